"""Keep-in-place planning on GPUs of unequal speed: ``gpu_capacity=`` with ``previous=``, moves and time-balance.

Half the GPUs at 0.6 (``benchmarks/capacity.py``'s layouts and configs, 288
slots). Per trace and config, chains of re-plans over the same windows, each
call given the last result (the first window planned fresh):

- oblivious: ``rebalance_experts(w, ..., gpu_capacity=c)`` every time (no ``previous``);
- ``previous=`` alone, and with ``balance_tolerance`` 0.005 and 0.05.

Moved experts are counted by the plain-Python counter of ``tests/oracle.py``
(new ``(expert, GPU)`` pairs), time-balance by its float64 scorer
(``oracle.capacity_balance64``: (total load / total capacity) / slowest GPU's
time) on the window planned for, mean over layers and steps. Traces: the 12
SGLang DeepSeek-V3 files in name order (all-zero layers dropped from every
file where any is zero), and lognormal drift 0.03 and 0.1 of DeepSeek-V3's
shape (16 layers, 9 windows). ms: median numpy call of the chain (2-core CPU).

``--devices``: instead, the keep-in-place call on torch (CUDA where present)
and JAX (its default device, under ``jit`` with the tolerance traced):
``prefill_in4096`` planned by numpy, then ``prefill_in2048`` re-planned with
``previous=`` and ``balance_tolerance=0.005``, the first layout of each
config; the median of warm calls (ended by a synchronisation), each result
and the fresh placement checked equal to numpy's, bit for bit. Also JAX's
keep-in-place call forced to XLA (``impl="xla"``: the array API under
``vmap``, what JAX GPUs ran before the Pallas kernels), checked too.

    python benchmarks/capacity_keep.py [--quick | --devices]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.capacity import CONFIGS, half_slow, loads
from benchmarks.migration import drifting
from tests import oracle

TOLERANCES = (None, 0.005, 0.05)


def chain(windows: list[np.ndarray], sizes: tuple, caps: np.ndarray, tolerance: object) -> tuple[int, float, float]:
    """Moved experts over the chain, mean time-balance, median ms a call (``tolerance`` ``"oblivious"``: no
    ``previous``)."""
    replicas, groups, nodes, gpus, hierarchical = sizes
    config = {"hierarchical": hierarchical, "gpu_capacity": caps}
    placement = eplb.rebalance_experts(windows[0], replicas, groups, nodes, gpus, **config).phy2log
    moved, balance, times = 0, [], []
    for weight in windows[1:]:
        keep = {} if tolerance == "oblivious" else {"previous": placement, "balance_tolerance": tolerance}
        start = time.perf_counter()
        result = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, **config, **keep).phy2log
        times.append(time.perf_counter() - start)
        moved += int(oracle.moves(placement, result, gpus).sum())
        balance.append(float(oracle.capacity_balance64(weight, result, gpus, caps).mean()))
        placement = result
    return moved, float(np.mean(balance)), float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the real files only, one layout per config")
    parser.add_argument("--devices", action="store_true", help="time torch (CUDA) and JAX calls instead")
    args = parser.parse_args()
    if args.devices:
        print(devices())
        return
    from eplb.backends import _numba

    _numba.warm_up()
    files = loads()
    traces = []
    if files:
        keep = np.all([f.sum(axis=1) > 0 for f in (np.asarray(_full(name)) for name, _ in files)], axis=0)
        traces.append(("DeepSeek-V3 files", [_full(name)[keep] for name, _ in files]))
    if not args.quick:
        for drift in (0.03, 0.1):
            traces.append((f"lognormal drift {drift}", drifting(16, 256, 9, drift, seed=1)))
    print("| trace | config | slow half | rule | moved | share of oblivious | time-balance | ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for trace, windows in traces:
        for name, (replicas, groups, nodes, gpus, hierarchical, layouts) in CONFIGS.items():
            for layout in layouts[:1] if args.quick else layouts:
                caps = half_slow(gpus, layout)
                sizes = (replicas, groups, nodes, gpus, hierarchical)
                oblivious = chain(windows, sizes, caps, "oblivious")
                rows = [("oblivious", oblivious)] + [(f"previous=, tolerance {t}", chain(windows, sizes, caps, t))
                                                     for t in TOLERANCES]  # fmt: skip
                for rule, (moved, balance, ms) in rows:
                    share = moved / max(oblivious[0], 1)
                    print(
                        f"| {trace} | {name} | {layout} | {rule} | {moved} | {share:.1%} | {balance:.4f} | {ms:.1f} |"
                    )


def devices(runs: int = 10, tolerance: float = 0.005) -> str:
    """ms of one keep-in-place call on torch (CUDA where present) and JAX (its default, and forced to XLA: the
    array API under ``vmap``), each checked equal to numpy."""
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.timing import host_median_ms
    from eplb.backends import _jax

    cuda = torch.cuda.is_available()
    before, after = (np.asarray(_full(name)) for name in ("prefill_in4096", "prefill_in2048"))
    live = (before.sum(axis=1) > 0) & (after.sum(axis=1) > 0)
    before, after = before[live], after[live]
    backend = jax.default_backend()
    torch_name = "CUDA" if cuda else "CPU"
    header = f"| config | torch {torch_name} ms | equal | JAX {backend} ms | equal | JAX {backend}, XLA ms |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    for name, (replicas, groups, nodes, gpus, hierarchical, layouts) in CONFIGS.items():
        sizes, caps = (replicas, groups, nodes, gpus), half_slow(gpus, layouts[0])
        kw = {"hierarchical": hierarchical, "gpu_capacity": caps}
        previous = np.asarray(eplb.rebalance_experts(before, *sizes, **kw).phy2log)
        want = [*eplb.rebalance_experts(after, *sizes, **kw)]
        want += [*eplb.rebalance_experts(after, *sizes, **kw, previous=previous, balance_tolerance=tolerance)]

        device = "cuda" if cuda else "cpu"
        w_t, prev_t = torch.as_tensor(after, device=device), torch.as_tensor(previous, device=device)
        kw_t = {**kw, "gpu_capacity": torch.as_tensor(caps, dtype=torch.float32, device=device)}

        def torch_call(kw_t=kw_t, w_t=w_t, prev_t=prev_t, sizes=sizes):
            out = eplb.rebalance_experts(w_t, *sizes, **kw_t, previous=prev_t, balance_tolerance=tolerance)
            if cuda:
                torch.cuda.synchronize()
            return out

        got_t = [*eplb.rebalance_experts(w_t, *sizes, **kw_t), *torch_call()]
        plan = jax.jit(
            lambda w, p, c, t, sizes=sizes, h=hierarchical: tuple(
                eplb.rebalance_experts(w, *sizes, hierarchical=h, gpu_capacity=c, previous=p, balance_tolerance=t)
            )
        )
        w_j, prev_j, caps_j = jnp.asarray(after, jnp.float32), jnp.asarray(previous), jnp.asarray(caps, jnp.float32)

        def jax_call(plan=plan, w_j=w_j, prev_j=prev_j, caps_j=caps_j):
            return jax.block_until_ready(plan(w_j, prev_j, caps_j, jnp.float32(tolerance)))

        options = {"hierarchical": hierarchical, "policy": "greedy", "spill": 0, "max_moves": None}
        plan_xla = jax.jit(
            lambda w, p, c, t, sizes=sizes, o=options: _jax.rebalance_stable(
                w, p, *sizes, impl="xla", gpu_capacity=c, tolerance=t, **o
            )
        )

        def xla_call(plan=plan_xla, w_j=w_j, prev_j=prev_j, caps_j=caps_j):
            return jax.block_until_ready(plan(w_j, prev_j, caps_j, jnp.float32(tolerance)))

        got_j = [*eplb.rebalance_experts(w_j, *sizes, hierarchical=hierarchical, gpu_capacity=caps_j), *jax_call()]
        got_j += [*xla_call()]
        want_j = want + want[3:]
        equal_t = all(np.array_equal(np.asarray(g.cpu()), np.asarray(e)) for g, e in zip(got_t, want, strict=True))
        equal_j = all(np.array_equal(np.asarray(g), np.asarray(e)) for g, e in zip(got_j, want_j, strict=True))
        ms_t, ms_j = host_median_ms(torch_call, runs), host_median_ms(jax_call, runs)
        ms_x = host_median_ms(xla_call, runs)
        lines.append(f"| {name} | {ms_t:.1f} | {equal_t} | {ms_j:.1f} | {equal_j} | {ms_x:.1f} |")
    return "\n".join(lines)


def _full(name: str) -> np.ndarray:
    """One SGLang file's ``logical_count`` [61, 256], every layer."""
    import json

    from benchmarks.capacity import DATA

    return np.asarray(json.loads((DATA / "deepseek-v3-sglang" / f"{name}.json").read_text())["logical_count"])


if __name__ == "__main__":
    main()
