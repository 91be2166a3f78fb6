"""The refined policy: greedy, then better splits, replications, starts and swaps.

Per layer it builds candidate placements, all batched over layers and nodes:

- group split (hierarchical policy): the greedy LPT split, replaced by the
  split whose worst node has the lowest lower bound when that bound is
  lower than the greedy split's by the ``IMPROVEMENT`` margin (every split is
  enumerated when there are at most ``MAX_ASSIGNMENTS``);
- per node: greedy replication, or replication capped at one replica per
  GPU (a count between ``m`` and ``2m`` doubles an expert up on some GPU);
  each packed by LPT and by a snake deal, then refined by swaps out of the
  heaviest GPU; the lightest heaviest-GPU wins, the greedy-derived candidate
  unless another beats it by the margin;
- per layer, that result or the plain greedy placement, whichever has the
  lighter heaviest GPU (greedy unless beaten by the margin);
- with two slots per GPU, per (layer, node): replica counts searched for the
  fold pairing (:mod:`eplb.algorithms.pairs`), kept where the heaviest GPU
  is lighter by the margin.

So no layer ends with a heavier GPU than greedy gives, on any backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eplb import _xp
from eplb.algorithms.bounds import (
    MAX_ASSIGNMENTS,
    count_assignments,
    group_assignments,
    node_set_bound,
    split_bounds,
)
from eplb.algorithms.hierarchy import (
    assemble,
    expert_order,
    greedy_group_split,
    rebalance_hierarchical,
    replicate_on_nodes,
)
from eplb.algorithms.loads import clean_loads
from eplb.algorithms.packing import lpt_pack, slots_by_pack
from eplb.algorithms.pairs import pair_counts, pair_stage
from eplb.algorithms.refine import IMPROVEMENT, max_gpu_load, pack_loads, refine_by_swaps, snake_pack

__all__ = [
    "default_iterations",
    "group_split",
    "keep_greedy_unless_beaten",
    "node_candidates",
    "pick_candidates",
    "rebalance_refined",
]


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


def group_split(
    weight: Any, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, *, xp: Any
) -> tuple[Any, bool]:
    """``mgroup2group [L, groups]`` and whether any layer may differ from the greedy split."""
    greedy = greedy_group_split(weight, num_groups, num_nodes, xp=xp)
    if num_groups == num_nodes or count_assignments(num_groups, num_nodes) > MAX_ASSIGNMENTS:
        return greedy, False
    num_layers = weight.shape[0]
    mlog2log = expert_order(greedy, weight.shape[1] // num_groups, xp=xp)
    node_loads = xp.reshape(_xp.take_along(weight, mlog2log, xp=xp), (num_layers * num_nodes, -1))
    greedy_bound = node_set_bound(node_loads, num_phy // num_nodes, num_gpus // num_nodes, xp=xp)
    greedy_bound = xp.max(xp.reshape(greedy_bound, (num_layers, num_nodes)), axis=-1, keepdims=True)
    bounds = split_bounds(weight, num_phy, num_groups, num_nodes, num_gpus, xp=xp)  # [L, A]
    best = _best(xp.concat([greedy_bound, bounds], axis=-1), xp=xp)  # 0 = keep greedy
    table = [[g for node in split for g in node] for split in group_assignments(num_groups, num_nodes)]
    candidates = xp.astype(_xp.constant(table, xp=xp, device=_xp.device(weight)), greedy.dtype)
    # where(), not maximum(best - 1, 0): compat's torch maximum copies the 0 to the device (a sync).
    chosen = xp.take(candidates, xp.reshape(xp.where(best > 0, best - 1, 0), (-1,)), axis=0)
    return xp.where(best > 0, chosen, greedy), True


def node_candidates(
    weight: Any, mlog2log: Any, num_phy: int, num_nodes: int, num_gpus: int, num_iters: int, *, xp: Any
) -> tuple[Any, Any, Any, Any]:
    """The per-(layer, node) candidate stage: each row's best replication and packing.

    Rows are (layer, node) pairs of the node-major order ``mlog2log [L, E]``.
    Candidates: greedy replication, and (with several GPUs per node and
    spare slots) replication capped at one replica per GPU; each packed by
    LPT and by a snake deal, then refined by swaps (``num_iters`` rounds at
    most). Candidate 0 (greedy replication, LPT) stays unless another's
    heaviest GPU is lighter by the ``IMPROVEMENT`` margin.

    Returns the chosen ``phy2mlog``, ``phyrank``, ``pphy2phy`` ``[L*N, R/N]``
    and ``mlogcnt [L*N, E/N]`` in the order :func:`assemble` takes them:
    ``(phy2mlog, phyrank, mlogcnt, pphy2phy)``.
    """
    num_log = weight.shape[1]
    phy_per_node, gpus_per_node = num_phy // num_nodes, num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus
    replications = [replicate_on_nodes(weight, mlog2log, num_nodes, num_phy, xp=xp)]
    if gpus_per_node > 1 and phy_per_node > num_log // num_nodes:
        replications.append(replicate_on_nodes(weight, mlog2log, num_nodes, num_phy, xp=xp, max_count=gpus_per_node))
    loads, starts, per_node = [], [], []
    for phy_load, *node_arrays in replications:
        order, gpu_by_step, rank_by_step = lpt_pack(phy_load, gpus_per_node, xp=xp)
        for start in (
            slots_by_pack(order, gpu_by_step, rank_by_step, phy_per_gpu, xp=xp),
            snake_pack(phy_load, gpus_per_node, xp=xp),
        ):
            loads.append(phy_load)
            starts.append(start)
            per_node.append(node_arrays)
    num_cands, rows = len(starts), loads[0].shape[0]
    item_load = xp.concat(loads)
    refined = refine_by_swaps(item_load, xp.concat(starts), gpus_per_node, num_iters, xp=xp)
    node_max = xp.max(pack_loads(_xp.take_along(item_load, refined, xp=xp), gpus_per_node, xp=xp), axis=-1)
    slot_orders = [refined[c * rows : (c + 1) * rows] for c in range(num_cands)]
    return pick_candidates(xp.reshape(node_max, (num_cands, rows)), slot_orders, per_node, xp=xp)


def pick_candidates(
    node_max: Any, slot_orders: list[Any], node_arrays: list[tuple[Any, Any, Any]], *, xp: Any
) -> tuple[Any, Any, Any, Any]:
    """The choice of :func:`node_candidates` among its ``C`` refined candidates.

    ``node_max [C, rows]``: each candidate's heaviest GPU; ``slot_orders``:
    each candidate's ``pphy2phy [rows, R/N]``; ``node_arrays``: each
    candidate's ``(phy2mlog, phyrank, mlogcnt)``. Per row, candidate 0 unless
    another's heaviest GPU is lighter by the ``IMPROVEMENT`` margin (then the
    lightest, first on ties). Returns ``(phy2mlog, phyrank, mlogcnt, pphy2phy)``.
    """
    best = _best(xp.permute_dims(node_max, (1, 0)), xp=xp)
    pphy2phy = _pick(slot_orders, best, xp=xp)
    phy2mlog, phyrank, mlogcnt = (_pick([cand[k] for cand in node_arrays], best, xp=xp) for k in range(3))
    return phy2mlog, phyrank, mlogcnt, pphy2phy


def keep_greedy_unless_beaten(
    weight: Any,
    mlog2log: Any,
    node_arrays: tuple[Any, ...],
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    split_may_differ: bool,
    *,
    xp: Any,
    greedy_stage: Callable[..., tuple[Any, Any, Any]] = rebalance_hierarchical,
) -> tuple[Any, Any, Any]:
    """The final stage: ``phy2log, phyrank, logcnt`` from the chosen node candidates.

    ``node_arrays`` is what :func:`node_candidates` returned for ``mlog2log``.
    Where the split stage may have left the greedy split, a layer keeps the
    plain greedy placement unless the refined one's heaviest GPU beats it by
    the ``IMPROVEMENT`` margin. ``greedy_stage``: the greedy placement, as
    :func:`eplb.algorithms.hierarchy.rebalance_hierarchical` (a fused kernel
    may stand in).
    """
    placement = assemble(mlog2log, *node_arrays, num_nodes, xp=xp)
    if not split_may_differ:
        return placement
    # A non-greedy split carries no guarantee by itself: keep greedy unless beaten.
    greedy = greedy_stage(weight, num_phy, num_groups, num_nodes, num_gpus, xp=xp)
    peaks = [max_gpu_load(weight, p[0], p[2], num_gpus, xp=xp) for p in (greedy, placement)]
    best = _best(xp.stack(peaks, axis=-1), xp=xp)
    return tuple(_pick([g, r], best, xp=xp) for g, r in zip(greedy, placement, strict=True))


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
    split_stage: Callable[..., tuple[Any, bool]] = group_split,
    candidate_stage: Callable[..., tuple[Any, ...]] = node_candidates,
    final_stage: Callable[..., tuple[Any, Any, Any]] = keep_greedy_unless_beaten,
    pair_counts_fn: Callable[..., Any] = pair_counts,
) -> tuple[Any, Any, Any]:
    """Refined placement of float32 ``weight [L, E]``: ``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]``.

    Same constraints and outputs as
    :func:`eplb.algorithms.hierarchy.rebalance_hierarchical`; per layer the
    heaviest GPU is never heavier than with the greedy placement.

    Three stages, each replaceable by an implementation with the same
    signature and results (the fused Triton kernels of
    :mod:`eplb.kernels.refined_triton` on CUDA): ``split_stage`` as
    :func:`group_split`, ``candidate_stage`` as :func:`node_candidates` and
    ``final_stage`` as :func:`keep_greedy_unless_beaten`, which receives what
    ``candidate_stage`` returned (the two come as a pair). With the global
    policy they see ``num_groups = num_nodes = 1``. With two slots per GPU a
    fourth, :func:`eplb.algorithms.pairs.pair_stage`, searches each node's
    replica counts for the pairs (``pair_counts_fn``: its search,
    :func:`eplb.algorithms.pairs.pair_counts` or a kernel equal to it). Loads below ``2**-64``
    count as zero (:mod:`eplb.algorithms.loads`): the stages see them flushed.
    """
    weight = clean_loads(weight, xp=xp)  # the kernels' wrappers call this directly, not through place
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    num_log = weight.shape[1]
    phy_per_node, gpus_per_node = num_phy // num_nodes, num_gpus // num_nodes
    if num_iters is None:
        num_iters = default_iterations(phy_per_node, gpus_per_node)

    mgroup2group, split_may_differ = split_stage(weight, num_phy, num_groups, num_nodes, num_gpus, xp=xp)
    mlog2log = expert_order(mgroup2group, num_log // num_groups, xp=xp)
    # Candidates per (layer, node) row; candidate 0 is the greedy's own.
    node_arrays = candidate_stage(weight, mlog2log, num_phy, num_nodes, num_gpus, num_iters, xp=xp)
    placement = final_stage(
        weight, mlog2log, node_arrays, num_phy, num_groups, num_nodes, num_gpus, split_may_differ, xp=xp
    )
    # Two slots per GPU: the fold pairs the replicas best; the counts are searched for it (never heavier).
    return pair_stage(weight, *placement, num_nodes, num_gpus, xp=xp, counts_fn=pair_counts_fn)
