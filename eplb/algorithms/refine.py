"""Refinement of a packing: alternative starts and swaps out of the heaviest pack.

All functions work on a batch of independent rows. A packing is given as
``slot2item [B, n]``: the item in each slot, pack ``p`` owning slots
``p*k .. p*k + k - 1`` (``k = n // m``). Loads are float32 and every sum is
taken left to right over a pack's slots, so each backend computes the same
bits and makes the same choices.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.packing import slots_by_pack, sum_left_to_right
from eplb.algorithms.replication import replica_load

__all__ = ["IMPROVEMENT", "max_gpu_load", "pack_loads", "refine_by_swaps", "snake_pack"]

# A change must lower the max load by this relative margin to count: float32
# sums carry ~1e-7 relative error, so smaller "gains" are noise, and an
# independent float64 scorer must agree that a refined placement is no worse.
IMPROVEMENT = 1.0 - 2.0**-16


def pack_loads(slot_load: Any, num_packs: int, *, xp: Any) -> Any:
    """``[B, m]`` float32: load of each pack from the load in each slot ``[B, n]``."""
    batch, n = slot_load.shape
    return sum_left_to_right(xp.reshape(slot_load, (batch, num_packs, n // num_packs)), xp=xp)


def max_gpu_load(weight: Any, phy2log: Any, logcnt: Any, num_gpus: int, *, xp: Any) -> Any:
    """``[L]`` float32: the heaviest GPU's load under ``phy2log [L, R]`` / ``logcnt [L, E]``.

    Same arithmetic as the packing steps (replica load ``w * fl(1/c)``,
    left-to-right sums), so placements compare alike on every backend.
    """
    reciprocal = _xp.reciprocal_table(phy2log.shape[1], xp=xp, device=_xp.device(weight))
    per_replica = replica_load(weight, logcnt, reciprocal, xp=xp)
    return xp.max(pack_loads(_xp.take_along(per_replica, phy2log, xp=xp), num_gpus, xp=xp), axis=-1)


def snake_pack(weight: Any, num_packs: int, *, xp: Any) -> Any:
    """``slot2item [B, n]``: deal items heaviest first in snake order (0..m-1, m-1..0, ...).

    A start for refinement that differs from LPT; ties as in
    :func:`eplb._xp.argsort_desc`.
    """
    batch, n = weight.shape
    capacity = n // num_packs
    device = _xp.device(weight)
    order = _xp.argsort_desc(weight, xp=xp)
    step = xp.arange(n, dtype=order.dtype, device=device)
    round_, place = step // num_packs, step % num_packs
    pack = xp.where(round_ % 2 == 0, place, num_packs - 1 - place)
    pack = xp.broadcast_to(pack, (batch, n))
    rank = xp.broadcast_to(round_, (batch, n))
    return slots_by_pack(order, pack, rank, capacity, xp=xp)


def refine_by_swaps(item_load: Any, slot2item: Any, num_packs: int, num_iters: int, *, xp: Any) -> Any:
    """Swap items out of the heaviest pack while that lowers it: returns ``slot2item [B, n]``.

    Each iteration takes the heaviest pack ``a`` (first on ties) and, over
    every other pack ``b`` and item pair ``(i in a, j in b)``, the swap that
    minimises ``max(load_a - x_i + x_j, load_b - x_j + x_i)``; it is applied
    only if that is below ``load_a`` by the :data:`IMPROVEMENT` margin, so the
    max load never rises. Candidates are ranked by that value, then by
    ``(i, b, j)`` in row-major order (first minimum). Rows that cannot improve
    stay as they are.
    """
    n = slot2item.shape[1]
    capacity = n // num_packs
    device = _xp.device(slot2item)
    index_dtype = slot2item.dtype
    position = xp.arange(n, dtype=index_dtype, device=device)
    in_pack = xp.arange(capacity, dtype=index_dtype, device=device)
    pack_ids = xp.arange(num_packs, dtype=index_dtype, device=device)
    width = capacity * num_packs * capacity

    def swap_once(rows: tuple[Any, Any]) -> tuple[tuple[Any, Any], Any]:
        slot2item, slot_load = rows
        batch = slot2item.shape[0]  # the rows still changing, on host backends
        by_pack = xp.reshape(slot_load, (batch, num_packs, capacity))
        loads = sum_left_to_right(by_pack, xp=xp)  # [B, m]
        heavy = xp.reshape(xp.astype(xp.argmax(loads, axis=-1), index_dtype), (batch, 1))
        heavy_load = _xp.take_along(loads, heavy, xp=xp)  # [B, 1]
        heavy_items = _xp.take_along(slot_load, heavy * capacity + in_pack, xp=xp)  # [B, k]
        out_i = heavy_items[:, :, None, None]  # leaves the heavy pack
        in_j = by_pack[:, None, :, :]  # enters it, [B, 1, m, k]
        new_heavy = (heavy_load[:, :, None, None] - out_i) + in_j
        # The heavy pack as partner gets load +inf, so swaps within it never win.
        partner_load = xp.where(pack_ids == heavy, xp.inf, loads)
        new_other = (partner_load[:, None, :, None] - in_j) + out_i
        worst = xp.reshape(xp.maximum(new_heavy, new_other), (batch, width))  # [B, k*m*k]
        best = xp.reshape(xp.astype(xp.argmin(worst, axis=-1), index_dtype), (batch, 1))
        accept = _xp.take_along(worst, best, xp=xp) < heavy_load * IMPROVEMENT
        give = heavy * capacity + best // (num_packs * capacity)
        take = (best // capacity) % num_packs * capacity + best % capacity
        give = xp.where(accept, give, 0)  # a rejected swap becomes slot 0 <-> slot 0
        take = xp.where(accept, take, 0)
        slot2item = _swap(slot2item, give, take, position, xp=xp)
        slot_load = _swap(slot_load, give, take, position, xp=xp)
        return (slot2item, slot_load), accept[:, 0]

    slot_load = _xp.take_along(item_load, slot2item, xp=xp)
    slot2item, _ = _xp.refine_rows(swap_once, (slot2item, slot_load), num_iters, xp=xp)
    return slot2item


def _swap(values: Any, first: Any, second: Any, position: Any, *, xp: Any) -> Any:
    """Exchange ``values[b, first[b]]`` and ``values[b, second[b]]`` (``[B, 1]`` indices) without a scatter."""
    at_first = _xp.take_along(values, first, xp=xp)
    at_second = _xp.take_along(values, second, xp=xp)
    return xp.where(position == first, at_second, xp.where(position == second, at_first, values))
