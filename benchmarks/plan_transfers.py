"""Transfer planning speed and send spread: ``eplb.plan_transfers`` against the old sequential greedy.

A full reshuffle (old and new placements unrelated) of 58 layers x 288 slots,
256 experts, at two shapes: DeepSeek-V3 on 32 GPUs over 4 nodes, and 144 GPUs
(2 slots each) over 18 nodes of 8. Placements: fresh
``eplb.rebalance_experts`` plans of two different real DeepSeek-V3 SGLang load
files from ../shared/data (EPLB_DATA_DIR overrides), and uniformly random
placements (every expert at least once; also with 64 experts, 4.5 copies
each, where most copies have several candidate sources). Per shape and
reshuffle:

- ms: median of ``--runs`` warm calls (host clock) of ``plan_transfers`` and
  of the old rule (``plan_transfers_reference`` in tests/oracle.py: the
  released sequential greedy as plain Python, fewer runs);
- send spread of both plans: the most copies one GPU sends in one layer (max
  over layers, and mean over layers of the per-layer max), the most one GPU
  sends over the whole plan, and the copies that cross nodes (the same for
  both rules: those whose expert no GPU of the destination's node holds).

    python benchmarks/plan_transfers.py [--runs 50] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.timing import host_median_ms
from tests.oracle import plan_transfers_reference

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
# label: (rebalance_experts config (R, groups, nodes, GPUs), nodes for the plan)
SHAPES = {"DeepSeek-V3, 32 GPUs / 4 nodes": ((288, 8, 4, 32), 4), "144 GPUs / 18 nodes": ((288, 8, 3, 144), 18)}
PAIRS = [("prefill_in4096.json", "prefill_in2048.json"), ("decode_in1000out1000.json", "prefill_in512.json")]
COLUMNS = ("layer", "expert", "src_gpu", "src_slot", "dst_gpu", "dst_slot", "stage")


def load(name: str) -> np.ndarray:
    counts = np.asarray(json.loads((DATA / "deepseek-v3-sglang" / name).read_text())["logical_count"], np.int64)
    return counts[counts.sum(axis=1) > 0]


def random_placement(rng: np.random.Generator, layers: int, experts: int, slots: int) -> np.ndarray:
    """Every expert at least once, the other slots random, shuffled."""
    rows = [np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)]) for _ in range(layers)]
    return np.stack([rng.permutation(row) for row in rows])


def spread(layer, src_gpu, dst_gpu, num_layers: int, num_gpus: int, per_node: int) -> tuple[int, float, int, int]:
    """(max sends of a GPU in a layer, mean over layers of that max, max sends of a GPU over the plan, cross-node)."""
    remote = src_gpu != dst_gpu
    sends = np.bincount(layer[remote] * num_gpus + src_gpu[remote], minlength=num_layers * num_gpus)
    sends = sends.reshape(num_layers, num_gpus)
    cross = int((src_gpu[remote] // per_node != dst_gpu[remote] // per_node).sum())
    return int(sends.max()), float(sends.max(axis=1).mean()), int(sends.sum(axis=0).max()), cross


def reshuffles(config: tuple) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for first, second in PAIRS:
        old, new = (np.asarray(eplb.rebalance_experts(load(name), *config).phy2log) for name in (first, second))
        out[f"real {first[:-5]} -> {second[:-5]}"] = (old, new)
    rng = np.random.default_rng(0)
    layers, slots = out[next(iter(out))][0].shape
    out["random"] = (random_placement(rng, layers, 256, slots), random_placement(rng, layers, 256, slots))
    # Heavy replication (4.5 copies an expert): many copies with several candidates, the slowest case.
    out["random, 64 experts"] = (random_placement(rng, layers, 64, slots), random_placement(rng, layers, 64, slots))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    lines = [
        "| shape | reshuffle | copies (remote) | new ms | old ms | speed-up | max sends / GPU / layer (new, old) "
        "| mean over layers (new, old) | max sends / GPU, plan (new, old) | cross-node (new, old) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print(lines[0], flush=True)
    cases = [
        (shape, name, old, new, config[3], nodes)
        for shape, (config, nodes) in SHAPES.items()
        for name, (old, new) in reshuffles(config).items()
    ]
    try:  # rebalance_experts started loading eplb's optional numba kernels in a thread: keep it out of the times
        from eplb.backends import _numba

        _numba.warm_up()
    except Exception:  # numba missing or broken: nothing to wait for
        pass
    for _ in range(3):  # warm every case first
        for _, _, old, new, gpus, nodes in cases:
            eplb.plan_transfers(old, new, num_gpus=gpus, num_nodes=nodes)
    for shape, name, old, new, gpus, nodes in cases:
        layers = old.shape[0]

        def call(old=old, new=new, gpus=gpus, nodes=nodes):
            return eplb.plan_transfers(old, new, num_gpus=gpus, num_nodes=nodes)

        plan = call()
        new_ms = host_median_ms(call, args.runs)
        old_lists, new_lists = old.tolist(), new.tolist()
        old_ms = host_median_ms(
            lambda a=old_lists, b=new_lists, g=gpus, n=nodes: plan_transfers_reference(a, b, g, n),
            max(3, args.runs // 10),
        )
        rows = plan_transfers_reference(old_lists, new_lists, gpus, nodes)
        ref = dict(zip(COLUMNS, (np.array(column, dtype=np.int64) for column in zip(*rows, strict=True)), strict=True))
        got = spread(plan.layer, plan.src_gpu, plan.dst_gpu, layers, gpus, gpus // nodes)
        want = spread(ref["layer"], ref["src_gpu"], ref["dst_gpu"], layers, gpus, gpus // nodes)
        cells = [
            shape,
            name,
            f"{len(plan)} ({int(plan.remote_copies.sum())})",
            f"{new_ms:.2f}",
            f"{old_ms:.1f}",
            f"{old_ms / new_ms:.0f}x",
            f"{got[0]}, {want[0]}",
            f"{got[1]:.2f}, {want[1]:.2f}",
            f"{got[2]}, {want[2]}",
            f"{got[3]}, {want[3]}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
