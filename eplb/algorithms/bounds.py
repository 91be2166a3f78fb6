"""Lower bounds on the best achievable max GPU load, and group-to-node assignments.

Used by :mod:`eplb.metrics` (how far from ideal a placement is) and by the
refined policy (which group-to-node assignment gives each node's replication
the most room).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any

from eplb import _xp
from eplb.algorithms.packing import sum_left_to_right
from eplb.algorithms.replication import replica_load, replicate_experts
from eplb.algorithms.speed import capacity_live, clean_capacity

__all__ = [
    "best_split",
    "capacity_bound",
    "capacity_node_bound",
    "count_assignments",
    "group_assignments",
    "node_bounds",
    "node_lower_bound",
    "node_set_bound",
    "pigeonhole_bound",
    "replication_bound",
    "split_bounds",
]

# Enumerate every group-to-node assignment up to this many (8 groups on 4
# nodes: 105; on 2 nodes: 35); beyond, use a relaxation.
MAX_ASSIGNMENTS = 1024


def replication_bound(weight: Any, num_slots: int, *, xp: Any) -> Any:
    """``[B]``: smallest achievable max per-replica load of ``weight [B, E]`` with ``num_slots`` slots.

    Greedy replication (always split the expert with the largest load per
    replica) minimises the max per-replica load, so its result is the bound.
    """
    _, logcnt = replicate_experts(weight, num_slots, xp=xp)[1:]
    reciprocal = _xp.reciprocal_table(num_slots, xp=xp, device=_xp.device(weight))
    return xp.max(replica_load(weight, logcnt, reciprocal, xp=xp), axis=-1)


def count_assignments(num_groups: int, num_nodes: int) -> int:
    """Ways to split ``num_groups`` groups into ``num_nodes`` unlabelled nodes of equal size."""
    per_node = num_groups // num_nodes
    return math.factorial(num_groups) // (math.factorial(per_node) ** num_nodes * math.factorial(num_nodes))


@functools.lru_cache(maxsize=32)
def group_assignments(num_groups: int, num_nodes: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """``[A][num_nodes][num_groups // num_nodes]``: every split of groups into nodes.

    Nodes are unlabelled (node sets in increasing order of their first group,
    groups increasing inside a node), so each split appears once; the first
    is ``[[0, 1, ..], [gpn, ..], ..]``.
    """
    per_node = num_groups // num_nodes

    def splits(remaining: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
        if not remaining:
            return [[]]
        first, rest = remaining[0], remaining[1:]
        out = []
        for partners in itertools.combinations(rest, per_node - 1):
            node = (first, *partners)
            left = tuple(g for g in rest if g not in partners)
            out.extend([node, *tail] for tail in splits(left))
        return out

    return tuple(tuple(split) for split in splits(tuple(range(num_groups))))


def _gather_sets(weight: Any, expert_sets: list[list[int]], *, xp: Any) -> Any:
    """``[L * K, n]``: loads of the experts of each of ``K`` equal-size sets, per layer."""
    num_layers = weight.shape[0]
    flat = [e for experts in expert_sets for e in experts]
    index = _xp.constant(flat, xp=xp, device=_xp.device(weight))
    loads = xp.take(weight, index, axis=1)  # [L, K * n]
    return xp.reshape(loads, (num_layers * len(expert_sets), len(expert_sets[0])))


def node_bounds(weight: Any, expert_sets: list[list[int]], slots_per_node: int, gpus_per_node: int, *, xp: Any) -> Any:
    """``[L, K]``: lower bound on the max GPU load of a node holding each of ``K`` expert sets.

    ``max(node total / gpus_per_node, best max per-replica load with slots_per_node slots)``.
    """
    loads = _gather_sets(weight, expert_sets, xp=xp)
    bound = node_set_bound(loads, slots_per_node, gpus_per_node, xp=xp)
    return xp.reshape(bound, (weight.shape[0], len(expert_sets)))


def node_set_bound(loads: Any, slots_per_node: int, gpus_per_node: int, *, xp: Any) -> Any:
    """``[B]``: lower bound on the max GPU load of a node holding experts with ``loads [B, n]``.

    Fixed-order sum and a product (no library reduction, no division), so
    every backend ranks splits alike: the refined policy decides with it.
    """
    share = xp.full((), 1.0 / gpus_per_node, dtype=xp.float32, device=_xp.device(loads))  # no host copy
    spread = sum_left_to_right(loads, xp=xp) * share
    bound = xp.maximum(spread, replication_bound(loads, slots_per_node, xp=xp))
    return xp.maximum(bound, pigeonhole_bound(loads, slots_per_node, gpus_per_node, xp=xp))


def pigeonhole_bound(loads: Any, num_slots: int, num_gpus: int, *, xp: Any) -> Any:
    """``[B]``: bound from experts that cannot all get a second replica.

    With ``n`` experts and ``S`` slots at most ``S - n`` experts are
    replicated, so at least ``u = 2n - S`` keep a single replica, each
    carrying its whole load. Among any ``j*G + 1`` of them, some GPU holds
    ``j + 1``. The unreplicated set's order statistics are at least those of
    the ``u`` lightest experts ``y_1 <= .. <= y_u``, so the max GPU load is
    at least ``y_(u-jG) + .. + y_(u-jG+j)`` for every ``j`` with ``jG < u``.
    """
    num_experts = loads.shape[1]
    unreplicated = 2 * num_experts - num_slots
    best = xp.zeros(loads.shape[:1], dtype=loads.dtype, device=_xp.device(loads))
    if unreplicated <= num_gpus:
        return best
    lightest = xp.sort(loads, axis=-1)[:, :unreplicated]
    for j in range(1, (unreplicated - 1) // num_gpus + 1):
        start = unreplicated - j * num_gpus - 1  # 0-based y_(u - jG)
        best = xp.maximum(best, sum_left_to_right(lightest[:, start : start + j + 1], xp=xp))
    return best


def split_bounds(weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *, xp: Any) -> Any:
    """``[L, A]``: for each split of :func:`group_assignments`, the worst node's :func:`node_bounds`."""
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    # Bound each distinct node set once (many splits share a node).
    set_index: dict[tuple[int, ...], int] = {}
    which = [
        set_index.setdefault(node, len(set_index))
        for split in group_assignments(num_groups, num_nodes)
        for node in split
    ]
    sets = [[g * group_size + k for g in node for k in range(group_size)] for node in set_index]
    per_set = node_bounds(weight, sets, num_replicas // num_nodes, num_gpus // num_nodes, xp=xp)  # [L, K]
    index = _xp.constant(which, xp=xp, device=_xp.device(weight))
    return xp.max(xp.reshape(xp.take(per_set, index, axis=1), (num_layers, -1, num_nodes)), axis=-1)


def best_split(weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *, xp: Any) -> Any:
    """``mgroup2group [L, groups]``: per layer, the split whose worst node bound is lowest (first on ties).

    Groups listed node by node, as :func:`eplb.algorithms.hierarchy.greedy_group_split`
    does. Needs ``count_assignments(num_groups, num_nodes) <= MAX_ASSIGNMENTS``.
    """
    bounds = split_bounds(weight, num_replicas, num_groups, num_nodes, num_gpus, xp=xp)
    table = [[g for node in split for g in node] for split in group_assignments(num_groups, num_nodes)]
    table = _xp.constant(table, xp=xp, device=_xp.device(weight))
    choice = xp.argmin(bounds, axis=-1)
    return xp.take(table, choice, axis=0)


def node_lower_bound(weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *, xp: Any) -> Any:
    """``[L]``: lower bound on the max GPU load of any hierarchical placement.

    With at most :data:`MAX_ASSIGNMENTS` ways to split groups into nodes, the
    exact minimum over splits of the worst node's :func:`node_bounds`.
    Otherwise a relaxation valid for every split: the node holding group
    ``g`` also holds ``gpn - 1`` other groups, at least the lightest ones,
    and leaves its own experts at most ``R/N - (gpn - 1) * group_size`` slots.
    """
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    per_node = num_groups // num_nodes
    slots = num_replicas // num_nodes
    gpus = num_gpus // num_nodes
    if count_assignments(num_groups, num_nodes) <= MAX_ASSIGNMENTS:
        return xp.min(split_bounds(weight, num_replicas, num_groups, num_nodes, num_gpus, xp=xp), axis=-1)
    group_total = xp.sum(xp.reshape(weight, (num_layers, num_groups, group_size)), axis=-1)
    lightest = xp.sum(xp.sort(group_total, axis=-1)[:, : per_node - 1], axis=-1)  # may include g: still a bound
    spread = xp.max(group_total + lightest[:, None], axis=-1) / gpus
    groups = [[g * group_size + k for k in range(group_size)] for g in range(num_groups)]
    own_slots = slots - (per_node - 1) * group_size
    split = xp.reshape(replication_bound(_gather_sets(weight, groups, xp=xp), own_slots, xp=xp), (num_layers, -1))
    return xp.maximum(spread, xp.max(split, axis=-1))


def capacity_bound(weight: Any, capacity: Any, num_replicas: int, num_gpus: int, *, xp: Any) -> Any:
    """``[L]``: lower bound on the slowest GPU's time (``load / capacity``) of any placement.

    ``weight [L, E]`` float32; ``capacity [G]`` read as
    :func:`eplb.algorithms.speed.clean_capacity` does, live GPUs as
    :func:`eplb.algorithms.speed.capacity_live` (each holds ``S = R / G``
    slots; ``R_live = S * live GPUs >= E``). The largest of:

    - ``total / C``, ``C`` the sum of live capacities;
    - ``m* / c_max``: ``m*`` the smallest achievable max per-replica load with
      ``R_live`` slots (greedy replication), on the fastest GPU at best;
    - for each ``k``: the ``k`` slowest live GPUs hold ``k S`` replicas, the
      others ``h = (live - k) S``, which carry at most the ``h`` heaviest
      experts' load; so the ``k`` slowest carry at least the ``E - h``
      lightest experts' load, over their capacity sum;
    - :func:`pigeonhole_bound` over the live GPUs, over ``c_max``.

    Valid for the hierarchical policy too (its placements are global ones).
    With equal capacities ``c`` it is at least :func:`node_set_bound` over ``c``.
    """
    num_layers, num_experts = weight.shape
    per_gpu = num_replicas // num_gpus
    device = _xp.device(weight)
    capacity = xp.reshape(clean_capacity(capacity, xp=xp), (1, num_gpus))
    live = capacity_live(capacity, xp=xp)
    capacity = xp.where(live, capacity, xp.zeros_like(capacity))
    num_live = xp.sum(xp.astype(live, xp.int32), axis=-1, keepdims=True)  # [1, 1]
    live_slots = num_live * per_gpu
    fastest = xp.max(capacity, axis=-1)
    bound = xp.sum(weight, axis=-1) / xp.sum(capacity, axis=-1)
    # Greedy replication is prefix-consistent: the first R_live - E steps are the replication into R_live slots.
    phy2log, _, _ = replicate_experts(weight, num_replicas, xp=xp)
    kept = xp.arange(num_replicas, dtype=xp.int32, device=device) < live_slots
    experts = xp.arange(num_experts, dtype=phy2log.dtype, device=device)
    counts = xp.sum(xp.astype((phy2log[:, :, None] == experts) & kept[:, :, None], phy2log.dtype), axis=1)
    reciprocal = _xp.reciprocal_table(num_replicas, xp=xp, device=device)
    bound = xp.maximum(bound, xp.max(replica_load(weight, counts, reciprocal, xp=xp), axis=-1) / fastest)
    ascending = xp.sort(weight, axis=-1)
    lightest = xp.concat(
        [xp.zeros((num_layers, 1), dtype=weight.dtype, device=device), xp.cumulative_sum(ascending, axis=-1)], axis=-1
    )
    slow_capacity = xp.cumulative_sum(xp.sort(xp.where(live, capacity, xp.inf), axis=-1), axis=-1)  # [1, G]
    slowest = xp.arange(1, num_gpus + 1, dtype=xp.int32, device=device)
    heavy_slots = (num_live - slowest) * per_gpu
    count = xp.clip(num_experts - heavy_slots, 0, num_experts)  # [1, G]: experts the k slowest carry at least
    carried = xp.take(lightest, xp.reshape(xp.astype(count, xp.int32), (-1,)), axis=1)  # [L, G]
    bound = xp.maximum(bound, xp.max(carried / slow_capacity, axis=-1))  # past the live GPUs: x / inf = 0
    unreplicated = 2 * num_experts - live_slots  # [1, 1]
    for j in range(1, per_gpu):
        start = unreplicated - j * num_live - 1
        index = xp.clip(start + xp.arange(j + 1, dtype=xp.int32, device=device), 0, num_experts - 1)
        together = sum_left_to_right(
            _xp.take_along(ascending, xp.broadcast_to(index, (num_layers, j + 1)), xp=xp), xp=xp
        )
        bound = xp.maximum(bound, xp.where(start[:, 0] >= 0, together, 0.0) / fastest)
    return bound


def capacity_node_bound(
    weight: Any, capacity: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *, xp: Any
) -> Any:
    """``[L]``: :func:`capacity_bound` for the hierarchical policy (groups stay on their node).

    Per layer, the least over every assignment of groups to nodes (each split
    of :func:`group_assignments`, its node sets given to the nodes in every
    order) of the worst node's :func:`capacity_bound` (the node's experts on
    its GPUs), and at least the global :func:`capacity_bound`. Where a node
    has fewer live slots than ``E / N`` (the policy then places globally), or
    with more than :data:`MAX_ASSIGNMENTS` labelled assignments, the global bound.
    """
    num_layers, num_experts = weight.shape
    flat = capacity_bound(weight, capacity, num_replicas, num_gpus, xp=xp)
    orders = list(itertools.permutations(range(num_nodes)))
    if count_assignments(num_groups, num_nodes) * len(orders) > MAX_ASSIGNMENTS * 4:
        return flat
    device = _xp.device(weight)
    capacity = xp.reshape(clean_capacity(capacity, xp=xp), (num_nodes, num_gpus // num_nodes))
    live = capacity_live(xp.reshape(capacity, (1, num_gpus)), xp=xp)
    node_slots = xp.sum(xp.astype(xp.reshape(live, (num_nodes, -1)), xp.int32), axis=-1) * (num_replicas // num_gpus)
    short = xp.any(node_slots < num_experts // num_nodes)
    group_size = num_experts // num_groups
    set_index: dict[tuple[int, ...], int] = {}
    splits = [
        [set_index.setdefault(node, len(set_index)) for node in split]
        for split in group_assignments(num_groups, num_nodes)
    ]
    sets = [[g * group_size + k for g in node for k in range(group_size)] for node in set_index]
    loads = _gather_sets(weight, sets, xp=xp)  # [L * K, E / N]
    live_capacity = xp.where(xp.reshape(live, (num_nodes, -1)), capacity, xp.zeros_like(capacity))
    per_node = [  # [L, K] each: the bound of every expert set on node n's GPUs
        xp.reshape(
            capacity_bound(loads, live_capacity[n], num_replicas // num_nodes, num_gpus // num_nodes, xp=xp),
            (num_layers, len(sets)),
        )
        for n in range(num_nodes)
    ]
    table = xp.stack(per_node, axis=-1)  # [L, K, N]
    table = xp.where(xp.isnan(table), xp.inf, table)  # a node without live GPUs can hold nothing
    pairs = [[split[pos] * num_nodes + order[pos] for pos in range(num_nodes)] for split in splits for order in orders]
    index = _xp.constant(pairs, xp=xp, device=device)  # [A * N!, N]: (set, node) of each position
    worst = xp.max(
        xp.reshape(
            xp.take(xp.reshape(table, (num_layers, -1)), xp.reshape(index, (-1,)), axis=1),
            (num_layers, len(pairs), num_nodes),
        ),
        axis=-1,
    )
    best = xp.maximum(xp.min(worst, axis=-1), flat)
    return xp.where(short, flat, best)
