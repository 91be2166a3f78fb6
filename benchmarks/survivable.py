"""A placement that survives a node failure: ``survivable=True`` against the greedy global policy.

    python benchmarks/survivable.py [--files 12]

Real DeepSeek-V3 loads (SGLang ``logical_count`` [61, 256], all-zero layers dropped; EPLB_DATA_DIR overrides
../shared/data), 288 slots, global policy. Per config: the surviving load share under every single-node failure
(share of the layer's load whose expert keeps a replica off the failed node; mean and worst over nodes and
layers), the balancedness (mean over layers of mean / max GPU load) and the plan time (numpy, median of 5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eplb.algorithms.hierarchy import rebalance_hierarchical
from eplb.algorithms.survivable import rebalance_survivable, surviving_load_share

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
CONFIGS = {"32 GPUs / 4 nodes": (288, 4, 32), "144 GPUs / 18 nodes": (288, 18, 144)}


def balancedness(weight: np.ndarray, phy2log: np.ndarray, gpus: int) -> float:
    count = np.stack([np.bincount(row, minlength=weight.shape[1]) for row in phy2log])
    per_slot = np.take_along_axis(weight.astype(np.float64) / np.maximum(count, 1), phy2log, axis=1)
    loads = per_slot.reshape(len(weight), gpus, -1).sum(axis=2)
    return float((loads.mean(axis=1) / loads.max(axis=1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=12)
    args = parser.parse_args()
    files = sorted((DATA / "deepseek-v3-sglang").glob("*.json"))[: args.files]
    loads = [np.asarray(json.loads(f.read_text())["logical_count"], dtype=np.float32) for f in files]
    loads = [w[w.sum(axis=1) > 0] for w in loads]
    print("| config | policy | surviving share, mean | worst | balancedness | plan ms (numpy) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (slots, nodes, gpus) in CONFIGS.items():
        for label, place in (
            ("greedy (global)", lambda w, s=slots, g=gpus: rebalance_hierarchical(w, s, 1, 1, g, xp=np)),
            ("survivable", lambda w, s=slots, n=nodes, g=gpus: rebalance_survivable(w, s, n, g, xp=np)),
        ):
            shares, worst, balance, times = [], [], [], []
            for w in loads:
                start = time.perf_counter()
                phy2log = place(w)[0]
                times.append(time.perf_counter() - start)
                share = surviving_load_share(w, phy2log, nodes, xp=np)
                shares.append(share.mean())
                worst.append(share.min())
                balance.append(balancedness(w, phy2log, gpus))
            print(f"| {name} | {label} | {np.mean(shares):.4f} | {min(worst):.4f} | {np.mean(balance):.4f} | "
                  f"{statistics.median(times) * 1e3:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
