"""Elastic placement: the greedy policies on the GPUs that are up (``active_gpus``).

Slots of failed GPUs hold no expert (``-1`` in ``phy2log``). The rule, per
layer, with ``S = R / G`` slots per GPU and ``R_live = S * #live GPUs``:

- global policy: replicate greedily into ``R_live`` slots (``R_live - E``
  steps), then pack the replicas onto the live GPUs by LPT, exactly as the
  greedy policy does on a cluster of the live GPUs alone (live GPU ``k``
  playing GPU ``k`` of that cluster), scattered back;
- hierarchical policy: groups to nodes by live capacity
  (:func:`live_group_split`: LPT on group loads scaled by each node's
  ``1 / R_n``; the greedy split where every node has as many live slots),
  then per node the same with ``R_n = S * #live GPUs of the node`` slots.
  A layer where some node has fewer live slots than the experts of its
  groups (``R_n < E / N``, e.g. a whole node down) falls back to the global
  rule.

Static shapes throughout, so that it runs under ``jit`` with a traced mask:
greedy replication is prefix-consistent (its first ``k`` steps do not
depend on later ones), so it runs all ``R - E`` steps and keeps the first
``R_live - E``; the replicas beyond (phantoms, load ``-1``) are visited last
by the LPT loop, whose dead packs start (and stay) full, and land in the
dead slots in increasing order. With every GPU live the result is the greedy
placement bit for bit. Fewer than ``E`` live slots (only possible when the
mask cannot be read on the host, which rejects it) gives ``phy2log = -1``,
``logcnt = 0`` everywhere: an unmistakably empty placement, never a
plausible one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eplb import _xp
from eplb.algorithms.assignment import BIG, max_assignment
from eplb.algorithms.hierarchy import (
    assemble,
    covers_groups,
    expert_order,
    greedy_group_split,
    group_loads,
    node_groups,
)
from eplb.algorithms.loads import MAX_LOAD, clean_loads
from eplb.algorithms.packing import inverse_permutation, slots_by_pack, sum_in_pairs, sum_left_to_right
from eplb.algorithms.polish import polish
from eplb.algorithms.relabel import align_slots, count_moves, gpu_overlap, occurrence, replica_counts
from eplb.algorithms.repair import repair, sticky_pack
from eplb.algorithms.replication import replica_load, replicate_experts

__all__ = [
    "build_log2phy_masked",
    "live_group_split",
    "lpt_pack_live",
    "node_fallback_needed",
    "place_elastic",
    "place_elastic_stable",
    "polish_live",
    "rebalance_elastic",
    "relabel_pinned",
    "stabilize_elastic",
    "sticky_group_split",
]


def lpt_pack_live(weight: Any, live_pack: Any, capacity: int, *, xp: Any) -> tuple[Any, Any, Any]:
    """:func:`eplb.algorithms.packing.lpt_pack` where only ``live_pack [B, m]`` packs take items.

    Dead packs are full from the start (load ``+inf``) and never chosen while
    a live pack is open; live packs' running loads saturate at float32 max,
    so they stay below ``+inf``. Steps after every live pack is full return
    unspecified packs and ranks (callers ignore them). With every pack live
    this is ``lpt_pack`` without its one-item shortcut, step for step.
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
        open_load, pack_count = carry
        pack = xp.reshape(xp.argmin(open_load, axis=-1), (batch, 1))  # first minimum wins
        rank = _xp.take_along(pack_count, pack, xp=xp)
        chosen = pack_ids == pack
        pack_count = pack_count + chosen
        open_load = xp.minimum(open_load + chosen * xp.reshape(item_weight, (batch, 1)), most)
        open_load = xp.where((pack_count >= capacity) | dead, xp.inf, open_load)
        return (open_load, pack_count), (pack[:, 0], rank[:, 0])

    init = (xp.where(dead, xp.inf, zeros), zeros)
    _, (pack_by_step, rank_by_step) = _xp.scan(visit, init, weight_by_step, xp=xp)
    pack_by_step = xp.astype(xp.permute_dims(pack_by_step, (1, 0)), order.dtype)
    return order, pack_by_step, xp.astype(xp.permute_dims(rank_by_step, (1, 0)), order.dtype)


def _live_rows(weight: Any, active: Any, num_phy: int, num_nodes: int, num_gpus: int, *, xp: Any) -> tuple[Any, Any]:
    """``live_gpu [L*N, G/N]`` bool and ``live_slots [L*N, 1]`` (live slots of each (layer, node) row)."""
    num_layers = weight.shape[0]
    live_gpu = xp.reshape(xp.broadcast_to(active, (num_layers, num_gpus)), (num_layers * num_nodes, -1))
    per_gpu = num_phy // num_gpus
    live_slots = xp.sum(xp.astype(live_gpu, xp.int32), axis=-1, keepdims=True) * per_gpu
    return live_gpu, live_slots


