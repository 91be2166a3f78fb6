"""Balanced packing: ``n`` weighted items into ``m`` packs of exactly ``n/m`` items."""

from __future__ import annotations

from typing import Any

from eplb import _xp

__all__ = ["balanced_packing", "inverse_permutation"]


def inverse_permutation(perm: Any, *, xp: Any) -> Any:
    """``inv[b, perm[b, j]] = j`` for a batch of permutations ``perm [B, n]``."""
    batch, n = perm.shape
    rows = xp.reshape(xp.arange(batch, dtype=perm.dtype, device=_xp.device(perm)), (batch, 1))
    positions = xp.broadcast_to(xp.arange(n, dtype=perm.dtype, device=_xp.device(perm)), (batch, n))
    inv = xp.empty((batch, n), dtype=perm.dtype, device=_xp.device(perm))
    return _xp.at_set(inv, (rows, perm), positions, xp=xp)


def balanced_packing(weight: Any, num_packs: int, *, xp: Any) -> tuple[Any, Any]:
    """Pack each row's items into ``num_packs`` packs of equal cardinality (LPT).

    Parameters
    ----------
    weight : array [B, n], float32
        Item weights, one independent problem per row; ``n % num_packs == 0``.
    num_packs : int
        ``m``; every pack receives exactly ``n // m`` items.

    Returns
    -------
    pack_index : array [B, n], integer
        Pack of each item.
    rank_in_pack : array [B, n], integer
        Position of each item inside its pack (0 .. n/m - 1), in arrival order.

    Tie rules
    ---------
    Items are visited in decreasing weight, equal weights in increasing item
    index (stable sort). Each goes to the pack with the smallest running load
    among those not yet full, equal loads to the lowest pack index. Running
    loads are float32 sums accumulated in visiting order, so every backend
    computes the same values. With one item per pack, item ``i`` goes to pack
    ``i`` (the published shortcut).
    """
    batch, n = weight.shape
    device = _xp.device(weight)
    if n % num_packs:
        raise ValueError(f"{n} items cannot fill num_packs={num_packs} packs equally")
    capacity = n // num_packs
    if capacity == 1:
        pack_index = xp.broadcast_to(xp.arange(n, device=device), (batch, n))
        return xp.asarray(pack_index, copy=True), xp.zeros((batch, n), dtype=pack_index.dtype, device=device)

    order = _xp.argsort_desc(weight, xp=xp)  # [B, n] item visited at step t
    weight_in_order = _xp.take_along(weight, order, xp=xp)  # [B, n]
    pack_ids = xp.arange(num_packs, dtype=order.dtype, device=device)  # [m]

    def visit(carry: Any, item_weight: Any) -> tuple[Any, Any]:
        # carry: pack_load [B, m] float32, pack_count [B, m] int; item_weight [B]
        pack_load, pack_count = carry
        open_load = xp.where(pack_count < capacity, pack_load, xp.inf)
        pack = xp.argmin(open_load, axis=-1)  # first minimum: lowest index wins
        chosen = pack_ids == xp.reshape(pack, (batch, 1))  # [B, m] one-hot
        rank = xp.sum(xp.where(chosen, pack_count, 0), axis=-1)
        pack_load = xp.where(chosen, pack_load + xp.reshape(item_weight, (batch, 1)), pack_load)
        pack_count = pack_count + xp.astype(chosen, pack_count.dtype)
        return (pack_load, pack_count), (xp.astype(pack, order.dtype), xp.astype(rank, order.dtype))

    init = (
        xp.zeros((batch, num_packs), dtype=weight.dtype, device=device),
        xp.zeros((batch, num_packs), dtype=order.dtype, device=device),
    )
    _, (pack_by_step, rank_by_step) = _xp.scan(visit, init, xp.permute_dims(weight_in_order, (1, 0)), xp=xp)
    # Step t placed item order[b, t]; undo the sort to index by item.
    step_of_item = inverse_permutation(order, xp=xp)
    pack_index = _xp.take_along(xp.permute_dims(pack_by_step, (1, 0)), step_of_item, xp=xp)
    rank_in_pack = _xp.take_along(xp.permute_dims(rank_by_step, (1, 0)), step_of_item, xp=xp)
    return pack_index, rank_in_pack
