"""Arithmetic and packing for GPUs of unequal speed (``gpu_capacity``), without float division.

A GPU's *time* is its load divided by its capacity. No division decides
anything here: times are ``load * inv`` with ``inv = fl32(2**k / c)``, the
correctly rounded float32 reciprocal of each capacity scaled by a power of
two ``2**k`` common to a row (the largest capacity's), made by
:func:`inverse_capacity` with exact integer long division, so every backend
(JAX on a GPU included, whose float32 division is not correctly rounded)
gets the same bits, also for capacities traced under ``jit``. Scaling every
time by the same power of two changes no comparison.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.loads import MAX_LOAD, TINY_LOAD
from eplb.algorithms.packing import sum_left_to_right
from eplb.algorithms.refine import IMPROVEMENT

__all__ = [
    "SPEED_RANGE",
    "capacity_live",
    "clean_capacity",
    "inverse_capacity",
    "lpt_pack_speed",
    "pack_times",
    "pair_pack_speed",
    "refine_by_swaps_speed",
]

# Capacities below 2**-SPEED_RANGE times the largest count as 0 (a GPU 10**12 times slower than
# the fastest is idle; the API rejects such values where it reads them), so every scaled
# reciprocal lies in (2**-1, 2**(SPEED_RANGE + 1)].
SPEED_RANGE = 40
_MIN_EXP = -64  # loads.TINY_LOAD = 2**-64: the smallest capacity kept


def clean_capacity(capacity: Any, *, xp: Any) -> Any:
    """float32 ``capacity [..., G]`` as the placement reads it: below ``2**-64``, NaN, inf or negative -> 0."""
    capacity = xp.astype(capacity, xp.float32)
    keep = (capacity >= TINY_LOAD) & (capacity <= MAX_LOAD)  # false for NaN
    return xp.where(keep, capacity, xp.zeros_like(capacity))


def _exponent(capacity: Any, *, xp: Any) -> Any:
    """int32 ``floor(log2 c)`` of clean capacities (``-64`` for 0), by exact comparisons with powers of two."""
    powers = _xp.constant([2.0**k for k in range(_MIN_EXP + 1, 128)], xp=xp, device=_xp.device(capacity))
    above = xp.astype(capacity[..., None] >= xp.astype(powers, xp.float32), xp.int32)
    return xp.sum(above, axis=-1) + _MIN_EXP


def _power_of_two(exponent: Any, *, xp: Any) -> Any:
    """float32 ``2**exponent`` for an int array ``exponent`` in ``[-126, 127]`` (a table lookup: exact)."""
    table = _xp.constant([2.0**k for k in range(-126, 128)], xp=xp, device=_xp.device(exponent))
    flat = xp.take(xp.astype(table, xp.float32), xp.reshape(xp.astype(exponent + 126, xp.int32), (-1,)), axis=0)
    return xp.reshape(flat, exponent.shape)


def capacity_live(capacity: Any, *, xp: Any) -> Any:
    """bool ``[..., G]``: clean capacities, positive and at least ``2**-SPEED_RANGE`` times the row's largest."""
    exponent = _exponent(capacity, xp=xp)
    return (capacity > 0) & (exponent >= xp.max(exponent, axis=-1, keepdims=True) - SPEED_RANGE)


