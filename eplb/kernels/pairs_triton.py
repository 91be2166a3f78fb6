"""Equals :func:`eplb.algorithms.pairs.pair_counts` bit for bit, one Triton launch: the refined policy on torch CUDA.

As tensor operations the search is about 80 launches a round, and a CUDA
tensor cannot stop early without a host read, so all its rounds (32 at 288
slots) would add 2,500 launches to a refined call of 0.35 ms. Here one
program per row runs every round.

The program ranks experts instead of sorting items. Each expert's replicas
are a run of equal items in the array API's stable descending sort (experts
by replica load, equal loads by index), so with ``before[e, f]`` = ``f``
ranks before ``e`` (an ``[n, n]`` comparison) an expert's first item sits at
``start_e``, the sum of the counts ranked before it. The fold pairs item
``j`` with item ``S - 1 - j``; over an expert's items ``j < S / 2`` the
partner only gets heavier as ``j`` grows, and float32 rounding is monotone,
so the expert's heaviest pair is its item with the partner at rank
``S - min(end_e, S / 2)``, found by the run that contains that rank. The
heaviest pair of the row is the largest of these, the same float32 sums as
the array API's fold. The first heaviest pair in fold order belongs to the
first-ranked expert reaching it; its partner is the last-ranked expert whose
run meets the pair's partner ranks with that same sum.

Every candidate is evaluated the same way with its two changed counts; the
rest follows the array API: donors by ``w * fl(1/(c - 1))`` ascending
(equal values by index), candidates in donor order, heavy item's expert
first, the first smallest heaviest pair, taken where it is below
``current * IMPROVEMENT``. A row that rejects a round would reject every
later one (nothing changed), so running all rounds gives the array API's
counts. Loads are ``w * fl(1/c)`` from the correctly rounded table; the
launcher compiles with ``enable_fp_fusion=False``, so no product is
contracted into an addition (an FMA rounds once, not twice). Elements are
picked out of a vector by a masked sum of one term (exact) or a masked max.

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

__all__ = ["MAX_EXPERTS", "fits", "pair_counts"]

MAX_EXPERTS = 512  # experts per row: the program holds [n, n] comparisons


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fits(num_log: int, num_slots: int) -> bool:
    """Whether the kernel takes rows of ``num_log`` experts (at most :data:`MAX_EXPERTS`) in ``num_slots``."""
    return 0 < num_log <= MAX_EXPERTS and num_slots >= num_log and num_slots % 2 == 0


@triton.jit
def _fold(v, cnt, e, valid, S: tl.constexpr):
    """The row's heaviest fold pair ``[]`` and the experts of its first heaviest pair's two items."""
    half = S // 2
    ve, vf = v[:, None], v[None, :]
    before = ((vf > ve) | ((vf == ve) & (e[None, :] < e[:, None]))) & valid[None, :]  # f ranks before e
    start = tl.sum(tl.where(before, cnt[None, :], 0), axis=1)  # each expert's first item
    end = start + cnt
    partner = S - tl.minimum(end, half)  # rank of the partner of the expert's heaviest pair
    runs = (start[None, :] <= partner[:, None]) & (partner[:, None] < end[None, :]) & valid[None, :]
    partner_load = tl.max(tl.where(runs, vf, -float("inf")), axis=1)
    heavy_side = valid & (start < half)
    pair = tl.where(heavy_side, v + partner_load, -float("inf"))
    top = tl.max(pair, axis=0)
    # The first heaviest pair: the first-ranked expert reaching top, and its partner the last-ranked run
    # that meets the expert's partner ranks [S - min(end, half), S - 1 - start] with that same sum.
    reach = heavy_side & (pair == top)
    first = tl.min(tl.where(reach, start, 2 * S), axis=0)
    is_heavy = reach & (start == first)
    heavy = tl.sum(tl.where(is_heavy, e, 0), axis=0)
    heavy_load = tl.sum(tl.where(is_heavy, v, 0.0), axis=0)
    low = tl.sum(tl.where(is_heavy, partner, 0), axis=0)
    high = S - 1 - first
    meets = valid & (start <= high) & (end - 1 >= low) & ((heavy_load + v) == top)
    last = tl.max(tl.where(meets, start, -1), axis=0)
    light = tl.sum(tl.where(meets & (start == last), e, 0), axis=0)
    return top, heavy, light


@triton.jit
def _pairs_kernel(
    load_ptr, count_ptr, out_ptr, table_ptr, n, iters,
    S: tl.constexpr, NP: tl.constexpr, DONORS_: tl.constexpr, IMPROVE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, NP)
    valid = e < n
    w = tl.load(load_ptr + row * n + e, mask=valid, other=0.0)
    cnt = tl.load(count_ptr + row * n + e, mask=valid, other=0).to(tl.int32)
    inf = float("inf")
    for _ in range(iters):
        v = w * tl.load(table_ptr + cnt, mask=valid, other=0.0)
        current, heavy, light = _fold(v, cnt, e, valid, S)
        can = valid & (cnt >= 2)
        cost = tl.where(can, w * tl.load(table_ptr + (cnt - 1), mask=can, other=0.0), inf)
        ce, cf = cost[:, None], cost[None, :]
        donor_rank = tl.sum(((cf < ce) | ((cf == ce) & (e[None, :] < e[:, None]))).to(tl.int32), axis=1)
        best = inf
        best_d = -1
        best_t = -1
        for i in tl.static_range(DONORS_):
            is_d = (donor_rank == i) & can
            d_ok = tl.sum(is_d.to(tl.int32), axis=0) > 0
            d = tl.sum(tl.where(is_d, e, 0), axis=0)
            for side in tl.static_range(2):
                t = heavy if side == 0 else light  # unrolled: side is a constant
                ok = d_ok & (t != d)
                moved = cnt - tl.where(ok & (e == d), 1, 0) + tl.where(ok & (e == t), 1, 0)
                moved_load = w * tl.load(table_ptr + moved, mask=valid, other=0.0)
                value, _, _ = _fold(moved_load, moved, e, valid, S)
                value = tl.where(ok, value, inf)
                better = value < best
                best = tl.where(better, value, best)
                best_d = tl.where(better, d, best_d)
                best_t = tl.where(better, t, best_t)
        accept = best < current * IMPROVE
        cnt = tl.where(accept, cnt - (e == best_d).to(tl.int32) + (e == best_t).to(tl.int32), cnt)
    tl.store(out_ptr + row * n + e, cnt.to(tl.int64), mask=valid)


def pair_counts(load: torch.Tensor, count: torch.Tensor, num_slots: int, num_iters: int, *, xp: object = None):
    """:func:`eplb.algorithms.pairs.pair_counts` on tensors of one device (same counts, same dtype as ``count``);
    rows that :func:`fits` rejects raise ``ValueError``."""
    del xp
    batch, num_log = load.shape
    if batch == 0 or num_slots == num_log or num_iters <= 0:
        return count
    if not fits(num_log, num_slots):
        raise ValueError(f"the pair-count kernel takes 1 to {MAX_EXPERTS} experts a row, got {num_log}")
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
        S=num_slots,
        NP=_pow2(num_log),
        DONORS_=min(DONORS, num_log),
        IMPROVE=IMPROVEMENT,
        num_warps=4 if num_log <= 64 else 8 if num_log <= 128 else 16,  # [n, n] tiles: about 128 elements a thread
        enable_fp_fusion=False,
    )
    return out.to(count.dtype)
