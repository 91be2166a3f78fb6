"""The refined policy: greedy, then better starts, swaps and group splits, best kept per layer.

For every layer it builds several candidate placements, all batched:

- group splits (hierarchical policy): the greedy LPT split, plus the split
  whose worst node has the lowest lower bound (every split is enumerated when
  there are at most a thousand or so);
- packings of each node's replicas onto its GPUs: LPT (the greedy's) and a
  snake deal, each refined by swaps out of the heaviest GPU.

It keeps the candidate with the lowest max GPU load; an alternative replaces
the greedy-derived one only if it is lower by the ``IMPROVEMENT`` margin.
Refining never raises a node's max load, so no layer ends worse than greedy.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.bounds import MAX_ASSIGNMENTS, best_split, count_assignments
from eplb.algorithms.hierarchy import assemble, expert_order, greedy_group_split, replicate_on_nodes
from eplb.algorithms.packing import lpt_pack, slots_by_pack
from eplb.algorithms.refine import IMPROVEMENT, pack_loads, refine_by_swaps, snake_pack

__all__ = ["default_iterations", "rebalance_refined"]


def default_iterations(slots_per_node: int, gpus_per_node: int) -> int:
    """Swap rounds per packing: enough to move every slot of a few GPUs."""
    return min(64, max(8, 2 * slots_per_node // gpus_per_node + gpus_per_node))


def _best(values: Any, *, xp: Any) -> Any:
    """``[B, 1]``: per row, the candidate with the lowest value of ``values [B, C]``.

    Candidate 0 (the greedy-derived one) stays unless another is lower by the
    ``IMPROVEMENT`` margin; among those, the lowest value, then lowest index.
    """
    batch = values.shape[0]
    best = xp.reshape(xp.argmin(values, axis=-1), (batch, 1))
    beaten = _xp.take_along(values, best, xp=xp) < values[:, :1] * IMPROVEMENT
    return xp.where(beaten, best, 0)


def _pick(candidates: list[Any], best: Any, *, xp: Any) -> Any:
    """Row ``b`` of ``candidates[best[b]]``; each candidate is ``[B, ...]``."""
    stacked = xp.stack(candidates, axis=1)  # [B, C, ...]
    index = xp.reshape(best, (best.shape[0],) + (1,) * (stacked.ndim - 1))
    index = xp.broadcast_to(index, (best.shape[0], 1, *stacked.shape[2:]))
    return xp.take_along_axis(stacked, index, axis=1)[:, 0, ...]


def rebalance_refined(
    weight: Any,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    hierarchical: bool,
    xp: Any,
    num_iters: int | None = None,
) -> tuple[Any, Any, Any]:
    """Refined placement of float32 ``weight [L, E]``: ``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]``.

    Same constraints and outputs as
    :func:`eplb.algorithms.hierarchy.rebalance_hierarchical`; per layer the
    max GPU load is never above the greedy one.
    """
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    phy_per_node, gpus_per_node = num_phy // num_nodes, num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus
    if num_iters is None:
        num_iters = default_iterations(phy_per_node, gpus_per_node)

    # Candidate group splits, stacked as [L, A, groups] then flattened to rows.
    splits = [greedy_group_split(weight, num_groups, num_nodes, xp=xp)]
    if num_groups // num_nodes > 1 and count_assignments(num_groups, num_nodes) <= MAX_ASSIGNMENTS:
        splits.append(best_split(weight, num_phy, num_groups, num_nodes, num_gpus, xp=xp))
    num_splits = len(splits)
    mgroup2group = xp.reshape(xp.stack(splits, axis=1), (num_layers * num_splits, num_groups))
    mlog2log = expert_order(mgroup2group, group_size, xp=xp)
    weight_by_split = xp.reshape(xp.stack([weight] * num_splits, axis=1), (num_layers * num_splits, num_log))

    # Candidate placements of each (layer, split, node) row: greedy
    # replication or one capped at one replica per GPU, each packed by LPT
    # (the greedy's, candidate 0) or a snake deal, then refined by swaps.
    replications = [replicate_on_nodes(weight_by_split, mlog2log, num_nodes, num_phy, xp=xp)]
    if gpus_per_node > 1 and phy_per_node > num_log // num_nodes:
        replications.append(
            replicate_on_nodes(weight_by_split, mlog2log, num_nodes, num_phy, xp=xp, max_count=gpus_per_node)
        )
    loads, starts, per_node = [], [], []
    for phy_load, phy2mlog, phyrank, mlogcnt in replications:
        order, gpu_by_step, rank_by_step = lpt_pack(phy_load, gpus_per_node, xp=xp)
        for start in (
            slots_by_pack(order, gpu_by_step, rank_by_step, phy_per_gpu, xp=xp),
            snake_pack(phy_load, gpus_per_node, xp=xp),
        ):
            loads.append(phy_load)
            starts.append(start)
            per_node.append((phy2mlog, phyrank, mlogcnt))
    num_cands, rows = len(starts), loads[0].shape[0]
    item_load = xp.concat(loads)
    refined = refine_by_swaps(item_load, xp.concat(starts), gpus_per_node, num_iters, xp=xp)
    node_max = xp.max(pack_loads(_xp.take_along(item_load, refined, xp=xp), gpus_per_node, xp=xp), axis=-1)
    node_max = xp.permute_dims(xp.reshape(node_max, (num_cands, rows)), (1, 0))  # [rows, C]
    best = _best(node_max, xp=xp)
    node_max = _xp.take_along(node_max, best, xp=xp)[:, 0]
    pphy2phy = _pick([refined[c * rows : (c + 1) * rows] for c in range(num_cands)], best, xp=xp)
    phy2mlog, phyrank, mlogcnt = (_pick([cand[k] for cand in per_node], best, xp=xp) for k in range(3))

    # Per layer, the split whose worst node is lightest.
    layer_max = xp.max(xp.reshape(node_max, (num_layers, num_splits, num_nodes)), axis=-1)  # [L, A]
    best = _best(layer_max, xp=xp)

    def per_layer(a: Any) -> Any:
        by_split = xp.reshape(a, (num_layers, num_splits, -1))
        return _pick([by_split[:, c, :] for c in range(num_splits)], best, xp=xp)

    mlog2log = per_layer(mlog2log)
    phy2mlog, phyrank, mlogcnt, pphy2phy = (
        xp.reshape(per_layer(a), (num_layers * num_nodes, -1)) for a in (phy2mlog, phyrank, mlogcnt, pphy2phy)
    )
    return assemble(mlog2log, phy2mlog, phyrank, mlogcnt, pphy2phy, num_nodes, xp=xp)