def _place_rows(
    mlog_load: Any,
    live_gpu: Any,
    live_slots: Any,
    phy_per_node: int,
    per_gpu: int,
    *,
    xp: Any,
    sticky_pack_fn: Callable[..., Any] | None = None,
    replicate_fn: Callable[..., Any] = replicate_experts,
    replica_counts_fn: Callable[..., Any] = replica_counts,
) -> tuple[Any, ...]:
    """Per (layer, node) row: replicate into the row's live slots, pack onto its live GPUs.

    Returns ``phy2mlog`` (phantoms read expert 0), ``phyrank``, ``mlogcnt``
    (live replicas) and ``pphy2phy [rows, R/N]`` (item of each slot of the row).

    ``sticky_pack_fn`` (optional: :func:`eplb.algorithms.repair.sticky_pack`
    or a compiled kernel equal to it) packs instead of :func:`lpt_pack_live`,
    in one call: with no old placement (``old`` all ``-1``, so no item has a
    home) and failed GPUs' packs closed (``initial_load`` ``+inf``), it is the
    same LPT (heaviest item first, ties by index, to the first lightest open
    pack), and once the live packs are full the phantoms fill the failed GPUs'
    slots in order, as the slot order below does. ``replicate_fn``:
    :func:`eplb.algorithms.replication.replicate_experts` or a compiled kernel
    equal to it; ``replica_counts_fn``: :func:`eplb.algorithms.relabel.replica_counts`
    or a compiled kernel equal to it (``-1`` counts for no expert).
    """
    rows_n, log_per_node = mlog_load.shape
    device = _xp.device(mlog_load)
    phy2mlog, phyrank, _ = replicate_fn(mlog_load, phy_per_node, xp=xp)
    index_dtype = phy2mlog.dtype
    item = xp.arange(phy_per_node, dtype=index_dtype, device=device)
    kept = item < xp.astype(live_slots, index_dtype)  # [rows, R/N]: the first R_n items
    # [rows, E/N]: the kept items' replicas (numpy's comparison of every item with every expert took 10 ms at
    # 288 slots / 256 experts on 58 layers; a compiled count, well under a millisecond)
    mlogcnt = replica_counts_fn(xp.where(kept, phy2mlog, xp.full_like(phy2mlog, -1)), log_per_node, xp=xp)
    reciprocal = _xp.reciprocal_table(phy_per_node - log_per_node + 1, xp=xp, device=device)
    load = replica_load(
        _xp.take_along(mlog_load, phy2mlog, xp=xp), _xp.take_along(mlogcnt, phy2mlog, xp=xp), reciprocal, xp=xp
    )
    load = xp.where(kept, load, -1.0)  # phantoms sort last (live loads are >= 0)
    phy2mlog = xp.where(kept, phy2mlog, xp.zeros_like(phy2mlog))
    if per_gpu > 1 and sticky_pack_fn is not None:
        items = xp.broadcast_to(item, (rows_n, phy_per_node))
        closed = xp.astype(xp.where(live_gpu, 0.0, xp.inf), mlog_load.dtype)  # [rows, G/N]
        pphy2phy = sticky_pack_fn(
            items, xp.full_like(items, -1), load, xp.zeros_like(mlog_load[:, :1]), live_gpu.shape[1],
            initial_load=closed, xp=xp,
        )  # fmt: skip
        return phy2mlog, phyrank, mlogcnt, xp.astype(pphy2phy, index_dtype)
    live_slot = xp.reshape(xp.broadcast_to(live_gpu[:, :, None], (rows_n, live_gpu.shape[1], per_gpu)), (rows_n, -1))
    # Live slots in increasing order, then dead slots in increasing order (a stable sort).
    slot_order = _xp.argsort_desc(xp.astype(live_slot, mlog_load.dtype), xp=xp)
    if per_gpu == 1:
        # One slot per GPU: item k to the k-th live slot (the published shortcut, item i on GPU i).
        order = xp.broadcast_to(item, (rows_n, phy_per_node))
        slot_by_step = slot_order
    else:
        order, pack_by_step, rank_by_step = lpt_pack_live(load, live_gpu, per_gpu, xp=xp)
        step = item < xp.astype(live_slots, index_dtype)  # the first R_n steps visit the kept items
        slot_by_step = xp.where(step, pack_by_step * per_gpu + rank_by_step, xp.astype(slot_order, index_dtype))
    row_ids = xp.reshape(xp.arange(rows_n, dtype=index_dtype, device=device), (rows_n, 1))
    pphy2phy = xp.empty((rows_n, phy_per_node), dtype=index_dtype, device=device)
    pphy2phy = _xp.at_set(
        pphy2phy, (row_ids, xp.astype(slot_by_step, index_dtype)), xp.astype(order, index_dtype), xp=xp
    )
    return phy2mlog, phyrank, mlogcnt, pphy2phy


def _node_slots(weight: Any, active: Any, num_phy: int, num_nodes: int, num_gpus: int, *, xp: Any) -> tuple[Any, Any]:
    """``[L, N]`` live slots per node and their correctly rounded float32 reciprocals (0 for a node with none:
    such a layer falls back to the global rule)."""
    num_layers = weight.shape[0]
    _, node_slots = _live_rows(weight, active, num_phy, num_nodes, num_gpus, xp=xp)
    node_slots = xp.reshape(node_slots, (num_layers, num_nodes))
    table = _xp.reciprocal_table(num_phy, xp=xp, device=_xp.device(weight))
    inverse = _xp.take_along(xp.broadcast_to(table, (num_layers, num_phy + 1)), node_slots, xp=xp)
    return node_slots, inverse


def live_group_split(
    weight: Any, active: Any, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, *, xp: Any
) -> Any:
    """``mgroup2group [L, groups]``: groups to nodes by live capacity (the greedy split where all nodes are alike).

    LPT on the group loads (heaviest first, ties by group), each group to the
    open node (fewer than ``groups / N``) whose load after it, times the
    correctly rounded float32 reciprocal of the node's live slots, is
    smallest (ties: the lowest node): a node with failed GPUs takes lighter
    groups. One multiplication, no division, so every backend agrees. Where
    every node has the same live slots this is
    :func:`eplb.algorithms.hierarchy.greedy_group_split`, bit for bit (it is
    selected then: a common scale could round two loads alike).
    """
    num_layers = weight.shape[0]
    plain = greedy_group_split(weight, num_groups, num_nodes, xp=xp)  # one group per node: group g on node g
    device = _xp.device(weight)
    node_slots, inverse = _node_slots(weight, active, num_phy, num_nodes, num_gpus, xp=xp)
    has_slots = node_slots > 0
    loads = group_loads(weight, num_groups, xp=xp)  # [L, groups]
    order = _xp.argsort_desc(loads, xp=xp)
    load_by_step = xp.permute_dims(_xp.take_along(loads, order, xp=xp), (1, 0))  # [groups, L]
    per_node = num_groups // num_nodes
    node_ids = xp.arange(num_nodes, dtype=order.dtype, device=device)
    most = xp.full((1, 1), MAX_LOAD, dtype=weight.dtype, device=device)

    def visit(carry: Any, group_load: Any) -> tuple[Any, Any]:
        node_load, node_count = carry
        after = xp.minimum(node_load + xp.reshape(group_load, (num_layers, 1)), most)
        # Full nodes +inf; an open node without live slots last among the open ones (a valid split still).
        key = xp.where(node_count < per_node, xp.where(has_slots, after * inverse, most), xp.inf)
        node = xp.reshape(xp.argmin(key, axis=-1), (num_layers, 1))  # first minimum wins
        rank = _xp.take_along(node_count, node, xp=xp)
        chosen = node_ids == node
        node_count = node_count + chosen
        node_load = xp.where(chosen, after, node_load)
        return (node_load, node_count), (node[:, 0], rank[:, 0])

    zeros = xp.zeros((num_layers, num_nodes), dtype=weight.dtype, device=device)
    _, (node_by_step, rank_by_step) = _xp.scan(visit, (zeros, zeros), load_by_step, xp=xp)
    node_by_step = xp.astype(xp.permute_dims(node_by_step, (1, 0)), order.dtype)
    rank_by_step = xp.astype(xp.permute_dims(rank_by_step, (1, 0)), order.dtype)
    by_capacity = slots_by_pack(order, node_by_step, rank_by_step, per_node, xp=xp)
    alike = xp.all(node_slots == node_slots[:, :1], axis=-1, keepdims=True)  # [L, 1]
    return xp.where(alike, plain, by_capacity)


def group_split(
    weight: Any,
    active: Any,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    by_capacity: bool = True,
    xp: Any,
) -> Any:
    """``mgroup2group [L, groups]``: :func:`live_group_split` (``by_capacity``) or
    :func:`eplb.algorithms.hierarchy.greedy_group_split` (by load alone); the one signature a compiled kernel
    (:func:`eplb.kernels.group_split_triton.group_split`) takes too."""
    if by_capacity:
        return live_group_split(weight, active, num_phy, num_groups, num_nodes, num_gpus, xp=xp)
    return greedy_group_split(weight, num_groups, num_nodes, xp=xp)


