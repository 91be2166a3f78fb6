"""Balanced packing: ``n`` weighted items into ``m`` packs of exactly ``n/m`` items."""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.loads import MAX_LOAD

__all__ = ["balanced_packing", "inverse_permutation", "lpt_pack", "slots_by_pack", "sum_left_to_right"]


def sum_left_to_right(x: Any, *, xp: Any) -> Any:
    """Sum over the last axis in index order: ``((x0 + x1) + x2) + ...``.

    Library reductions choose their own order (pairwise, trees, per-backend),
    which changes float rounding; a fixed order gives every backend the same
    bits. The last axis is short here (slots per GPU, experts per group).
    """
    total = x[..., 0]
    for k in range(1, x.shape[-1]):
        total = total + x[..., k]
    return total


def sum_in_pairs(x: Any, *, xp: Any) -> Any:
    """Sum over the last axis in a fixed pairwise order: ``(x0 + x1) + (x2 + x3)``, and so on up the levels;
    an odd element out at a level joins the next level last.

    As :func:`sum_left_to_right`, the same bits on every backend, in about
    ``log2(n)`` array operations instead of ``n - 1`` (fewer kernel launches on
    CUDA); a different order, so a different rounding: only for sums that
    nothing else recomputes left to right.
    """
    while x.shape[-1] > 1:
        n = x.shape[-1]
        paired = x[..., 0 : n - 1 : 2] + x[..., 1:n:2]
        x = paired if n % 2 == 0 else xp.concat([paired, x[..., n - 1 :]], axis=-1)
    return x[..., 0]


def inverse_permutation(perm: Any, *, xp: Any) -> Any:
    """``inv[b, perm[b, j]] = j`` for a batch of permutations ``perm [B, n]``."""
    batch, n = perm.shape
    device = _xp.device(perm)
    rows = xp.reshape(_xp.iota(batch, dtype=perm.dtype, device=device, xp=xp), (batch, 1))
    positions = xp.broadcast_to(_xp.iota(n, dtype=perm.dtype, device=device, xp=xp), (batch, n))
    inv = xp.empty((batch, n), dtype=perm.dtype, device=device)
    return _xp.at_set(inv, (rows, perm), positions, xp=xp)


def lpt_pack(weight: Any, num_packs: int, *, xp: Any, initial_load: Any = None) -> tuple[Any, Any, Any]:
    """The LPT loop: ``order``, ``pack_by_step``, ``rank_by_step``, each ``[B, n]``.

    Step ``t`` visits item ``order[:, t]`` and puts it in pack
    ``pack_by_step[:, t]`` at position ``rank_by_step[:, t]`` (items already
    there).

    Tie rules: items are visited in decreasing weight, equal weights in
    increasing item index (stable sort); each goes to the open pack (fewer
    than ``n/m`` items) with the smallest running load, equal loads to the
    lowest pack index. Running loads are float32 sums in visiting order,
    saturating at float32 max (only unchecked loads get there), so every
    backend computes the same bits. ``initial_load [B, m]``: loads the
    packs start with (default zero). With one item per pack and no
    ``initial_load``, item ``i`` goes to pack ``i`` (the published shortcut,
    which the greedy policy must reproduce); with an ``initial_load`` the
    loop runs as described, so the heaviest item goes to the lightest pack.
    """
    batch, n = weight.shape
    device = _xp.device(weight)
    capacity = n // num_packs
    if capacity == 1 and initial_load is None:
        order = xp.broadcast_to(xp.arange(n, device=device), (batch, n))
        return order, order, xp.zeros((batch, n), dtype=order.dtype, device=device)
    order = _xp.argsort_desc(weight, xp=xp)
    weight_by_step = xp.permute_dims(_xp.take_along(weight, order, xp=xp), (1, 0))  # [n, B]
    pack_ids = xp.arange(num_packs, dtype=order.dtype, device=device)
    # A device constant, made once: a Python float operand would be copied to a CUDA device (a host sync).
    most = xp.full((1, 1), MAX_LOAD, dtype=weight.dtype, device=device)

    def visit(carry: Any, item_weight: Any) -> tuple[Any, Any]:
        # open_load [B, m] float32: running load, +inf once a pack is full.
        # pack_count [B, m] float32: items per pack (small integers, exact).
        open_load, pack_count = carry
        pack = xp.reshape(xp.argmin(open_load, axis=-1), (batch, 1))  # first minimum wins
        rank = _xp.take_along(pack_count, pack, xp=xp)  # items already in the pack
        chosen = pack_ids == pack
        pack_count = pack_count + chosen
        # Saturate at float32 max: a full pack's +inf must stay above every open pack, even where
        # unchecked loads overflow a sum (min of a correctly rounded sum: the same bits everywhere). Only the
        # chosen pack adds: an item of +inf (a group load that overflowed) times a 0 of the others would be NaN.
        added = xp.minimum(open_load + xp.reshape(item_weight, (batch, 1)), most)
        open_load = xp.where(chosen, added, open_load)
        open_load = xp.where(pack_count == capacity, xp.inf, open_load)
        return (open_load, pack_count), (pack[:, 0], rank[:, 0])

    if initial_load is None:
        initial_load = xp.zeros((batch, num_packs), dtype=weight.dtype, device=device)
    init = (initial_load, xp.zeros((batch, num_packs), dtype=weight.dtype, device=device))
    _, (pack_by_step, rank_by_step) = _xp.scan(visit, init, weight_by_step, xp=xp)
    pack_by_step = xp.astype(xp.permute_dims(pack_by_step, (1, 0)), order.dtype)
    return order, pack_by_step, xp.astype(xp.permute_dims(rank_by_step, (1, 0)), order.dtype)


def slots_by_pack(order: Any, pack_by_step: Any, rank_by_step: Any, capacity: int, *, xp: Any) -> Any:
    """Items listed pack by pack, in arrival order inside a pack: ``[B, n]``.

    Entry ``j`` is the item in slot ``j`` when pack ``p`` owns slots
    ``p*capacity .. (p+1)*capacity - 1`` (the outputs of :func:`lpt_pack`).
    """
    batch, n = order.shape
    device = _xp.device(order)
    rows = xp.reshape(_xp.iota(batch, dtype=order.dtype, device=device, xp=xp), (batch, 1))
    slot_by_step = pack_by_step * capacity + rank_by_step  # a permutation of 0..n-1
    slot2item = xp.empty((batch, n), dtype=order.dtype, device=device)
    return _xp.at_set(slot2item, (rows, slot_by_step), order, xp=xp)


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

    Tie rules are those of :func:`lpt_pack`.
    """
    capacity = weight.shape[1] // num_packs
    order, pack_by_step, rank_by_step = lpt_pack(weight, num_packs, xp=xp)
    slot_of_item = inverse_permutation(slots_by_pack(order, pack_by_step, rank_by_step, capacity, xp=xp), xp=xp)
    return slot_of_item // capacity, slot_of_item % capacity
