"""Migration: experts moved per rebalance vs balance, oblivious vs stable vs each knob.

Each mode runs its own chain of rebalances over a trace of load windows, each
call given the previous result (``previous=``), except "oblivious" (the
placement without ``previous``). Per mode:

- moved: experts moved per rebalance and layer (``eplb.moved_experts``, mean
  over windows 1..T-1 and layers), and as a share of the oblivious chain's;
- copies: experts copied between GPUs (``TransferPlan.remote_copies`` of
  ``eplb.plan_transfers``; at most "moved"), and the share of those that
  cross nodes (``cross_node_copies``);
- balancedness (mean GPU load / max GPU load, mean over layers and windows)
  on the window planned for, and on the next window (plan on i, run on i+1);
- ms: time per call (numpy backend; includes the policy itself).

Traces: synthetic drift (each expert's load drifts by a lognormal factor per
window, plus occasional shifts of a few experts), and the Llama-4-Maverick
MMLU request series from ../shared/data (EPLB_DATA_DIR overrides), summed
over consecutive requests into windows.

    python benchmarks/migration.py [--quick] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from eplb import metrics

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

# mode: rebalance_experts keywords (None: oblivious, no previous=)
MODES = {
    "oblivious": None,
    "stable (relabel)": {},
    "tolerance 0": {"balance_tolerance": 0.0},
    "tolerance 0.005": {"balance_tolerance": 0.005},
    "tolerance 0.02": {"balance_tolerance": 0.02},
    "max_moves 4": {"max_moves": 4},
    "max_moves 16": {"max_moves": 16},
}


def drifting(layers: int, experts: int, windows: int, drift: float, seed: int = 0) -> list[np.ndarray]:
    """Token counts per window: lognormal(1.2) loads; each window every load is multiplied by
    ``exp(N(0, drift))``; every 8th window 5% of the experts shift by ``lognormal(0, 1)``."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.2, (layers, experts))
    out = []
    for t in range(windows):
        base = base * np.exp(rng.normal(0.0, drift, base.shape))
        if t % 8 == 7:
            hit = rng.random((layers, experts)) < 0.05
            base = np.where(hit, base * rng.lognormal(0.0, 1.0, base.shape), base)
        out.append(np.round(base * 1000).astype(np.int64))
    return out


def llama_windows(
    requests: int, offset: int = 0, reverse: bool = False, counts: str = "prefill"
) -> list[np.ndarray] | None:
    """Llama-4-Maverick ``counts`` (``"prefill"`` or ``"decode"``) [24, 128] summed over ``requests`` consecutive
    requests; ``reverse``: the series played backwards, ``offset``: its first ``offset`` requests skipped (other
    windows of the same series)."""
    path = DATA / "llama4-maverick-mmlu" / "llama4_maverick_mmlu_counts.npz"
    if not path.exists():
        return None
    series = np.load(path)[counts].astype(np.int64)  # [387, 24, 128]
    series = (series[::-1] if reverse else series)[offset:]
    count = series.shape[0] // requests
    return [series[i * requests : (i + 1) * requests].sum(axis=0) for i in range(count)]


def run_chain(windows: list[np.ndarray], config: tuple, options: dict | None) -> dict:
    nodes, gpus = config[2:]
    placement = eplb.rebalance_experts(windows[0], *config).phy2log
    moved, copies, cross, bal, bal_next, seconds = [], [], [], [], [], []
    for t, weight in enumerate(windows[1:], start=1):
        start = time.perf_counter()
        if options is None:
            result = eplb.rebalance_experts(weight, *config)
        else:
            result = eplb.rebalance_experts(weight, *config, previous=placement, **options)
        seconds.append(time.perf_counter() - start)
        plan = eplb.plan_transfers(placement, result.phy2log, num_gpus=gpus, num_nodes=nodes)
        moved.append(eplb.moved_experts(placement, result.phy2log, gpus).mean())
        copies.append(plan.remote_copies.mean())
        cross.append(plan.cross_node_copies.sum() / max(plan.remote_copies.sum(), 1))
        bal.append(np.mean(metrics.balancedness(weight, result.phy2log, gpus)))
        if t + 1 < len(windows):
            bal_next.append(np.mean(metrics.balancedness(windows[t + 1], result.phy2log, gpus)))
        placement = result.phy2log
    return {
        "moved": float(np.mean(moved)),
        "copies": float(np.mean(copies)),
        "cross": float(np.mean(cross)),
        "bal": float(np.mean(bal)),
        "bal_next": float(np.mean(bal_next)),
        "ms": 1000 * float(np.median(seconds)),
    }


def table(trace: str, windows: list[np.ndarray], config: tuple) -> list[list[str]]:
    results = {mode: run_chain(windows, config, options) for mode, options in MODES.items()}
    base = results["oblivious"]
    rows = []
    for mode, r in results.items():
        rows.append(
            [
                trace,
                "/".join(map(str, config)),
                mode,
                f"{r['moved']:.1f}",
                f"{100 * r['moved'] / base['moved']:.1f}%",
                f"{r['copies']:.1f}",
                f"{100 * r['cross']:.0f}%",
                f"{r['bal']:.4f}",
                f"{100 * (r['bal'] / base['bal'] - 1):+.2f}%",
                f"{r['bal_next']:.4f}",
                f"{r['ms']:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


HEADER = [
    "trace",
    "R/groups/nodes/GPUs",
    "mode",
    "moved",
    "of oblivious",
    "copies",
    "cross-node",
    "balancedness",
    "vs oblivious",
    "next window",
    "ms",
]


def fmt_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join("---" for _ in HEADER) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer layers and windows")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    layers, count = (8, 6) if args.quick else (16, 17)
    rows = []
    for drift in (0.01, 0.03, 0.05):
        trace = f"synthetic drift {drift:g}"
        windows = drifting(layers, 256, count, drift)
        rows += table(trace, windows, (288, 8, 4, 32))
    rows += table("synthetic drift 0.03", drifting(layers, 128, count, 0.03, seed=1), (144, 1, 1, 16))
    for requests in (32, 64):
        windows = llama_windows(requests)
        if windows is None:
            print("../shared/data not present: skipping the Llama-4-Maverick trace", file=sys.stderr)
            break
        trace = f"Llama-4-Maverick, {requests} requests/window"
        rows += table(trace, windows[: 4 if args.quick else None], (160, 8, 4, 32))
        rows += table(trace, windows[: 4 if args.quick else None], (144, 1, 1, 16))
    text = fmt_table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
