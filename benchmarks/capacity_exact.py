"""How far from the best placement is ``gpu_capacity=`` at two slots per GPU? An exact check by integer programming.

At 144 GPUs and 288 slots every GPU holds two replicas. There the lower
bound of ``eplb.metrics.lower_bound`` and our placement disagree by about 5%
(``benchmarks/capacity.py``); this script tells which of the two is off, on
sampled layers of the real DeepSeek-V3 loads, by solving the placement
problem exactly (SciPy's HiGHS MILP solver; SciPy is needed here only).

The model, for a target time ``T``: expert ``e`` gets ``r`` replicas
(``1 <= r <= R_MAX``) of load ``w_e / r`` each; the GPUs of one capacity ``c``
(a class: here the fast and the slow half) each take exactly two replicas
whose sum is at most ``T c``. Items that must pair with a sum at most ``C``
form a threshold graph, so a class's replicas pair up if and only if, for
every size ``tau > C / 2``, the replicas of size ``>= tau`` are no more than
those of size ``<= C - tau`` (Hall's condition on nested neighbourhoods).
Integer variables: the count choice per expert (binary) and how many of its
replicas each class takes. Bisection on ``T`` between the lower bound and
our placement's time gives the optimum within ``--tolerance``; a solve that
hits ``--time-limit`` stops the bisection and the bracket is reported as is.

Two replicas of one expert may share a GPU in this model (a valid if
wasteful placement), and counts stop at ``R_MAX`` (6): the "exact" figure is
the best placement with at most six replicas per expert, so it is a lower
bound on the best time only within that class (ours uses at most four here).

Per layer: our time-balance (``rebalance_experts(..., gpu_capacity=c)``),
the lower bound's, and the exact optimum's bracket; equal speeds too (the
greedy and the refined policy against the exact optimum).

    python benchmarks/capacity_exact.py [--files 2] [--every 15] [--equal]
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

R_MAX = 6
NUM_GPUS, NUM_SLOTS, NUM_NODES = 144, 288, 18


def pairable(weight: np.ndarray, classes: list[tuple[int, float]], target: float, time_limit: float) -> bool | None:
    """Whether ``weight [E]`` (float64) fits: ``classes`` = (GPUs, capacity) pairs, two slots each, time ``target``.

    ``True``/``False``; ``None`` when the solver hit ``time_limit`` seconds.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    num_experts, num_classes = len(weight), len(classes)
    options = [(e, r) for e in range(num_experts) for r in range(1, R_MAX + 1)]
    size = np.array([weight[e] / r for e, r in options])
    num_options = len(options)
    num_vars = num_options * (1 + num_classes)  # choice z[o], then takes y[o, k]

    def take(o: int, k: int) -> int:
        return num_options + o * num_classes + k

    rows: list[tuple[dict[int, float], float, float]] = []
    for e in range(num_experts):  # one count per expert
        rows.append(({e * R_MAX + i: 1.0 for i in range(R_MAX)}, 1.0, 1.0))
    for o, (_, r) in enumerate(options):  # its r replicas go to the classes
        coeffs = {take(o, k): 1.0 for k in range(num_classes)}
        coeffs[o] = -float(r)
        rows.append((coeffs, 0.0, 0.0))
    upper = np.full(num_vars, np.inf)
    upper[:num_options] = 1.0
    for k, (gpus, cap) in enumerate(classes):
        limit = target * cap
        rows.append(({take(o, k): 1.0 for o in range(num_options)}, 2.0 * gpus, 2.0 * gpus))
        upper[[take(o, k) for o in range(num_options) if size[o] > limit]] = 0.0
        for tau in sorted({s for s in size if limit / 2 < s <= limit}, reverse=True):
            coeffs: dict[int, float] = {}
            for o in range(num_options):
                if size[o] >= tau:
                    coeffs[take(o, k)] = coeffs.get(take(o, k), 0.0) + 1.0
                if size[o] <= limit - tau:
                    coeffs[take(o, k)] = coeffs.get(take(o, k), 0.0) - 1.0
            rows.append((coeffs, -np.inf, 0.0))
    matrix = lil_matrix((len(rows), num_vars))
    lower_rhs, upper_rhs = np.empty(len(rows)), np.empty(len(rows))
    for i, (coeffs, lo, hi) in enumerate(rows):
        for j, v in coeffs.items():
            matrix[i, j] = v
        lower_rhs[i], upper_rhs[i] = lo, hi
    result = milp(
        np.zeros(num_vars),
        constraints=LinearConstraint(matrix.tocsr(), lower_rhs, upper_rhs),
        integrality=np.ones(num_vars),
        bounds=Bounds(np.zeros(num_vars), upper),
        options={"time_limit": time_limit},
    )
    if result.status == 0:
        return True
    if result.status == 2:
        return False
    return None


