"""Migration-aware placement: keep experts on the GPUs that already hold them.

A fresh placement (any policy) says which experts share a GPU; which GPU of a
node, which node, and which slot of a GPU carries each group of experts is a
free choice that does not change the balance. Given the previous placement
``old [B, R]``, :func:`stabilize`

- **relabels** the fresh placement (:func:`eplb.algorithms.relabel.relabel`):
  nodes as a whole and GPUs within a node (hierarchical policy) or all GPUs
  (global policy) are permuted to keep the most ``(expert, GPU)`` pairs where
  they are, an assignment problem solved exactly
  (:mod:`eplb.algorithms.assignment`), then each GPU's slots are ordered so
  that an expert staying on its GPU keeps its old slot. Every GPU keeps its
  experts (so its load, as an exact sum; a float32 sum may round otherwise
  where a GPU's slots are reordered);
- optionally **trades balance for fewer moves** (a load ``limit``): local
  search from the old placement, and from two "sticky" repackings of the
  fresh replicas that prefer each replica's old GPU, one within the limit,
  one wherever that GPU has room (:mod:`eplb.algorithms.repair`); with
  groups kept on nodes also from a sticky repacking of :func:`near_split`,
  the placement on the old group split with at most one pair of groups
  swapped between nodes (a fresh split may move several groups, each a
  node's worth of copies, where one swap brings the nodes within reach of
  the limit); per layer the candidate with the fewest moves whose heaviest
  GPU is within the limit wins, else the relabelled fresh placement.

"Moves" are ``(expert, GPU)`` pairs of the new placement absent from the old
one, counted as multisets: the expert copies a migration must make.

Everything is batched over a leading axis, integer where it decides (counts
of kept experts, first index on ties), and float32 loads are compared only
after left-to-right sums and products (no division), as in the rest of the
algorithm layer, so every backend returns the same placement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eplb import _xp
from eplb.algorithms.assignment import BIG
from eplb.algorithms.elastic import sticky_group_split
from eplb.algorithms.hierarchy import build_log2phy, covers_groups, expert_order, node_groups
from eplb.algorithms.loads import MAX_LOAD, clean_loads
from eplb.algorithms.packing import inverse_permutation
from eplb.algorithms.policies import place
from eplb.algorithms.polish import polish
from eplb.algorithms.relabel import align_slots, count_moves, occurrence, relabel, replica_counts
from eplb.algorithms.repair import gpu_loads, heaviest_gpu, repair, sticky_pack
from eplb.algorithms.replication import replica_load

__all__ = ["choose", "near_split", "place_stable", "stabilize"]


def _other_groups(phy2log: Any, base: Any, num_log: int, num_groups: int, num_nodes: int, *, xp: Any) -> Any:
    """``[B, 1]``: some node of ``phy2log [B, R]`` holds an expert of a group that ``base [B, R]``'s same node
    does not. Both keep whole groups on nodes, ``groups / N`` a node, so otherwise their nodes hold the
    same groups."""
    batch, num_phy = phy2log.shape
    present = xp.reshape(node_groups(base, num_log, num_groups, num_nodes, xp=xp), (batch, num_nodes * num_groups))
    node_of_slot = _xp.iota(num_phy, dtype=phy2log.dtype, device=_xp.device(phy2log), xp=xp) // (num_phy // num_nodes)
    held = _xp.take_along(present, node_of_slot * num_groups + phy2log // (num_log // num_groups), xp=xp)
    return xp.logical_not(xp.all(held, axis=-1, keepdims=True))


def near_split(
    weight: Any,
    old: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    xp: Any,
    place_fn: Callable[..., Any] = place,
    group_split_fn: Callable[..., Any] | None = None,
    **options: Any,
) -> tuple[Any, Any]:
    """``phy2log [L, R]`` and ``logcnt [L, E]``: a placement that keeps ``old [L, R]``'s groups on their nodes
    but at most one pair, swapped between nodes where that lowers the heaviest node.

    The split is :func:`eplb.algorithms.elastic.sticky_group_split` with one
    swap (every GPU live; an ``old`` whose groups are not one node each
    gives groups in order, node by node: a valid split, a poor start). Each
    node then gets the policy's own per-node step: ``place_fn`` (the fresh
    placement, ``options`` its ``policy``) on the node's experts alone, as
    the global policy over ``R / N`` slots and ``G / N`` GPUs, expert ids in
    group order. One batched call over ``L * N`` rows. ``group_split_fn``:
    a fused kernel equal to that split (``(weight, old, num_replicas,
    num_groups, num_nodes) -> mgroup2group``), or ``None``.
    """
    num_layers, num_log = weight.shape
    if group_split_fn is not None:
        split = xp.astype(group_split_fn(weight, old, num_replicas, num_groups, num_nodes), old.dtype, copy=False)
    else:
        split, _ = sticky_group_split(
            weight, old, None, num_replicas, num_groups, num_nodes, num_gpus, max_swaps=1, xp=xp
        )
    mlog2log = expert_order(split, num_log // num_groups, xp=xp)  # [L, E] node by node
    rows = (num_layers * num_nodes, num_log // num_nodes)
    node_weight = xp.reshape(_xp.take_along(weight, mlog2log, xp=xp), rows)
    phy2mlog, _, mlogcnt = place_fn(
        node_weight, num_replicas // num_nodes, 1, 1, num_gpus // num_nodes, hierarchical=False, xp=xp, **options
    )
    phy2log = _xp.take_along(xp.reshape(mlog2log, rows), xp.astype(phy2mlog, mlog2log.dtype, copy=False), xp=xp)
    mlogcnt = xp.reshape(mlogcnt, (num_layers, num_log))
    logcnt = _xp.take_along(mlogcnt, inverse_permutation(mlog2log, xp=xp), xp=xp)
    return xp.astype(xp.reshape(phy2log, (num_layers, num_replicas)), old.dtype, copy=False), logcnt


def choose(
    weight: Any, candidates: Any, counts: Any, moves: Any, usable: Any, limit: Any, num_gpus: int, *, xp: Any
) -> tuple[Any, Any]:
    """``phy2log [B, R]`` and ``logcnt [B, E]``: per row, the candidate :func:`stabilize` keeps.

    ``candidates [C * B, R]`` and ``counts [C * B, E]`` are candidate-major
    (row ``c * B + b`` is candidate ``c`` of row ``b``); ``weight [B, E]``
    and ``limit [B, 1]`` float32; ``moves [B, C]`` integer; ``usable [B, C]``
    bool. A candidate's heaviest GPU is its :func:`~eplb.algorithms.repair.gpu_loads`
    maximum (left-to-right float32 sums of ``w * fl(1/c)``); candidate 0
    counts as within the limit whatever its heaviest GPU (the relabelled
    fresh placement: fresh's GPU loads, up to the order of summation). Per
    row: the usable candidate within the limit (``peak <= limit``) with the
    fewest moves, the first on ties; if none, the usable one with the
    lightest heaviest GPU, the first on ties; if none is usable, candidate 0.
    """
    batch, num_choices = moves.shape
    loads = gpu_loads(xp.concat([weight] * num_choices, axis=0), candidates, counts, num_gpus, xp=xp)
    # [C * B, G] -> [B, C]: one reduction and a transpose (one launch each on CUDA).
    peaks = xp.permute_dims(xp.reshape(xp.max(loads, axis=-1), (num_choices, batch)), (1, 0))
    first = _xp.iota(num_choices, dtype=moves.dtype, device=_xp.device(moves), xp=xp) == 0
    balanced = usable & (first | (peaks <= limit))
    fewest = xp.argmin(xp.where(balanced, moves, BIG), axis=-1)
    lightest = xp.argmin(xp.where(usable, peaks, xp.inf), axis=-1)
    choice = xp.where(xp.any(balanced, axis=-1), fewest, xp.where(xp.any(usable, axis=-1), lightest, 0))
    # Row b of candidate choice[b] is row choice[b] * B + b.
    row = xp.astype(choice, moves.dtype) * batch + _xp.iota(batch, dtype=moves.dtype, device=_xp.device(moves), xp=xp)
    return xp.take(candidates, row, axis=0), xp.take(counts, row, axis=0)


def stabilize(
    weight: Any,
    fresh: Any,
    logcnt: Any,
    old: Any,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    tolerance: float | None,
    max_moves: int | None,
    near: tuple[Any, Any] | None = None,
    xp: Any,
    relabel_fn: Callable[..., Any] = relabel,
    sticky_pack_fn: Callable[..., Any] = sticky_pack,
    repair_fn: Callable[..., Any] = repair,
    align_slots_fn: Callable[..., Any] = align_slots,
    replica_counts_fn: Callable[..., Any] = replica_counts,
    heaviest_gpu_fn: Callable[..., Any] = heaviest_gpu,
    choose_fn: Callable[..., Any] = choose,
    polish_fn: Callable[..., Any] = polish,
    count_moves_fn: Callable[..., Any] = count_moves,
) -> tuple[Any, Any]:
    """``phy2log [B, R]`` and ``logcnt [B, E]``: ``fresh`` (with ``logcnt``), or a migration-aware
    variant of it, given ``old [B, R]``.

    ``num_nodes`` is the number of nodes that must keep whole groups (1 for
    the global policy). With ``tolerance`` and ``max_moves`` both ``None``:
    :func:`relabel` (same GPU loads as ``fresh``). Otherwise, per layer, the
    candidate with the fewest moves whose heaviest GPU (left-to-right float32
    sums) is at most ``fresh``'s times ``fl(1 + tolerance)`` (0 if ``None``)
    and whose moves are at most ``max_moves``: the relabelled fresh placement
    (always within the limit), :func:`repair` of ``old``, :func:`repair` of
    a :func:`sticky_pack` of the fresh replicas within the limit,
    :func:`repair` of one with no limit (a replica stays on its old GPU
    whenever that GPU has a free slot), or (given ``near``, a placement
    ``(phy2log [B, R], logcnt [B, E])`` with whole groups on nodes, e.g.
    :func:`near_split`) :func:`repair` of its replicas repacked the same
    way with no limit, searched only where its nodes hold other groups than
    the relabelled fresh placement's (it never adds moves: it wins only
    with fewer); ties in that order. If
    none meets both (only with ``max_moves``), the lightest heaviest GPU
    among those within ``max_moves`` (:func:`choose`). Then
    :func:`~eplb.algorithms.polish.polish` swaps its slots back toward
    ``old`` while every GPU stays within the limit (or within the chosen
    placement's heaviest GPU, where that is higher), its slots aligned
    again; kept only where its left-to-right sums stay within that bound
    and ``old`` keeps groups on nodes, so it never adds a move nor raises
    the heaviest GPU above it.
    ``relabel_fn``, ``sticky_pack_fn``, ``repair_fn``, ``align_slots_fn``,
    ``replica_counts_fn``, ``heaviest_gpu_fn``, ``choose_fn``,
    ``polish_fn``, ``count_moves_fn``: :func:`relabel`, :func:`sticky_pack`,
    :func:`repair`, :func:`align_slots`, :func:`replica_counts`,
    :func:`~eplb.algorithms.repair.heaviest_gpu`, :func:`choose`,
    :func:`~eplb.algorithms.polish.polish` and :func:`count_moves`, or
    compiled kernels equal to them (same arguments).
    """
    batch, num_phy = fresh.shape
    num_log = weight.shape[1]
    dtype = fresh.dtype
    old = xp.astype(old, dtype)
    base = relabel_fn(fresh, old, num_gpus, num_nodes, xp=xp)
    if tolerance is None and max_moves is None:
        return base, logcnt
    peak = heaviest_gpu_fn(weight, fresh, logcnt, num_gpus, xp=xp)
    limit = peak * _factor(tolerance, peak, xp=xp)
    cap = _cap(max_moves, num_phy, fresh, xp=xp)
    base_moves = xp.reshape(count_moves_fn(base, old, num_gpus, xp=xp), (batch, 1))
    budget = xp.where(base_moves - 1 < cap, base_moves - 1, cap)  # a repair must beat the relabelled placement

    # Sticky starts: the fresh replicas repacked per node, each preferring its old GPU, once within the limit
    # and once wherever its old GPU has room (an unbounded limit: more replicas stay, the local search then
    # sheds the overload with few moves; on drifting traces it wins most layers that the old placement's
    # search cannot bring within the limit). Both in one batched call.
    per_node, gpus_per_node = num_phy // num_nodes, num_gpus // num_nodes
    reciprocal = _xp.reciprocal_table(num_phy, xp=xp, device=_xp.device(weight))
    item_load = _xp.take_along(replica_load(weight, logcnt, reciprocal, xp=xp), base, xp=xp)
    node_shape = (batch * num_nodes, per_node)
    node_limit = xp.reshape(xp.broadcast_to(limit, (batch, num_nodes)), (batch * num_nodes, 1))
    unbounded = xp.full(node_limit.shape, MAX_LOAD, dtype=node_limit.dtype, device=_xp.device(node_limit))
    items, item_loads, limits = [base, base], [item_load, item_load], [node_limit, unbounded]
    if near is not None:  # its groups are on old's nodes but one pair: repacked as the unbounded start is
        near_phy2log, near_cnt = near[0], xp.astype(near[1], logcnt.dtype, copy=False)
        items.append(near_phy2log)
        item_loads.append(_xp.take_along(replica_load(weight, near_cnt, reciprocal, xp=xp), near_phy2log, xp=xp))
        limits.append(unbounded)
    packs = len(items)
    sticky = sticky_pack_fn(
        xp.concat([xp.reshape(x, node_shape) for x in items], axis=0),
        xp.concat([xp.reshape(old, node_shape)] * packs, axis=0),
        xp.concat([xp.reshape(x, node_shape) for x in item_loads], axis=0),
        xp.concat(limits, axis=0),
        gpus_per_node,
        xp=xp,
    )
    sticky = align_slots_fn(
        xp.reshape(sticky, (packs * batch, num_phy)), xp.concat([old] * packs, axis=0), num_gpus, xp=xp
    )

    old_cnt = xp.astype(replica_counts_fn(old, num_log, xp=xp), logcnt.dtype)
    valid = covers_groups(old, old_cnt, num_groups, num_nodes, xp=xp)
    always = xp.ones_like(valid)
    searched = [valid, always, always]  # the old placement's rows only where it keeps groups on nodes
    if near is not None:
        # Only where its nodes hold other groups than the relabelled fresh placement's: elsewhere the two
        # unbounded starts hold the same replicas on the same nodes and the search would repeat.
        searched.append(_other_groups(near_phy2log, base, num_log, num_groups, num_nodes, xp=xp))
    starts = 1 + packs  # the old placement, the sticky repackings
    repaired, counts, moves = repair_fn(
        xp.concat([old, sticky], axis=0),
        xp.concat([old_cnt] + [logcnt] * 2 + ([near_cnt] if near is not None else []), axis=0),
        xp.concat([old] * starts, axis=0),
        xp.concat([weight] * starts, axis=0),
        xp.concat([limit] * starts, axis=0),
        xp.concat([budget] * starts, axis=0),
        xp.concat(searched, axis=0),
        num_gpus,
        num_nodes,
        num_log // num_groups,
        # Rows stop once within the limit or stuck (host, JAX); CUDA runs every step.
        max_iters=min(num_phy, max(64, 4 * num_gpus)),
        xp=xp,
    )
    rows = [slice(k * batch, (k + 1) * batch) for k in range(starts)]
    moves = xp.concat([base_moves] + [moves[r] for r in rows], axis=-1)  # [B, 1 + starts]
    usable = xp.concat([always, valid] + [always] * packs, axis=-1) & (moves <= cap)
    chosen, chosen_cnt = choose_fn(
        weight,
        xp.concat([base, repaired], axis=0),
        xp.concat([logcnt, counts], axis=0),
        moves,
        usable,
        limit,
        num_gpus,
        xp=xp,
    )
    # Give moves back: swaps toward old within the limit, or within the chosen placement's own heaviest GPU
    # where that is higher (only with max_moves), so the heaviest GPU never rises above either.
    ceiling = xp.maximum(limit, heaviest_gpu_fn(weight, chosen, chosen_cnt, num_gpus, xp=xp))
    polished = polish_fn(chosen, chosen_cnt, old, weight, ceiling, num_gpus, num_nodes, num_phy, xp=xp)
    polished = align_slots_fn(polished, old, num_gpus, xp=xp)
    # The search prices a swap as (load - out) + in; the placement's left-to-right sums decide. Where old
    # does not keep groups on nodes (ids unread, e.g. under jit) the layer keeps the relabelled placement.
    within = valid & (heaviest_gpu_fn(weight, polished, chosen_cnt, num_gpus, xp=xp) <= ceiling)
    return xp.where(within, polished, chosen), chosen_cnt


def _factor(tolerance: Any, peak: Any, *, xp: Any) -> Any:
    """``[1, 1]`` float32: ``fl32(1 + fl32(tolerance))``, the same bits on every backend (1 without a tolerance).

    ``tolerance`` is a Python number or a 0-d array (a traced JAX value: a
    control loop varies it without recompiling); a negative or NaN array
    value counts as 0 (a Python one was refused by the API). A Python value
    is rounded on the host and written with ``full`` (no host-to-device copy).
    """
    if tolerance is None:
        return xp.full((1, 1), 1.0, dtype=peak.dtype, device=_xp.device(peak))
    if isinstance(tolerance, int | float):
        factor = _xp.round_float32(1.0 + _xp.round_float32(tolerance))  # the tolerance in float32, then the sum
        return xp.full((1, 1), factor, dtype=peak.dtype, device=_xp.device(peak))
    tol = xp.reshape(xp.astype(tolerance, peak.dtype), (1, 1))
    tol = xp.where(tol >= 0, tol, xp.zeros_like(tol))  # NaN and negatives: 0
    return xp.ones_like(tol) + tol


def _cap(max_moves: Any, num_phy: int, like: Any, *, xp: Any) -> Any:
    """The move cap: ``min(max_moves, R)`` (``R`` without one); a 0-d array (traced) below 0 counts as 0."""
    if max_moves is None:
        return num_phy
    if isinstance(max_moves, int):
        return min(max_moves, num_phy)
    cap = xp.reshape(xp.astype(max_moves, like.dtype), (1, 1))
    return xp.clip(cap, 0, num_phy)


def place_stable(
    weight: Any,
    previous: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    hierarchical: bool,
    tolerance: float | None = None,
    max_moves: int | None = None,
    xp: Any,
    place_fn: Callable[..., Any] = place,
    relabel_fn: Callable[..., Any] = relabel,
    sticky_pack_fn: Callable[..., Any] = sticky_pack,
    repair_fn: Callable[..., Any] = repair,
    align_slots_fn: Callable[..., Any] = align_slots,
    replica_counts_fn: Callable[..., Any] = replica_counts,
    log2phy_fn: Callable[[Any, int], Any] | None = None,
    group_split_fn: Callable[..., Any] | None = None,
    heaviest_gpu_fn: Callable[..., Any] = heaviest_gpu,
    choose_fn: Callable[..., Any] = choose,
    polish_fn: Callable[..., Any] = polish,
    count_moves_fn: Callable[..., Any] = count_moves,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Like :func:`eplb.algorithms.policies.place`, keeping the experts of ``previous [L, R]`` in place.

    ``options`` go to :func:`~eplb.algorithms.policies.place` (``policy``,
    ``spill``); ``tolerance`` and ``max_moves`` to :func:`stabilize`, with,
    where groups stay on nodes (hierarchical, more groups than nodes, no
    ``spill``), :func:`near_split`'s placement as its extra start.
    ``place_fn``, ``relabel_fn``, ``log2phy_fn``: :func:`place`,
    :func:`relabel` and the slot-order ``log2phy`` below, and
    ``sticky_pack_fn``, ``repair_fn``, ``align_slots_fn``,
    ``replica_counts_fn``, ``heaviest_gpu_fn``, ``choose_fn``, ``polish_fn``,
    ``count_moves_fn`` (used only with ``tolerance`` or ``max_moves``):
    :func:`stabilize`'s, and ``group_split_fn`` :func:`near_split`'s, or
    fused implementations equal to them (a backend's fast paths).
    Replica numbers in ``log2phy`` follow slot order (replica ``k`` of an
    expert is its ``k``-th slot). Loads below ``2**-64`` count as zero, here
    too (:mod:`eplb.algorithms.loads`).
    """
    weight = clean_loads(weight, xp=xp)  # for stabilize's loads; place flushes its own (idempotent)
    fresh, _, logcnt = place_fn(
        weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical=hierarchical, xp=xp, **options
    )
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    near = None
    knobs = tolerance is not None or max_moves is not None
    if knobs and num_groups > num_nodes > 1 and not options.get("spill") and options.get("policy") != "survivable":
        near = near_split(
            weight, xp.astype(previous, fresh.dtype, copy=False), num_replicas, num_groups, num_nodes, num_gpus,
            xp=xp, place_fn=place_fn, group_split_fn=group_split_fn, **options,
        )  # fmt: skip
    phy2log, logcnt = stabilize(
        weight,
        fresh,
        logcnt,
        previous,
        num_groups,
        num_nodes,
        num_gpus,
        tolerance=tolerance,
        max_moves=max_moves,
        near=near,
        xp=xp,
        relabel_fn=relabel_fn,
        sticky_pack_fn=sticky_pack_fn,
        repair_fn=repair_fn,
        align_slots_fn=align_slots_fn,
        replica_counts_fn=replica_counts_fn,
        heaviest_gpu_fn=heaviest_gpu_fn,
        choose_fn=choose_fn,
        polish_fn=polish_fn,
        count_moves_fn=count_moves_fn,
    )
    if log2phy_fn is not None:
        return phy2log, log2phy_fn(phy2log, weight.shape[1]), logcnt
    log2phy = build_log2phy(phy2log, occurrence(phy2log, xp=xp), weight.shape[1], xp=xp)
    return phy2log, log2phy, logcnt