def inverse_capacity(capacity: Any, *, xp: Any) -> Any:
    """float32 ``inv [..., G]``: ``fl32(2**k / c)``, correctly rounded, ``k`` the exponent of the row's largest ``c``.

    ``capacity [..., G]`` clean (:func:`clean_capacity`). GPUs that
    :func:`capacity_live` marks idle get ``1.0`` (callers give them key
    ``+inf``). With ``c = m * 2**(e - 23)``, ``m`` an integer in ``[2**23,
    2**24)``: ``q = 2**47 // m`` by long division in int32 (every value below
    ``2**25``), rounded to nearest by the remainder (never a tie: ``m * (2q +
    1) = 2**48`` has no solution; ``m = 2**23`` leaves remainder 0), then
    ``q * 2**(k - e - 24)``, an exact scaling: the float32 nearest ``2**k / c``,
    which is numpy's ``float32(1) / c`` times ``2**k`` wherever ``1 / c`` is a
    normal float32 (the scaling also keeps it exact where it is not).
    """
    exponent = _exponent(capacity, xp=xp)
    top = xp.max(exponent, axis=-1, keepdims=True)
    live = (capacity > 0) & (exponent >= top - SPEED_RANGE)
    exponent = xp.where(live, exponent, xp.zeros_like(exponent))
    scaled = xp.where(live, capacity, xp.ones_like(capacity)) * _power_of_two(23 - exponent, xp=xp)
    mantissa = xp.astype(scaled, xp.int32)  # exact: an integer in [2**23, 2**24)
    quotient = xp.ones_like(mantissa)  # 2**24 // m = 1
    remainder = 2**24 - mantissa
    for _ in range(23):
        remainder = remainder * 2
        bit = xp.astype(remainder >= mantissa, xp.int32)
        quotient = quotient * 2 + bit
        remainder = remainder - bit * mantissa
    quotient = quotient + xp.astype(remainder * 2 > mantissa, xp.int32)  # <= 2**24: exact in float32
    shift = xp.where(live, top - exponent - 24, xp.zeros_like(exponent) - 24)
    inverse = xp.astype(quotient, xp.float32) * _power_of_two(shift, xp=xp)
    return xp.where(live, inverse, xp.ones_like(inverse))


def lpt_pack_speed(weight: Any, live_pack: Any, inverse: Any, per_pack: int, *, xp: Any) -> tuple[Any, Any, Any]:
    """LPT by time: ``order``, ``pack_by_step``, ``rank_by_step``, each ``[B, n]``.

    Items in decreasing weight (equal weights: lower index first), each to the
    open live pack (``live_pack [B, m]``; open: fewer than ``per_pack`` items)
    that would finish it first, the smallest ``fl32(fl32(load + item) *
    inverse)`` (``inverse [B, m]``, positive; equal keys: the lowest pack).
    Running loads are float32 sums in visiting order, saturating at float32
    max. Steps after every live pack is full return unspecified packs
    (callers ignore them). With one item per pack the heaviest item goes to
    the fastest pack (no "item ``i`` to pack ``i``" shortcut).
    """
    batch, _ = weight.shape
    num_packs = live_pack.shape[1]
    device = _xp.device(weight)
    order = _xp.argsort_desc(weight, xp=xp)
    weight_by_step = xp.permute_dims(_xp.take_along(weight, order, xp=xp), (1, 0))  # [n, B]
    pack_ids = xp.arange(num_packs, dtype=order.dtype, device=device)
    most = xp.full((1, 1), MAX_LOAD, dtype=weight.dtype, device=device)
    dead = ~live_pack
    zeros = xp.zeros((batch, num_packs), dtype=weight.dtype, device=device)

    def visit(carry: Any, item_weight: Any) -> tuple[Any, Any]:
        load, pack_count = carry
        after = xp.minimum(load + xp.reshape(item_weight, (batch, 1)), most)
        key = xp.where((pack_count >= per_pack) | dead, xp.inf, after * inverse)
        pack = xp.reshape(xp.argmin(key, axis=-1), (batch, 1))  # first minimum wins
        rank = _xp.take_along(pack_count, pack, xp=xp)
        chosen = pack_ids == pack
        return (xp.where(chosen, after, load), pack_count + xp.astype(chosen, weight.dtype)), (pack[:, 0], rank[:, 0])

    _, (pack_by_step, rank_by_step) = _xp.scan(visit, (zeros, zeros), weight_by_step, xp=xp)
    pack_by_step = xp.astype(xp.permute_dims(pack_by_step, (1, 0)), order.dtype)
    return order, pack_by_step, xp.astype(xp.permute_dims(rank_by_step, (1, 0)), order.dtype)


