"""Two slots per GPU: the refined policy's pair stage against the greedy policy, on real DeepSeek-V3 loads.

Every SGLang file in ../shared/data/deepseek-v3-sglang (EPLB_DATA_DIR
overrides; ``logical_count`` [61, 256], all-zero layers dropped), 288 slots
on 144 GPUs: the global policy, and the hierarchical one on 4 and 2 nodes
(8 groups). Balancedness = mean GPU load / max GPU load, mean over layers,
scored in float64 (``tests/oracle.py``-style, plain numpy); "bound": the
mean over the lower bound (``eplb.metrics.lower_bound``); "gained": layers
whose heaviest GPU the refined policy lowered by more than 0.1%.

Then the median time of one call (61 layers, warm, 2-core CPU) of the
greedy and the refined policy on numpy (numba kernels), torch CPU and JAX
CPU, and the refined call with the pair search forced to the array-API
path (``impl="xp"``).

``--devices``: instead, the refined call on torch (CUDA where present) and
JAX (its default device), each checked equal to numpy, and on CUDA the pair
search's Triton kernel alone (``eplb.kernels.pairs_triton``) on greedy's
counts of the global rows (256 experts in 288 slots) and of the per-node rows
of 4 nodes (64 in 72), checked equal to the numba kernel; median of warm
calls ended by a synchronisation, ``prefill_in2048``.

    python benchmarks/pairs.py [--runs N] [--devices]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.capacity import loads
from benchmarks.timing import host_median_ms
from tests.oracle import gpu_loads64

# name -> (replicas, groups, nodes, gpus, hierarchical)
CONFIGS = {
    "global, 144 GPUs": (288, 8, 1, 144, False),
    "hierarchical, 4 nodes / 144 GPUs": (288, 8, 4, 144, True),
    "hierarchical, 2 nodes / 144 GPUs": (288, 8, 2, 144, True),
}


def quality(data: list[tuple[str, np.ndarray]]) -> str:
    lines = [
        "| config | greedy | refined | bound | refined / greedy heaviest GPU (mean, min) | layers gained |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (replicas, groups, nodes, gpus, hierarchical) in CONFIGS.items():
        sizes = (replicas, groups, nodes, gpus)
        figures: dict[str, list] = {"greedy": [], "refined": [], "bound": [], "ratio": [], "gained": []}
        for _, w in data:
            mean = w.sum(axis=1) / gpus
            plain = eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical)
            greedy = gpu_loads64(w, plain.phy2log, gpus).max(axis=1)
            placement = eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical, policy="refined")
            refined = gpu_loads64(w, placement.phy2log, gpus).max(axis=1)
            bound = eplb.metrics.lower_bound(w, *sizes, hierarchical=hierarchical)
            figures["greedy"].append(mean / greedy)
            figures["refined"].append(mean / refined)
            figures["bound"].append(mean / bound)
            figures["ratio"].append(refined / greedy)
            figures["gained"].append(refined < greedy * (1 - 1e-3))
        cat = {k: np.concatenate(v) for k, v in figures.items()}
        lines.append(
            f"| {name} | {cat['greedy'].mean():.4f} | {cat['refined'].mean():.4f} | {cat['bound'].mean():.4f} | "
            f"{cat['ratio'].mean():.4f}, {cat['ratio'].min():.4f} | {int(cat['gained'].sum())} / {cat['gained'].size} |"
        )
    return "\n".join(lines)


def _jax_call(weight, args, kw) -> None:
    eplb.rebalance_experts(weight, *args, **kw).phy2log.block_until_ready()


def speed(data: list[tuple[str, np.ndarray]], runs: int) -> str:
    import jax.numpy as jnp
    import torch

    from eplb.backends import _numba, _numpy

    _numba.warm_up()
    w = dict(data)["prefill_in2048"].astype(np.float32)
    header = ("config", "greedy numpy", "refined numpy", "refined torch CPU", "refined JAX CPU", "refined, array API")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, (replicas, groups, nodes, gpus, hierarchical) in CONFIGS.items():
        args = (replicas, groups, nodes, gpus)
        kw = {"hierarchical": hierarchical, "policy": "refined"}
        calls = [
            functools.partial(eplb.rebalance_experts, w, *args, hierarchical=hierarchical),
            functools.partial(eplb.rebalance_experts, w, *args, **kw),
            functools.partial(eplb.rebalance_experts, torch.as_tensor(w), *args, **kw),
            functools.partial(_jax_call, jnp.asarray(w), args, kw),
            functools.partial(_numpy.rebalance, w, *args, impl="xp", **kw),
        ]
        ms = [host_median_ms(call, runs) for call in calls]
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f}" for m in ms) + " |")
    return "\n".join(lines)


def devices(weight: np.ndarray, runs: int) -> str:
    """ms of the refined call on torch and JAX (checked equal to numpy), and of the Triton pair search."""
    import jax
    import jax.numpy as jnp
    import torch

    from eplb.algorithms.pairs import default_pair_iterations

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"

    def synced(fn):
        def call():
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            return out

        return call

    torch_name, jax_name = f"torch {'CUDA' if cuda else 'CPU'}", f"JAX {jax.default_backend()}"
    header = f"| config | refined, {torch_name} ms | equal | {jax_name} ms | equal |"
    lines = [header, "| --- | --- | --- | --- | --- |"]
    for name, (replicas, groups, nodes, gpus, hierarchical) in CONFIGS.items():
        args, kw = (replicas, groups, nodes, gpus), {"hierarchical": hierarchical, "policy": "refined"}
        want = eplb.rebalance_experts(weight, *args, **kw)
        w_t, w_j = torch.as_tensor(weight, device=device), jnp.asarray(weight)
        torch_call = synced(functools.partial(eplb.rebalance_experts, w_t, *args, **kw))
        equal_t = all(np.array_equal(g.cpu().numpy(), e) for g, e in zip(torch_call(), want, strict=True))
        equal_j = all(np.array_equal(np.asarray(g), e) for g, e in zip(eplb.rebalance_experts(w_j, *args, **kw), want,
                                                                        strict=True))  # fmt: skip
        ms_t = host_median_ms(torch_call, runs)
        ms_j = host_median_ms(functools.partial(_jax_call, w_j, args, kw), runs)
        lines.append(f"| {name} | {ms_t:.2f} | {equal_t} | {ms_j:.2f} | {equal_j} |")
    if not cuda:
        return "\n".join([*lines, "", "(no CUDA device: the Triton pair kernel was not timed)"])
    from eplb.kernels import pairs_numba, pairs_triton

    lines += ["", "| pair search rows | Triton kernel ms | equal to numba |", "| --- | --- | --- |"]
    for rows, slots in ((weight, 288), (weight.reshape(-1, 64), 72)):
        count = np.asarray(eplb.replicate_experts(rows, slots)[2])  # the greedy policy's replica counts
        rounds = default_pair_iterations(slots, rows.shape[1])
        want = pairs_numba.pair_counts(rows, count, slots, rounds)
        w_t, c_t = torch.as_tensor(rows, device=device), torch.as_tensor(count, device=device)
        kernel = synced(functools.partial(pairs_triton.pair_counts, w_t, c_t, slots, rounds))
        equal = np.array_equal(kernel().cpu().numpy(), want)
        label = f"{rows.shape[0]} x {rows.shape[1]} experts in {slots} slots, {rounds} rounds"
        lines.append(f"| {label} | {host_median_ms(kernel, runs):.3f} | {equal} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed calls per median")
    parser.add_argument("--devices", action="store_true", help="time torch (CUDA) and JAX calls instead")
    args = parser.parse_args()
    data = loads()
    if args.devices:
        print(devices(dict(data)["prefill_in2048"].astype(np.float32), args.runs))
        return
    print(f"{len(data)} SGLang DeepSeek-V3 load files, 288 slots on 144 GPUs (two per GPU)\n")
    print(quality(data))
    print("\nms per call (61 layers, prefill_in2048, median of warm calls)\n")
    print(speed(data, args.runs))


if __name__ == "__main__":
    main()
