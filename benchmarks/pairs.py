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
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

# name -> (replicas, groups, nodes, gpus, hierarchical)
CONFIGS = {
    "global, 144 GPUs": (288, 8, 1, 144, False),
    "hierarchical, 4 nodes / 144 GPUs": (288, 8, 4, 144, True),
    "hierarchical, 2 nodes / 144 GPUs": (288, 8, 2, 144, True),
}


def loads() -> list[tuple[str, np.ndarray]]:
    out = []
    for path in sorted((DATA / "deepseek-v3-sglang").glob("*.json")):
        counts = np.asarray(json.loads(path.read_text())["logical_count"], np.int64)
        out.append((path.stem, counts[counts.sum(axis=1) > 0]))
    return out


def heaviest64(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L]`` float64: the heaviest GPU's load, each replica carrying ``w / count``."""
    phy2log = np.asarray(phy2log)
    rows = np.arange(phy2log.shape[0])[:, None]
    count = np.stack([np.bincount(row, minlength=weight.shape[1]) for row in phy2log])
    slot = weight.astype(np.float64)[rows, phy2log] / count[rows, phy2log]
    return slot.reshape(phy2log.shape[0], num_gpus, -1).sum(axis=2).max(axis=1)


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
            greedy = heaviest64(w, eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical).phy2log, gpus)
            refined = heaviest64(
                w, eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical, policy="refined").phy2log, gpus
            )
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


def _median_ms(call, runs: int) -> float:
    call()
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


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
        ms = [_median_ms(call, runs) for call in calls]
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