def sticky_group_split(
    weight: Any,
    previous: Any,
    active: Any,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    max_swaps: int | None = None,
    xp: Any,
) -> tuple[Any, Any]:
    """``mgroup2group [L, groups]`` near ``previous [L, R]``'s split, and ``[L, 1]`` whether it is one.

    Starts from the node that holds each group in ``previous`` (``-1`` slots
    hold nothing; a ``previous`` whose groups do not lie one per node, ``groups
    / N`` to a node, is no start: ``False``), then swaps pairs of groups
    between nodes while that lowers the heaviest node's load times
    ``fl32(1 / its live slots)`` (``active=None``: every GPU live, loads
    unscaled) by the ``IMPROVEMENT`` margin: the swap that lowers it most
    (ties: the first pair ``(g1, g2)``, ``g1 < g2``), at most ``max_swaps``
    swaps (``None``: ``groups``). A group's load is the pairwise sum of its
    experts' loads (:func:`eplb.algorithms.packing.sum_in_pairs`: few array
    operations), a node's the left-to-right sum of its groups' in group
    order; groups are listed node by node, in group order.
    """
    from eplb.algorithms.refine import IMPROVEMENT

    num_layers, num_log = weight.shape
    device = _xp.device(weight)
    dtype = previous.dtype  # the ids' integer type (int32 on JAX without x64)
    group_ids = xp.arange(num_groups, dtype=dtype, device=device)
    node_ids = xp.arange(num_nodes, dtype=dtype, device=device)
    present = xp.astype(node_groups(previous, num_log, num_groups, num_nodes, xp=xp), dtype)  # [L, N, groups]
    # Each group on exactly one node (a group with no slot is on none), groups / N groups on each node.
    valid = xp.all(xp.sum(present, axis=1) == 1, axis=-1, keepdims=True) & xp.all(
        xp.sum(present, axis=2) == num_groups // num_nodes, axis=-1, keepdims=True
    )
    low = xp.sum(present * node_ids[None, :, None], axis=1)  # [L, groups] the group's node where valid
    assign = xp.where(valid, low, xp.zeros_like(low))  # [L, groups] node of each group
    loads = sum_in_pairs(xp.reshape(weight, (num_layers, num_groups, num_log // num_groups)), xp=xp)  # [L, groups]
    inverse = None if active is None else _node_slots(weight, active, num_phy, num_nodes, num_gpus, xp=xp)[1]
    first = [g1 for g1 in range(num_groups) for g2 in range(g1 + 1, num_groups)]
    second = [g2 for g1 in range(num_groups) for g2 in range(g1 + 1, num_groups)]
    if not first:
        return _order_by_node(assign, num_groups, xp=xp), valid
    g1 = xp.astype(_xp.constant(first, xp=xp, device=device), dtype, copy=False)  # no host copy per call (a CUDA sync)
    g2 = xp.astype(_xp.constant(second, xp=xp, device=device), dtype, copy=False)
    zero = xp.zeros_like(loads)
    for _ in range(num_groups if max_swaps is None else max_swaps):
        on_node = assign[:, None, :] == node_ids[None, :, None]  # [L, N, groups]
        node_load = sum_left_to_right(xp.where(on_node, loads[:, None, :], zero[:, None, :]), xp=xp)  # [L, N]
        scaled = node_load if inverse is None else node_load * inverse
        current = xp.max(scaled, axis=-1, keepdims=True)
        a, b = xp.take(assign, g1, axis=1), xp.take(assign, g2, axis=1)  # [L, P]
        x1, x2 = xp.take(loads, g1, axis=1), xp.take(loads, g2, axis=1)
        new_a = (_xp.take_along(node_load, a, xp=xp) - x1) + x2
        new_b = (_xp.take_along(node_load, b, xp=xp) - x2) + x1
        touched = (node_ids[None, None, :] == a[:, :, None]) | (node_ids[None, None, :] == b[:, :, None])
        others = xp.max(xp.where(touched, -xp.inf, scaled[:, None, :]), axis=-1)  # [L, P]
        if inverse is not None:
            new_a, new_b = new_a * _xp.take_along(inverse, a, xp=xp), new_b * _xp.take_along(inverse, b, xp=xp)
        after = xp.maximum(others, xp.maximum(new_a, new_b))
        ok = (a != b) & (after < current * IMPROVEMENT)
        choice = xp.reshape(xp.argmin(xp.where(ok, after, xp.inf), axis=-1), (num_layers, 1))
        accept = xp.any(ok, axis=-1, keepdims=True)
        pick1, pick2 = (
            _xp.take_along(xp.broadcast_to(g1, a.shape), choice, xp=xp),
            _xp.take_along(xp.broadcast_to(g2, a.shape), choice, xp=xp),
        )
        node1, node2 = _xp.take_along(a, choice, xp=xp), _xp.take_along(b, choice, xp=xp)
        swapped = xp.where(group_ids == pick1, node2, xp.where(group_ids == pick2, node1, assign))
        assign = xp.where(accept, swapped, assign)
    return _order_by_node(assign, num_groups, xp=xp), valid


def _order_by_node(assign: Any, num_groups: int, *, xp: Any) -> Any:
    """Groups listed node by node, in group order within a node: ``mgroup2group [L, groups]``."""
    key = assign * num_groups + xp.arange(num_groups, dtype=assign.dtype, device=_xp.device(assign))
    return xp.argsort(key, axis=-1, stable=True)  # unique keys: the same order on every backend


def _elastic(
    weight: Any,
    active: Any,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    by_capacity: bool = True,
    split: Any = None,
    xp: Any,
    sticky_pack_fn: Callable[..., Any] | None = None,
    replicate_fn: Callable[..., Any] = replicate_experts,
    split_fn: Callable[..., Any] = group_split,
    replica_counts_fn: Callable[..., Any] = replica_counts,
) -> tuple[Any, Any, Any]:
    """The hierarchical elastic rule (global with one group, one node), no fallback; groups to nodes by live
    capacity (:func:`live_group_split`), by load alone (``by_capacity=False``: the healthy greedy split), or
    as ``split [L, groups]`` (groups node by node) says. ``sticky_pack_fn``, ``replicate_fn``,
    ``replica_counts_fn``: as :func:`_place_rows`; ``split_fn``: :func:`group_split` or a compiled kernel
    equal to it."""
    group_size = weight.shape[1] // num_groups
    if split is None and num_groups == 1:
        # One group (the global rule): the only split, with no group loads or LPT steps (hundreds of launches on
        # CUDA for nothing).
        split = xp.zeros((weight.shape[0], 1), dtype=xp.arange(1).dtype, device=_xp.device(weight))  # argsort's
    elif split is None:
        split = split_fn(weight, active, num_phy, num_groups, num_nodes, num_gpus, by_capacity=by_capacity, xp=xp)
    mlog2log = expert_order(split, group_size, xp=xp)
    num_layers, num_log = weight.shape
    mlog_load = xp.reshape(_xp.take_along(weight, mlog2log, xp=xp), (num_layers * num_nodes, num_log // num_nodes))
    live_gpu, live_slots = _live_rows(weight, active, num_phy, num_nodes, num_gpus, xp=xp)
    phy2mlog, phyrank, mlogcnt, pphy2phy = _place_rows(
        mlog_load, live_gpu, live_slots, num_phy // num_nodes, num_phy // num_gpus, xp=xp,
        sticky_pack_fn=sticky_pack_fn, replicate_fn=replicate_fn, replica_counts_fn=replica_counts_fn,
    )  # fmt: skip
    phy2log, phyrank, logcnt = assemble(mlog2log, phy2mlog, phyrank, mlogcnt, pphy2phy, num_nodes, xp=xp)
    live_slot = _live_slot(active, num_layers, num_phy, num_gpus, xp=xp)
    none = xp.full_like(phy2log, -1)
    return xp.where(live_slot, phy2log, none), xp.where(live_slot, phyrank, none), logcnt


def _live_slot(active: Any, num_layers: int, num_phy: int, num_gpus: int, *, xp: Any) -> Any:
    """``[L, R]`` bool: slot on a live GPU."""
    per_gpu = num_phy // num_gpus
    grid = xp.broadcast_to(xp.reshape(active, (-1, num_gpus, 1)), (num_layers, num_gpus, per_gpu))
    return xp.reshape(grid, (num_layers, num_phy))


def node_fallback_needed(live_per_gpu: Any, num_log: int, num_phy: int, num_nodes: int, num_gpus: int) -> bool:
    """Host rule: some node has fewer live slots than ``E / N`` (``live_per_gpu``: a host bool sequence)."""
    per_node = num_gpus // num_nodes
    per_gpu = num_phy // num_gpus
    counts = [sum(bool(x) for x in live_per_gpu[n * per_node : (n + 1) * per_node]) for n in range(num_nodes)]
    return any(c * per_gpu < num_log // num_nodes for c in counts)


def rebalance_elastic(
    weight: Any,
    active: Any,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    fallback: bool | None = None,
    by_capacity: bool = True,
    xp: Any,
    sticky_pack_fn: Callable[..., Any] | None = None,
    replicate_fn: Callable[..., Any] = replicate_experts,
    split_fn: Callable[..., Any] = group_split,
    replica_counts_fn: Callable[..., Any] = replica_counts,
) -> tuple[Any, Any, Any]:
    """Greedy placement on the live GPUs: ``phy2log`` (``-1`` on dead GPUs), ``phyrank``, ``logcnt``.

    Parameters
    ----------
    weight : array [L, E], float32
        Clean loads (:func:`eplb.algorithms.loads.clean_loads`).
    active : array [G] (or [1, G] per vmapped layer), bool
        Live GPUs; may be traced.
    num_groups, num_nodes : int
        ``1, 1`` for the global policy.
    fallback : bool or None
        Hierarchical only: ``True``/``False`` when the host knows whether some
        node has fewer than ``E / N`` live slots (then the global rule runs for
        every layer); ``None`` computes both and selects per layer.
    by_capacity : bool
        Hierarchical only: groups to nodes by live capacity
        (:func:`live_group_split`, default) or by load alone.
    sticky_pack_fn : callable or None
        A compiled :func:`eplb.algorithms.repair.sticky_pack` to pack the
        replicas with (the same placement, see :func:`_place_rows`); ``None``:
        :func:`lpt_pack_live`.
    replicate_fn : callable
        :func:`eplb.algorithms.replication.replicate_experts` or a compiled
        kernel equal to it (``max_count`` not passed).
    split_fn : callable
        :func:`group_split` or a compiled kernel equal to it (groups to nodes).
    replica_counts_fn : callable
        :func:`eplb.algorithms.relabel.replica_counts` or a compiled kernel
        equal to it (``-1`` counts for no expert).

    Returns
    -------
    phy2log : array [L, R], integer, ``-1`` in dead slots
    phyrank : array [L, R], integer, ``-1`` in dead slots
    logcnt : array [L, E], integer, live replicas (>= 1)

    With fewer than ``E`` live slots: ``-1`` everywhere and ``logcnt = 0``.
    """
    num_log = weight.shape[1]
    active = xp.reshape(active, (-1, num_gpus))
    hierarchical = num_nodes > 1 or num_groups > 1
    packer = {
        "sticky_pack_fn": sticky_pack_fn,
        "replicate_fn": replicate_fn,
        "split_fn": split_fn,
        "replica_counts_fn": replica_counts_fn,
    }
    if not hierarchical or fallback:
        phy2log, phyrank, logcnt = _elastic(weight, active, num_phy, 1, 1, num_gpus, xp=xp, **packer)
    else:
        phy2log, phyrank, logcnt = _elastic(
            weight, active, num_phy, num_groups, num_nodes, num_gpus, by_capacity=by_capacity, xp=xp, **packer
        )
        if fallback is None and num_nodes > 1:
            node_slots, _ = _node_slots(weight, active, num_phy, num_nodes, num_gpus, xp=xp)
            short = xp.any(node_slots < num_log // num_nodes, axis=-1)
            flat = _elastic(weight, active, num_phy, 1, 1, num_gpus, xp=xp, **packer)
            phy2log = xp.where(short[:, None], flat[0], phy2log)
            phyrank = xp.where(short[:, None], flat[1], phyrank)
            logcnt = xp.where(short[:, None], flat[2], logcnt)
    _, live_slots = _live_rows(weight, active, num_phy, 1, num_gpus, xp=xp)  # [L, 1]
    enough = live_slots >= num_log
    phy2log = xp.where(enough, phy2log, xp.full_like(phy2log, -1))
    phyrank = xp.where(enough, phyrank, xp.full_like(phyrank, -1))
    logcnt = xp.where(enough, logcnt, xp.zeros_like(logcnt))
    return phy2log, phyrank, logcnt


def build_log2phy_masked(phy2log: Any, phyrank: Any, num_log: int, *, xp: Any) -> Any:
    """:func:`eplb.algorithms.hierarchy.build_log2phy` skipping ``-1`` slots (they appear nowhere).

    Each ``-1`` slot writes into its own scratch entry past the end, so the
    scatter keeps unique indices (as JAX needs).
    """
    num_layers, num_phy = phy2log.shape
    device = _xp.device(phy2log)
    max_count = num_phy - num_log + 1
    size = num_log * max_count
    log2phy = xp.full((num_layers, size + num_phy), -1, dtype=phy2log.dtype, device=device)
    rows = xp.reshape(xp.arange(num_layers, dtype=phy2log.dtype, device=device), (num_layers, 1))
    slots = xp.broadcast_to(xp.arange(num_phy, dtype=phy2log.dtype, device=device), (num_layers, num_phy))
    target = xp.where(phy2log >= 0, phy2log * max_count + phyrank, size + slots)
    log2phy = _xp.at_set(log2phy, (rows, target), slots, xp=xp)
    return xp.reshape(log2phy[:, :size], (num_layers, num_log, max_count))


def place_elastic(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    active_gpus: Any,
    hierarchical: bool,
    policy: str = "greedy",
    spill: int = 0,
    node_fallback: bool | None = None,
    xp: Any,
    sticky_pack_fn: Callable[..., Any] | None = None,
    replicate_fn: Callable[..., Any] = replicate_experts,
    split_fn: Callable[..., Any] = group_split,
    replica_counts_fn: Callable[..., Any] = replica_counts,
) -> tuple[Any, Any, Any]:
    """:func:`eplb.algorithms.policies.place` with ``active_gpus [G]`` bool: ``phy2log`` (``-1`` in dead
    slots), ``log2phy`` (never pointing at them), ``logcnt`` (live replicas), for float32 ``weight [L, E]``.

    Greedy policy without spill only. ``node_fallback``, ``sticky_pack_fn``, ``replicate_fn``, ``split_fn``,
    ``replica_counts_fn``: see :func:`rebalance_elastic`.
    """
    if policy != "greedy" or spill:
        raise ValueError(f"active_gpus supports the greedy policy without spill, got {policy=}, {spill=}")
    weight = clean_loads(weight, xp=xp)
    sizes = (num_groups, num_nodes) if hierarchical else (1, 1)
    phy2log, phyrank, logcnt = rebalance_elastic(
        weight,
        active_gpus,
        num_replicas,
        *sizes,
        num_gpus,
        fallback=node_fallback,
        xp=xp,
        sticky_pack_fn=sticky_pack_fn,
        replicate_fn=replicate_fn,
        split_fn=split_fn,
        replica_counts_fn=replica_counts_fn,
    )
    return phy2log, build_log2phy_masked(phy2log, phyrank, weight.shape[1], xp=xp), logcnt


# ---------------------------------------------------------------- previous= (only what must move moves)


def _live_gpu_loads(weight: Any, phy2log: Any, logcnt: Any, num_gpus: int, *, xp: Any) -> Any:
    """``[B, G]`` float32 GPU loads as :func:`eplb.algorithms.repair.gpu_loads`, ``-1`` slots counting 0."""
    batch, num_phy = phy2log.shape
    reciprocal = _xp.reciprocal_table(num_phy, xp=xp, device=_xp.device(weight))
    per_replica = replica_load(weight, logcnt, reciprocal, xp=xp)
    held = phy2log >= 0
    slot_load = _xp.take_along(per_replica, xp.where(held, phy2log, xp.zeros_like(phy2log)), xp=xp)
    slot_load = xp.where(held, slot_load, xp.zeros_like(slot_load))
    return sum_left_to_right(xp.reshape(slot_load, (batch, num_gpus, num_phy // num_gpus)), xp=xp)


def live_heaviest_gpu(weight: Any, phy2log: Any, logcnt: Any, num_gpus: int, *, xp: Any) -> Any:
    """``[B, 1]`` float32: the heaviest GPU of :func:`_live_gpu_loads` (``-1`` slots weigh 0; a max is exact in any
    order)."""
    return xp.max(_live_gpu_loads(weight, phy2log, logcnt, num_gpus, xp=xp), axis=-1, keepdims=True)


def relabel_pinned(new: Any, old: Any, live_gpu: Any, num_gpus: int, *, num_nodes: int = 1, xp: Any) -> Any:
    """:func:`eplb.algorithms.relabel.relabel` of ``new [B, R]`` to ``old [B, R]``, failed GPUs pinned.

    ``new`` holds ``-1`` exactly on the GPUs that ``live_gpu [B, G]`` marks
    down. GPUs are permuted to keep the most ``(expert, GPU)`` pairs, among
    the permutations that map live GPUs onto live positions (``live_gpu``
    may also hold integer classes: each GPU onto a position of its own
    class, as GPUs of equal capacity under ``gpu_capacity``; and, with
    ``num_nodes > 1``, each GPU onto a position of its own node: the
    hierarchical policy's groups stay on their nodes): the overlap of an
    allowed pair gets ``R + 1`` added (more than any overlap total), so the
    exact maximum assignment never takes another pair (the identity is an
    allowed assignment). Then each GPU's slots follow ``old``.
    """
    batch, num_phy = new.shape
    per_gpu = num_phy // num_gpus
    kept = gpu_overlap(new, old, num_gpus, xp=xp)  # [B, G, G]: new GPU i, old position j
    live_gpu = xp.broadcast_to(live_gpu, (batch, num_gpus))
    allowed = live_gpu[:, :, None] == live_gpu[:, None, :]
    if num_nodes > 1:
        node = xp.arange(num_gpus, device=_xp.device(new)) // (num_gpus // num_nodes)
        allowed = allowed & (node[:, None] == node[None, :])
    profit = kept + xp.astype(allowed, kept.dtype) * (num_phy + 1)
    holder = inverse_permutation(max_assignment(profit, xp=xp), xp=xp)  # new GPU placed at each position
    slots = xp.reshape(
        holder[:, :, None] * per_gpu + xp.arange(per_gpu, dtype=holder.dtype, device=_xp.device(new)),
        (batch, num_phy),
    )
    return align_slots(_xp.take_along(new, xp.astype(slots, new.dtype), xp=xp), old, num_gpus, xp=xp)


def stabilize_elastic(
    weight: Any,
    fresh: Any,
    logcnt: Any,
    previous: Any,
    active: Any,
    num_gpus: int,
    *,
    tolerance: Any,
    num_nodes: int = 1,
    num_groups: int = 1,
    peak: Any = None,
    rows: Any = None,
    xp: Any,
    sticky_pack_fn: Callable[..., Any] = sticky_pack,
    repair_fn: Callable[..., Any] = repair,
    align_slots_fn: Callable[..., Any] = align_slots,
    relabel_pinned_fn: Callable[..., Any] = relabel_pinned,
    heaviest_gpu_fn: Callable[..., Any] = live_heaviest_gpu,
    count_moves_fn: Callable[..., Any] = count_moves,
    replica_counts_fn: Callable[..., Any] = replica_counts,
) -> tuple[Any, Any, Any, Any]:
    """``phy2log [B, R]``: the elastic placement ``fresh`` (with ``logcnt``) moving few experts from ``previous``;
    also its replica counts ``[B, E]``, its moves ``[B, 1]`` and whether it is within the limit ``[B, 1]``.

    Slots of failed GPUs in ``previous`` count as empty (no source, no
    affinity). Candidates: ``fresh`` relabelled (:func:`relabel_pinned`), and
    a :func:`eplb.algorithms.repair.sticky_pack` of its replicas onto the
    live GPUs (failed ones start at ``+inf``), each replica preferring the
    live GPU that held its copy, within ``limit = fresh's heaviest GPU *
    fl32(1 + tolerance)`` (``tolerance`` ``None``: 0), once plain, once
    with ``reserve`` (room kept for the items to come), and once with no
    limit (a replica stays whenever its old GPU has a free slot), each of
    these three, and ``previous`` itself where it holds every expert on a live
    GPU, fills every live slot and keeps groups on nodes, after
    :func:`eplb.algorithms.repair.repair`'s local search toward the
    limit (failed GPUs' slots stay empty; moves kept below the relabelled
    placement's; replica counts may change). Per layer, among the candidates
    whose heaviest GPU is within the limit (the relabelled one always is),
    the one with the fewest moves, ties to the earlier in that order; slots
    follow ``previous`` (:func:`align_slots`). ``num_groups``: the groups
    that stay on their node (with ``num_nodes > 1``).
    With ``num_nodes > 1`` (the hierarchical rule, groups on nodes) both stay
    within nodes: GPUs are relabelled among their node's positions, and the
    sticky repacking runs per node. ``peak [B, 1]`` (optional): the heaviest
    GPU the limit scales instead of ``fresh``'s; the relabelled candidate is
    then checked against the limit too (else it is within by construction).
    ``rows [B, 1]`` (bool, or None for all): the layers whose result the
    caller keeps; the local search skips the others (their result is then
    the best unsearched candidate: :func:`stable_by_layer` drops it).
    ``sticky_pack_fn``, ``repair_fn``, ``align_slots_fn``, ``relabel_pinned_fn``,
    ``heaviest_gpu_fn``, ``count_moves_fn``, ``replica_counts_fn``: :func:`sticky_pack`, :func:`repair`,
    :func:`align_slots`, :func:`relabel_pinned`, :func:`live_heaviest_gpu`, :func:`count_moves` and
    :func:`replica_counts`, or compiled kernels equal to them (same arguments, ``-1`` slots included).
    """
    from eplb.algorithms.stability import _factor  # the healthy rule's limit, the same float32 bits

    batch, num_phy = fresh.shape
    dtype = fresh.dtype
    live_gpu = xp.broadcast_to(xp.reshape(active, (-1, num_gpus)), (batch, num_gpus))
    live_slot = _live_slot(live_gpu, batch, num_phy, num_gpus, xp=xp)
    old = xp.where(live_slot, xp.astype(previous, dtype), xp.full_like(fresh, -1))
    base = relabel_pinned_fn(fresh, old, live_gpu, num_gpus, num_nodes=num_nodes, xp=xp)
    fresh_peak = heaviest_gpu_fn(weight, fresh, logcnt, num_gpus, xp=xp)
    base_within = xp.ones_like(fresh_peak, dtype=bool) if peak is None else None
    peak = fresh_peak if peak is None else peak
    limit = peak * _factor(tolerance, peak, xp=xp)
    reciprocal = _xp.reciprocal_table(num_phy, xp=xp, device=_xp.device(weight))
    per_replica = replica_load(weight, logcnt, reciprocal, xp=xp)
    held = base >= 0
    item_load = _xp.take_along(per_replica, xp.where(held, base, xp.zeros_like(base)), xp=xp)
    item_load = xp.where(held, item_load, -xp.ones_like(item_load))  # empty slots come last
    initial = xp.where(live_gpu, 0.0, xp.inf)
    initial = xp.astype(initial, weight.dtype)
    if base_within is None:
        base_peak = heaviest_gpu_fn(weight, base, logcnt, num_gpus, xp=xp)
        base_within = base_peak <= limit
    node_rows = (batch * num_nodes, num_phy // num_nodes)  # one sticky repacking per (layer, node)
    node_limit = xp.reshape(xp.broadcast_to(limit, (batch, num_nodes)), (batch * num_nodes, 1))
    node_initial = xp.reshape(initial, (batch * num_nodes, num_gpus // num_nodes))
    unbounded = xp.full(node_limit.shape, MAX_LOAD, dtype=node_limit.dtype, device=_xp.device(node_limit))
    # Within the limit, plain and with reserve; and wherever the old GPU has room (no limit: more replicas
    # stay, and the local search below sheds the overload with few moves).
    stickies = []
    for reserve, pack_limit in ((False, node_limit), (True, node_limit), (False, unbounded)):
        sticky = sticky_pack_fn(
            xp.reshape(base, node_rows),
            xp.reshape(old, node_rows),
            xp.reshape(item_load, node_rows),
            pack_limit,
            num_gpus // num_nodes,
            initial_load=node_initial,
            reserve=reserve,
            xp=xp,
        )
        stickies.append(xp.reshape(sticky, (batch, num_phy)))
    packs = len(stickies)
    # Every later step is row by row: the candidates stacked ([k * B + b], k-th candidate of layer b), one call
    # each (a few launches on CUDA instead of a few per candidate).
    olds = xp.concat([old] * (packs + 1), axis=0)  # [4B, R]
    weights = xp.concat([weight] * (packs + 1), axis=0)
    logcnts = xp.concat([logcnt] * (packs + 1), axis=0)
    limits = xp.concat([limit] * (packs + 1), axis=0)  # [4B, 1]
    packed = align_slots_fn(xp.concat(stickies, axis=0), olds[: packs * batch], num_gpus, xp=xp)  # [3B, R]
    packed_peak = heaviest_gpu_fn(weights[: packs * batch], packed, logcnts[: packs * batch], num_gpus, xp=xp)
    first = xp.concat([base, packed], axis=0)  # the relabelled placement and the sticky repackings, [4B, R]
    first_moves = count_moves_fn(first, olds, num_gpus, xp=xp)  # [4B]
    # The sticky repackings often miss a tight limit by a little: the local search closes the gap with a few
    # moves (below the relabelled placement's, else it could not win).
    # And the previous placement itself (its live slots), where it still holds every expert on a live GPU, fills
    # every live slot and keeps groups on nodes: with no expert lost, a few changes from it beat any repacking.
    num_log = weight.shape[1]
    old_cnt = xp.astype(replica_counts_fn(old, num_log, xp=xp), logcnt.dtype)
    old_valid = covers_groups(old, old_cnt, num_groups if num_nodes > 1 else 1, num_nodes, xp=xp) & xp.all(
        (old >= 0) | xp.logical_not(live_slot), axis=-1, keepdims=True
    )  # and no live slot empty (a GPU back from a failure has none of its experts)
    searched = xp.ones((packs * batch, 1), dtype=bool, device=_xp.device(weight))
    if rows is not None:  # (repair leaves rows that are not valid as they are, with no step)
        searched = xp.concat([rows] * packs, axis=0)
        old_valid = old_valid & rows
    base_moves = first_moves[:batch]
    repaired, repaired_cnt, repaired_moves = repair_fn(
        xp.concat([packed, old], axis=0),  # [4B, R]
        xp.concat([logcnts[: packs * batch], old_cnt], axis=0),
        olds,
        weights,
        limits,
        xp.concat([base_moves - 1] * (packs + 1), axis=0)[:, None],
        xp.concat([searched, old_valid], axis=0),
        num_gpus,
        num_nodes,
        num_log // num_groups if num_nodes > 1 else num_log,
        max_iters=min(num_phy, max(64, 4 * num_gpus)),
        xp=xp,
    )
    # The searched candidates' heaviest GPUs in one call; their moves as the search counted them (exact).
    repaired_peak = heaviest_gpu_fn(weights, repaired, repaired_cnt, num_gpus, xp=xp)
    repaired_within = (repaired_peak <= limits) & xp.concat([searched, old_valid], axis=0)
    # Candidates in order: relabelled, the 3 sticky repackings, then the 4 searched ones, [8B] stacked.
    within = xp.concat([base_within, packed_peak <= limits[: packs * batch], repaired_within], axis=0)  # [8B, 1]
    moves = xp.concat([first_moves, xp.astype(repaired_moves[:, 0], first_moves.dtype)], axis=0)  # [8B]
    within = xp.permute_dims(xp.reshape(within, (2 * (packs + 1), batch)), (1, 0))  # [B, 8]
    moves = xp.where(within, xp.permute_dims(xp.reshape(moves, (2 * (packs + 1), batch)), (1, 0)), BIG)
    choice = xp.argmin(moves, axis=-1)  # [B] fewest moves; ties: the earlier candidate
    pick = choice * batch + xp.arange(batch, dtype=choice.dtype, device=_xp.device(weight))  # its stacked row
    out = xp.take(xp.concat([first, repaired], axis=0), pick, axis=0)
    out_cnt = xp.take(xp.concat([logcnts, repaired_cnt], axis=0), pick, axis=0)
    choice = xp.reshape(choice, (batch, 1))
    return out, out_cnt, _xp.take_along(moves, choice, xp=xp), _xp.take_along(within, choice, xp=xp)


def polish_live(
    weight: Any,
    phy2log: Any,
    counts: Any,
    previous: Any,
    active: Any,
    limit: Any,
    num_gpus: int,
    num_nodes: int,
    *,
    xp: Any,
    polish_fn: Callable[..., Any] = polish,
    align_slots_fn: Callable[..., Any] = align_slots,
    heaviest_gpu_fn: Callable[..., Any] = live_heaviest_gpu,
    rows: Any = None,
) -> Any:
    """``phy2log [B, R]`` (``-1`` on failed GPUs) with :func:`eplb.algorithms.polish.polish`'s swaps back toward
    ``previous [B, R]``'s live slots, every GPU within ``limit [B, 1]`` (or within ``phy2log``'s own heaviest GPU,
    where that is higher); ``counts [B, E]`` its replica counts, ``active [1, G]`` the live GPUs.

    The polish takes expert ids in ``[0, E)``, so an empty slot (of ``phy2log``, or of ``previous`` on a failed
    GPU or anywhere) becomes one more expert, ``E``, of load 0. A swap that puts a live expert ``x`` on a
    failed GPU never gives a pair back: ``x`` was not there in ``previous`` (which holds only ``E`` there), and
    the ``E`` it takes from that GPU was no new pair there, so its change in moves is ``1 + [E not on x's GPU
    in previous] - [x new on its GPU] >= 0``; it is never made, and the empty slots stay where they are.
    Slots aligned to ``previous`` again (:func:`align_slots`); the result is kept only where its left-to-right
    sums (``heaviest_gpu_fn``) stay within that bound, so it never adds a move nor raises the heaviest GPU above
    it. ``polish_fn``, ``align_slots_fn``, ``heaviest_gpu_fn``: the array-API functions or compiled kernels equal
    to them. ``rows [B, 1]`` (bool, or None for all): the rows whose result the caller keeps; the others return
    ``phy2log`` unchanged after one step that finds no swap (their ceiling is ``-inf``), so a rule that a layer
    does not take (:func:`stable_by_layer` computes both where the mask is on the device) costs no search.
    """
    batch, num_phy = phy2log.shape
    num_log = weight.shape[1]
    dtype = phy2log.dtype
    live_slot = _live_slot(xp.broadcast_to(xp.reshape(active, (-1, num_gpus)), (batch, num_gpus)), batch, num_phy,
                           num_gpus, xp=xp)  # fmt: skip
    old = xp.where(live_slot, xp.astype(previous, dtype), xp.full_like(phy2log, -1))
    empty = xp.full_like(phy2log, num_log)
    counts = xp.astype(counts, dtype, copy=False)
    spare = num_phy - xp.sum(counts, axis=-1, keepdims=True)  # the empty slots (a count of 0 would read 1/0)
    ceiling = xp.maximum(limit, heaviest_gpu_fn(weight, phy2log, counts, num_gpus, xp=xp))
    if rows is not None:  # no load is <= -inf: no swap is allowed, and the result fails the check below
        ceiling = xp.where(rows, ceiling, xp.full_like(ceiling, -xp.inf))
    polished = polish_fn(
        xp.where(phy2log >= 0, phy2log, empty),
        xp.concat([counts, xp.maximum(spare, xp.ones_like(spare))], axis=-1),
        xp.where(old >= 0, old, empty),
        xp.concat([weight, xp.zeros((batch, 1), dtype=weight.dtype, device=_xp.device(weight))], axis=-1),
        ceiling,
        num_gpus,
        num_nodes,
        num_phy,
        xp=xp,
    )
    polished = xp.astype(polished, dtype, copy=False)
    polished = align_slots_fn(xp.where(polished < num_log, polished, xp.full_like(polished, -1)), old, num_gpus, xp=xp)
    within = heaviest_gpu_fn(weight, polished, counts, num_gpus, xp=xp) <= ceiling
    return xp.where(within, polished, phy2log)


def place_elastic_stable(
    weight: Any,
    previous: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    active_gpus: Any,
    hierarchical: bool,
    tolerance: Any = None,
    policy: str = "greedy",
    spill: int = 0,
    node_fallback: bool | None = None,
    xp: Any,
    sticky_pack_fn: Callable[..., Any] = sticky_pack,
    repair_fn: Callable[..., Any] = repair,
    align_slots_fn: Callable[..., Any] = align_slots,
    relabel_pinned_fn: Callable[..., Any] = relabel_pinned,
    heaviest_gpu_fn: Callable[..., Any] = live_heaviest_gpu,
    replicate_fn: Callable[..., Any] = replicate_experts,
    group_split_fn: Callable[..., Any] = sticky_group_split,
    split_fn: Callable[..., Any] = group_split,
    polish_fn: Callable[..., Any] = polish,
    count_moves_fn: Callable[..., Any] = count_moves,
    replica_counts_fn: Callable[..., Any] = replica_counts,
    log2phy_fn: Callable[[Any, int], Any] | None = None,
) -> tuple[Any, Any, Any]:
    """:func:`place_elastic` keeping the experts of ``previous [L, R]`` (``-1``: an empty slot) in place.

    The replicas start as the fresh elastic placement's (:func:`rebalance_elastic`,
    hierarchical or global, ``node_fallback`` as there); the GPUs' contents
    (and, where its local search changed them, the replica counts) are
    :func:`stabilize_elastic`'s, within nodes where the layer keeps its
    groups on nodes (no fallback), across all live GPUs otherwise.
    ``log2phy`` numbers replicas in slot order. ``sticky_pack_fn``,
    ``repair_fn``, ``align_slots_fn``, ``relabel_pinned_fn``,
    ``heaviest_gpu_fn``, ``count_moves_fn``, ``replica_counts_fn``: :func:`stabilize_elastic`'s; ``log2phy_fn``:
    :func:`stable_by_layer`'s; a ``sticky_pack_fn``
    other than :func:`sticky_pack` (a compiled one) also packs the fresh
    placements (:func:`_place_rows`: the same placements); ``replicate_fn``
    replicates them and ``split_fn`` splits their groups (:func:`rebalance_elastic`'s); ``group_split_fn``:
    :func:`sticky_group_split` or a compiled kernel equal to it (same arguments). Each rule's choice then
    gives moves back (:func:`polish_live`: swaps toward ``previous`` within the limit, ``fresh``'s heaviest
    GPU times ``fl32(1 + tolerance)``; within nodes where groups stay on nodes); ``polish_fn``:
    :func:`eplb.algorithms.polish.polish` or a compiled kernel equal to it.
    """
    if policy != "greedy" or spill:
        raise ValueError(f"active_gpus supports the greedy policy without spill, got {policy=}, {spill=}")
    weight = clean_loads(weight, xp=xp)
    active = xp.reshape(active_gpus, (-1, num_gpus))
    if not hierarchical:
        num_groups = num_nodes = 1
    # A compiled sticky packing also packs the fresh placements (the same ones as lpt_pack_live's, in one call).
    packer = {
        "sticky_pack_fn": None if sticky_pack_fn is sticky_pack else sticky_pack_fn,
        "replicate_fn": replicate_fn,
        "split_fn": split_fn,
        "replica_counts_fn": replica_counts_fn,
    }
    fresh, _, logcnt = rebalance_elastic(
        weight, active, num_replicas, num_groups, num_nodes, num_gpus, fallback=node_fallback, xp=xp, **packer
    )
    kernels = {
        "sticky_pack_fn": sticky_pack_fn,
        "repair_fn": repair_fn,
        "align_slots_fn": align_slots_fn,
        "relabel_pinned_fn": relabel_pinned_fn,
        "heaviest_gpu_fn": heaviest_gpu_fn,
        "count_moves_fn": count_moves_fn,
        "replica_counts_fn": replica_counts_fn,
    }

    from eplb.algorithms.stability import _factor  # the healthy rule's limit, the same float32 bits

    peak = heaviest_gpu_fn(weight, fresh, logcnt, num_gpus, xp=xp)
    limit = peak * _factor(tolerance, peak, xp=xp)  # stabilize_elastic's

    def polished(placed: Any, counts: Any, nodes: int, rows: Any) -> tuple[Any, Any]:
        return polish_live(
            weight, placed, counts, previous, active, limit, num_gpus, nodes, xp=xp, polish_fn=polish_fn,
            align_slots_fn=align_slots_fn, heaviest_gpu_fn=heaviest_gpu_fn, rows=rows,
        ), counts  # fmt: skip

    def stable(rows: Any) -> tuple[Any, Any]:
        placed, counts = stabilize_elastic(
            weight, fresh, logcnt, previous, active, num_gpus, tolerance=tolerance, rows=rows, xp=xp, **kernels
        )[:2]
        return polished(placed, counts, 1, rows)

    def stable_nodes(rows: Any) -> tuple[Any, Any]:
        """Within nodes: the groups split by live capacity (the limit's placement); or ``previous``'s split with
        a few groups swapped between nodes (:func:`sticky_group_split`), or the split by load alone (the
        healthy one), where that is within the limit and moves fewer experts."""
        by_capacity = stabilize_elastic(
            weight, fresh, logcnt, previous, active, num_gpus, tolerance=tolerance, num_nodes=num_nodes,
            num_groups=num_groups, rows=rows, xp=xp, **kernels,
        )  # fmt: skip
        by_load, _, load_cnt = rebalance_elastic(
            weight, active, num_replicas, num_groups, num_nodes, num_gpus, fallback=False, by_capacity=False, xp=xp,
            **packer,
        )  # fmt: skip
        kept = stabilize_elastic(
            weight, by_load, load_cnt, previous, active, num_gpus, tolerance=tolerance, num_nodes=num_nodes,
            num_groups=num_groups, peak=peak, rows=rows, xp=xp, **kernels,
        )  # fmt: skip
        split, valid = group_split_fn(weight, previous, active, num_replicas, num_groups, num_nodes, num_gpus, xp=xp)
        near, _, near_cnt = _elastic(
            weight, active, num_replicas, num_groups, num_nodes, num_gpus, split=split, xp=xp, **packer
        )
        swapped = stabilize_elastic(
            weight, near, near_cnt, previous, active, num_gpus, tolerance=tolerance, num_nodes=num_nodes,
            num_groups=num_groups, peak=peak, rows=rows, xp=xp, **kernels,
        )  # fmt: skip
        best, best_cnt, best_moves, _ = by_capacity
        for (placed, counts, moves, within), usable in ((swapped, valid), (kept, True)):
            fewer = usable & within & (moves < best_moves)  # [L, 1]
            best = xp.where(fewer, placed, best)
            best_cnt = xp.where(fewer, counts, best_cnt)
            best_moves = xp.where(fewer, moves, best_moves)
        return polished(best, best_cnt, num_nodes, rows)

    sizes = (num_replicas, num_nodes, num_gpus)
    return stable_by_layer(
        weight, active, fresh, stable, stable_nodes, sizes, node_fallback, xp=xp, log2phy_fn=log2phy_fn
    )


def stable_by_layer(
    weight: Any,
    active: Any,
    fresh: Any,
    across: Callable[[Any], tuple[Any, Any]],
    within_nodes: Callable[[Any], tuple[Any, Any]],
    sizes: tuple[int, int, int],
    node_fallback: bool | None,
    *,
    xp: Any,
    log2phy_fn: Callable[[Any, int], Any] | None = None,
) -> tuple[Any, Any, Any]:
    """A keep-in-place placement on the live GPUs (``active [1, G]``), per layer ``across(rows)``'s (the global
    rule) or ``within_nodes(rows)``'s (groups on nodes), each ``(phy2log [L, R], logcnt [L, E])``; ``rows [L,
    1]`` (bool) are the layers whose result is kept, so a rule may skip work on the others.

    ``sizes`` is ``(num_replicas, num_nodes, num_gpus)``. ``node_fallback``
    ``True`` or one node: across; ``False``: within nodes; ``None``: decided
    on the device, as the fresh placement did (layers where some node has
    fewer live slots than the experts of its groups: across; both rules
    run). Layers with fewer live slots than experts keep ``fresh`` (the
    empty placement). Returns ``phy2log``, ``log2phy`` (replicas in slot
    order) and ``logcnt``; ``log2phy_fn(phy2log, E)`` (optional): a compiled
    kernel equal to :func:`build_log2phy_masked` of the slot-order ranks.
    """
    num_replicas, num_nodes, num_gpus = sizes
    num_log = weight.shape[1]
    _, live_slots = _live_rows(weight, active, num_replicas, 1, num_gpus, xp=xp)  # [L, 1]
    enough = live_slots >= num_log  # elsewhere, too few live slots: the empty placement
    if num_nodes == 1 or node_fallback:
        phy2log, logcnt = across(enough)
    elif node_fallback is False:
        phy2log, logcnt = within_nodes(enough)
    else:
        node_slots, _ = _node_slots(weight, active, num_replicas, num_nodes, num_gpus, xp=xp)
        short = xp.any(node_slots < num_log // num_nodes, axis=-1, keepdims=True)  # [L, 1]
        inside, inside_cnt = within_nodes(enough & ~short)
        outside, outside_cnt = across(enough & short)
        phy2log = xp.where(short, outside, inside)
        logcnt = xp.where(short, outside_cnt, inside_cnt)
    phy2log = xp.where(enough, phy2log, fresh)
    if log2phy_fn is not None:
        return phy2log, log2phy_fn(phy2log, num_log), logcnt
    phyrank = xp.where(phy2log >= 0, occurrence(phy2log, xp=xp), xp.full_like(phy2log, -1))
    return phy2log, build_log2phy_masked(phy2log, phyrank, num_log, xp=xp), logcnt
