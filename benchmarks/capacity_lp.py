"""GPUs of unequal speed at two slots per GPU, against a near-exact bound: ``eplb.metrics.lower_bound_lp``.

``benchmarks/capacity.py`` scores ``rebalance_experts(..., gpu_capacity=)``
against ``eplb.metrics.lower_bound``; at 288 slots on 144 GPUs (two a GPU)
that bound sits percents below the best placement (``capacity_exact.py``).
This script scores the same placements against the linear relaxation of the
exact model (``lower_bound_lp``: SciPy, seconds a layer), on every
``--every``-th layer of the 12 SGLang DeepSeek-V3 files (all-zero layers
dropped), global policy, 144 GPUs. Per capacity vector, mean over the layers
of bound / slowest time ("ours / bound"; 1.0 = provably the best placement):

- ours / LP bound and ours / ``lower_bound``;
- capacity-blind / LP bound (the greedy without speeds; blind to speeds, not
  to idle GPUs);
- the share of layers within 2% of the LP bound.

``--vectors``: the other capacity vectors of ``capacity.py --vectors`` too, and
equal speeds (the greedy and refined policies).

    python benchmarks/capacity_lp.py [--every 4] [--files 12] [--vectors]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import capacity as capacity_bench

import eplb

NUM_GPUS, NUM_SLOTS = 144, 288


def _slowest(weight: np.ndarray, phy2log, caps: np.ndarray) -> np.ndarray:
    return np.asarray(eplb.metrics.gpu_times(weight, phy2log, NUM_GPUS, caps)).max(axis=-1)


def row(layers: np.ndarray, caps: np.ndarray | None, policies: tuple[str, ...]) -> dict[str, float]:
    """Means over ``layers [L, E]`` (float32) of bound / slowest time, for ours and capacity-blind placements."""
    speeds = {} if caps is None else {"gpu_capacity": caps}
    scored = np.ones(NUM_GPUS) if caps is None else caps
    start = time.perf_counter()
    lp = eplb.metrics.lower_bound_lp(layers, NUM_SLOTS, NUM_GPUS, **speeds)
    seconds = time.perf_counter() - start
    plain = np.asarray(eplb.metrics.lower_bound(layers, NUM_SLOTS, 1, 1, NUM_GPUS, **speeds), np.float64)
    out = {"layers": float(layers.shape[0]), "s / layer": seconds / layers.shape[0]}
    for policy in policies:
        placement = eplb.rebalance_experts(layers, NUM_SLOTS, 1, 1, NUM_GPUS, policy=policy, **speeds).phy2log
        slowest = _slowest(layers, placement, scored)
        out[f"{policy} / LP"] = float(np.mean(lp / slowest))
        out[f"{policy} / bound"] = float(np.mean(plain / slowest))
        out[f"{policy} within 2%"] = float(np.mean(lp / slowest >= 0.98))
    if caps is not None:
        up = {"active_gpus": caps > 0} if (caps == 0).any() else {}
        blind = eplb.rebalance_experts(layers, NUM_SLOTS, 1, 1, NUM_GPUS, **up).phy2log
        out["blind / LP"] = float(np.mean(lp / _slowest(layers, blind, scored)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=4, help="every k-th layer of each file")
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--vectors", action="store_true", help="the other capacity vectors and equal speeds too")
    args = parser.parse_args()
    data = capacity_bench.loads()[: args.files]
    layers = np.concatenate([w[:: args.every] for _, w in data]).astype(np.float32)
    vectors = {"half at 0.6 (alternate)": capacity_bench.half_slow(NUM_GPUS, "alternate")}
    if args.vectors:
        vectors = {**capacity_bench.other_vectors(NUM_GPUS), "equal speeds": None}
    print(f"{layers.shape[0]} layers (every {args.every}-th of {len(data)} files), 288 slots, global, 144 GPUs\n")
    print("| capacities | ours / LP bound | ours / lower_bound | within 2% of LP | blind / LP bound | s a layer |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, caps in vectors.items():
        policies = ("greedy", "refined") if caps is None else ("greedy",)
        r = row(layers, caps, policies)
        for policy in policies:
            label = name if caps is not None else f"{name}, {policy}"
            blind = f"{r['blind / LP']:.4f}" if caps is not None else "-"
            print(
                f"| {label} | {r[f'{policy} / LP']:.4f} | {r[f'{policy} / bound']:.4f} | "
                f"{r[f'{policy} within 2%']:.0%} | {blind} | {r['s / layer']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
