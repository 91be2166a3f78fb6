"""Equals :func:`eplb.algorithms.replication.replicate_experts` (``max_count=None``) bit for bit, on CUDA (Triton).

The greedy replication as one launch: one program per row, the ``R - E``
steps in a loop over ``[E]`` registers. Each step gives a replica to the
expert with the largest score ``w * fl(1/count)`` (the table of
:func:`eplb._xp.reciprocal_table`: one float32 product, correctly rounded,
so no contraction can change it), equal scores to the lowest index, and
rescores only that expert, as the array-API loop does. Integer outputs
(int64): ``phy2log [B, R]`` (slots ``0 .. E - 1`` hold the experts in order,
slot ``E + s`` the expert of step ``s``), ``phyrank [B, R]`` and ``logcnt [B,
E]``.

Used where the array-API loop would be hundreds of torch launches on CUDA: the
elastic placements' replication (:func:`eplb.algorithms.elastic._place_rows`,
``replicate_fn``). Proved by ``tests/test_kernels_elastic_triton.py`` (Triton's
interpreter against the array-API function on ties, all-zero rows, one
expert, no extra slot, and the DeepSeek-V3 sizes in the end-to-end calls; on
CUDA with the elastic calls).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from eplb import _xp
from eplb.kernels.greedy_triton import ensure_cache_dir
from eplb.kernels.relabel_triton import _on_device

__all__ = ["fits", "replicate_experts", "replicate_kernel"]

_BIG = tl.constexpr(2**30)
MAX_EXPERTS = 4096  # the row's scores and counts live in registers


@triton.jit
def replicate_kernel(w_ptr, recip_ptr, phy_ptr, rank_ptr, cnt_ptr, E: tl.constexpr, R: tl.constexpr,
                     P_E: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, P_E)
    real = e < E
    w = tl.load(w_ptr + row * E + e, mask=real, other=0.0)
    count = tl.where(real, 1, 0).to(tl.int64)
    score = tl.where(real, w * tl.load(recip_ptr + 1), -float("inf"))
    tl.store(phy_ptr + row * R + e, e.to(tl.int64), mask=real)
    tl.store(rank_ptr + row * R + e, tl.zeros([P_E], tl.int64), mask=real)
    for step in range(R - E):
        best = tl.max(score, axis=0)
        expert = tl.min(tl.where(score == best, e, _BIG), axis=0)  # the first maximum
        chosen = e == expert
        rank = tl.sum(tl.where(chosen, count, 0), axis=0)
        grown = tl.sum(tl.where(chosen, w, 0.0), axis=0) * tl.load(recip_ptr + rank + 1)
        score = tl.where(chosen, grown, score)
        count = tl.where(chosen, count + 1, count)
        tl.store(phy_ptr + row * R + E + step, expert.to(tl.int64))
        tl.store(rank_ptr + row * R + E + step, rank)
    tl.store(cnt_ptr + row * E + e, count, mask=real)


def fits(num_log: int, num_phy: int) -> bool:
    """Whether :func:`replicate_experts` takes these sizes."""
    return 0 < num_log <= MAX_EXPERTS and num_phy >= num_log


def replicate_experts(weight: torch.Tensor, num_phy: int, *, xp: Any = None) -> tuple[torch.Tensor, ...]:
    """:func:`eplb.algorithms.replication.replicate_experts` of ``weight [B, E]`` (float32; ``xp`` is not used,
    ``max_count`` not taken): ``phy2log [B, R]``, ``phyrank [B, R]``, ``logcnt [B, E]``, int64, one launch."""
    batch, num_log = weight.shape
    if not fits(num_log, num_phy):
        raise ValueError(f"the replication kernel takes 1 to {MAX_EXPERTS} experts and num_phy >= them, "
                         f"got {num_log} experts and num_phy={num_phy}")  # fmt: skip
    device = weight.device
    phy2log = torch.empty((batch, num_phy), dtype=torch.int64, device=device)
    phyrank = torch.empty((batch, num_phy), dtype=torch.int64, device=device)
    logcnt = torch.empty((batch, num_log), dtype=torch.int64, device=device)
    if batch == 0:
        return phy2log, phyrank, logcnt
    recip = _xp.reciprocal_table(num_phy - num_log + 1, xp=torch, device=device).to(torch.float32).contiguous()
    ensure_cache_dir()
    with _on_device(device):
        replicate_kernel[(batch,)](
            weight.to(torch.float32).contiguous(), recip, phy2log, phyrank, logcnt, num_warps=4,
            enable_fp_fusion=False, E=num_log, R=num_phy, P_E=max(2, triton.next_power_of_2(num_log)),
        )  # fmt: skip
    return phy2log, phyrank, logcnt
