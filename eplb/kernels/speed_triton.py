"""Equals :mod:`eplb.algorithms.speed`'s packing loops bit for bit, on CUDA (Triton): ``gpu_capacity`` on torch.

Placement by time (``gpu_capacity=``) packs replicas by LPT on time, pairs
them by a time budget, and refines by swaps out of the slowest GPU. As
torch ops those loops are one tensor operation per step: 8,000 to 32,000
launches a call at the DeepSeek-V3 sizes (150-400 ms of host time on an
H200 host). Here each is one launch, one program per row:

- :func:`lpt_pack_speed` = :func:`eplb.algorithms.speed.lpt_pack_speed`:
  the visiting order is the same stable descending sort (``torch.sort``,
  outside the kernel), then one step per item over ``[packs]`` registers;
  the key is ``fl32(min(load + item, float32 max)) * inverse``, one product
  compared, never added to;
- :func:`pair_pack_speed` = :func:`eplb.algorithms.speed.pair_pack_speed`:
  packs fastest first (the same sort, outside), then per pack the heaviest
  item left and its partner, ``fl32(load_x + load_y) * inverse <= budget``
  (a sum, then a product: no fused multiply-add can form);
- :func:`refine_by_swaps_speed` = :func:`eplb.algorithms.speed.refine_by_swaps_speed`:
  the rounds in a loop that ends at the first round that changes nothing
  (every later round would change nothing either, so the result is the
  same as running them all); a pack's load is its slots' left-to-right sum;
  the candidate moves are scanned swap by swap in the array API's row-major
  ``(i, b, j)`` order, then the exchanges, the first smallest value winning.

Ties are the array API's (first minimum or maximum), and elements are
picked out of a vector by a masked sum of one term (exact). Proved by
``tests/test_kernels_speed_triton.py`` (Triton's CPU interpreter and CUDA
against the array-API functions: idle packs, phantoms, ties, all-zero
rows, one slot per pack, every pack but one idle, early and late
exits; and ``gpu_capacity=`` end to end on torch tensors against numpy).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.refine import IMPROVEMENT
from eplb.kernels.greedy_triton import ensure_cache_dir

__all__ = ["fits", "lpt_pack_speed", "pair_pack_speed", "refine_by_swaps_speed"]

MAX_TILE = 16384  # packs x slots a pack (padded to powers of two), and items a row, in registers


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _per_row(x: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """``x [B or 1, k]`` as a contiguous ``[B, k]`` of ``dtype`` (a row the kernel reads at ``row * k``)."""
    return x.to(dtype).expand(batch, x.shape[-1]).contiguous()


def _limits(limit: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """``limit [B or 1, 1]`` as a contiguous float32 ``[B]`` (``-inf``, no limit, where ``None``)."""
    if limit is None:
        return torch.full((batch,), -float("inf"), dtype=torch.float32, device=device)
    return limit.to(device=device, dtype=torch.float32).reshape(-1).expand(batch).contiguous()


def fits(num_items: int, num_packs: int) -> bool:
    """Whether the kernels take rows of ``num_items`` items in ``num_packs`` equal packs."""
    if num_items <= 0 or num_packs <= 0 or num_items % num_packs:
        return False
    per_pack = num_items // num_packs
    return _pow2(num_packs) * _pow2(per_pack) <= MAX_TILE and _pow2(num_items) <= MAX_TILE


# ---------------------------------------------------------------- LPT on time


@triton.jit
def _lpt_kernel(w_ptr, live_ptr, inv_ptr, pack_ptr, rank_ptr, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                PER: tl.constexpr, MOST: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    pm = tl.arange(0, MP)
    real = pm < M
    live = (tl.load(live_ptr + row * M + pm, mask=real, other=0) != 0) & real
    inverse = tl.load(inv_ptr + row * M + pm, mask=real, other=1.0)
    load = tl.zeros([MP], tl.float32)
    count = tl.zeros([MP], tl.int32)
    for t in range(N):
        w = tl.load(w_ptr + row * N + t)
        after = tl.minimum(load + w, MOST)
        key = tl.where((count >= PER) | (~live), float("inf"), after * inverse)
        pack = tl.argmin(key, axis=0, tie_break_left=True)
        chosen = pm == pack
        rank = tl.sum(tl.where(chosen, count, 0), axis=0)
        load = tl.where(chosen, after, load)
        count = count + chosen.to(tl.int32)
        tl.store(pack_ptr + row * N + t, pack.to(tl.int64))
        tl.store(rank_ptr + row * N + t, rank.to(tl.int64))


def lpt_pack_speed(
    weight: torch.Tensor, live_pack: torch.Tensor, inverse: torch.Tensor, per_pack: int, *, xp: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`eplb.algorithms.speed.lpt_pack_speed` of ``weight [B, n]`` (float32) onto packs ``live_pack [B,
    m]`` (bool) of ``inverse [B, m]`` (float32): ``order``, ``pack_by_step``, ``rank_by_step`` ``[B, n]``
    int64 (``xp`` is not used)."""
    ensure_cache_dir()
    batch, n = weight.shape
    num_packs = live_pack.shape[-1]
    weight = weight.to(torch.float32)
    order = torch.sort(weight, dim=-1, descending=True, stable=True).indices  # argsort_desc's order
    by_step = torch.take_along_dim(weight, order, dim=-1).contiguous()
    pack_by_step = torch.empty((batch, n), dtype=torch.int64, device=weight.device)
    rank_by_step = torch.empty((batch, n), dtype=torch.int64, device=weight.device)
    if batch and n:
        _lpt_kernel[(batch,)](
            by_step,
            _per_row(live_pack, batch, torch.int8),
            _per_row(inverse, batch, torch.float32),
            pack_by_step,
            rank_by_step,
            N=n,
            M=num_packs,
            MP=_pow2(num_packs),
            PER=per_pack,
            MOST=MAX_LOAD,
            enable_fp_fusion=False,  # no multiply-add contracted into an FMA: the array API rounds each
        )
    return order, pack_by_step, rank_by_step


