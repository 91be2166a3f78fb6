"""Where the time of a torch CUDA greedy call goes: host launch path vs kernel.

Run on a GPU machine: ``python benchmarks/launch_overhead.py``. Prints, at the
DeepSeek-V3 shape (58 x 256 -> 288 / 8 groups / 4 nodes / 32 GPUs), median
CUDA-event time of (a) ``eplb.rebalance_experts`` (the default path), (b) the
launcher alone, (c) Triton's generic launch path on every call, (d) the
kernel alone (100 launches captured in one CUDA graph, per launch), and
(e) one empty kernel launch + event (the floor).
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
from eplb.backends import _triton
from eplb.kernels.greedy_triton import greedy_kernel, scratch_size

SHAPES = {
    "deepseek-v3 hierarchical": (58, 256, 288, 8, 4, 32, True),
    "deepseek-v3 global 144 GPUs": (58, 256, 288, 8, 3, 144, False),
    "94x512 -> 768 / 256 GPUs": (94, 512, 768, 32, 32, 256, True),
}


def cuda_ms(fn, runs: int = 200) -> float:
    return cuda_median_ms(fn, runs, warmup=5)


def generic(weight, config, hier, num_warps: int = 1):
    """Triton's JITFunction.run on every call (what the launcher did before the direct path)."""
    num_replicas, num_groups, num_nodes, num_gpus = config
    if not hier:
        num_groups, num_nodes = 1, 1
    layers, experts = weight.shape
    grid, meta = _triton.launch_config(layers, experts, num_replicas, num_groups, num_nodes, num_gpus, num_warps)
    scratch = torch.empty(scratch_size(layers, num_nodes, meta), dtype=torch.int32, device="cuda")
    out = (
        torch.empty((layers, num_replicas), dtype=torch.int64, device="cuda"),
        torch.empty((layers, experts, meta["MAXCNT"]), dtype=torch.int64, device="cuda"),
        torch.empty((layers, experts), dtype=torch.int64, device="cuda"),
    )
    table = _triton._reciprocal(meta["MAXCNT"] + 1, weight.device)
    greedy_kernel[grid](weight, table, *out, scratch, enable_fp_fusion=False, **meta)
    return out


def host_us(fn, calls: int = 2000) -> float:
    """Host time per call when calls are queued back to back (no sync inside), microseconds."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def kernel_only_ms(weight, config, hier, launches: int = 100, call=None) -> float:
    call = call or (lambda: _triton.rebalance_greedy_cuda(weight, *config, hier))
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            call()
    return cuda_ms(graph.replay, 50) / launches


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    rng = np.random.default_rng(0)
    empty = torch.empty(1, device="cuda")
    print(f"floor (one tiny kernel + events): {cuda_ms(lambda: empty.add_(1)):.4f} ms")
    for name, (layers, experts, *config, hier) in SHAPES.items():
        weight = torch.as_tensor((rng.lognormal(0, 1.5, (layers, experts)) * 1000).astype(np.float32), device="cuda")
        api = cuda_ms(lambda w=weight, c=config: eplb.rebalance_experts(w, *c))
        launcher = cuda_ms(lambda w=weight, c=config, h=hier: _triton.rebalance_greedy_cuda(w, *c, h))
        slow = cuda_ms(lambda w=weight, c=config, h=hier: generic(w, c, h))
        kernel = kernel_only_ms(weight, config, hier)
        pairs = zip(eplb.rebalance_experts(weight, *config), generic(weight, config, hier), strict=True)
        same = all(torch.equal(a, b) for a, b in pairs)
        hosts = {
            "api": host_us(lambda w=weight, c=config: eplb.rebalance_experts(w, *c)),
            "launcher": host_us(lambda w=weight, c=config, h=hier: _triton.rebalance_greedy_cuda(w, *c, h)),
            "3 x torch.empty": host_us(lambda: [torch.empty(8, device="cuda") for _ in range(3)]),
            "python loop of 1000": host_us(lambda: sum(range(1000)), 200),
        }
        print(f"{name:30} host us per call: " + ", ".join(f"{k} {v:.1f}" for k, v in hosts.items()))
        warps = {
            n: kernel_only_ms(weight, config, hier, call=lambda w=weight, c=config, h=hier, n=n: generic(w, c, h, n))
            for n in (1, 2, 4, 8)
        }
        print(f"{name:30} kernel alone by num_warps: " + ", ".join(f"{n}: {t:.4f} ms" for n, t in warps.items()))
        print(
            f"{name:30} api {api:.4f} ms | launcher {launcher:.4f} | generic Triton path {slow:.4f} | "
            f"kernel alone {kernel:.4f} ms | direct == generic: {same}"
        )


if __name__ == "__main__":
    main()
