"""Keep-in-place planning on GPUs of unequal speed (``gpu_capacity`` with ``previous``).

The fresh placement is :func:`eplb.algorithms.capacity.rebalance_capacity`'s
(placement by time); the limit, per layer, is its slowest GPU's time times
``fl32(1 + balance_tolerance)`` (the healthy rule's factor). Candidates, per
layer:

1. *relabelled*: the fresh placement with its GPUs permuted to keep the most
   ``(expert, GPU)`` pairs, among permutations that map each GPU onto a GPU of
   the same capacity (and, under the hierarchical rule, of the same node), so
   every GPU's time is the fresh one's: within the limit by construction;
2. *kept*: ``previous`` itself (its slots on live GPUs), where it still holds
   every expert on a live GPU, fills every live slot and (hierarchical) keeps
   each group on one node;
3. *recounted*: ``previous`` brought to the fresh replica counts with the
   fewest changes (:func:`recount`: an expert's surplus copies leave its last
   slots, the experts short of copies fill the freed slots, lightest GPUs'
   slots first with the heaviest replicas); under the hierarchical rule
   every expert's copies end on the node the fresh placement gives its group;
4. *repacked*: the fresh replicas repacked near their old GPUs
   (:func:`eplb.algorithms.repair.sticky_pack` per node row, as the
   ``active_gpus`` rule does) within the limit, plain and with ``reserve``,
   and with no limit. Times become loads against one limit: with ``a`` the
   limit in load per unit of capacity (the time limit times ``2**-k``, the
   scale of :func:`eplb.algorithms.speed.inverse_capacity`), GPU ``g`` starts
   at ``a * (top - c_g)`` (``top``: the fastest live capacity), so it reaches
   ``a * top`` when its own load reaches ``a * c_g``.

2, 3 and 4 are then searched by swaps and exchanges out of the slowest GPU
(:func:`eplb.algorithms.speed.refine_by_swaps_speed`, per node under the
hierarchical rule) until within the limit. Per layer the candidate within the
limit with the fewest moves wins, ties to the earlier in that order; slots
follow ``previous`` (:func:`eplb.algorithms.relabel.align_slots`). So a layer
never moves more experts than the relabelled fresh placement, and its slowest
GPU is within the limit (up to float32 rounding of the relabelled placement's
sums, whose order follows ``previous``'s slots). Every comparison is of float32
products and left-to-right sums (no division), so every backend places alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eplb import _xp
from eplb.algorithms.assignment import BIG
from eplb.algorithms.capacity import _max_time, default_swap_rounds, fit_loads_to_times, rebalance_capacity
from eplb.algorithms.elastic import _live_gpu_loads, _live_slot, relabel_pinned, stable_by_layer
from eplb.algorithms.hierarchy import covers_groups, node_groups
from eplb.algorithms.loads import MAX_LOAD, clean_loads
from eplb.algorithms.relabel import align_slots, count_moves, occurrence, replica_counts
from eplb.algorithms.repair import sticky_pack
from eplb.algorithms.replication import replica_load
from eplb.algorithms.speed import (
    _exponent,
    _power_of_two,
    capacity_live,
    clean_capacity,
    inverse_capacity,
    refine_by_swaps_speed,
)

__all__ = ["capacity_classes", "kept_copies", "place_capacity_stable", "recount", "stabilize_capacity"]


def capacity_classes(capacity: Any, num_layers: int, *, xp: Any) -> Any:
    """``[L, G]`` int: per GPU, how many GPUs are strictly slower (idle GPUs count as capacity 0), so two GPUs
    share a class iff their capacities are equal (float32 comparisons only)."""
    row = xp.reshape(capacity, (1, -1))
    slower = xp.astype(row[:, None, :] < row[:, :, None], xp.int32)  # [1, G, G]: GPU j slower than GPU i
    return xp.broadcast_to(xp.sum(slower, axis=-1), (num_layers, row.shape[1]))


def _node_of_expert(fresh: Any, num_log: int, num_groups: int, num_nodes: int, *, xp: Any) -> Any:
    """``[B, E]``: the node whose slots hold each expert's group in ``fresh`` (groups on one node each)."""
    present = node_groups(fresh, num_log, num_groups, num_nodes, xp=xp)  # [B, N, groups]
    node_of_group = xp.astype(xp.argmax(xp.astype(present, xp.int32), axis=1), fresh.dtype)  # [B, groups]
    group_of = _xp.iota(num_log, dtype=fresh.dtype, device=_xp.device(fresh), xp=xp) // (num_log // num_groups)
    return _xp.take_along(node_of_group, xp.broadcast_to(group_of, (fresh.shape[0], num_log)), xp=xp)


