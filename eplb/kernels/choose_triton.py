"""Equals :func:`eplb.algorithms.repair.heaviest_gpu` and :func:`eplb.algorithms.stability.choose`, one launch each
(Triton).

The first and last steps of ``previous=`` with knobs on torch CUDA
(:func:`eplb.algorithms.stability.stabilize`): the fresh placement's heaviest
GPU (the load limit), and the choice among the candidates with the pick of
the winner. As torch ops they are about 60 small launches (replica loads,
the left-to-right sums slot by slot, the maxima, the choice rule, the
gathers), over a third of a host-bound call; here one program per layer does
each.

Bit for bit the array-API functions, because every float step is the same
IEEE operation in the same order:

- a replica's load is ``w * fl(1/c)`` (the table of
  :func:`eplb._xp.reciprocal_table`), a GPU's load the sum of its slots'
  replica loads left to right from its first slot; the launchers compile with
  ``enable_fp_fusion=False``, so no multiply-add is contracted into an FMA
  (which would round once, not twice);
- a heaviest GPU is a maximum (exact in any order); a peak is compared with
  the limit, never divided;
- ties: the first candidate with the fewest moves, else the first with the
  lightest heaviest GPU (strict comparisons in candidate order), as
  ``argmin`` returns the first minimum.

Proved by ``tests/test_choose_triton.py`` (Triton's CPU interpreter and CUDA
against the array-API functions: ties, all-zero layers, unusable candidates,
candidates beyond the limit, one slot per GPU, loads whose sums round apart
in another order) and by the torch CUDA ``previous=`` tests against numpy.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from eplb import _xp
from eplb.kernels.greedy_triton import ensure_cache_dir
from eplb.kernels.relabel_triton import _on_device

__all__ = ["choose", "fits", "heaviest_gpu"]

MAX_SLOTS_PER_GPU = 64  # the left-to-right sum is unrolled slot by slot
MAX_SIZE = 16384  # GPUs, slots and experts of a layer (register tiles)
_BIG = tl.constexpr(2**62)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fits(num_phy: int, num_log: int, num_gpus: int) -> bool:
    """Whether the kernels take these sizes: at most 64 slots a GPU, at most 16384 slots and experts."""
    if num_gpus <= 0 or num_phy % num_gpus:
        return False
    return num_phy // num_gpus <= MAX_SLOTS_PER_GPU and 0 < num_phy <= MAX_SIZE and 0 < num_log <= MAX_SIZE


@triton.jit
def _peak(w_ptr, phy_ptr, cnt_ptr, recip_ptr, w_row, row, E: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
          K: tl.constexpr, GP: tl.constexpr):  # fmt: skip
    """The heaviest GPU of placement ``row`` (slots ``phy_ptr[row * R:]``, counts ``cnt_ptr[row * E:]``) on the
    loads ``w_ptr[w_row * E:]``: GPU ``g`` sums its slots ``g * K .. g * K + K - 1`` left to right; an empty
    slot (``-1``, a failed GPU's) weighs 0."""
    g = tl.arange(0, GP)
    live = g < G
    total = tl.zeros((GP,), dtype=tl.float32)
    for k in tl.static_range(K):
        expert = tl.load(phy_ptr + row * R + g * K + k, mask=live, other=0)
        held = live & (expert >= 0)
        count = tl.load(cnt_ptr + row * E + expert, mask=held, other=0)
        load = tl.load(w_ptr + w_row * E + expert, mask=held, other=0.0) * tl.load(
            recip_ptr + count, mask=held, other=0.0
        )
        load = tl.where(held, load, 0.0)
        if k == 0:  # noqa: SIM108 (a static if: the first slot starts the sum)
            total = load
        else:
            total = total + load
    return tl.max(tl.where(live, total, -float("inf")), axis=0)


@triton.jit
def peak_kernel(w_ptr, phy_ptr, cnt_ptr, recip_ptr, out_ptr, E: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
                K: tl.constexpr, GP: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + b, _peak(w_ptr, phy_ptr, cnt_ptr, recip_ptr, b, b, E, R, G, K, GP))


@triton.jit
def choose_kernel(w_ptr, phy_ptr, cnt_ptr, recip_ptr, moves_ptr, usable_ptr, limit_ptr, out_phy_ptr, out_cnt_ptr,
                  B, E: tl.constexpr, R: tl.constexpr, G: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                  GP: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    limit = tl.load(limit_ptr + b)
    # argmin in candidate order (running minima, strict comparisons: the first wins ties) of the moves where
    # within the limit (else _BIG) and of the heaviest GPU where usable (else inf).
    for c in tl.static_range(C):
        peak = _peak(w_ptr, phy_ptr, cnt_ptr, recip_ptr, b, c * B + b, E, R, G, K, GP)
        moves = tl.load(moves_ptr + b * C + c).to(tl.int64)
        usable = tl.load(usable_ptr + b * C + c) != 0
        if c == 0:  # a static if: the relabelled fresh placement is within the limit
            balanced = usable
            fewest = tl.where(balanced, 0, -1)
            fewest_moves = tl.where(balanced, moves, _BIG)
            lightest = 0
            lightest_peak = tl.where(usable, peak, float("inf"))
            any_usable = usable
        else:
            balanced = usable & (peak <= limit)
            better = balanced & (moves < fewest_moves)
            fewest = tl.where(better, c, fewest)
            fewest_moves = tl.where(better, moves, fewest_moves)
            key = tl.where(usable, peak, float("inf"))
            lighter = key < lightest_peak
            lightest = tl.where(lighter, c, lightest)
            lightest_peak = tl.where(lighter, key, lightest_peak)
            any_usable = any_usable | usable
    choice = tl.where(fewest >= 0, fewest, tl.where(any_usable, lightest, 0)).to(tl.int64)
    row = choice * B + b
    r = tl.arange(0, RP)
    tl.store(out_phy_ptr + b * R + r, tl.load(phy_ptr + row * R + r, mask=r < R), mask=r < R)
    e = tl.arange(0, EP)
    tl.store(out_cnt_ptr + b * E + e, tl.load(cnt_ptr + row * E + e, mask=e < E), mask=e < E)


def _meta(num_phy: int, num_log: int, num_gpus: int) -> dict[str, int]:
    if not fits(num_phy, num_log, num_gpus):
        raise ValueError(f"the choose kernels do not take {num_phy} slots, {num_log} experts, {num_gpus} GPUs")
    return {"E": num_log, "R": num_phy, "G": num_gpus, "K": num_phy // num_gpus, "GP": _pow2(num_gpus)}


def _recip(num_phy: int, device: torch.device) -> torch.Tensor:
    return _xp.reciprocal_table(num_phy, xp=torch, device=device)  # float32 [R + 1], cached on CUDA


def heaviest_gpu(
    weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_gpus: int, *, xp: Any = None
) -> torch.Tensor:
    """:func:`eplb.algorithms.repair.heaviest_gpu` (same arguments; ``xp`` is not used): ``[B, 1]`` float32.

    ``weight [B, E]`` float32, ``phy2log [B, R]`` and ``logcnt [B, E]`` integer, expert ids in ``[0, E)``
    and counts in ``[0, R]`` (not checked: that would read values on the host). A slot holding ``-1`` (a failed
    GPU's) weighs 0, as in :func:`eplb.algorithms.elastic.stabilize_elastic`'s GPU loads.
    """
    batch, num_phy = phy2log.shape
    out = torch.empty((batch, 1), dtype=torch.float32, device=phy2log.device)
    if batch == 0:
        return out
    meta = _meta(num_phy, weight.shape[1], num_gpus)
    ensure_cache_dir()
    with _on_device(phy2log.device):
        peak_kernel[(batch,)](
            weight.to(torch.float32).contiguous(),
            phy2log.to(torch.int64).contiguous(),
            logcnt.to(torch.int64).contiguous(),
            _recip(num_phy, phy2log.device),
            out,
            num_warps=4,
            enable_fp_fusion=False,
            **meta,
        )
    return out


def choose(
    weight: torch.Tensor,
    candidates: torch.Tensor,
    counts: torch.Tensor,
    moves: torch.Tensor,
    usable: torch.Tensor,
    limit: torch.Tensor,
    num_gpus: int,
    *,
    xp: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`eplb.algorithms.stability.choose` (same arguments; ``xp`` is not used).

    Returns ``phy2log [B, R]`` (``candidates``' dtype) and ``logcnt [B, E]`` (``counts``'), each a new tensor.
    """
    batch, num_choices = moves.shape
    num_phy, num_log = candidates.shape[1], counts.shape[1]
    out_phy = torch.empty((batch, num_phy), dtype=torch.int64, device=candidates.device)
    out_cnt = torch.empty((batch, num_log), dtype=torch.int64, device=candidates.device)
    if batch == 0:
        return out_phy.to(candidates.dtype), out_cnt.to(counts.dtype)
    meta = _meta(num_phy, num_log, num_gpus)
    ensure_cache_dir()
    with _on_device(candidates.device):
        choose_kernel[(batch,)](
            weight.to(torch.float32).contiguous(),
            candidates.to(torch.int64).contiguous(),
            counts.to(torch.int64).contiguous(),
            _recip(num_phy, candidates.device),
            moves.to(torch.int64).contiguous(),
            usable.to(torch.int8).contiguous(),
            limit.to(torch.float32).reshape(batch).contiguous(),
            out_phy,
            out_cnt,
            batch,
            C=num_choices,
            RP=_pow2(num_phy),
            EP=_pow2(num_log),
            num_warps=4,
            enable_fp_fusion=False,
            **meta,
        )
    return out_phy.to(candidates.dtype), out_cnt.to(counts.dtype)
