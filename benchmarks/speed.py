"""Time per rebalance_experts call: each backend vs the published greedy, in the same process.

Median of many warm runs; torch CUDA timed with CUDA events, JAX with
``block_until_ready``. Run: ``python benchmarks/speed.py [--runs N] [--quick]``.
The baseline is the published DeepSeek EPLB greedy as published runs it
(benchmarks/baselines.py: torch, loads moved to the host, Python loops over
layers and items in the packing); the plain-Python oracle (tests/oracle.py,
one layer at a time) is listed too. "numpy (numba)" is the compiled greedy
kernel, the default for numpy and torch CPU inputs when numba is installed;
"numpy (xp)" the array-API algorithm layer it replaces there.
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


def implementations(weight: np.ndarray, config: list[int], policy: str) -> list[tuple[str, object, str]]:
    """(name, zero-argument call, timer) for every installed backend; timer is "host" or "cuda"."""
    from eplb.backends import _numba, _numpy

    hier = config[1] % config[2] == 0
    out = [("numpy", lambda: eplb.rebalance_experts(weight, *config, policy=policy), "host")]
    if policy == "greedy" and _numba.available():
        out.append(
            ("numpy (numba)", lambda: _numpy.rebalance(weight, *config, hierarchical=hier, impl="numba"), "host")
        )
    out.append(
        ("numpy (xp)", lambda: _numpy.rebalance(weight, *config, hierarchical=hier, policy=policy, impl="xp"), "host")
    )
    if importlib.util.find_spec("torch"):
        import torch

        from eplb.backends import _torch

        wt = torch.as_tensor(weight)
        out.append(("torch cpu", lambda: eplb.rebalance_experts(wt, *config, policy=policy), "host"))
        out.append(
            (
                "torch cpu (torch ops)",
                lambda: _torch.rebalance(wt, *config, hierarchical=hier, policy=policy, impl="torch"),
                "host",
            )
        )
        if torch.cuda.is_available():
            wc = wt.cuda()
            out.append(("torch cuda (default)", lambda: eplb.rebalance_experts(wc, *config, policy=policy), "cuda"))
            out.append(
                (
                    "torch cuda (torch ops)",
                    lambda: _torch.rebalance(wc, *config, hierarchical=hier, policy=policy, impl="torch"),
                    "cuda",
                )
            )
    if importlib.util.find_spec("jax"):
        import jax

        for platform in ("cpu", "gpu"):
            try:
                device = jax.devices(platform)[0]
            except RuntimeError:
                continue
            wj = jax.device_put(weight, device)
            out.append(
                (
                    f"jax {platform}",
                    lambda w=wj: jax.block_until_ready(eplb.rebalance_experts(w, *config, policy=policy)),
                    "host",
                )
            )
            from eplb.backends import _jax

            if platform == "gpu" and policy == "greedy" and _jax.kernel_available():
                out.append(
                    (
                        "jax gpu (triton kernel)",
                        lambda w=wj: jax.block_until_ready(
                            _jax.rebalance(w, *config, hierarchical=hier, policy=policy, impl="triton")
                        ),
                        "host",
                    )
                )
    return out


def scaling(runs: int) -> None:
    """How the greedy call time grows with layers (E = 256) and with experts (L = 58).

    Config scaled with the experts: R = 9E/8 slots, 8 groups, 4 nodes, E/8 GPUs.
    """
    rng = np.random.default_rng(1)
    cases = [(layers, 256) for layers in (1, 4, 16, 64, 256)] + [(58, e) for e in (64, 128, 256, 512, 1024)]
    names = None
    for layers, experts in cases:
        config = [experts * 9 // 8, 8, 4, experts // 8]
        weight = (rng.lognormal(0, 1.5, (layers, experts)) * 1000).astype(np.float32)
        rows = [(impl, call, timer) for impl, call, timer in implementations(weight, config, "greedy")]
        rows = [r for r in rows if "torch ops" not in r[0]]
        if names is None:
            names = [r[0] for r in rows]
            print(f"{'L x E -> R / G':24}" + "".join(f"{n:>22}" for n in names))
        times = [_cuda_ms(call, runs) if timer == "cuda" else _median_ms(call, runs) for _, call, timer in rows]
        label = f"{layers} x {experts} -> {config[0]} / {config[3]}"
        print(f"{label:24}" + "".join(f"{t:20.3f}ms" for t in times), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="only the DeepSeek-V3 shapes, 20 runs")
    parser.add_argument("--policy", choices=["greedy", "refined", "both"], default="both")
    parser.add_argument("--scaling", action="store_true", help="greedy time vs layers and experts, then stop")
    args = parser.parse_args()
    if args.scaling:
        scaling(20 if args.quick else args.runs)
        return
    runs = 20 if args.quick else args.runs
    policies = ["greedy", "refined"] if args.policy == "both" else [args.policy]
    rng = np.random.default_rng(0)
    shapes = dict(list(SHAPES.items())[:2]) if args.quick else SHAPES
    print(f"{'shape':30} {'policy':8} {'implementation':24} {'ms/call':>9} {'vs published':>13}")
    for name, (layers, experts, *config) in shapes.items():
        weight = (rng.lognormal(0, 1.5, (layers, experts)) * 1000).astype(np.float32)
        slow_runs = 1 if layers > 60 else 3
        oracle_ms = _median_ms(lambda w=weight, c=config: oracle.rebalance(w, *c), slow_runs)
        base_ms = oracle_ms  # without torch, ratios are against the oracle
        if importlib.util.find_spec("torch"):
            from benchmarks.baselines import published_greedy

            wt = torch_weight(weight)
            base_ms = _median_ms(lambda w=wt, c=config: published_greedy(w, *c), slow_runs)
            print(f"{name:30} {'greedy':8} {'published greedy':24} {base_ms:9.3f} {1.0:12.1f}x")
        print(f"{name:30} {'greedy':8} {'plain-Python oracle':24} {oracle_ms:9.3f} {base_ms / oracle_ms:12.1f}x")
        for policy in policies:
            for impl, call, timer in implementations(weight, config, policy):
                ms = _cuda_ms(call, runs) if timer == "cuda" else _median_ms(call, runs)
                print(f"{name:30} {policy:8} {impl:24} {ms:9.3f} {base_ms / ms:12.1f}x", flush=True)


def torch_weight(weight: np.ndarray):
    """The load as the published greedy receives it: a torch tensor (on the GPU where there is one)."""
    import torch

    tensor = torch.as_tensor(weight)
    return tensor.cuda() if torch.cuda.is_available() else tensor


if __name__ == "__main__":
    main()