def pair_pack_speed(item_load: Any, live_pack: Any, inverse: Any, budget: Any, *, xp: Any) -> Any:
    """Two items per pack, by a time budget: ``slot2item [B, 2m]`` (pack ``p`` holds slots ``2p, 2p + 1``).

    Packs are visited fastest first (smallest ``inverse [B, m]``, equal ones
    by index; idle packs, ``live_pack`` false, last). Each takes the heaviest
    item left (equal loads: lower index) and, as its partner, the heaviest
    live item left that keeps it within ``budget [B, 1]``: ``fl32(load_x +
    load_y) * inverse <= budget``; if none fits, the lightest live item left
    (lower index on ties). Live items have loads ``>= 0``, phantoms ``-1``;
    with ``2 * live packs`` live items the live packs take exactly the live
    items and idle packs the phantoms (an idle pack's partner: the heaviest
    item left). Best fit by size under one time limit:
    the fast packs pair each heavy replica with the largest one that fits
    beside it, which leaves the middle-sized ones to pair up on slow packs.
    """
    batch, n = item_load.shape
    device = _xp.device(item_load)
    pack_order = _xp.argsort_desc(xp.where(live_pack, -inverse, -xp.inf), xp=xp)  # fastest first, idle last
    index_dtype = pack_order.dtype
    idle_inverse = xp.where(live_pack, inverse, xp.inf)  # an idle pack: every phantom fits, no live item
    inverse_by_step = xp.permute_dims(_xp.take_along(idle_inverse, pack_order, xp=xp), (1, 0))  # [m, B]
    ids = xp.arange(n, dtype=index_dtype, device=device)

    def visit(left: Any, pack_inverse: Any) -> tuple[Any, Any]:  # left: the loads of the items left, else -inf
        first = xp.reshape(xp.argmax(left, axis=-1), (batch, 1))
        left = xp.where(ids == first, -xp.inf, left)
        pack_inverse = xp.reshape(pack_inverse, (batch, 1))
        within = (left >= 0) & ((_xp.take_along(item_load, first, xp=xp) + left) * pack_inverse <= budget)
        fits = xp.where(within | ((pack_inverse == xp.inf) & (left > -xp.inf)), left, -xp.inf)
        heaviest = xp.reshape(xp.argmax(fits, axis=-1), (batch, 1))
        lightest = xp.reshape(xp.argmin(xp.where(left >= 0, left, xp.inf), axis=-1), (batch, 1))
        partner = xp.where(_xp.take_along(fits, heaviest, xp=xp) > -xp.inf, heaviest, lightest)
        return xp.where(ids == partner, -xp.inf, left), (first[:, 0], partner[:, 0])

    _, (firsts, partners) = _xp.scan(visit, item_load, inverse_by_step, xp=xp)
    rows = xp.reshape(xp.arange(batch, dtype=index_dtype, device=device), (batch, 1))
    slot2item = xp.empty((batch, n), dtype=index_dtype, device=device)
    for offset, items in ((0, firsts), (1, partners)):
        items = xp.astype(xp.permute_dims(items, (1, 0)), index_dtype)  # [B, m]
        slot2item = _xp.at_set(slot2item, (rows, pack_order * 2 + offset), items, xp=xp)
    return slot2item


