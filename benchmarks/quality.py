"""Balance quality: greedy vs refined vs the lower bound, on synthetic and real loads.

Balancedness = mean GPU load / max GPU load (1.0 is perfect), mean over layers,
scored in float64 independently of eplb's own arithmetic. "bound" is the best
balancedness any placement of the policy could reach (mean / lower bound).
"closed" = (refined - greedy) / (bound - greedy), the share of the gap closed.

    python benchmarks/quality.py [--quick] [--markdown FILE]

Real loads are read from ../shared/data (EPLB_DATA_DIR overrides); they are
skipped if absent. The next-window table plans on window i of the
Llama-4-Maverick request series and scores on window i+1.
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
from eplb import metrics

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

# name: (layers, experts, replicas, groups, nodes, gpus, hierarchical)
CONFIGS = {
    "256e 288/4n/32g": (58, 256, 288, 8, 4, 32, True),
    "256e 320/8n/64g": (58, 256, 320, 8, 8, 64, True),
    "256e 288/144g global": (58, 256, 288, 1, 1, 144, False),
    "128e 144/16g global": (48, 128, 144, 1, 1, 16, False),
    "512e 768/32n/256g": (94, 512, 768, 32, 32, 256, True),
}


def synthetic(kind: str, layers: int, experts: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "near-uniform":
        return rng.uniform(900, 1100, (layers, experts))
    if kind.startswith("lognormal"):
        return rng.lognormal(0, float(kind.split()[1]), (layers, experts)) * 1000
    if kind == "zipf":
        ranks = np.stack([rng.permutation(experts) for _ in range(layers)]) + 1
        return 1e5 / ranks
    if kind == "few hot":
        base = rng.lognormal(0, 0.5, (layers, experts)) * 1000
        return base * np.where(rng.random((layers, experts)) < 4 / experts, 30.0, 1.0)
    if kind == "30% zero":
        return np.where(rng.random((layers, experts)) < 0.3, 0.0, rng.lognormal(0, 1, (layers, experts)) * 1000)
    raise ValueError(kind)


LOAD_KINDS = ["near-uniform", "lognormal 0.5", "lognormal 1", "lognormal 1.5", "zipf", "few hot", "30% zero"]
SKEWED = {"lognormal 1", "lognormal 1.5", "zipf", "few hot", "30% zero"}


def peak_and_mean(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 max and mean GPU load per layer (replica load = w / count)."""
    counts = np.stack([np.bincount(row, minlength=weight.shape[1]) for row in phy2log])
    per_slot = np.take_along_axis(weight.astype(np.float64) / np.maximum(counts, 1), phy2log, axis=1)
    loads = per_slot.reshape(len(weight), num_gpus, -1).sum(-1)
    return loads.max(-1), loads.mean(-1)


