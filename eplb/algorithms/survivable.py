"""A placement that survives failures: replicas of one expert spread over nodes, then GPUs (``survivable=True``).

The global greedy policy packs replicas onto GPUs by LPT alone, so several replicas of one expert often share
a node, and one node's failure can take every replica of an expert (its tokens then have nowhere to go until
the expert is reloaded). Here the replication is the greedy one (the same replica counts), and the packing
is LPT with one change: each replica goes, among the open GPUs (fewer than ``R / G`` replicas),

1. to a node that holds no replica of its expert yet, if any open GPU is on one;
2. else to a GPU that holds no replica of its expert, if any;
3. else anywhere;

and within that class to the GPU with the smallest running load, ties to the lowest GPU. Replicas are visited
as LPT visits them (decreasing load, ties by replica index). So an expert with ``k`` replicas and ``N`` nodes
keeps a replica after any single node failure whenever ``k >= 2`` and a second node had room when its second
replica was placed; the balance cost is measured in ``benchmarks/survivable.py`` and ``docs/benchmarks.md``.

Everything is integer or float32 comparisons of left-to-right sums (no division), batched over layers, with
static shapes (``jit``-able), so every backend returns the same placement.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.hierarchy import assemble, replicate_on_nodes
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.packing import slots_by_pack

__all__ = ["lpt_pack_spread", "rebalance_survivable", "surviving_load_share"]


def lpt_pack_spread(
    weight: Any, item_expert: Any, num_packs: int, packs_per_node: int, num_experts: int, *, xp: Any
) -> tuple[Any, Any, Any]:
    """:func:`eplb.algorithms.packing.lpt_pack` with the spread rule above: ``order``, ``pack_by_step``,
    ``rank_by_step``, each ``[B, n]``.

    ``weight [B, n]`` float32 item loads, ``item_expert [B, n]`` integer expert of each item (in
    ``[0, num_experts)``, ``num_experts <= 2**24``); packs ``p`` of node ``p // packs_per_node``. Without a
    second item of any expert this is ``lpt_pack`` without its one-item shortcut, step for step.
    """
    batch, n = weight.shape
    num_nodes = num_packs // packs_per_node
    device = _xp.device(weight)
    capacity = n // num_packs
    order = _xp.argsort_desc(weight, xp=xp)
    # The scan's inputs, step by step: [n, B, 2] (load, expert id as an exact float: ids < 2**24). Indexing by a
    # step counter on the device would read it on the host (a sync per step on CUDA).
    by_step = xp.stack(
        [_xp.take_along(weight, order, xp=xp), xp.astype(_xp.take_along(item_expert, order, xp=xp), weight.dtype)],
        axis=-1,
    )
    by_step = xp.permute_dims(by_step, (1, 0, 2))
    index_dtype = order.dtype
    pack_ids = xp.arange(num_packs, dtype=index_dtype, device=device)
    node_of_pack = pack_ids // packs_per_node
    most = xp.full((1, 1), MAX_LOAD, dtype=weight.dtype, device=device)
    rows = xp.reshape(xp.arange(batch, dtype=index_dtype, device=device), (batch, 1))

    def visit(carry: Any, step: Any) -> tuple[Any, Any]:
        # open_load [B, m]: running load, +inf once full; pack_count [B, m]: items per pack (exact floats);
        # on_node [B, E * N], on_pack [B, E * m] int8-like flags (0/1 in the load dtype: exact).
        open_load, pack_count, on_node, on_pack = carry
        item_weight, expert = step[:, 0], step[:, 1]
        expert = xp.reshape(xp.astype(expert, index_dtype), (batch, 1))
        node_taken = _xp.take_along(on_node, expert * num_nodes + node_of_pack, xp=xp)  # [B, m]
        pack_taken = _xp.take_along(on_pack, expert * num_packs + pack_ids, xp=xp)  # [B, m]
        is_open = open_load < xp.inf
        # Class 0: a new node; 1: a new GPU on a node that has the expert; 2: a GPU that has it.
        klass = node_taken + pack_taken
        best = xp.min(xp.where(is_open, klass, 3), axis=-1, keepdims=True)
        candidate_load = xp.where(is_open & (klass == best), open_load, xp.inf)
        pack = xp.reshape(xp.argmin(candidate_load, axis=-1), (batch, 1))  # first minimum wins
        pack = xp.astype(pack, index_dtype)
        rank = _xp.take_along(pack_count, pack, xp=xp)
        chosen = pack_ids == pack
        pack_count = pack_count + chosen
        open_load = xp.minimum(open_load + chosen * xp.reshape(item_weight, (batch, 1)), most)
        open_load = xp.where(pack_count == capacity, xp.inf, open_load)
        one = xp.ones((batch, 1), dtype=on_node.dtype, device=device)
        on_node = _xp.at_set(on_node, (rows, expert * num_nodes + pack // packs_per_node), one, xp=xp)
        on_pack = _xp.at_set(on_pack, (rows, expert * num_packs + pack), one, xp=xp)
        return (open_load, pack_count, on_node, on_pack), (pack[:, 0], rank[:, 0])

    zeros = xp.zeros((batch, num_packs), dtype=weight.dtype, device=device)
    init = (
        zeros,
        zeros,
        xp.zeros((batch, num_experts * num_nodes), dtype=weight.dtype, device=device),
        xp.zeros((batch, num_experts * num_packs), dtype=weight.dtype, device=device),
    )
    _, (pack_by_step, rank_by_step) = _xp.scan(visit, init, by_step, xp=xp)
    pack_by_step = xp.astype(xp.permute_dims(pack_by_step, (1, 0)), index_dtype)
    return order, pack_by_step, xp.astype(xp.permute_dims(rank_by_step, (1, 0)), index_dtype)


def rebalance_survivable(weight: Any, num_phy: int, num_nodes: int, num_gpus: int, *, xp: Any) -> tuple[Any, Any, Any]:
    """``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]``: the global greedy replication, packed with
    :func:`lpt_pack_spread` over ``num_nodes`` nodes of ``num_gpus / num_nodes`` GPUs (the failure domains)."""
    num_layers, num_log = weight.shape
    device = _xp.device(weight)
    mlog2log = xp.broadcast_to(xp.arange(num_log, device=device), (num_layers, num_log))
    phy_load, phy2mlog, phyrank, mlogcnt = replicate_on_nodes(weight, mlog2log, 1, num_phy, xp=xp)
    order, gpu_by_step, rank_by_step = lpt_pack_spread(
        phy_load, phy2mlog, num_gpus, num_gpus // num_nodes, num_log, xp=xp
    )
    pphy2phy = slots_by_pack(order, gpu_by_step, rank_by_step, num_phy // num_gpus, xp=xp)
    return assemble(mlog2log, phy2mlog, phyrank, mlogcnt, pphy2phy, 1, xp=xp)


def surviving_load_share(weight: Any, phy2log: Any, num_nodes: int, *, xp: Any) -> Any:
    """``[L, N]`` float32: share of layer ``l``'s load whose expert keeps a replica when node ``n`` fails
    (slots ``j`` of node ``j // (R / N)``; ``-1`` slots hold nothing). An all-zero layer survives whole (1)."""
    num_layers, num_phy = phy2log.shape
    num_log = weight.shape[1]
    device = _xp.device(weight)
    per_node = num_phy // num_nodes
    experts = xp.arange(num_log, dtype=phy2log.dtype, device=device)
    holds = phy2log[:, :, None] == experts  # [L, R, E]
    node_holds = xp.any(xp.reshape(holds, (num_layers, num_nodes, per_node, num_log)), axis=2)  # [L, N, E]
    replicas_elsewhere = xp.sum(xp.astype(node_holds, xp.int32), axis=1, keepdims=True) - xp.astype(
        node_holds, xp.int32
    )
    alive = replicas_elsewhere > 0  # [L, N, E]: expert e keeps a replica when node n fails
    total = xp.sum(weight, axis=-1)[:, None]
    kept = xp.sum(xp.where(alive, weight[:, None, :], xp.zeros_like(weight[:, None, :])), axis=-1)
    return xp.where(total > 0, kept / xp.where(total > 0, total, xp.ones_like(total)), xp.ones_like(total))
