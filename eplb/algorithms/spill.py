"""Between hierarchical and global: groups stay home except a bounded number of spilled replicas.

The hierarchical policy keeps every replica of a group on the group's home
node (group-limited routing keeps a token's traffic inside one node), which
costs balance when a node's experts are hot. Here each node reserves
``spill`` of its ``R/N`` slots for replicas of other nodes' experts:

1. groups to nodes as in the greedy policy (their home nodes);
2. each node replicates its own experts into ``R/N - spill`` slots;
3. the ``N * spill`` spare slots go, one at a time, to the expert with the
   largest load per replica over the whole layer (the greedy rule);
4. those spilled replicas are dealt to nodes by LPT on the nodes' loads,
   ``spill`` per node, so they land where there is room;
5. each node packs its replicas onto its GPUs (LPT, plus swap refinement
   with ``refine=True``).

``spill=0`` is the hierarchical policy; ``spill=(R - E) / N`` lets every
redundant replica leave home.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.hierarchy import expert_order, greedy_group_split, replicate_on_nodes
from eplb.algorithms.packing import lpt_pack, slots_by_pack, sum_left_to_right
from eplb.algorithms.refine import refine_by_swaps
from eplb.algorithms.refined import default_iterations
from eplb.algorithms.replication import add_replicas, replica_load

__all__ = ["rebalance_spill"]


def rebalance_spill(
    weight: Any,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    spill: int,
    refine: bool,
    xp: Any,
) -> tuple[Any, Any, Any]:
    """Placement of float32 ``weight [L, E]`` with up to ``spill`` foreign replicas per node.

    Returns ``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]`` as the
    hierarchical policy does. Needs ``1 <= spill <= (R - E) / num_nodes``
    (``spill=0`` is the hierarchical policy itself).
    """
    num_layers, num_log = weight.shape
    device = _xp.device(weight)
    log_per_node, phy_per_node = num_log // num_nodes, num_phy // num_nodes
    gpus_per_node, phy_per_gpu = num_gpus // num_nodes, num_phy // num_gpus
    local_per_node = phy_per_node - spill

    # 1-2: home nodes and local replication; ids below are node-major ("mlog").
    mlog2log = expert_order(greedy_group_split(weight, num_groups, num_nodes, xp=xp), num_log // num_groups, xp=xp)
    _, phy2mlog, local_rank, mlogcnt = replicate_on_nodes(
        weight, mlog2log, num_nodes, num_phy - num_nodes * spill, xp=xp
    )
    index_dtype = phy2mlog.dtype
    mlog_load = _xp.take_along(weight, mlog2log, xp=xp)  # [L, E]
    node_offset = xp.reshape(xp.arange(num_nodes, dtype=index_dtype, device=device) * log_per_node, (1, num_nodes, 1))
    local_expert = xp.reshape(phy2mlog, (num_layers, num_nodes, local_per_node)) + node_offset

    # 3: the spare slots, by the greedy rule over the whole layer.
    spill_expert, spill_rank, count = add_replicas(
        mlog_load, xp.reshape(mlogcnt, (num_layers, num_log)), num_nodes * spill, num_phy, xp=xp
    )
    reciprocal = _xp.reciprocal_table(num_phy, xp=xp, device=device)
    per_replica = replica_load(mlog_load, count, reciprocal, xp=xp)  # [L, E], final counts

    # 4: deal spilled replicas to nodes, lightest node first, `spill` each.
    local_load = _xp.take_along(per_replica, xp.reshape(local_expert, (num_layers, -1)), xp=xp)
    node_load = sum_left_to_right(xp.reshape(local_load, (num_layers, num_nodes, local_per_node)), xp=xp)
    spill_load = _xp.take_along(per_replica, spill_expert, xp=xp)
    order, node_by_step, rank_by_step = lpt_pack(spill_load, num_nodes, xp=xp, initial_load=node_load)
    by_node = slots_by_pack(order, node_by_step, rank_by_step, spill, xp=xp)  # [L, N * spill]
    spill_expert = xp.reshape(_xp.take_along(spill_expert, by_node, xp=xp), (num_layers, num_nodes, spill))
    spill_rank = xp.reshape(_xp.take_along(spill_rank, by_node, xp=xp), (num_layers, num_nodes, spill))

    # 5: each node's replicas onto its GPUs.
    node_expert = xp.reshape(xp.concat([local_expert, spill_expert], axis=-1), (num_layers * num_nodes, phy_per_node))
    local_rank = xp.reshape(local_rank, (num_layers, num_nodes, local_per_node))
    node_rank = xp.reshape(xp.concat([local_rank, spill_rank], axis=-1), (num_layers * num_nodes, phy_per_node))
    item_load = xp.reshape(
        _xp.take_along(per_replica, xp.reshape(node_expert, (num_layers, num_phy)), xp=xp),
        (num_layers * num_nodes, phy_per_node),
    )
    order, gpu_by_step, rank_by_step = lpt_pack(item_load, gpus_per_node, xp=xp)
    slot2item = slots_by_pack(order, gpu_by_step, rank_by_step, phy_per_gpu, xp=xp)
    if refine:
        iterations = default_iterations(phy_per_node, gpus_per_node)
        slot2item = refine_by_swaps(item_load, slot2item, gpus_per_node, iterations, xp=xp)
    phy2mlog = xp.reshape(_xp.take_along(node_expert, slot2item, xp=xp), (num_layers, num_phy))
    phyrank = xp.reshape(_xp.take_along(node_rank, slot2item, xp=xp), (num_layers, num_phy))
    rows = xp.reshape(xp.arange(num_layers, dtype=index_dtype, device=device), (num_layers, 1))
    logcnt = _xp.at_set(
        xp.empty((num_layers, num_log), dtype=count.dtype, device=device), (rows, mlog2log), count, xp=xp
    )
    return _xp.take_along(mlog2log, phy2mlog, xp=xp), phyrank, logcnt
