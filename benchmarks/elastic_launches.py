"""What a torch CUDA ``active_gpus=`` + ``previous=`` call launches, counted on the CPU (no GPU needed).

The torch CUDA call is host-bound: each tensor operation is a kernel launch of
10-20 us of host time, and a loop that runs on the device cannot stop early
(that would read the device), so every step of every loop runs. This counts,
for :func:`eplb.algorithms.elastic.place_elastic_stable` on torch CPU tensors
with every ``refine_rows`` round forced (as CUDA runs them):

- tensor operations (``TorchDispatchMode``; views and reshapes left out), and
- calls of the fused steps the torch CUDA adapter plugs in
  (``eplb.backends._torch._elastic_kernels``: ``relabel_pinned``,
  ``sticky_pack``, ``repair``, ``align_slots``, ``heaviest_gpu``,
  ``replicate_experts``, ``sticky_group_split``, ``group_split``), one launch each; on the CPU their numba twins or
  the numpy functions (equal to them bit for bit) stand in.

Real DeepSeek-V3 loads (``previous``: another SGLang file's placement), 288
slots (352 with a node down), tolerance ``None`` and 0.05, and the fresh
placement (no ``previous``). ``--baseline`` adds the count with torch ops
alone for the ``previous=`` calls (minutes on the CPU; the fresh ones always). The placements are
checked against numpy's. ``--capacity``: instead, ``gpu_capacity=`` calls (half the GPUs at 0.6),
with placement by time's kernels (``eplb.kernels.speed_triton``; their numba twins stand in) and
with torch ops alone.

    python benchmarks/elastic_launches.py [--baseline] [--capacity]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.keep_speed import load
from eplb import _xp
from eplb.algorithms import capacity as capacity_placement
from eplb.algorithms import elastic
from eplb.algorithms.replication import replicate_experts
from eplb.backends import _numba, _torch

VIEWS = {"view", "reshape", "_unsafe_view", "expand", "as_strided", "slice", "select", "unsqueeze", "squeeze"}
VIEWS |= {"alias", "detach", "t", "transpose", "permute", "lift_fresh", "unbind", "split", "split_with_sizes"}
CASES = [
    ("4 nodes / 32 GPUs, GPU 5 down", (288, 8, 4, 32), True, [5]),
    ("4 nodes / 32 GPUs, node 1 down (352 slots)", (352, 8, 4, 32), True, list(range(8, 16))),
    ("global, 144 GPUs, GPU 5 down", (288, 8, 3, 144), False, [5]),
]


FRESH_HOOKS = ("sticky_pack_fn", "replicate_fn", "split_fn")  # the fresh placement's kernels


class Launches(TorchDispatchMode):
    """Tensor operations (views left out) and fused calls, while ``counting``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.fused: collections.Counter = collections.Counter()
        self.counting = True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.counting and func.__name__.split(".")[0] not in VIEWS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def every_round(body: Any, rows: Any, max_iters: int, *, xp: Any) -> Any:
    """``refine_rows`` as CUDA runs it: no early exit."""
    for _ in range(max_iters):
        rows, _ = body(rows)
    return rows


