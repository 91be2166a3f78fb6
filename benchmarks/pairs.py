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

    python benchmarks/pairs.py [--runs N]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed calls per median")
    args = parser.parse_args()
    data = loads()
    print(f"{len(data)} SGLang DeepSeek-V3 load files, 288 slots on 144 GPUs (two per GPU)\n")
    print(quality(data))
    print("\nms per call (61 layers, prefill_in2048, median of warm calls)\n")
    print(speed(data, args.runs))


if __name__ == "__main__":
    main()
