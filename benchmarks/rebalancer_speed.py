"""Host time of ``eplb.Rebalancer.record`` and ``step`` on the CPU (numpy and torch CPU loads).

One run, real DeepSeek-V3 loads from ../shared/data (EPLB_DATA_DIR overrides): the 12 SGLang files in turn,
each window with lognormal noise (sigma 0.1), 58 layers; a step every other window. Median and max of the
``record`` calls (each scores the window under the placement in force) and of the steps after the first
(the fresh plan). Torch CUDA steps: ``python benchmarks/graphed.py --rebalancer``.

    python benchmarks/rebalancer_speed.py [--windows 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.keep_speed import CONFIGS, DATA, load
from eplb.backends import _numba


def sglang_windows(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` int64 windows ``[L, 256]``: the 12 SGLang DeepSeek-V3 files in name order, in turn, each times
    lognormal noise (sigma 0.1), rounded; ``L`` the fewest loaded layers of a file (58)."""
    dumps = [load(path.name) for path in sorted((DATA / "deepseek-v3-sglang").glob("*.json"))]
    layers = min(len(d) for d in dumps)
    rng = np.random.default_rng(seed)
    return [
        np.round(dumps[t % len(dumps)][:layers] * rng.lognormal(0.0, 0.1, (layers, 256))).astype(np.int64)
        for t in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    _numba.warm_up()
    windows = sglang_windows(args.windows)
    layers = windows[0].shape[0]
    frameworks = {"numpy": np.asarray}
    try:
        import torch

        frameworks["torch CPU"] = torch.as_tensor
    except ImportError:
        pass
    print(f"Rebalancer host ms, {layers} layers x 256 experts, {args.windows} windows, a step every other one")
    print("| config | loads | record: median / max | step: median / max |")
    print("| --- | --- | --- | --- |")
    for label, config in CONFIGS.items():
        for name, convert in frameworks.items():
            rebalancer = eplb.Rebalancer(*config)
            records, steps = [], []
            for t, window in enumerate(windows):
                load_t = convert(window)
                start = time.perf_counter()
                rebalancer.record(load_t)
                records.append((time.perf_counter() - start) * 1e3)
                if t % 2:
                    start = time.perf_counter()
                    rebalancer.step()
                    steps.append((time.perf_counter() - start) * 1e3)
            cells = [f"{statistics.median(v):.2f} / {max(v):.2f}" for v in (records, steps[1:])]
            print(f"| {label} | {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
