"""Failed GPUs: ``active_gpus=`` against SGLang's rule, on real DeepSeek-V3 loads.

Every SGLang file in ../shared/data/deepseek-v3-sglang (EPLB_DATA_DIR
overrides; ``logical_count`` [61, 256], all-zero layers dropped), 288 slots.
Per config and failure, balancedness on the survivors (mean over layers of
mean / max GPU load over the live GPUs) of:

- healthy: the placement with every GPU up (all GPUs);
- ours: ``rebalance_experts(..., active_gpus=mask)``;
- SGLang-like: SGLang's rule as issue 19 describes it ("when a rank is down,
  a fresh global greedy over the survivors"): the global greedy on a cluster
  of the live GPUs alone (``R_live = slots per GPU x live GPUs``), scattered
  back, ``-1`` in dead slots.

For the hierarchical config also the share of the load served on its group's
home node (:func:`eplb.metrics.locality`). Plus the time of one numpy call.

``--previous``: the global configs with ``previous=`` (the healthy placement
of the same loads, in force when the GPUs fail): experts moved per layer
(``(expert, GPU)`` pairs of the new placement absent from the old one on
the live GPUs; the dead GPUs' slots count nothing) and balancedness on the
survivors, of ``rebalance_experts(..., previous=, active_gpus=,
balance_tolerance=t)`` for ``t = 0`` and ``0.05`` against the SGLang-like
rule (which ignores the placement in force). Issue 19's target: balancedness
at least SGLang-like's with at most 1/3 of its moves.

    python benchmarks/elastic.py [--previous] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

# name -> (replicas, groups, nodes, gpus, hierarchical, {failure: dead GPUs}). At 288 slots on 32 GPUs
# (9 per GPU) at most 3 GPUs may fail (E = 256 needs 256 live slots), and one failed GPU already leaves
# its node 63 < 64 slots for its two groups: the hierarchical rule falls back to the global one. 320 slots
# (10 per GPU) shows the hierarchical rule itself.
CONFIGS = {
    "global, 144 GPUs": (288, 8, 18, 144, False, {"1 GPU down": [5], "8 GPUs (a node) down": list(range(8, 16))}),
    "global, 32 GPUs": (288, 8, 4, 32, False, {"1 GPU down": [5], "3 GPUs down": [5, 13, 21]}),
    "hierarchical, 4 nodes / 32 GPUs / 8 groups": (
        288,
        8,
        4,
        32,
        True,
        {"1 GPU down (fallback)": [5], "3 GPUs down (fallback)": [5, 13, 21]},
    ),
    "hierarchical, 320 slots, 4 nodes / 32 GPUs": (
        320,
        8,
        4,
        32,
        True,
        {"1 GPU down": [5], "3 GPUs down": [5, 13, 21]},
    ),
}


def loads() -> list[tuple[str, np.ndarray]]:
    out = []
    for path in sorted((DATA / "deepseek-v3-sglang").glob("*.json")):
        counts = np.asarray(json.loads(path.read_text())["logical_count"], np.int64)
        out.append((path.stem, counts[counts.sum(axis=1) > 0]))
    return out


def sglang_like(weight: np.ndarray, num_replicas: int, num_gpus: int, mask: np.ndarray) -> np.ndarray:
    """Fresh global greedy over the survivors, compacted then scattered back (-1 in dead slots)."""
    per_gpu = num_replicas // num_gpus
    live = np.flatnonzero(mask)
    compact = eplb.rebalance_experts(weight, per_gpu * len(live), 1, 1, len(live), hierarchical=False).phy2log
    phy2log = np.full((weight.shape[0], num_replicas), -1, dtype=np.int64)
    slots = (live[:, None] * per_gpu + np.arange(per_gpu)).reshape(-1)
    phy2log[:, slots] = compact
    return phy2log


def previous_table(data: list[tuple[str, np.ndarray]]) -> str:
    """The ``--previous`` table (every config; the hierarchical ones keep groups on nodes where the nodes can
    hold them, SGLang's rule never does)."""
    rows = []
    for name, (replicas, groups, nodes, gpus, hierarchical, failures) in CONFIGS.items():
        sizes = (replicas, groups, nodes, gpus)
        for failure, dead in failures.items():
            mask = np.ones(gpus, bool)
            mask[dead] = False
            bal = {"sglang": [], "t0": [], "t05": []}
            moves = {"sglang": [], "t0": [], "t05": []}
            times = []
            for _, w in data:
                previous = eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical).phy2log
                other = sglang_like(w, replicas, gpus, mask)
                bal["sglang"].append(eplb.metrics.summarize(w, other, gpus).balancedness)
                moves["sglang"].append(eplb.moved_experts(previous, other, gpus).mean())
                for key, tolerance in (("t0", 0.0), ("t05", 0.05)):
                    start = time.perf_counter()
                    ours = eplb.rebalance_experts(
                        w,
                        *sizes,
                        hierarchical=hierarchical,
                        previous=previous,
                        active_gpus=mask,
                        balance_tolerance=tolerance,
                    ).phy2log
                    times.append(time.perf_counter() - start)
                    bal[key].append(eplb.metrics.summarize(w, ours, gpus).balancedness)
                    moves[key].append(eplb.moved_experts(previous, ours, gpus).mean())
            mean = {k: float(np.mean(v)) for k, v in {**bal, **{f"m_{k}": v for k, v in moves.items()}}.items()}
            rows.append((name, failure, mean, 1e3 * float(np.median(times))))
    header = (
        "config",
        "failure",
        "balancedness SGLang-like",
        "ours t=0",
        "ours t=0.05",
        "moves/layer SGLang-like",
        "ours t=0",
        "ours t=0.05",
        "moves ours / SGLang t=0",
        "t=0.05",
        "ours ms (numpy)",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, failure, m, ms in rows:
        lines.append(
            f"| {name} | {failure} | {m['sglang']:.4f} | {m['t0']:.4f} | {m['t05']:.4f} | "
            f"{m['m_sglang']:.1f} | {m['m_t0']:.1f} | {m['m_t05']:.1f} | {m['m_t0'] / m['m_sglang']:.3f} | "
            f"{m['m_t05'] / m['m_sglang']:.3f} | {ms:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")
    parser.add_argument("--previous", action="store_true", help="previous= against SGLang-like: moves and balance")
    parser.add_argument("--configs", help="comma-separated substrings of the config names to run (default: all)")
    args = parser.parse_args()
    if args.configs:
        wanted = args.configs.split(",")
        for name in [n for n in CONFIGS if not any(w in n for w in wanted)]:
            del CONFIGS[name]
    data = loads()
    if args.previous:
        table = previous_table(data)
        print(f"{len(data)} SGLang DeepSeek-V3 load files; previous= the healthy placement; survivors only\n")
        print(table)
        if args.markdown:
            args.markdown.write_text(table + "\n")
        return
    rows = []
    for name, (replicas, groups, nodes, gpus, hierarchical, failures) in CONFIGS.items():
        sizes = (replicas, groups, nodes, gpus)
        healthy = np.mean(
            [
                eplb.metrics.summarize(
                    w, eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical).phy2log, gpus
                ).balancedness
                for _, w in data
            ]
        )
        for failure, dead in failures.items():
            mask = np.ones(gpus, bool)
            mask[dead] = False
            ours, sglang, home_ours, home_sglang, times = [], [], [], [], []
            for _, w in data:
                start = time.perf_counter()
                placement = eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical, active_gpus=mask)
                times.append(time.perf_counter() - start)
                other = sglang_like(w, replicas, gpus, mask)
                ours.append(eplb.metrics.summarize(w, placement.phy2log, gpus).balancedness)
                sglang.append(eplb.metrics.summarize(w, other, gpus).balancedness)
                if hierarchical:
                    home_ours.append(
                        float(np.mean(eplb.metrics.locality(w, placement.phy2log, groups, nodes).home_share))
                    )
                    home_sglang.append(float(np.mean(eplb.metrics.locality(w, other, groups, nodes).home_share)))
            home = f"{np.mean(home_ours):.3f} / {np.mean(home_sglang):.3f}" if hierarchical else "-"
            rows.append((name, failure, healthy, np.mean(ours), np.mean(sglang), home, 1e3 * float(np.median(times))))
    header = ("config", "failure", "healthy", "ours", "SGLang-like", "home share ours / SGLang", "ours ms (numpy)")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, failure, healthy, ours, sglang, home, ms in rows:
        lines.append(f"| {name} | {failure} | {healthy:.4f} | {ours:.4f} | {sglang:.4f} | {home} | {ms:.1f} |")
    table = "\n".join(lines)
    print(f"{len(data)} SGLang DeepSeek-V3 load files; balancedness on the survivors\n")
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