def exact_bracket(
    weight: np.ndarray, classes: list[tuple[int, float]], low: float, high: float, tolerance: float, time_limit: float
) -> tuple[float, float]:
    """(infeasible time, feasible time): bisection between ``low`` (a bound) and ``high`` (a placement's time)."""
    while high - low > tolerance * high:
        middle = (low + high) / 2
        fits = pairable(weight, classes, middle, time_limit)
        if fits is None:
            break
        low, high = (low, middle) if fits else (middle, high)
    return low, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2, help="SGLang files, in name order")
    parser.add_argument("--every", type=int, default=15, help="every k-th layer")
    parser.add_argument("--equal", action="store_true", help="equal speeds (greedy, refined) instead")
    parser.add_argument("--tolerance", type=float, default=2e-3)
    parser.add_argument("--time-limit", type=float, default=120.0)
    args = parser.parse_args()
    capacity = np.ones(NUM_GPUS) if args.equal else capacity_bench.half_slow(NUM_GPUS, "alternate")
    fast = int((capacity == 1.0).sum())
    classes = [(fast, 1.0)] + ([(NUM_GPUS - fast, float(capacity.min()))] if fast < NUM_GPUS else [])
    speeds = {} if args.equal else {"gpu_capacity": capacity}
    policies = ("greedy", "refined") if args.equal else ("greedy",)
    sizes = (NUM_SLOTS, 8, NUM_NODES, NUM_GPUS)
    print("| file | layer | " + " | ".join(policies) + " | lower bound | exact optimum | best ours / exact | s |")
    print("|" + " --- |" * (len(policies) + 6))
    ratios = []
    for name, loads in capacity_bench.loads()[: args.files]:
        for layer in range(0, loads.shape[0], args.every):
            w = loads[layer : layer + 1].astype(np.float32)
            ideal = float(w.sum(dtype=np.float64) / capacity.sum())
            ours = []
            for policy in policies:
                placement = eplb.rebalance_experts(w, *sizes, policy=policy, **speeds).phy2log
                ours.append(float(eplb.metrics.balancedness(w.astype(np.float64), placement, NUM_GPUS, **speeds)[0]))
            bound = float(eplb.metrics.lower_bound(w, *sizes, **speeds)[0])
            start = time.perf_counter()
            low, high = exact_bracket(
                w[0].astype(np.float64), classes, bound * (1 - 1e-6), ideal / max(ours) * (1 + 1e-9),
                args.tolerance, args.time_limit,
            )  # fmt: skip
            ratio = max(ours) / (ideal / high)
            ratios.append(ratio)
            cells = " | ".join(f"{b:.4f}" for b in ours)
            print(
                f"| {name} | {layer} | {cells} | {ideal / bound:.4f} | {ideal / high:.4f}-{ideal / low:.4f} | "
                f"{ratio:.4f} | {time.perf_counter() - start:.0f} |",
                flush=True,
            )
    print(f"\nmean best ours / exact: {np.mean(ratios):.4f} over {len(ratios)} layers")


if __name__ == "__main__":
    main()