# ---------------------------------------------------------------- pairing by a time budget


@triton.jit
def _pair_kernel(load_ptr, inv_ptr, order_ptr, budget_ptr, out_ptr, N: tl.constexpr, M: tl.constexpr,
                 NP: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    ids = tl.arange(0, NP)
    real = ids < N
    item = tl.load(load_ptr + row * N + ids, mask=real, other=-float("inf"))
    left = item
    budget = tl.load(budget_ptr + row)
    for t in range(M):
        pack_inverse = tl.load(inv_ptr + row * M + t)
        first = tl.argmax(left, axis=0, tie_break_left=True)
        first_load = tl.sum(tl.where(ids == first, item, 0.0), axis=0)
        left = tl.where(ids == first, -float("inf"), left)
        within = (left >= 0) & ((first_load + left) * pack_inverse <= budget)
        idle = (tl.zeros([NP], tl.float32) + pack_inverse) == float("inf")  # an idle pack takes the phantoms
        fit = tl.where(within | (idle & (left > -float("inf"))), left, -float("inf"))
        heaviest = tl.argmax(fit, axis=0, tie_break_left=True)
        lightest = tl.argmin(tl.where(left >= 0, left, float("inf")), axis=0, tie_break_left=True)
        partner = tl.where(tl.max(fit, axis=0) > -float("inf"), heaviest, lightest)
        left = tl.where(ids == partner, -float("inf"), left)
        pack = tl.load(order_ptr + row * M + t)
        tl.store(out_ptr + row * N + pack * 2, first.to(tl.int64))
        tl.store(out_ptr + row * N + pack * 2 + 1, partner.to(tl.int64))


def pair_pack_speed(
    item_load: torch.Tensor, live_pack: torch.Tensor, inverse: torch.Tensor, budget: torch.Tensor, *, xp: Any = None
) -> torch.Tensor:
    """:func:`eplb.algorithms.speed.pair_pack_speed`: ``slot2item [B, 2m]`` int64 for ``item_load [B, 2m]``
    (float32, phantoms ``-1``), ``live_pack``, ``inverse [B, m]`` and ``budget [B, 1]`` (``xp`` is not
    used)."""
    ensure_cache_dir()
    batch, n = item_load.shape
    num_packs = live_pack.shape[-1]
    live_pack = live_pack.expand(batch, num_packs)
    inverse = inverse.to(torch.float32).expand(batch, num_packs)
    inf = torch.full((), float("inf"), dtype=torch.float32, device=item_load.device)
    fastest = torch.where(live_pack, -inverse, -inf)
    pack_order = torch.sort(fastest, dim=-1, descending=True, stable=True).indices  # fastest first, idle last
    inverse_by_step = torch.take_along_dim(torch.where(live_pack, inverse, inf), pack_order, dim=-1).contiguous()
    slot2item = torch.empty((batch, n), dtype=torch.int64, device=item_load.device)
    if batch and n:
        _pair_kernel[(batch,)](
            item_load.to(torch.float32).contiguous(),
            inverse_by_step,
            pack_order.contiguous(),
            _per_row(budget, batch, torch.float32),
            slot2item,
            N=n,
            M=num_packs,
            NP=_pow2(n),
            enable_fp_fusion=False,  # no multiply-add contracted into an FMA: the array API rounds each
        )
    return slot2item


# ---------------------------------------------------------------- swaps and exchanges out of the slowest pack


@triton.jit
def _pick(x, mask):
    """The one element of ``x`` where ``mask`` holds (a masked sum of one term: exact)."""
    return tl.sum(tl.where(mask, x, tl.zeros_like(x)), axis=0)


@triton.jit
def _pick2(x, mask):
    """:func:`_pick` on a 2-D tile."""
    return tl.sum(tl.sum(tl.where(mask, x, tl.zeros_like(x)), axis=1), axis=0)


@triton.jit(do_not_specialize=["iters"])
def _swaps_kernel(load_ptr, s2i_ptr, inv_ptr, live_ptr, limit_ptr, out_ptr, iters, N: tl.constexpr, M: tl.constexpr,
                  K: tl.constexpr, MP: tl.constexpr, KP: tl.constexpr, IMPROVE: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    pm = tl.arange(0, MP)
    rk = tl.arange(0, KP)
    p = pm[:, None]
    r = rk[None, :]
    real = (p < M) & (r < K)
    s2i = tl.load(s2i_ptr + row * N + p * K + r, mask=real, other=0)
    slot_load = tl.load(load_ptr + row * N + s2i, mask=real, other=0.0)  # item_load[slot2item]
    inverse = tl.load(inv_ptr + row * M + pm, mask=pm < M, other=1.0)
    live = (tl.load(live_ptr + row * M + pm, mask=pm < M, other=0) != 0) & (pm < M)
    limit = tl.load(limit_ptr + row)
    WIDTH: tl.constexpr = K * M * K
    step = iters * 0
    while step < iters:
        loads = tl.sum(tl.where(r == 0, slot_load, 0.0), axis=1)  # [MP], left to right over the slots
        for k in tl.static_range(1, K):
            loads = loads + tl.sum(tl.where(r == k, slot_load, 0.0), axis=1)
        heavy = tl.argmax(tl.where(live, loads * inverse, -float("inf")), axis=0, tie_break_left=True)
        is_heavy = pm == heavy
        heavy_load = _pick(loads, is_heavy)
        heavy_inverse = _pick(inverse, is_heavy)
        heavy_items = tl.sum(tl.where(p == heavy, slot_load, 0.0), axis=0)  # [KP]
        barred = is_heavy | (~live)
        partner_load = tl.where(barred, float("inf"), loads)
        best_value = tl.min(tl.full([MP], float("inf"), tl.float32), axis=0)
        best = heavy * 0
        for i in tl.static_range(K):
            out_i = _pick(heavy_items, rk == i)
            new_heavy = ((heavy_load - out_i) + slot_load) * heavy_inverse
            new_other = ((partner_load[:, None] - slot_load) + out_i) * inverse[:, None]
            worst = tl.where(real, tl.maximum(new_heavy, new_other), float("inf"))
            # The first (b, j), row-major, of the least value, found on the tile itself: an argmin of the tile
            # reshaped to 1-D is wrong on a GPU, where Triton lets a reshape that feeds a reduction reorder its
            # elements (tt.reshape allow_reorder), so the argmin's position no longer names (b, j).
            value = tl.min(tl.min(worst, axis=1), axis=0)
            at = tl.min(tl.min(tl.where(real & (worst == value), p * K + r, WIDTH), axis=1), axis=0)
            index = i * (M * K) + at  # the array API's (i, b, j) row-major index
            better = value < best_value
            best = tl.where(better, index, best)
            best_value = tl.where(better, value, best_value)
        exchanges = tl.where(barred, float("inf"), tl.maximum(loads * heavy_inverse, heavy_load * inverse))
        at = tl.argmin(exchanges, axis=0, tie_break_left=True)
        value = tl.min(exchanges, axis=0)
        better = value < best_value
        best = tl.where(better, WIDTH + at, best)
        best_value = tl.where(better, value, best_value)
        heavy_time = heavy_load * heavy_inverse
        accept = (best_value < heavy_time * IMPROVE) & (heavy_time > limit)  # a row within its limit stops

        is_swap = accept & (best < WIDTH)
        is_exchange = accept & (best >= WIDTH)
        partner = tl.where(is_exchange, best - WIDTH, heavy)
        give = (p == heavy) & (r == best // (M * K))
        take = (p == (best // K) % M) & (r == best % K)
        give_load, take_load = _pick2(slot_load, give), _pick2(slot_load, take)
        give_item, take_item = _pick2(s2i, give), _pick2(s2i, take)
        heavy_row_load = tl.sum(tl.where(p == heavy, slot_load, 0.0), axis=0)[None, :]
        partner_row_load = tl.sum(tl.where(p == partner, slot_load, 0.0), axis=0)[None, :]
        heavy_row_item = tl.sum(tl.where(p == heavy, s2i, 0), axis=0)[None, :]
        partner_row_item = tl.sum(tl.where(p == partner, s2i, 0), axis=0)[None, :]
        swapped_load = tl.where(give, take_load, tl.where(take, give_load, slot_load))
        swapped_item = tl.where(give, take_item, tl.where(take, give_item, s2i))
        exchanged_load = tl.where(p == heavy, partner_row_load, tl.where(p == partner, heavy_row_load, slot_load))
        exchanged_item = tl.where(p == heavy, partner_row_item, tl.where(p == partner, heavy_row_item, s2i))
        slot_load = tl.where(is_swap, swapped_load, tl.where(is_exchange, exchanged_load, slot_load))
        s2i = tl.where(is_swap, swapped_item, tl.where(is_exchange, exchanged_item, s2i))
        # A round that changes nothing leaves the same state for every later one: stop there.
        step = tl.where(accept, step + 1, iters)
    tl.store(out_ptr + row * N + p * K + r, s2i, mask=real)


def refine_by_swaps_speed(
    item_load: torch.Tensor,
    slot2item: torch.Tensor,
    inverse: torch.Tensor,
    live_pack: torch.Tensor,
    num_iters: int,
    *,
    limit: torch.Tensor | None = None,
    xp: Any = None,
) -> torch.Tensor:
    """:func:`eplb.algorithms.speed.refine_by_swaps_speed`: ``slot2item [B, n]`` (its dtype) after at most
    ``num_iters`` rounds, for ``item_load [B, n]`` (float32), ``inverse``, ``live_pack [B, m]`` and
    ``limit [B, 1]`` (optional; ``xp`` is not used)."""
    ensure_cache_dir()
    batch, n = slot2item.shape
    num_packs = inverse.shape[-1]
    per_pack = n // num_packs
    out = torch.empty_like(slot2item)
    if batch and n and num_iters > 0:
        _swaps_kernel[(batch,)](
            item_load.to(torch.float32).contiguous(),
            slot2item.contiguous(),
            _per_row(inverse, batch, torch.float32),
            _per_row(live_pack, batch, torch.int8),
            _limits(limit, batch, slot2item.device),
            out,
            num_iters,
            N=n,
            M=num_packs,
            K=per_pack,
            MP=_pow2(num_packs),
            KP=_pow2(per_pack),
            IMPROVE=IMPROVEMENT,
            enable_fp_fusion=False,  # no multiply-add contracted into an FMA: the array API rounds each
        )
    else:
        out.copy_(slot2item)
    return out