def stand_ins(mode_of: Any) -> dict[str, Any]:
    """The fused steps as numba kernels on host copies, each counted as one launch."""
    from eplb.kernels import repair_numba, speed_numba

    def fused(name: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            mode = mode_of()
            mode.fused[name] += 1
            mode.counting = False
            args = [a.numpy() if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items() if k != "xp"}
            with torch._C._DisableTorchDispatch():
                out = fn(*args, **kwargs)
            mode.counting = True
            if isinstance(out, tuple):
                return tuple(torch.from_numpy(np.asarray(x)) for x in out)
            return torch.from_numpy(np.asarray(out))

        return run

    return {
        "relabel_pinned_fn": fused(
            "relabel_pinned", lambda n, o, live, g, num_nodes=1: repair_numba.relabel_pinned(n, o, live, g, num_nodes)
        ),
        "sticky_pack_fn": fused("sticky_pack", repair_numba.sticky_pack),
        "repair_fn": fused("repair", lambda *a, max_iters: repair_numba.repair(*a, max_iters)),
        "align_slots_fn": fused("align_slots", repair_numba.align_slots),
        "heaviest_gpu_fn": fused("heaviest_gpu", lambda w, p, c, g: elastic.live_heaviest_gpu(w, p, c, g, xp=np)),
        "replicate_fn": fused("replicate_experts", lambda w, r: replicate_experts(w, r, xp=np)),
        "group_split_fn": fused("sticky_group_split", lambda *a, **k: elastic.sticky_group_split(*a, **k, xp=np)),
        "split_fn": fused("group_split", lambda *a, **k: elastic.group_split(*a, **k, xp=np)),
        # gpu_capacity (eplb.kernels.speed_triton): its numba twins stand in
        "lpt_pack_fn": fused("lpt_pack_speed", speed_numba.lpt_pack_speed),
        "pair_pack_fn": fused("pair_pack_speed", speed_numba.pair_pack_speed),
        "swaps_fn": fused("refine_by_swaps_speed", speed_numba.refine_by_swaps_speed),
    }


CAPACITY_HOOKS = ("lpt_pack_fn", "pair_pack_fn", "swaps_fn", "replicate_fn", "sticky_pack_fn", "split_fn")
ELASTIC_HOOKS = (
    "relabel_pinned_fn", "sticky_pack_fn", "repair_fn", "align_slots_fn", "heaviest_gpu_fn", "replicate_fn",
    "group_split_fn", "split_fn",
)  # fmt: skip


def capacity_table(hooks: dict[str, Any], current: list[Launches], weight: np.ndarray) -> None:
    """``gpu_capacity=`` (half the GPUs at 0.6): launches with the kernels and with torch ops alone."""
    print("\n| call, half the GPUs at 0.6 | launches, kernels | of which fused | launches, torch ops alone |")
    print("| --- | --- | --- | --- |")
    for name, sizes, hierarchical in (
        ("global, 32 GPUs", (288, 8, 4, 32), False),
        ("global, 144 GPUs", (288, 8, 3, 144), False),
        ("4 nodes / 32 GPUs", (288, 8, 4, 32), True),
    ):
        capacity = np.ones(sizes[3], np.float32)
        capacity[1::2] = 0.6
        want = eplb.rebalance_experts(weight, *sizes, hierarchical=hierarchical, gpu_capacity=capacity).phy2log
        counts = []
        for plugged in (True, False):
            kernels = {k: hooks[k] for k in CAPACITY_HOOKS if hierarchical or k != "split_fn"} if plugged else {}
            current.append(Launches())
            with current[-1]:
                got = capacity_placement.place_capacity(
                    torch.as_tensor(weight, dtype=torch.float32), *sizes, gpu_capacity=torch.as_tensor(capacity),
                    hierarchical=hierarchical, uniform=False, node_fallback=False if hierarchical else None,
                    xp=_torch.xp, **kernels,
                )  # fmt: skip
            assert np.array_equal(got[0].numpy(), np.asarray(want)), "placement differs from numpy's"
            counts.append(current[-1])
        fused = sum(counts[0].fused.values())
        print(f"| {name} | {counts[0].ops + fused:,} | {fused} | {counts[1].ops:,} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", action="store_true", help="also count with torch ops alone (slow)")
    parser.add_argument("--capacity", action="store_true", help="gpu_capacity= calls instead")
    args = parser.parse_args()
    _numba.warm_up()
    _xp.refine_rows = every_round
    current: list[Launches] = []
    hooks = stand_ins(lambda: current[-1])
    weight, before = load("prefill_in2048.json"), load("prefill_in4096.json")
    if args.capacity:
        capacity_table(hooks, current, weight)
        return
    print("| call | tolerance | launches, kernels | of which fused | launches, torch ops alone |")
    print("| --- | --- | --- | --- | --- |")
    for name, sizes, hierarchical, dead in CASES:
        previous = torch.as_tensor(eplb.rebalance_experts(before, *sizes, hierarchical=hierarchical).phy2log)
        mask = torch.as_tensor(np.isin(np.arange(sizes[3]), dead, invert=True))
        for tolerance in (None, 0.05):
            want = eplb.rebalance_experts(weight, *sizes, hierarchical=hierarchical, previous=previous.numpy(),
                                          active_gpus=mask.numpy(), balance_tolerance=tolerance).phy2log  # fmt: skip
            counts = []
            for plugged in (True, False) if args.baseline else (True,):
                current.append(Launches())
                with current[-1]:
                    got = elastic.place_elastic_stable(
                        torch.as_tensor(weight, dtype=torch.float32), previous, *sizes, active_gpus=mask,
                        hierarchical=hierarchical, tolerance=tolerance, xp=_torch.xp,
                        **({k: hooks[k] for k in ELASTIC_HOOKS} if plugged else {}),
                    )  # fmt: skip
                assert np.array_equal(got[0].numpy(), want), "placement differs from numpy's"
                counts.append(current[-1])
            fused = sum(counts[0].fused.values())
            base = f"{counts[1].ops:,}" if len(counts) > 1 else "-"
            print(f"| {name} | {tolerance} | {counts[0].ops + fused:,} | {fused} | {base} |", flush=True)
        # The fresh placement (no previous=): its replication and packing, as the torch CUDA adapter plugs them.
        want = eplb.rebalance_experts(weight, *sizes, hierarchical=hierarchical, active_gpus=mask.numpy()).phy2log
        fresh = []
        for plugged in (True, False):
            current.append(Launches())
            with current[-1]:
                got = elastic.place_elastic(
                    torch.as_tensor(weight, dtype=torch.float32), *sizes, active_gpus=mask, hierarchical=hierarchical,
                    xp=_torch.xp, **({k: hooks[k] for k in FRESH_HOOKS} if plugged else {}),
                )  # fmt: skip
            assert np.array_equal(got[0].numpy(), want), "placement differs from numpy's"
            fresh.append(current[-1])
        fused = sum(fresh[0].fused.values())
        print(f"| {name}, no previous= | - | {fresh[0].ops + fused:,} | {fused} | {fresh[1].ops:,} |", flush=True)


if __name__ == "__main__":
    main()