def balancedness(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> float:
    peak, mean = peak_and_mean(weight, phy2log, num_gpus)
    return float(np.mean(np.where(peak > 0, mean / np.where(peak > 0, peak, 1), 1.0)))


def evaluate(weight: np.ndarray, config: tuple, score_on: np.ndarray | None = None) -> dict:
    """Greedy and refined on ``weight``; scored on ``score_on`` (default: the same loads)."""
    _, _, replicas, groups, nodes, gpus, hier = config
    score = weight if score_on is None else score_on
    row = {}
    for policy in ("greedy", "refined"):
        plan = lambda p=policy: eplb.rebalance_experts(  # noqa: E731
            weight, replicas, groups, nodes, gpus, hierarchical=hier, policy=p
        )
        plan()  # untimed: the first call in a process may compile (numba)
        t0 = time.perf_counter()
        placement = plan()
        row[f"{policy}_ms"] = (time.perf_counter() - t0) * 1e3
        row[policy] = balancedness(score, placement.phy2log, gpus)
        row[f"{policy}_peak"] = peak_and_mean(score, placement.phy2log, gpus)[0]
    if score_on is None:
        bound = np.asarray(metrics.lower_bound(weight, replicas, groups, nodes, gpus, hierarchical=hier), np.float64)
        mean = weight.astype(np.float64).sum(-1) / gpus
        row["bound"] = float(np.mean(np.where(bound > 0, mean / np.where(bound > 0, bound, 1), 1.0)))
        gap = row["bound"] - row["greedy"]
        row["closed"] = (row["refined"] - row["greedy"]) / gap if gap > 1e-9 else float("nan")
        row["worse_layers"] = int(np.sum(row["refined_peak"] > row["greedy_peak"] * (1 + 1e-9)))
    return row


def deepseek_files() -> list[Path]:
    folder = DATA / "deepseek-v3-sglang"
    return sorted(folder.glob("*.json")) if folder.exists() else []


def load_deepseek(path: Path) -> np.ndarray:
    counts = np.asarray(json.loads(path.read_text())["logical_count"], dtype=np.float64)
    return counts[counts.sum(axis=1) > 0]


def llama_windows(window: int) -> np.ndarray | None:
    path = DATA / "llama4-maverick-mmlu" / "llama4_maverick_mmlu_counts.npz"
    if not path.exists():
        return None
    per_request = np.load(path)["prefill"].astype(np.float64)  # [requests, 24, 128]
    usable = len(per_request) // window * window
    return per_request[:usable].reshape(-1, window, *per_request.shape[1:]).sum(1)  # [windows, 24, 128]


def locality_table(files: list[Path]) -> str:
    """Hierarchical vs spill settings vs global on the real DeepSeek-V3 loads at 288 slots / 4 nodes / 32 GPUs."""
    settings = [
        ("hierarchical", {}),
        *[(f"spill={s}", {"spill": s}) for s in (1, 2, 4, 8)],
        ("global", {"hierarchical": False}),
    ]
    rows = []
    for label, kwargs in settings:
        for policy in ("greedy", "refined"):
            bal, share, span = [], [], []
            for path in files:
                weight = load_deepseek(path)
                phy2log = eplb.rebalance_experts(weight, 288, 8, 4, 32, policy=policy, **kwargs).phy2log
                bal.append(balancedness(weight, phy2log, 32))
                where = metrics.locality(weight, phy2log, 8, 4)
                share.append(float(np.mean(where.home_share)))
                span.append(float(np.mean(where.nodes_per_group)))
            rows.append(
                [label, policy, float(np.mean(bal)), float(np.min(bal)), float(np.mean(share)), float(np.mean(span))]
            )
            print(rows[-1], flush=True)
    header = [
        "placement",
        "policy",
        "balancedness (mean)",
        "balancedness (worst file)",
        "traffic on home node",
        "nodes per group",
    ]
    return (
        f"### Locality vs balance: real DeepSeek-V3 loads ({len(files)} files), 288 slots / 4 nodes / 32 GPUs\n\n"
        + fmt_table(header, rows)
    )


def table_row(config: str, loads: str, r: dict) -> list:
    """One row of the greedy / refined / bound table, in the order of its header."""
    keys = ("greedy", "refined", "bound", "closed", "worse_layers", "greedy_ms", "refined_ms")
    return [config, loads, *(r[k] for k in keys)]


def fmt_table(header: list[str], rows: list[list]) -> str:
    cells = [[c if isinstance(c, str) else f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer layers, first three configs")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    header = ["config", "loads", "greedy", "refined", "bound", "closed", "worse layers", "greedy ms", "refined ms"]
    out = []

    synthetic_rows, closed_skewed = [], []
    configs = dict(list(CONFIGS.items())[:3]) if args.quick else CONFIGS
    for name, config in configs.items():
        layers = 8 if args.quick else config[0]
        for kind in LOAD_KINDS:
            weight = synthetic(kind, layers, config[1], rng)
            r = evaluate(weight, config)
            if kind in SKEWED and not np.isnan(r["closed"]):
                closed_skewed.append(r["closed"])
            synthetic_rows.append(table_row(name, kind, r))
            print(fmt_table(header, synthetic_rows[-1:]).splitlines()[-1], flush=True)
    out.append("### Synthetic loads\n\n" + fmt_table(header, synthetic_rows))
    out.append(f"Mean share of the greedy-to-bound gap closed on skewed loads: {np.mean(closed_skewed):.1%}")

    files = deepseek_files()
    if files:
        real_rows = []
        for name in list(configs)[:3]:
            config = configs[name]
            for path in files[:3] if args.quick else files:
                r = evaluate(load_deepseek(path), config)
                real_rows.append(table_row(name, path.stem, r))
                print(fmt_table(header, real_rows[-1:]).splitlines()[-1], flush=True)
        out.append("### Real DeepSeek-V3/R1 loads (SGLang statistics)\n\n" + fmt_table(header, real_rows))

    if files:
        out.append(locality_table(files[:4] if args.quick else files))

    windows = llama_windows(window=32)
    if windows is not None:
        next_rows = []
        for name, config in {
            "128e 144/16g global": CONFIGS["128e 144/16g global"],
            "128e 160/4n/32g": (24, 128, 160, 8, 4, 32, True),
        }.items():
            same, nxt = {"greedy": [], "refined": []}, {"greedy": [], "refined": []}
            for i in range(len(windows) - 1):
                r_same = evaluate(windows[i], config)
                r_next = evaluate(windows[i], config, score_on=windows[i + 1])
                for policy in same:
                    same[policy].append(r_same[policy])
                    nxt[policy].append(r_next[policy])
            next_rows.append(
                [
                    name,
                    len(windows),
                    np.mean(same["greedy"]),
                    np.mean(same["refined"]),
                    np.mean(nxt["greedy"]),
                    np.mean(nxt["refined"]),
                ]
            )
            print(next_rows[-1], flush=True)
        out.append(
            "### Llama-4-Maverick request series, 32 requests a window: plan on window i, "
            "score on window i and on i+1\n\n"
            + fmt_table(["config", "windows", "greedy same", "refined same", "greedy next", "refined next"], next_rows)
        )

    text = "\n\n".join(out)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
