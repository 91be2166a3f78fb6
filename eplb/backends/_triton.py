"""torch launcher of the fused Triton kernel (:mod:`eplb.kernels.greedy_triton`) for CUDA tensors.

A call is one kernel launch (plus a dtype conversion of the loads when they
are not float32) instead of hundreds of small ones; no host sync.

The kernel does the greedy policy in ~20 us on an H100/H200, so a call is
bound by host time, and Triton's generic launch path (argument binding,
specialisation key, cache lookup: tens of microseconds) was most of it. After
the first launch of a (device, sizes) pair, :class:`_Launch` keeps the
compiled kernel and calls its launcher directly with the same arguments
``JITFunction.run`` passes (Triton >= 3.3 with ``triton.knobs``; older versions always take
the generic path). The first launch of every pair still goes through
``JITFunction.run``, which compiles and checks everything.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton

from eplb.kernels.greedy_triton import ensure_cache_dir, greedy_kernel, launch_config, scratch_size

__all__ = ["rebalance_greedy_cuda"]

# Triton 3.3 moved the launcher to take every kernel argument, constexprs included,
# in signature order; the direct call below relies on that convention.
_DIRECT_LAUNCH = hasattr(triton, "knobs") and tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 3)


@functools.lru_cache(maxsize=64)
def _reciprocal(n: int, device: torch.device) -> torch.Tensor:
    # float32 1/k made by torch's exact division; created once per device.
    counts = torch.arange(n + 1, dtype=torch.float32, device=device)
    return torch.where(counts > 0, 1.0 / counts, torch.zeros_like(counts))


class _Launch:
    """Launch state of one (device, sizes, policy) key: grid, constexprs, table and, once known, the kernel."""

    def __init__(self, key: tuple[Any, ...]) -> None:
        device, num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus = key
        self.grid, meta = launch_config(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
        self.num_warps = meta.pop("num_warps")
        self.constexprs = tuple(meta.values())  # in the kernel's signature order after the five pointers
        self.meta = meta
        self.max_count = meta["MAXCNT"]
        self.scratch = scratch_size(num_layers, num_nodes, meta)
        self.table = _reciprocal(self.max_count + 1, device)
        self.kernel: Any = None

    def __call__(self, weight32: torch.Tensor, *outputs: torch.Tensor) -> None:
        args = (weight32, self.table, *outputs)
        kernel = self.kernel
        if kernel is None:
            ensure_cache_dir()
            # The generic path: compiles on first use and returns the compiled kernel.
            kernel = greedy_kernel[self.grid](*args, num_warps=self.num_warps, enable_fp_fusion=False, **self.meta)
            if _DIRECT_LAUNCH and all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
                self.kernel = kernel
            return
        args = (*args, *self.constexprs)
        # The current stream, as Triton takes it (the capture stream under CUDA graph capture).
        stream = _current_stream(weight32.device.index)
        hooks = triton.knobs.runtime
        enter = hooks.launch_enter_hook
        metadata = None if enter is None else kernel.launch_metadata(self.grid, stream, *args)
        kernel.run(
            self.grid[0],
            self.grid[1],
            1,
            stream,
            kernel.function,
            kernel.packed_metadata,
            metadata,
            enter,
            hooks.launch_exit_hook,
            *args,
        )


def _current_stream(index: int) -> int:
    """Raw handle of the current CUDA stream of device ``index``."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton itself calls, without a Stream object
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


_LAUNCHES: dict[tuple[Any, ...], _Launch] = {}


def rebalance_greedy_cuda(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, hierarchical: bool
) -> tuple[Any, Any, Any]:
    """Greedy placement of ``weight [L, E]`` (any real dtype) on its device: int64 ``phy2log, log2phy, logcnt``."""
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    num_layers, num_experts = weight.shape
    device = weight.device
    key = (device, num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    launch = _LAUNCHES.get(key)
    if launch is None:
        launch = _LAUNCHES[key] = _Launch(key)
    phy2log = torch.empty((num_layers, num_replicas), dtype=torch.int64, device=device)
    log2phy = torch.empty((num_layers, num_experts, launch.max_count), dtype=torch.int64, device=device)
    logcnt = torch.empty((num_layers, num_experts), dtype=torch.int64, device=device)
    scratch = torch.empty(launch.scratch, dtype=torch.int32, device=device)
    weight32 = weight if weight.dtype == torch.float32 and weight.is_contiguous() else weight.float().contiguous()
    if device.type != "cuda" or device.index == torch.cuda.current_device():  # (CPU: Triton's interpreter)
        launch(weight32, phy2log, log2phy, logcnt, scratch)
    else:
        # Triton launches on the current device; a tensor on another GPU needs that GPU made current.
        with torch.cuda.device(device):
            launch(weight32, phy2log, log2phy, logcnt, scratch)
    return phy2log, log2phy, logcnt
