"""The refined policy on torch CUDA: fused Triton kernels vs torch ops.

Run on a GPU machine from the repository root: ``python benchmarks/refined_triton.py``.
At the DeepSeek-V3 shape (58 x 256 -> 288 slots / 8 groups / 4 nodes / 32 GPUs),
on lognormal loads and on the real DeepSeek-V3 loads where ``../shared/data``
has them, it checks that the kernel path equals numpy, then prints the median
CUDA-event time of 100+ warm calls: the kernel path (one program per (layer,
node, candidate), the default, or one per (layer, node)) with 1, 2 and 4
warps per program, the default dispatch, ``impl="torch"``, the host time of
one call (no sync) and each stage alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.timing import cuda_median_ms
from eplb.algorithms.hierarchy import expert_order
from eplb.algorithms.refined import default_iterations
from eplb.backends import _torch
from eplb.kernels import refined_triton as kernels
from tests import cases

CONFIG = (288, 8, 4, 32)


def median_ms(fn, runs: int = 200) -> float:
    """Median CUDA-event time of ``fn()`` over ``runs`` warm calls."""
    return cuda_median_ms(fn, runs, warmup=20)


def host_ms(fn, runs: int = 200) -> float:
    """Median host time of ``fn()`` (launches queued, no sync inside the timed region)."""
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def report(name: str, weight: np.ndarray) -> None:
    replicas, groups, nodes, gpus = CONFIG
    w = torch.as_tensor(weight, device="cuda")
    want = eplb.rebalance_experts(weight, *CONFIG, policy="refined")
    got = _torch.rebalance(w, *CONFIG, hierarchical=True, policy="refined", impl="triton")
    same = all(np.array_equal(a.cpu().numpy(), b) for a, b in zip(got, want, strict=True))
    print(f"{name} {list(weight.shape)} -> {CONFIG}: kernel path == numpy: {same}")
    for parallel in (True, False):
        for warps in (1, 2, 4):
            ms = median_ms(
                lambda parallel=parallel, warps=warps: kernels.rebalance_refined_cuda(
                    w, *CONFIG, True, num_warps=warps, parallel=parallel
                )
            )
            layout = "program per (row, candidate)" if parallel else "program per row"
            print(f"  kernel path, {layout}, {warps} warp(s): {ms:.3f} ms")
    default = median_ms(lambda: eplb.rebalance_experts(w, *CONFIG, policy="refined"))
    print(f"  eplb.rebalance_experts (default: kernel path): {default:.3f} ms")
    host = host_ms(lambda: kernels.rebalance_refined_cuda(w, *CONFIG, True))
    print(f"  host time of one kernel-path call: {host:.3f} ms")
    ops = median_ms(lambda: _torch.rebalance(w, *CONFIG, hierarchical=True, policy="refined", impl="torch"), 100)
    print(f"  impl='torch' (torch ops): {ops:.3f} ms")
    w32 = w.float().contiguous()
    split, _ = kernels.split_stage(w32, replicas, groups, nodes, gpus)
    mlog2log = expert_order(split, 256 // groups, xp=kernels.xp)
    iters = default_iterations(replicas // nodes, gpus // nodes)
    arrays = kernels.candidate_stage(w32, mlog2log, replicas, nodes, gpus, iters)
    stages = {
        "split": lambda: kernels.split_stage(w32, replicas, groups, nodes, gpus),
        "candidates": lambda: kernels.candidate_stage(w32, mlog2log, replicas, nodes, gpus, iters),
        "candidates (program per row)": lambda: kernels.candidate_stage(
            w32, mlog2log, replicas, nodes, gpus, iters, parallel=False
        ),
        "final (with the greedy kernel)": lambda: kernels.final_stage(
            w32, mlog2log, arrays, replicas, groups, nodes, gpus, True
        ),
    }
    print("  stages: " + ", ".join(f"{stage} {median_ms(fn):.3f} ms" for stage, fn in stages.items()))


def main() -> None:
    print(torch.cuda.get_device_name(), "triton", __import__("triton").__version__, "torch", torch.__version__)
    report("lognormal", cases.lognormal_f32(np.random.default_rng(0), 58, 256))
    real = cases.deepseek_v3()
    if real is not None:
        report("deepseek-v3 real", real.astype(np.float32))


if __name__ == "__main__":
    main()