def kept_copies(old: Any, logcnt: Any, *, node_of: Any = None, num_nodes: int = 1, xp: Any) -> Any:
    """``[B, R]`` bool: the copies of ``old`` (``-1``: empty) that :func:`recount` keeps for counts ``logcnt
    [B, E]``: the first ``logcnt[e]`` copies of ``e`` in slot order (with ``node_of [B, E]`` and ``num_nodes >
    1``: among those on ``e``'s node ``node_of[e]``; the others leave)."""
    num_phy = old.shape[1]
    dtype = old.dtype
    slot = _xp.iota(num_phy, dtype=dtype, device=_xp.device(old), xp=xp)
    held = old >= 0
    safe = xp.where(held, old, xp.zeros_like(old))
    eligible = held
    if node_of is not None and num_nodes > 1:
        eligible = eligible & (_xp.take_along(node_of, safe, xp=xp) == slot // (num_phy // num_nodes))
    masked = xp.where(eligible, old, -1 - slot)  # ineligible slots match nothing
    return eligible & (occurrence(masked, xp=xp) < _xp.take_along(xp.astype(logcnt, dtype), safe, xp=xp))


def recount(
    old: Any, keep: Any, logcnt: Any, slot_load: Any, gpu_time: Any, num_gpus: int, *, node_of: Any = None,
    num_nodes: int = 1, xp: Any,
) -> Any:  # fmt: skip
    """``[B, R]``: ``old`` (``-1``: empty) keeping the copies ``keep`` (:func:`kept_copies`), with the copies
    still missing for counts ``logcnt [B, E]`` in the other slots of live GPUs.

    The missing copies (expert ``e`` short by ``logcnt[e]`` minus its kept
    copies) are sorted by ``slot_load [B, E]`` (one replica's load), heaviest
    first, ties to the lower expert id; the free slots of live GPUs by
    ``gpu_time [B, G]`` (the kept copies' time on each GPU; ``+inf``: an idle
    GPU, whose slots stay ``-1``), least first, ties to the lower slot; the
    ``k``-th copy goes to the ``k``-th slot, per node with ``node_of`` and
    ``num_nodes > 1`` (a node's free slots take its experts' copies). Where
    the counts do not sum to the live slots (per node: the node's), some slot
    stays ``-1`` or some count short: the caller checks the result.
    """
    batch, num_phy = old.shape
    num_log = logcnt.shape[1]
    device = _xp.device(old)
    dtype = old.dtype
    per_gpu = num_phy // num_gpus
    live_slot = xp.reshape(
        xp.broadcast_to(xp.reshape(gpu_time < xp.inf, (batch, num_gpus, 1)), (batch, num_gpus, per_gpu)),
        (batch, num_phy),
    )
    keep = keep & live_slot
    kept = xp.where(keep, old, xp.full_like(old, -1))
    short = xp.astype(logcnt, dtype) - replica_counts(kept, num_log, xp=xp)  # [B, E] >= 0
    free = live_slot & xp.logical_not(keep)
    # Missing copies, heaviest replica first (stable: ties keep the lower expert id).
    by_load = xp.astype(_xp.argsort_desc(slot_load, xp=xp), dtype)  # [B, E]
    short_sorted = _xp.take_along(short, by_load, xp=xp)
    # Free slots, least loaded GPU first (stable in slot order); occupied and idle slots last.
    slot_time = xp.reshape(
        xp.broadcast_to(xp.reshape(gpu_time, (batch, num_gpus, 1)), (batch, num_gpus, per_gpu)), (batch, num_phy)
    )
    key = xp.where(free, slot_time, xp.inf)
    nodes = num_nodes if node_of is not None else 1
    width = num_phy // nodes
    key = xp.reshape(key, (batch * nodes, width))
    free_rows = xp.reshape(free, (batch * nodes, width))
    order = xp.astype(_xp.argsort_desc(-key, xp=xp), dtype)  # ascending time, stable (free slots first)
    # Per node, the missing copies of its experts in that order; the k-th free slot takes the k-th one.
    if nodes > 1:
        node_ids = _xp.iota(nodes, dtype=dtype, device=device, xp=xp)
        mine = _xp.take_along(node_of, by_load, xp=xp)[:, None, :] == node_ids[None, :, None]  # [B, N, E]
        short_rows = xp.reshape(xp.where(mine, short_sorted[:, None, :], 0), (batch * nodes, num_log))
        by_load_rows = xp.reshape(xp.broadcast_to(by_load[:, None, :], (batch, nodes, num_log)), (batch * nodes, -1))
    else:
        short_rows, by_load_rows = short_sorted, by_load
    ends = xp.cumulative_sum(short_rows, axis=-1)  # [rows, E]
    rank = _xp.iota(width, dtype=dtype, device=device, xp=xp)  # k-th free slot of the row
    which = xp.sum(xp.astype(ends[:, None, :] <= rank[None, :, None], dtype), axis=-1)  # [rows, width]
    # (where, not minimum(which, num_log - 1): array-api-compat copies a Python scalar to the device there, a sync)
    expert = _xp.take_along(by_load_rows, xp.where(which < num_log, which, num_log - 1), xp=xp)
    filled = (which < num_log) & (rank < xp.sum(xp.astype(free_rows, dtype), axis=-1, keepdims=True))
    row_ids = xp.reshape(_xp.iota(batch * nodes, dtype=dtype, device=device, xp=xp), (-1, 1))
    placed = xp.full((batch * nodes, width), -1, dtype=dtype, device=device)
    placed = _xp.at_set(placed, (row_ids, order), xp.where(filled, expert, -1), xp=xp)
    placed = xp.reshape(placed, (batch, num_phy))
    return xp.where(keep, old, xp.where(free, placed, xp.full_like(old, -1)))


def _gpu_times(
    weight: Any, phy2log: Any, logcnt: Any, inverse: Any, live_gpu: Any, num_gpus: int, *, xp: Any
) -> Any:  # fmt: skip
    """``[B, G]`` float32: each GPU's time (:func:`eplb.algorithms.elastic._live_gpu_loads` times its inverse
    capacity); ``-1`` slots weigh 0, idle GPUs (``live_gpu`` false) read ``+inf`` (no free slot there)."""
    return xp.where(live_gpu, _live_gpu_loads(weight, phy2log, logcnt, num_gpus, xp=xp) * inverse, xp.inf)


def _slot_loads(per_replica: Any, phy2log: Any, empty: float, *, xp: Any) -> Any:
    """``[B, R]``: the replica load ``per_replica [B, E]`` of each slot's expert, ``empty`` where it holds ``-1``."""
    held = phy2log >= 0
    loads = _xp.take_along(per_replica, xp.where(held, phy2log, xp.zeros_like(phy2log)), xp=xp)
    return xp.where(held, loads, xp.full_like(loads, empty))


def stabilize_capacity(
    weight: Any,
    fresh: Any,
    logcnt: Any,
    previous: Any,
    capacity: Any,
    inverse: Any,
    num_gpus: int,
    *,
    tolerance: Any,
    num_nodes: int = 1,
    num_groups: int = 1,
    rows: Any = None,
    xp: Any,
    swaps_fn: Callable[..., Any] = refine_by_swaps_speed,
    relabel_pinned_fn: Callable[..., Any] = relabel_pinned,
    align_slots_fn: Callable[..., Any] = align_slots,
    sticky_pack_fn: Callable[..., Any] = sticky_pack,
) -> tuple[Any, Any]:
    """``phy2log [B, R]`` and ``logcnt [B, E]``: the candidates of this module's docstring for the fresh
    placement ``fresh`` (``-1`` on idle GPUs) with ``logcnt``, from ``previous [B, R]`` (``-1``: empty),
    on GPUs of float32 ``capacity [1, G]`` (0: idle) with ``inverse [1, G]``
    (:func:`eplb.algorithms.speed.inverse_capacity`). ``num_nodes > 1``: the
    hierarchical rule (relabelling and search within nodes, groups on the fresh
    placement's nodes). ``rows [B, 1]`` (bool, or None for all): the layers whose
    result the caller keeps; the others' searches stop before their first
    step (their result is unspecified). ``swaps_fn`` (taking ``limit=``),
    ``relabel_pinned_fn`` (taking integer classes as ``live_gpu``) and
    ``align_slots_fn``: the array-API functions or compiled kernels equal to them.
    """
    from eplb.algorithms.stability import _factor  # the healthy rule's limit, the same float32 bits

    batch, num_phy = fresh.shape
    num_log = weight.shape[1]
    dtype = fresh.dtype
    device = _xp.device(weight)
    live = capacity_live(capacity, xp=xp)
    live_gpu = xp.broadcast_to(xp.reshape(live, (-1, num_gpus)), (batch, num_gpus))
    live_slot = _live_slot(live_gpu, batch, num_phy, num_gpus, xp=xp)
    old = xp.where(live_slot, xp.astype(previous, dtype), xp.full_like(fresh, -1))
    inverse = xp.broadcast_to(inverse, (batch, num_gpus))  # (idle GPUs: 1.0, never read as a time)
    live_capacity = xp.where(live, capacity, xp.zeros_like(capacity))  # [1, G], idle GPUs 0
    classes = capacity_classes(live_capacity, batch, xp=xp)
    base = relabel_pinned_fn(fresh, old, classes, num_gpus, num_nodes=num_nodes, xp=xp)
    fresh_time = _max_time(weight, fresh, logcnt, inverse, num_gpus, xp=xp)  # [B, 1]
    limit = fresh_time * _factor(tolerance, fresh_time, xp=xp)
    # Kept: previous as it is. Recounted: previous with the fresh counts.
    old_cnt = xp.astype(replica_counts(old, num_log, xp=xp), logcnt.dtype)
    groups = num_groups if num_nodes > 1 else 1
    kept_valid = covers_groups(old, old_cnt, groups, num_nodes, xp=xp) & xp.all(
        (old >= 0) | xp.logical_not(live_slot), axis=-1, keepdims=True
    )
    reciprocal = _xp.reciprocal_table(num_phy, xp=xp, device=device)
    per_replica = replica_load(weight, logcnt, reciprocal, xp=xp)  # [B, E] at the fresh counts
    node_of = _node_of_expert(fresh, num_log, groups, num_nodes, xp=xp) if num_nodes > 1 else None
    keep = kept_copies(old, logcnt, node_of=node_of, num_nodes=num_nodes, xp=xp)
    kept = xp.where(keep, old, xp.full_like(old, -1))
    kept_time = _gpu_times(weight, kept, logcnt, inverse, live_gpu, num_gpus, xp=xp)
    recounted = recount(
        old, keep, logcnt, per_replica, kept_time, num_gpus, node_of=node_of, num_nodes=num_nodes, xp=xp,
    )  # fmt: skip
    recounted_cnt = xp.astype(replica_counts(recounted, num_log, xp=xp), logcnt.dtype)
    recounted_valid = xp.all(recounted_cnt == logcnt, axis=-1, keepdims=True) & covers_groups(
        recounted, recounted_cnt, groups, num_nodes, xp=xp
    )
    # The fresh replicas repacked near their old GPUs (sticky_pack, per (layer, node) row) within the limit,
    # plain and with reserve, and with no limit (most stay home; the search sheds the overload). Times become
    # loads against one limit: GPU g starts at a * (top - c_g) (top: the fastest live capacity), so it reaches
    # a * top when its own load reaches a * c_g, its time the limit (up to float32 rounding; every candidate's
    # time is checked below).
    top = xp.max(live_capacity, axis=-1, keepdims=True)  # [1, 1]
    # Times are load * 2**k / c (k: the exponent of the largest capacity), so GPU g's load allowance is
    # a * c_g with a = limit * 2**-k (an exact power-of-two scaling).
    top_exponent = xp.clip(xp.max(_exponent(live_capacity, xp=xp)), -126, 126)
    allowance = limit * _power_of_two(-top_exponent, xp=xp)  # [B, 1]
    headroom = xp.where(live_gpu, allowance * top - allowance * capacity, xp.inf)  # [B, G]
    base_load = _slot_loads(per_replica, base, -1.0, xp=xp)  # empty slots come last
    node_rows = (batch * num_nodes, num_phy // num_nodes)
    node_limit = xp.reshape(xp.broadcast_to(allowance * top, (batch, num_nodes)), (batch * num_nodes, 1))
    unbounded = xp.full(node_limit.shape, MAX_LOAD, dtype=node_limit.dtype, device=device)
    stickies = [
        xp.reshape(
            sticky_pack_fn(
                xp.reshape(base, node_rows), xp.reshape(old, node_rows), xp.reshape(base_load, node_rows), pack_limit,
                num_gpus // num_nodes, initial_load=xp.reshape(headroom, (batch * num_nodes, -1)), reserve=reserve,
                xp=xp,
            ),
            (batch, num_phy),
        )
        for reserve, pack_limit in ((False, node_limit), (True, node_limit), (False, unbounded))
    ]  # fmt: skip
    # Every start searched toward the limit, per (layer, node) row, stacked [k * B + b]: kept, recounted, then
    # the three repackings.
    starts = xp.concat([old, recounted, *stickies], axis=0)
    num_starts = 2 + len(stickies)
    counts = xp.concat([old_cnt] + [logcnt] * (num_starts - 1), axis=0)
    valid = xp.concat([kept_valid, recounted_valid] + [xp.ones_like(kept_valid)] * len(stickies), axis=0)
    weights, inverses, limits, lives = (xp.concat([a] * num_starts, axis=0) for a in (weight, inverse, limit, live_gpu))
    item_load = _slot_loads(replica_load(weights, counts, reciprocal, xp=xp), starts, 0.0, xp=xp)
    row_count = num_starts * batch * num_nodes
    width = num_phy // num_nodes
    # Layers outside ``rows`` are thrown away by the caller: an infinite limit ends their search at once.
    search_limit = limit if rows is None else xp.where(rows, limit, xp.full_like(limit, xp.inf))
    search_limits = xp.concat([search_limit] * num_starts, axis=0)
    row_limit = xp.reshape(xp.broadcast_to(search_limits, (num_starts * batch, num_nodes)), (row_count, 1))
    row_inverse = xp.reshape(inverses, (row_count, num_gpus // num_nodes))
    row_live = xp.reshape(lives, (row_count, num_gpus // num_nodes))
    identity = xp.broadcast_to(_xp.iota(width, dtype=dtype, device=device, xp=xp), (row_count, width))
    slot2item = swaps_fn(
        xp.reshape(item_load, (row_count, width)), xp.asarray(identity, copy=True), row_inverse, row_live,
        default_swap_rounds(num_gpus // num_nodes), limit=row_limit, xp=xp,
    )  # fmt: skip
    searched = xp.reshape(
        _xp.take_along(xp.reshape(starts, (row_count, width)), slot2item, xp=xp), (num_starts * batch, num_phy)
    )
    searched_within = (_max_time(weights, searched, counts, inverses, num_gpus, xp=xp) <= limits) & valid
    # Candidates in order: relabelled, then the searched starts; the fewest moves within the limit (ties: the
    # earlier).
    candidates = xp.concat([base, searched], axis=0)  # [(k + 1) B, R]
    moves = count_moves(candidates, xp.concat([old] * (num_starts + 1), axis=0), num_gpus, xp=xp)
    within = xp.concat([xp.ones_like(limit, dtype=bool), searched_within], axis=0)[:, 0]
    moves = xp.where(within, moves, BIG)
    choice = xp.argmin(xp.permute_dims(xp.reshape(moves, (num_starts + 1, batch)), (1, 0)), axis=-1)  # [B]
    pick = choice * batch + xp.arange(batch, dtype=choice.dtype, device=device)
    out = xp.take(candidates, pick, axis=0)
    out_cnt = xp.take(xp.concat([logcnt, counts], axis=0), pick, axis=0)
    return align_slots_fn(out, old, num_gpus, xp=xp), out_cnt


def place_capacity_stable(
    weight: Any,
    previous: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    gpu_capacity: Any,
    hierarchical: bool,
    tolerance: Any = None,
    policy: str = "greedy",
    spill: int = 0,
    node_fallback: bool | None = None,
    uniform: bool | None = None,
    xp: Any,
    swaps_fn: Callable[..., Any] = refine_by_swaps_speed,
    relabel_pinned_fn: Callable[..., Any] = relabel_pinned,
    align_slots_fn: Callable[..., Any] = align_slots,
    sticky_pack_fn: Callable[..., Any] = sticky_pack,
    **kernels: Callable[..., Any],
) -> tuple[Any, Any, Any]:
    """:func:`eplb.algorithms.capacity.place_capacity` keeping the experts of ``previous [L, R]`` (``-1``: an
    empty slot) in place: ``phy2log`` (``-1`` on idle GPUs), ``log2phy`` (replicas in slot order), ``logcnt``.

    The fresh placement is ``place_capacity``'s (``node_fallback``, ``uniform``
    and ``kernels`` as there; ``swaps_fn`` too); the rest is
    :func:`stabilize_capacity`'s, within nodes where the layer keeps groups on
    nodes, across all live GPUs where it falls back to the global rule.
    """
    if policy != "greedy" or spill:
        raise ValueError(f"gpu_capacity supports the greedy policy without spill, got {policy=}, {spill=}")
    weight = fit_loads_to_times(clean_loads(weight, xp=xp), xp=xp)
    capacity = xp.reshape(clean_capacity(gpu_capacity, xp=xp), (-1, num_gpus))
    if not hierarchical:
        num_groups = num_nodes = 1
    packer = {} if sticky_pack_fn is sticky_pack else {"sticky_pack_fn": sticky_pack_fn}  # a compiled one packs too
    fresh, _, logcnt = rebalance_capacity(
        weight, capacity, num_replicas, num_groups, num_nodes, num_gpus, fallback=node_fallback, uniform=uniform,
        xp=xp, swaps_fn=swaps_fn, **packer, **kernels,
    )  # fmt: skip
    inverse = inverse_capacity(capacity, xp=xp)
    steps = {
        "swaps_fn": swaps_fn,
        "relabel_pinned_fn": relabel_pinned_fn,
        "align_slots_fn": align_slots_fn,
        "sticky_pack_fn": sticky_pack_fn,
    }

    def stable(nodes: int, rows: Any) -> tuple[Any, Any]:
        return stabilize_capacity(
            weight, fresh, logcnt, previous, capacity, inverse, num_gpus, tolerance=tolerance, num_nodes=nodes,
            num_groups=num_groups, rows=rows, xp=xp, **steps,
        )  # fmt: skip

    live = capacity_live(capacity, xp=xp)
    sizes = (num_replicas, num_nodes, num_gpus)
    return stable_by_layer(
        weight, live, fresh, lambda rows: stable(1, rows), lambda rows: stable(num_nodes, rows), sizes, node_fallback,
        xp=xp,
    )  # fmt: skip
