"""torch launcher of the fused Triton kernel (:mod:`eplb.backends._triton_kernel`) for CUDA tensors.

A call is one kernel launch (plus a dtype conversion of the loads when they
are not float32) instead of hundreds of small ones; no host sync.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from eplb.backends._triton_kernel import ensure_cache_dir, greedy_kernel, launch_config

__all__ = ["rebalance_greedy_cuda"]


@functools.lru_cache(maxsize=64)
def _reciprocal(n: int, device: torch.device) -> torch.Tensor:
    # float32 1/k made by torch's exact division; created once per device.
    counts = torch.arange(n + 1, dtype=torch.float32, device=device)
    return torch.where(counts > 0, 1.0 / counts, torch.zeros_like(counts))


def rebalance_greedy_cuda(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, hierarchical: bool
) -> tuple[Any, Any, Any]:
    """Greedy placement of ``weight [L, E]`` (any real dtype) on its device: int64 ``phy2log, log2phy, logcnt``."""
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    num_layers, num_experts = weight.shape
    grid, meta = launch_config(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    device = weight.device
    phy2log = torch.empty((num_layers, num_replicas), dtype=torch.int64, device=device)
    log2phy = torch.empty((num_layers, num_experts, meta["MAXCNT"]), dtype=torch.int64, device=device)
    logcnt = torch.empty((num_layers, num_experts), dtype=torch.int64, device=device)
    ensure_cache_dir()
    greedy_kernel[grid](
        weight.detach().to(torch.float32).contiguous(),
        _reciprocal(meta["MAXCNT"] + 1, device),
        phy2log,
        log2phy,
        logcnt,
        enable_fp_fusion=False,
        **meta,
    )
    return phy2log, log2phy, logcnt