def pack_times(slot_load: Any, inverse: Any, live_pack: Any, *, xp: Any) -> Any:
    """``[B, m]`` float32: each live pack's time, its left-to-right load sum times ``inverse``; ``-inf`` if idle."""
    batch, n = slot_load.shape
    num_packs = inverse.shape[-1]
    loads = sum_left_to_right(xp.reshape(slot_load, (batch, num_packs, n // num_packs)), xp=xp)
    return xp.where(live_pack, loads * inverse, -xp.inf)


def refine_by_swaps_speed(
    item_load: Any, slot2item: Any, inverse: Any, live_pack: Any, num_iters: int, *, limit: Any = None, xp: Any
) -> Any:
    """:func:`eplb.algorithms.refine.refine_by_swaps` by time: returns ``slot2item [B, n]``.

    Each round takes the slowest live pack ``a`` (largest time ``load * inverse``,
    first on ties) and the best of these moves with every other live pack ``b``:

    - swap items ``i`` of ``a`` and ``j`` of ``b``: ``max(fl32(load_a - x_i + x_j) * inv_a,
      fl32(load_b - x_j + x_i) * inv_b)``;
    - exchange the whole contents of ``a`` and ``b`` (slot order kept): ``max(load_b * inv_a,
      load_a * inv_b)``; a slow GPU's load may suit a faster one better than any single swap.

    The smallest value wins (ties: swaps first, ``(i, b, j)`` in row-major
    order, then exchanges by ``b``); it is applied only if below ``a``'s time
    by the :data:`eplb.algorithms.refine.IMPROVEMENT` margin, so the slowest
    time never rises. Idle packs (``live_pack [B, m]`` false) take no part.
    ``limit [B, 1]`` (float32, optional): a row stops once its slowest time
    is at most its limit (no move is made then; keep-in-place searches stop
    as soon as they are within the balance they must reach).
    """
    n = slot2item.shape[1]
    num_packs = inverse.shape[1]
    capacity = n // num_packs
    device = _xp.device(slot2item)
    index_dtype = slot2item.dtype
    position = xp.arange(n, dtype=index_dtype, device=device)
    pack_of = position // capacity
    in_pack = xp.arange(capacity, dtype=index_dtype, device=device)
    pack_ids = xp.arange(num_packs, dtype=index_dtype, device=device)
    width = capacity * num_packs * capacity

    def swap_once(rows: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
        slot2item, slot_load, inverse, live = rows[:4]
        batch = slot2item.shape[0]
        by_pack = xp.reshape(slot_load, (batch, num_packs, capacity))
        loads = sum_left_to_right(by_pack, xp=xp)  # [B, m]
        heavy = xp.reshape(
            xp.astype(xp.argmax(xp.where(live, loads * inverse, -xp.inf), axis=-1), index_dtype), (batch, 1)
        )
        heavy_load = _xp.take_along(loads, heavy, xp=xp)
        heavy_inverse = _xp.take_along(inverse, heavy, xp=xp)
        heavy_items = _xp.take_along(slot_load, heavy * capacity + in_pack, xp=xp)  # [B, k]
        out_i = heavy_items[:, :, None, None]
        in_j = by_pack[:, None, :, :]
        new_heavy = ((heavy_load[:, :, None, None] - out_i) + in_j) * heavy_inverse[:, :, None, None]
        barred = (pack_ids == heavy) | ~live
        partner_load = xp.where(barred, xp.inf, loads)
        new_other = ((partner_load[:, None, :, None] - in_j) + out_i) * inverse[:, None, :, None]
        swaps = xp.reshape(xp.maximum(new_heavy, new_other), (batch, width))
        exchanges = xp.where(barred, xp.inf, xp.maximum(loads * heavy_inverse, heavy_load * inverse))  # [B, m]
        worst = xp.concat([swaps, exchanges], axis=-1)
        best = xp.reshape(xp.astype(xp.argmin(worst, axis=-1), index_dtype), (batch, 1))
        heavy_time = heavy_load * heavy_inverse
        accept = _xp.take_along(worst, best, xp=xp) < heavy_time * IMPROVEMENT
        if bound is not None:
            accept = accept & (heavy_time > rows[4])
        is_swap = accept & (best < width)
        partner = xp.where(accept & (best >= width), best - width, heavy)  # heavy itself: no exchange
        give = heavy * capacity + best // (num_packs * capacity)
        take = (best // capacity) % num_packs * capacity + best % capacity
        offset = position % capacity
        source = xp.where(
            pack_of == heavy,
            partner * capacity + offset,
            xp.where(pack_of == partner, heavy * capacity + offset, position),
        )
        source = xp.where(is_swap & (position == give), take, xp.where(is_swap & (position == take), give, source))
        slot2item = _xp.take_along(slot2item, source, xp=xp)
        slot_load = _xp.take_along(slot_load, source, xp=xp)
        return (slot2item, slot_load, inverse, live, *rows[4:]), accept[:, 0]

    slot_load = _xp.take_along(item_load, slot2item, xp=xp)
    bound = None if limit is None else xp.broadcast_to(xp.astype(limit, item_load.dtype), (slot2item.shape[0], 1))
    rows = (slot2item, slot_load, inverse, live_pack) + (() if bound is None else (bound,))
    return _xp.refine_rows(swap_once, rows, num_iters, xp=xp)[0]
