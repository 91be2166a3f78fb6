"""Time per rebalance_experts call: each backend vs the plain-Python oracle.

Median of many warm runs; torch CUDA timed with CUDA events, JAX with
``block_until_ready``. Run: ``python benchmarks/speed.py [--runs N] [--quick]``.
The oracle is the sequential reference in tests/oracle.py (the published
greedy's loops, one layer at a time).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from tests import oracle

SHAPES = {
    # name: (layers, experts, replicas, groups, nodes, gpus)
    "deepseek-v3 hierarchical": (58, 256, 288, 8, 4, 32),
    "deepseek-v3 global 144 GPUs": (58, 256, 288, 8, 3, 144),
    "94x512 -> 768 / 256 GPUs": (94, 512, 768, 32, 32, 256),
}


def _median_ms(fn, runs: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _cuda_ms(fn, runs: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="only the DeepSeek-V3 shapes, 20 runs")
    args = parser.parse_args()
    runs = 20 if args.quick else args.runs
    rng = np.random.default_rng(0)
    shapes = dict(list(SHAPES.items())[:2]) if args.quick else SHAPES
    print(f"{'shape':32} {'implementation':26} {'ms/call':>9} {'vs oracle':>10}")
    for name, (layers, experts, *config) in shapes.items():
        weight = (rng.lognormal(0, 1.5, (layers, experts)) * 1000).astype(np.float32)
        rows = []
        oracle_ms = _median_ms(lambda w=weight, c=config: oracle.rebalance(w, *c), 1 if layers > 60 else 3)
        rows.append(("plain-Python oracle", oracle_ms))
        rows.append(("numpy", _median_ms(lambda w=weight, c=config: eplb.rebalance_experts(w, *c), runs)))
        if importlib.util.find_spec("torch"):
            import torch

            from eplb.backends import _torch

            wt = torch.as_tensor(weight)
            rows.append(("torch cpu", _median_ms(lambda w=wt, c=config: eplb.rebalance_experts(w, *c), runs)))
            hier = config[1] % config[2] == 0
            rows.append(
                (
                    "torch cpu (torch ops)",
                    _median_ms(
                        lambda w=wt, c=config, h=hier: _torch.rebalance(w, *c, hierarchical=h, impl="torch"), runs
                    ),
                )
            )
            if torch.cuda.is_available():
                wc = wt.cuda()
                rows.append(("torch cuda eager", _cuda_ms(lambda w=wc, c=config: eplb.rebalance_experts(w, *c), runs)))
        if importlib.util.find_spec("jax"):
            import jax

            for platform in ("cpu", "gpu"):
                try:
                    device = jax.devices(platform)[0]
                except RuntimeError:
                    continue
                wj = jax.device_put(weight, device)
                ms = _median_ms(lambda w=wj, c=config: jax.block_until_ready(eplb.rebalance_experts(w, *c)), runs)
                rows.append((f"jax {platform}", ms))
        for impl, ms in rows:
            print(f"{name:32} {impl:26} {ms:9.3f} {oracle_ms / ms:9.1f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
