"""The greedy EPLB policies: hierarchical (groups stay on one node) and global."""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.packing import lpt_pack, slots_by_pack, sum_left_to_right
from eplb.algorithms.replication import replica_load, replicate_experts

__all__ = [
    "assemble",
    "build_log2phy",
    "covers_groups",
    "expert_order",
    "greedy_group_split",
    "group_loads",
    "node_groups",
    "rebalance_hierarchical",
    "replicate_on_nodes",
]


def group_loads(weight: Any, num_groups: int, *, xp: Any) -> Any:
    """Load of each expert group, ``[L, num_groups]`` float32.

    Summed left to right inside each group (a fixed order, so every backend
    rounds alike; library reductions pick their own order).
    """
    num_layers, num_experts = weight.shape
    return sum_left_to_right(xp.reshape(weight, (num_layers, num_groups, num_experts // num_groups)), xp=xp)


def node_groups(phy2log: Any, num_log: int, num_groups: int, num_nodes: int, *, xp: Any) -> Any:
    """``[B, N, groups]`` bool: node ``n``'s slots hold an expert of group ``g`` (``-1`` slots hold none).

    Slot ``j`` is on node ``j // (R / N)``; expert ``e`` is in group
    ``e // (E / groups)``. Integer comparisons only.
    """
    batch, num_phy = phy2log.shape
    group_of_slot = xp.where(phy2log >= 0, phy2log // (num_log // num_groups), -1)
    groups = _xp.iota(num_groups, dtype=phy2log.dtype, device=_xp.device(phy2log), xp=xp)
    by_node = xp.reshape(group_of_slot, (batch, num_nodes, num_phy // num_nodes, 1)) == groups
    return xp.any(by_node, axis=2)


def covers_groups(phy2log: Any, logcnt: Any, num_groups: int, num_nodes: int, *, xp: Any) -> Any:
    """``[B, 1]``: every expert has a slot, and (``num_nodes > 1``) each group's slots lie on one node."""
    ok = xp.all(logcnt > 0, axis=-1, keepdims=True)
    if num_nodes == 1:
        return ok
    present = xp.astype(node_groups(phy2log, logcnt.shape[1], num_groups, num_nodes, xp=xp), xp.int32)
    return ok & xp.all(xp.sum(present, axis=1) <= 1, axis=-1, keepdims=True)


def greedy_group_split(weight: Any, num_groups: int, num_nodes: int, *, xp: Any) -> Any:
    """``mgroup2group [L, groups]``: groups node by node (LPT on group loads), arrival order inside a node."""
    num_layers = weight.shape[0]
    if num_groups == num_nodes:
        # One group per node: packing places group g on node g whatever the loads.
        tokens_per_group = xp.zeros((num_layers, num_groups), dtype=weight.dtype, device=_xp.device(weight))
    else:
        tokens_per_group = group_loads(weight, num_groups, xp=xp)
    group_order, node_by_step, rank_by_step = lpt_pack(tokens_per_group, num_nodes, xp=xp)
    return slots_by_pack(group_order, node_by_step, rank_by_step, num_groups // num_nodes, xp=xp)


def expert_order(mgroup2group: Any, group_size: int, *, xp: Any) -> Any:
    """``mlog2log [L, E]``: logical expert at each node-major position, from the group order."""
    num_layers, num_groups = mgroup2group.shape
    in_group = _xp.iota(group_size, dtype=mgroup2group.dtype, device=_xp.device(mgroup2group), xp=xp)
    return xp.reshape(mgroup2group[:, :, None] * group_size + in_group, (num_layers, num_groups * group_size))


def replicate_on_nodes(
    weight: Any, mlog2log: Any, num_nodes: int, num_phy: int, *, xp: Any, max_count: int | None = None
) -> tuple[Any, ...]:
    """Greedy replication inside each node; rows are (layer, node) pairs.

    Returns ``phy_load [L*N, R/N]`` (float32 load of each replica) and
    ``phy2mlog``, ``phyrank`` ``[L*N, R/N]``, ``mlogcnt [L*N, E/N]`` with
    node-local expert ids. ``max_count``: see :func:`replicate_experts`.
    """
    num_layers, num_log = weight.shape
    log_per_node, phy_per_node = num_log // num_nodes, num_phy // num_nodes
    mlog_load = xp.reshape(_xp.take_along(weight, mlog2log, xp=xp), (num_layers * num_nodes, log_per_node))
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, phy_per_node, xp=xp, max_count=max_count)
    reciprocal = _xp.reciprocal_table(phy_per_node - log_per_node + 1, xp=xp, device=_xp.device(weight))
    phy_load = replica_load(
        _xp.take_along(mlog_load, phy2mlog, xp=xp), _xp.take_along(mlogcnt, phy2mlog, xp=xp), reciprocal, xp=xp
    )
    return phy_load, phy2mlog, phyrank, mlogcnt


def assemble(
    mlog2log: Any, phy2mlog: Any, phyrank: Any, mlogcnt: Any, pphy2phy: Any, num_nodes: int, *, xp: Any
) -> tuple[Any, Any, Any]:
    """Global ``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]`` from per-node results.

    ``pphy2phy [L*N, R/N]`` is the node's slot order (GPU by GPU); node-local
    expert ids map to node-major ids, then to logical ids via ``mlog2log``.
    """
    num_layers, num_log = mlog2log.shape
    phy_per_node = phy2mlog.shape[1]
    device = _xp.device(mlog2log)
    index_dtype = mlog2log.dtype
    pphy2mlog = xp.reshape(_xp.take_along(phy2mlog, pphy2phy, xp=xp), (num_layers, num_nodes, phy_per_node))
    log_per_node = num_log // num_nodes
    node_offset = xp.reshape(xp.arange(num_nodes, dtype=index_dtype, device=device) * log_per_node, (1, num_nodes, 1))
    pphy2mlog = xp.reshape(pphy2mlog + node_offset, (num_layers, num_nodes * phy_per_node))
    phy2log = _xp.take_along(mlog2log, pphy2mlog, xp=xp)
    pphyrank = xp.reshape(_xp.take_along(phyrank, pphy2phy, xp=xp), (num_layers, num_nodes * phy_per_node))
    rows = xp.reshape(xp.arange(num_layers, dtype=index_dtype, device=device), (num_layers, 1))
    logcnt = xp.empty((num_layers, num_log), dtype=mlogcnt.dtype, device=device)
    logcnt = _xp.at_set(logcnt, (rows, mlog2log), xp.reshape(mlogcnt, (num_layers, num_log)), xp=xp)
    return phy2log, pphyrank, logcnt


def rebalance_hierarchical(
    weight: Any, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, *, xp: Any
) -> tuple[Any, Any, Any]:
    """Hierarchical greedy placement: groups to nodes, replicas within nodes, replicas to GPUs.

    Parameters
    ----------
    weight : array [L, E], float32
        Expert loads; ``E % num_groups == 0``, ``num_groups % num_nodes == 0``,
        ``num_gpus % num_nodes == 0``, ``num_phy % num_gpus == 0``.

    Returns
    -------
    phy2log : array [L, num_phy], integer
        Expert held by each slot; slot ``j`` is on GPU ``j // (num_phy // num_gpus)``.
    phyrank : array [L, num_phy], integer
        Replica number of each slot within its expert.
    logcnt : array [L, E], integer
        Replicas per expert.
    """
    group_size = weight.shape[1] // num_groups
    # Step 1: groups to nodes; mlog2log [L, E] lists node 0's experts first.
    mlog2log = expert_order(greedy_group_split(weight, num_groups, num_nodes, xp=xp), group_size, xp=xp)
    # Step 2: replicate within each node; one row per (layer, node).
    phy_load, phy2mlog, phyrank, mlogcnt = replicate_on_nodes(weight, mlog2log, num_nodes, num_phy, xp=xp)
    # Step 3: pack each node's replicas onto its GPUs (LPT); pphy = slot order on the node.
    phy_order, gpu_by_step, rank_by_step = lpt_pack(phy_load, num_gpus // num_nodes, xp=xp)
    pphy2phy = slots_by_pack(phy_order, gpu_by_step, rank_by_step, num_phy // num_gpus, xp=xp)
    return assemble(mlog2log, phy2mlog, phyrank, mlogcnt, pphy2phy, num_nodes, xp=xp)


def build_log2phy(phy2log: Any, phyrank: Any, num_log: int, *, xp: Any) -> Any:
    """``log2phy [L, E, R - E + 1]``: slots of each expert by replica number, ``-1`` padded."""
    num_layers, num_phy = phy2log.shape
    device = _xp.device(phy2log)
    max_count = num_phy - num_log + 1
    log2phy = xp.full((num_layers, num_log * max_count), -1, dtype=phy2log.dtype, device=device)
    rows = xp.reshape(_xp.iota(num_layers, dtype=phy2log.dtype, device=device, xp=xp), (num_layers, 1))
    slots = xp.broadcast_to(_xp.iota(num_phy, dtype=phy2log.dtype, device=device, xp=xp), (num_layers, num_phy))
    # (expert, replica number) pairs are unique, so the scatter has no duplicates.
    log2phy = _xp.at_set(log2phy, (rows, phy2log * max_count + phyrank), slots, xp=xp)
    return xp.reshape(log2phy, (num_layers, num_log, max_count))
