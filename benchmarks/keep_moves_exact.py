"""The fewest moves any placement within ``balance_tolerance`` needs: an exact check by integer programming.

``benchmarks/keep_moves.py`` measures the moves of ``previous=`` +
``balance_tolerance`` as a share of an oblivious chain's. This script asks how
low that share can go at all: per layer and decision of the same chains, the
fewest new ``(expert, GPU)`` pairs (counted as multisets, as
``tests/oracle.moves`` does) of any global placement whose heaviest GPU is
within ``fresh plan's heaviest GPU x (1 + tolerance)`` (float64), by SciPy's
HiGHS MILP solver (SciPy is needed here only).

The model: expert ``e`` gets ``r`` replicas (``1 <= r <= R - E + 1``) of load
``w_e / r``; ``u[e, g, r]`` of them on GPU ``g``; every GPU fills its ``S``
slots and carries at most the limit; a move is a replica beyond the old
placement's count of that expert on that GPU. With a time limit the solver's
proven lower bound is reported (``>=``). Counts go up to ``R - E + 1`` (every
extra slot to one expert), so the model holds every placement.

    python benchmarks/keep_moves_exact.py [--steps 3] [--layers 24] [--time-limit 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.migration import llama_windows
from tests import oracle


def fewest_moves(
    weight: np.ndarray, old_row: np.ndarray, num_gpus: int, limit: float, time_limit: float
) -> tuple[float, float | None]:
    """(proven lower bound, best found or None) on the moves of one layer ``weight [E]`` from ``old_row [R]``."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    num_experts, num_slots = len(weight), len(old_row)
    per_gpu = num_slots // num_gpus
    old = np.zeros((num_experts, num_gpus))
    for slot, e in enumerate(old_row):
        old[e, slot // per_gpu] += 1
    # Variables: z[e, r] (E * RM), u[e, g, r] (E * G * RM), m[e, g] (E * G).
    rm = num_slots - num_experts + 1  # every count a placement can give
    nz, nu = num_experts * rm, num_experts * num_gpus * rm

    def z(e: int, r: int) -> int:
        return e * rm + (r - 1)

    def u(e: int, g: int, r: int) -> int:
        return nz + (e * num_gpus + g) * rm + (r - 1)

    def m(e: int, g: int) -> int:
        return nz + nu + e * num_gpus + g

    num_vars = nz + nu + num_experts * num_gpus
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(coeffs: list[tuple[int, float]], low: float, high: float) -> None:
        row = len(lo)
        for col, val in coeffs:
            rows.append(row)
            cols.append(col)
            vals.append(val)
        lo.append(low)
        hi.append(high)

    for e in range(num_experts):
        add([(z(e, r), 1.0) for r in range(1, rm + 1)], 1.0, 1.0)
        for r in range(1, rm + 1):
            add([(u(e, g, r), 1.0) for g in range(num_gpus)] + [(z(e, r), -float(r))], 0.0, 0.0)
        for g in range(num_gpus):  # m >= placed - old
            add([(m(e, g), 1.0)] + [(u(e, g, r), -1.0) for r in range(1, rm + 1)], -old[e, g], np.inf)
    for g in range(num_gpus):
        add([(u(e, g, r), 1.0) for e in range(num_experts) for r in range(1, rm + 1)], per_gpu, per_gpu)
        add([(u(e, g, r), weight[e] / r) for e in range(num_experts) for r in range(1, rm + 1)], -np.inf, limit)
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(lo), num_vars)).tocsr()
    cost = np.zeros(num_vars)
    cost[nz + nu :] = 1.0
    upper = np.full(num_vars, float(per_gpu))
    upper[:nz] = 1.0
    upper[nz + nu :] = np.inf
    result = milp(
        cost,
        constraints=LinearConstraint(matrix, np.array(lo), np.array(hi)),
        integrality=np.r_[np.ones(nz + nu), np.zeros(num_experts * num_gpus)],
        bounds=Bounds(np.zeros(num_vars), upper),
        options={"time_limit": time_limit},
    )
    best = float(result.fun) if result.x is not None else None
    bound = getattr(result, "mip_dual_bound", None)
    if result.status == 0:
        bound = best
    return (max(0.0, float(np.ceil(bound - 1e-6))) if bound is not None else 0.0), best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--steps", type=int, default=3, help="decisions of the chain")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--time-limit", type=float, default=60.0)
    args = parser.parse_args()
    windows = llama_windows(32)
    if windows is None:
        sys.exit("needs ../shared/data/llama4-maverick-mmlu (or EPLB_DATA_DIR)")
    config = (144, 1, 1, 16)
    gpus = config[3]
    windows = [w[: args.layers] for w in windows[: args.steps + 1]]
    kept = eplb.rebalance_experts(windows[0], *config).phy2log
    oblivious = kept
    totals = {"oblivious": 0, "ours": 0, "least": 0, "found": 0}
    print("| decision | layer | oblivious | ours | fewest (proven >=) | best found | max count ours | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for step, weight in enumerate(windows[1:], start=1):
        fresh = eplb.rebalance_experts(weight, *config)
        ours = eplb.rebalance_experts(weight, *config, previous=kept, balance_tolerance=args.tolerance)
        moved_o = oracle.moves(oblivious, fresh.phy2log, gpus)
        moved = oracle.moves(kept, ours.phy2log, gpus)
        peak = oracle.gpu_loads64(weight, fresh.phy2log, gpus).max(axis=1)
        for layer in range(weight.shape[0]):
            start = time.perf_counter()
            limit = float(peak[layer]) * (1 + args.tolerance) * (1 + 1e-9)
            least, found = fewest_moves(
                weight[layer].astype(np.float64), np.asarray(kept)[layer], gpus, limit, args.time_limit
            )
            totals["oblivious"] += int(moved_o[layer])
            totals["ours"] += int(moved[layer])
            totals["least"] += least
            totals["found"] += found if found is not None else moved[layer]
            print(
                f"| {step} | {layer} | {moved_o[layer]} | {moved[layer]} | {least:.0f} | "
                f"{'-' if found is None else f'{found:.0f}'} | {int(np.asarray(ours.logcnt)[layer].max())} | "
                f"{time.perf_counter() - start:.0f} |",
                flush=True,
            )
        kept, oblivious = ours.phy2log, fresh.phy2log
    share = {k: v / max(totals["oblivious"], 1) for k, v in totals.items()}
    print(
        f"\nshares of the oblivious moves: ours {share['ours']:.1%}, fewest possible >= {share['least']:.1%} "
        f"(best found {share['found']:.1%})"
    )


if __name__ == "__main__":
    main()
