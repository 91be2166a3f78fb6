"""Policy dispatch: which algorithm places the replicas, and the ``log2phy`` map."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eplb.algorithms.hierarchy import build_log2phy, rebalance_hierarchical
from eplb.algorithms.loads import clean_loads
from eplb.algorithms.refined import rebalance_refined
from eplb.algorithms.spill import rebalance_spill
from eplb.algorithms.survivable import rebalance_survivable

__all__ = ["POLICIES", "place"]

POLICIES = ("greedy", "refined", "survivable")


def place(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    hierarchical: bool,
    policy: str = "greedy",
    spill: int = 0,
    xp: Any,
    pair_counts_fn: Callable[..., Any] | None = None,
) -> tuple[Any, Any, Any]:
    """``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]``, ``logcnt [L, E]`` for float32 ``weight [L, E]``.

    ``policy``: ``"greedy"`` (the published algorithm), ``"refined"``, or
    ``"survivable"`` (the global greedy replication, each expert's replicas
    spread over the ``num_nodes`` nodes, then GPUs; groups and
    ``hierarchical`` ignored: :mod:`eplb.algorithms.survivable`).
    ``hierarchical=False`` is the global policy: one group, one node.
    ``spill > 0`` (hierarchical only): that many replicas per node may serve
    other nodes' groups (:func:`eplb.algorithms.spill.rebalance_spill`).
    Loads below ``2**-64`` count as zero (:mod:`eplb.algorithms.loads`).
    ``pair_counts_fn``: the refined policy's count search for two slots per
    GPU (:func:`eplb.algorithms.pairs.pair_counts` or a kernel equal to it).
    """
    weight = clean_loads(weight, xp=xp)
    if policy == "survivable":
        phy2log, phyrank, logcnt = rebalance_survivable(weight, num_replicas, num_nodes, num_gpus, xp=xp)
    elif spill > 0:
        phy2log, phyrank, logcnt = rebalance_spill(
            weight, num_replicas, num_groups, num_nodes, num_gpus, spill=spill, refine=policy == "refined", xp=xp
        )
    elif policy == "refined":
        searched = {} if pair_counts_fn is None else {"pair_counts_fn": pair_counts_fn}
        phy2log, phyrank, logcnt = rebalance_refined(
            weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical=hierarchical, xp=xp, **searched
        )
    else:
        if not hierarchical:
            num_groups, num_nodes = 1, 1
        phy2log, phyrank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus, xp=xp)
    return phy2log, build_log2phy(phy2log, phyrank, weight.shape[1], xp=xp), logcnt
