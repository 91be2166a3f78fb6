"""Equals :func:`eplb.algorithms.pairs.pair_counts` bit for bit, one Triton launch: the refined policy on torch CUDA.

As tensor operations the search is about 80 launches a round, and a CUDA
tensor cannot stop early without a host read, so all its rounds (32 at 288
slots) would add 2,500 launches to a refined call of 0.35 ms. Here one
program per row runs the rounds until one moves nothing, and evaluates a
round's ``2 * DONORS`` candidate moves side by side (``[C, n]`` blocks).

The program ranks experts instead of sorting items. Each expert's replicas
are a run of equal items in the array API's stable descending sort (experts
by replica load, equal loads by index). One sort of packed int64 keys per
fold ranks the experts: the complement of the load's float32 bits (loads are
>= 0, so their bits order as the loads), the expert, its count; a cumulative
sum of the counts in rank order then gives each run's ``[start, end)``. The
fold pairs item ``j`` with item ``S - 1 - j`` (``S``: the slots the row's
counts fill, its live slots; fewer than ``num_slots`` where it has idle GPUs); over an expert's items
``j < S / 2`` the partner only gets heavier as ``j`` grows, and float32
rounding is monotone, so the expert's heaviest pair is its item with the
partner at rank ``S - min(end, S / 2)``, whose run a binary search over the
run ends finds. The heaviest pair of the
row is the largest of these, the same float32 sums as the array API's fold.
The first heaviest pair in fold order belongs to the first-ranked expert
reaching it; its partner is the last-ranked run that meets the pair's
partner ranks with that same sum.

The rest follows the array API: donors by ``w * fl(1/(c - 1))`` ascending
(equal values by index; one more sort of packed keys), candidates in donor
order, heavy item's expert first, the first smallest heaviest pair, taken
where it is below ``current * IMPROVEMENT``. A row that rejects a round
would reject every later one (nothing changed), so stopping there gives the
array API's counts, as its ``refine_rows`` and the numba kernel do. Loads
are ``w * fl(1/c)`` from the correctly rounded table; the launcher compiles
with ``enable_fp_fusion=False``, so no product is contracted into an
addition (an FMA rounds once, not twice). Elements are
picked out of a vector by a masked sum of one term (exact) or a masked max.

An earlier version ranked by ``[n, n]`` comparisons: at 256 experts its
tiles spilled out of registers and the call took 134 ms on an H200. This one,
on an H200 (Triton 3.6, greedy counts of ``prefill_in2048``): 1.09 ms for 58
rows of 256 experts in 288 slots (3.39 ms before rows stopped early) and
0.18 ms for 232 rows of 64 in 72; the refined call over 144 GPUs 2.1 ms.

Proved by ``tests/test_pairs.py`` (Triton's CPU interpreter and CUDA
against the array-API function: random, tied, all-zero and one-expert
rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb import _xp
from eplb.algorithms.pairs import DONORS
from eplb.algorithms.refine import IMPROVEMENT
from eplb.kernels.greedy_triton import ensure_cache_dir

__all__ = ["MAX_EXPERTS", "MAX_SLOTS", "fits", "pair_counts"]

MAX_EXPERTS = 2048  # experts per row: 11 bits of the packed rank keys
MAX_SLOTS = 1 << 20  # slots per row: 20 bits of the packed rank keys


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fits(num_log: int, num_slots: int) -> bool:
    """Whether the kernel takes rows of ``num_log`` experts (at most :data:`MAX_EXPERTS`) in ``num_slots``, on
    this Triton (``tl.sort`` and ``tl.gather``: Triton 3.2 and later; else the array-API search runs)."""
    sized = 0 < num_log <= MAX_EXPERTS and num_log <= num_slots < MAX_SLOTS and num_slots % 2 == 0
    return sized and hasattr(tl, "gather") and hasattr(tl, "sort")


@triton.jit
def _ranked(v, cnt, valid):
    """Experts ``[R, NP]`` ranked by load (descending, equal loads by index): their loads, indices, counts."""
    e = tl.arange(0, v.shape[1])[None, :].to(tl.int64)
    bits = v.to(tl.int32, bitcast=True).to(tl.int64)
    # 0x7FFFFFFF minus a load's bits (loads are >= 0 floats: their bits order as they do): heavier first;
    # padding lanes get the largest key, after every expert.
    key = ((0x7FFFFFFF - bits) << 32) | (e << 20) | cnt.to(tl.int64)
    key = tl.sort(tl.where(valid, key, 0x7FFFFFFFFFFFFFFF))
    real = key != 0x7FFFFFFFFFFFFFFF
    load = (0x7FFFFFFF - (key >> 32)).to(tl.int32).to(tl.float32, bitcast=True)
    expert = ((key >> 20) & 0x7FF).to(tl.int32)
    count = tl.where(real, (key & 0xFFFFF).to(tl.int32), 0)
    return load, expert, count, real


@triton.jit
def _fold(v, cnt, valid, S, LOG: tl.constexpr, WHO: tl.constexpr):
    """Per row of ``[R, NP]`` whose counts fill ``S`` slots (the program's row; a scalar): the heaviest fold pair
    ``[R]``, and where ``WHO``, the experts of the first heaviest pair's heavy and light items ``[R]``."""
    half = S // 2
    NP: tl.constexpr = v.shape[1]
    load, expert, count, real = _ranked(v, cnt, valid)
    end = tl.cumsum(count, axis=1)
    start = end - count
    partner = S - tl.minimum(end, half)  # rank of the partner of each run's heaviest pair
    # The run holding rank partner: the number of runs ending at or before it (ends ascend; the padding
    # lanes end at S, past every rank).
    run = tl.zeros_like(partner)
    for b in tl.static_range(LOG):
        step = NP >> (b + 1)
        run = tl.where(tl.gather(end, run + step - 1, axis=1) <= partner, run + step, run)
    heavy_side = real & (count > 0) & (start < half)
    pair = tl.where(heavy_side, load + tl.gather(load, run, axis=1), -float("inf"))
    top = tl.max(pair, axis=1)
    if WHO:
        # The first heaviest pair: the first-ranked run reaching top; its partner the last-ranked run that
        # meets the run's partner ranks [S - min(end, half), S - 1 - start] with that same sum.
        k = tl.arange(0, NP)[None, :]
        first = tl.min(tl.where(heavy_side & (pair == top[:, None]), k, NP), axis=1)[:, None]
        is_heavy = k == first
        heavy = tl.sum(tl.where(is_heavy, expert, 0), axis=1)
        heavy_load = tl.sum(tl.where(is_heavy, load, 0.0), axis=1)[:, None]
        low = tl.sum(tl.where(is_heavy, partner, 0), axis=1)[:, None]
        high = S - 1 - tl.sum(tl.where(is_heavy, start, 0), axis=1)[:, None]
        meets = real & (count > 0) & (start <= high) & (end - 1 >= low) & ((heavy_load + load) == top[:, None])
        last = tl.max(tl.where(meets, k, -1), axis=1)[:, None]
        light = tl.sum(tl.where(k == last, expert, 0), axis=1)
    else:
        heavy = top.to(tl.int32)  # unused
        light = heavy
    return top, heavy, light


@triton.jit
def _pairs_kernel(
    load_ptr, count_ptr, out_ptr, table_ptr, n, iters,
    NP: tl.constexpr, LOG: tl.constexpr, DONORS_: tl.constexpr, C: tl.constexpr, IMPROVE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, NP)
    valid = e < n
    w = tl.load(load_ptr + row * n + e, mask=valid, other=0.0)
    cnt = tl.load(count_ptr + row * n + e, mask=valid, other=0).to(tl.int32)
    S = tl.sum(cnt, axis=0)  # the row's live slots: every move keeps the counts' sum
    cand = tl.arange(0, C)  # candidate c: donor c // 2 gives to the heavy (c even) or light item's expert
    inf = float("inf")
    step = iters * 0
    while step < iters:
        v = w * tl.load(table_ptr + cnt, mask=valid, other=0.0)
        top, heavy, light = _fold(v[None, :], cnt[None, :], valid[None, :], S, LOG, True)
        current = tl.max(top, axis=0)
        heavy = tl.sum(heavy, axis=0)
        light = tl.sum(light, axis=0)
        # Donors: experts of >= 2 replicas by their replicas' load after giving one up (equal: lower index).
        can = valid & (cnt >= 2)
        cost = tl.where(can, w * tl.load(table_ptr + (cnt - 1), mask=can, other=0.0), inf)
        donor_key = tl.sort((cost.to(tl.int32, bitcast=True).to(tl.int64) << 32) | e.to(tl.int64))
        picked = tl.sum(tl.where(e[None, :] == (cand // 2)[:, None], donor_key[None, :], 0), axis=1)  # [C]
        donor = (picked & 0xFFFFFFFF).to(tl.int32)
        target = tl.where(cand % 2 == 0, heavy, light)
        ok = ((picked >> 32) < 0x7F800000) & (cand // 2 < DONORS_) & (donor != target)  # a finite cost
        moved = (
            cnt[None, :]
            - tl.where(ok[:, None] & (e[None, :] == donor[:, None]), 1, 0)
            + tl.where(ok[:, None] & (e[None, :] == target[:, None]), 1, 0)
        )  # [C, NP]
        moved_load = w[None, :] * tl.load(table_ptr + moved, mask=valid[None, :], other=0.0)
        value, _, _ = _fold(moved_load, moved, valid[None, :], S, LOG, False)
        value = tl.where(ok, value, inf)
        best = tl.min(value, axis=0)
        chosen = tl.min(tl.where(value == best, cand, C), axis=0)  # the first smallest
        best_d = tl.sum(tl.where(cand == chosen, donor, 0), axis=0)
        best_t = tl.sum(tl.where(cand == chosen, target, 0), axis=0)
        accept = best < current * IMPROVE
        cnt = tl.where(accept, cnt - (e == best_d).to(tl.int32) + (e == best_t).to(tl.int32), cnt)
        # A round that moves nothing leaves the same counts for every later one: stop there, as the array API's
        # refine_rows and the numba kernel do (rows stop long before iters: default_pair_iterations).
        step = tl.where(accept, step + 1, iters)
    tl.store(out_ptr + row * n + e, cnt.to(tl.int64), mask=valid)


def pair_counts(load: torch.Tensor, count: torch.Tensor, num_slots: int, num_iters: int, *, xp: object = None):
    """:func:`eplb.algorithms.pairs.pair_counts` on tensors of one device (same counts, same dtype as ``count``);
    rows that :func:`fits` rejects raise ``ValueError``."""
    del xp
    batch, num_log = load.shape
    if batch == 0 or num_slots == num_log or num_iters <= 0:
        return count
    if not fits(num_log, num_slots):
        raise ValueError(
            f"the pair-count kernel takes rows of 1 to {MAX_EXPERTS} experts in an even number of slots below "
            f"{MAX_SLOTS}, got {num_log} experts in {num_slots} slots"
        )
    ensure_cache_dir()
    out = torch.empty((batch, num_log), dtype=torch.int64, device=load.device)
    table = _xp.reciprocal_table(num_slots - num_log + 1, xp=_xp.array_namespace(load), device=load.device)
    _pairs_kernel[(batch,)](
        load.to(torch.float32).contiguous(),
        count.to(torch.int64).contiguous(),
        out,
        table,
        num_log,
        num_iters,
        NP=_pow2(num_log),
        LOG=_pow2(num_log).bit_length() - 1,
        DONORS_=min(DONORS, num_log),
        C=_pow2(2 * DONORS),
        IMPROVE=IMPROVEMENT,
        num_warps=4 if num_log <= 128 else 8,  # [C, n] blocks: 16 candidates side by side
        enable_fp_fusion=False,
    )
    return out.to(count.dtype)
