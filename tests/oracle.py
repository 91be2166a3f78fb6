"""A plain-Python oracle of the greedy policy, written from its description.

One layer at a time, sequential loops, Python lists; float32 arithmetic via
numpy scalars exactly as ``docs/algorithm.md`` states it (loads rounded to
float32, loads below 2**-64 read as 0, sums accumulated in visiting order,
replica load = w * fl(1/c)). It shares no code with eplb.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
TINY = 2.0**-64  # smaller loads count as 0 (docs/algorithm.md)


def recip(c: int) -> np.float32:
    return F32(1.0) / F32(c)


def pack(weights: list[np.float32], num_packs: int) -> tuple[list[int], list[int]]:
    """LPT into equal-count packs: (pack of each item, rank inside its pack)."""
    n = len(weights)
    cap = n // num_packs
    if cap == 1:
        return list(range(n)), [0] * n
    order = sorted(range(n), key=lambda i: (-float(weights[i]), i))
    loads = [F32(0)] * num_packs
    counts = [0] * num_packs
    pack_of, rank_of = [0] * n, [0] * n
    for item in order:
        best = None
        for p in range(num_packs):
            if counts[p] < cap and (best is None or loads[p] < loads[best]):
                best = p
        pack_of[item], rank_of[item] = best, counts[best]
        loads[best] = F32(loads[best] + weights[item])
        counts[best] += 1
    return pack_of, rank_of


def replicate(weights: list[np.float32], num_phy: int) -> tuple[list[int], list[int], list[int]]:
    num_log = len(weights)
    phy2log, rank, cnt = list(range(num_log)), [0] * num_log, [1] * num_log
    for _ in range(num_phy - num_log):
        scores = [F32(weights[e] * recip(cnt[e])) for e in range(num_log)]
        best = max(range(num_log), key=lambda e: (scores[e], -e))
        phy2log.append(best)
        rank.append(cnt[best])
        cnt[best] += 1
    return phy2log, rank, cnt


def rebalance_layer(
    weight: list[float], num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[list[int], list[list[int]], list[int]]:
    """(phy2log [R], log2phy [E][R-E+1], logcnt [E]) for one layer."""
    w = [F32(0) if F32(x) < TINY else F32(x) for x in weight]
    num_log = len(w)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    gsize = num_log // num_groups
    gpn = num_groups // num_nodes
    group_load = []
    for g in range(num_groups):
        s = w[g * gsize]
        for k in range(1, gsize):
            s = F32(s + w[g * gsize + k])
        group_load.append(s)
    gpack, grank = pack(group_load, num_nodes)
    # experts of each node, node-major, groups in their rank order
    node_experts: list[list[int]] = [[] for _ in range(num_nodes)]
    for node in range(num_nodes):
        for r in range(gpn):
            g = next(g for g in range(num_groups) if gpack[g] == node and grank[g] == r)
            node_experts[node].extend(range(g * gsize, (g + 1) * gsize))
    phy_per_node = num_phy // num_nodes
    phy_per_gpu = num_phy // num_gpus
    phy2log: list[int] = []
    phyrank: list[int] = []
    logcnt = [0] * num_log
    for node in range(num_nodes):
        experts = node_experts[node]
        local = [w[e] for e in experts]
        p2l, rank, cnt = replicate(local, phy_per_node)
        for i, e in enumerate(experts):
            logcnt[e] = cnt[i]
        loads = [F32(local[p2l[j]] * recip(cnt[p2l[j]])) for j in range(phy_per_node)]
        gpu, slot = pack(loads, num_gpus // num_nodes)
        placed = [None] * phy_per_node
        for j in range(phy_per_node):
            placed[gpu[j] * phy_per_gpu + slot[j]] = j
        phy2log.extend(experts[p2l[j]] for j in placed)
        phyrank.extend(rank[j] for j in placed)
    width = num_phy - num_log + 1
    log2phy = [[-1] * width for _ in range(num_log)]
    for slot, (e, r) in enumerate(zip(phy2log, phyrank, strict=True)):
        log2phy[e][r] = slot
    return phy2log, log2phy, logcnt


def rebalance(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    layers = [rebalance_layer(list(row), num_phy, num_groups, num_nodes, num_gpus) for row in weight]
    return tuple(np.array([layer[k] for layer in layers], dtype=np.int64) for k in range(3))


def lpt_from(weights: list[np.float32], start: list[np.float32], cap: int) -> list[list[int]]:
    """LPT of ``weights`` into ``len(start)`` packs of ``cap`` items, packs starting at loads ``start``.

    No one-item shortcut: the heaviest item goes to the lightest pack. Returns
    each pack's items in arrival order.
    """
    loads = list(start)
    packs: list[list[int]] = [[] for _ in start]
    for item in sorted(range(len(weights)), key=lambda i: (-float(weights[i]), i)):
        best = min((p for p in range(len(packs)) if len(packs[p]) < cap), key=lambda p: (loads[p], p))
        packs[best].append(item)
        loads[best] = F32(loads[best] + weights[item])
    return packs


def spill_layer(
    weight: list[float], num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, spill: int
) -> tuple[list[int], list[list[int]], list[int]]:
    """The greedy policy with ``spill`` foreign replicas per node (``docs/algorithm.md``), one layer.

    1. groups to nodes as the greedy policy does; 2. each node replicates its
    own experts into ``R/N - spill`` slots; 3. the ``N * spill`` spare slots go
    one at a time to the expert with the largest load per replica over the
    layer (ties: the first in node-major order); 4. the spilled replicas are
    dealt to nodes by LPT starting from each node's own load (its replicas at
    their final counts), ``spill`` per node; 5. each node packs its replicas
    (its own, then the spilled ones in arrival order) onto its GPUs by LPT.
    """
    w = [F32(0) if not (TINY <= F32(x) <= F32(3.4028235e38)) else F32(x) for x in weight]
    num_log = len(w)
    gsize, gpn = num_log // num_groups, num_groups // num_nodes
    group_load = []
    for g in range(num_groups):
        s = w[g * gsize]
        for k in range(1, gsize):
            s = F32(s + w[g * gsize + k])
        group_load.append(s)
    gpack, grank = pack(group_load if gpn > 1 else [F32(0)] * num_groups, num_nodes)
    mlog2log: list[int] = []
    for node in range(num_nodes):
        for r in range(gpn):
            g = next(g for g in range(num_groups) if gpack[g] == node and grank[g] == r)
            mlog2log.extend(range(g * gsize, (g + 1) * gsize))
    per_node_log, per_node_phy = num_log // num_nodes, num_phy // num_nodes
    wm = [w[e] for e in mlog2log]
    local_mlog: list[list[int]] = []
    local_rank: list[list[int]] = []
    cnt = [0] * num_log
    for node in range(num_nodes):
        base = node * per_node_log
        p2l, rank, c = replicate(wm[base : base + per_node_log], per_node_phy - spill)
        local_mlog.append([base + i for i in p2l])
        local_rank.append(rank)
        cnt[base : base + per_node_log] = c
    spilled, spilled_rank = [], []
    for _ in range(num_nodes * spill):
        scores = [F32(wm[i] * recip(cnt[i])) for i in range(num_log)]
        best = max(range(num_log), key=lambda i: (scores[i], -i))
        spilled.append(best)
        spilled_rank.append(cnt[best])
        cnt[best] += 1
    per_replica = [F32(wm[i] * recip(cnt[i])) for i in range(num_log)]
    node_load = []
    for node in range(num_nodes):
        s = per_replica[local_mlog[node][0]]
        for i in local_mlog[node][1:]:
            s = F32(s + per_replica[i])
        node_load.append(s)
    dealt = lpt_from([per_replica[i] for i in spilled], node_load, spill)
    gpus_per_node, per_gpu = num_gpus // num_nodes, num_phy // num_gpus
    phy2log: list[int] = []
    phyrank: list[int] = []
    for node in range(num_nodes):
        items = local_mlog[node] + [spilled[k] for k in dealt[node]]
        ranks = local_rank[node] + [spilled_rank[k] for k in dealt[node]]
        gpu, slot = pack([per_replica[i] for i in items], gpus_per_node)
        placed = [0] * per_node_phy
        for j in range(per_node_phy):
            placed[gpu[j] * per_gpu + slot[j]] = j
        phy2log.extend(mlog2log[items[j]] for j in placed)
        phyrank.extend(ranks[j] for j in placed)
    logcnt = [0] * num_log
    for i, e in enumerate(mlog2log):
        logcnt[e] = cnt[i]
    width = num_phy - num_log + 1
    log2phy = [[-1] * width for _ in range(num_log)]
    for slot, (e, r) in enumerate(zip(phy2log, phyrank, strict=True)):
        log2phy[e][r] = slot
    return phy2log, log2phy, logcnt


def rebalance_spill(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, spill: int):
    layers = [spill_layer(list(row), num_phy, num_groups, num_nodes, num_gpus, spill) for row in weight]
    return tuple(np.array([layer[k] for layer in layers], dtype=np.int64) for k in range(3))


def load_slack(num_replicas: int, num_gpus: int) -> float:
    """Relative float32 rounding of a GPU load (a product per replica, a sum over its slots, both ways): a float64
    GPU load of a placement whose float32 loads are within a bound is within the bound times this."""
    return 1.0 + (2 * (num_replicas // num_gpus) + 4) * 2.0**-24


def gpu_loads64(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L, G]`` float64: each GPU's exact load (``math.fsum``), replica load ``w[e] / count[e]`` in float64.

    A scorer that shares nothing with eplb's float32 arithmetic; loads below
    ``2**-64`` are counted as they are (they are far below any tolerance); ``-1`` (a failed GPU's empty slot)
    holds nothing.
    """
    import math

    weight = np.asarray(weight, dtype=np.float64)
    out = np.zeros((len(phy2log), num_gpus))
    per_gpu = phy2log.shape[1] // num_gpus
    for layer, row in enumerate(np.asarray(phy2log).tolist()):
        count: dict[int, int] = {}
        for e in row:
            count[e] = count.get(e, 0) + 1
        for gpu in range(num_gpus):
            slots = [e for e in row[gpu * per_gpu : (gpu + 1) * per_gpu] if e >= 0]  # -1: an empty slot
            out[layer, gpu] = math.fsum(float(weight[layer, e]) / count[e] for e in slots)
    return out


def moves(old: np.ndarray, new: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L]``: per layer, the ``(expert, GPU)`` pairs of ``new`` that ``old`` lacks, counted as multisets
    (``-1``, a failed GPU's empty slot, holds nothing and receives nothing)."""
    from collections import Counter

    per_gpu = np.asarray(new).shape[1] // num_gpus
    out = []
    for old_row, new_row in zip(np.asarray(old).tolist(), np.asarray(new).tolist(), strict=True):
        total = 0
        for gpu in range(num_gpus):
            had = Counter(e for e in old_row[gpu * per_gpu : (gpu + 1) * per_gpu] if e >= 0)  # -1: empty
            has = Counter(e for e in new_row[gpu * per_gpu : (gpu + 1) * per_gpu] if e >= 0)
            total += sum((has - had).values())
        out.append(total)
    return np.array(out, dtype=np.int64)


def plan_transfers_reference(
    old: list[list[int]], new: list[list[int]], num_gpus: int, num_nodes: int = 1, allow_reload: bool = False
) -> list[tuple[int, int, int, int, int, int, int]]:
    """The sequential greedy transfer planner (eplb 0.x's ``plan_transfers``), for comparison.

    Rows ``(layer, expert, src_gpu, src_slot, dst_gpu, dst_slot, stage)`` sorted by layer, destination GPU and
    slot: a changed slot copies from the first old slot of its GPU holding the expert (stage 0), else the first
    such slot of the GPU (in slot order) receives it from another GPU (stage 0) and the others copy from it
    (stage 1). A remote source is a holder on the destination's node if any, then the fewest sends so far in
    the layer, then in the whole plan, then the lowest GPU; needs with the fewest candidates go first.
    Raises ValueError like eplb when ``new`` needs an expert that ``old`` lacks in that layer.
    ``-1`` (an empty slot): no row into it, no source from it; with ``allow_reload`` a lacking expert's first
    slot per GPU is a row from ``(-1, -1)`` (stage 0), its further slots copy from it (stage 1).
    """
    old, new = [list(map(int, row)) for row in old], [list(map(int, row)) for row in new]
    per_gpu = len(old[0]) // num_gpus if old else 0
    per_node = num_gpus // num_nodes
    total_sends = [0] * num_gpus
    rows: list[tuple[int, int, int, int, int, int, int]] = []
    for layer, (old_row, new_row) in enumerate(zip(old, new, strict=True)):
        holders: dict[int, dict[int, int]] = {}  # expert -> {gpu: first old slot}
        for j, expert in enumerate(old_row):
            if expert >= 0:
                holders.setdefault(expert, {}).setdefault(j // per_gpu, j % per_gpu)
        out: dict[tuple[int, int], tuple[int, int, int, int, int, int, int]] = {}
        needs, duplicates = [], []
        for gpu in range(num_gpus):
            first_received: dict[int, int] = {}
            for slot in range(per_gpu):
                j = gpu * per_gpu + slot
                expert = new_row[j]
                if expert == old_row[j] or expert < 0:
                    continue
                here = holders.get(expert, {})
                if gpu in here:
                    out[gpu, slot] = (layer, expert, gpu, here[gpu], gpu, slot, 0)
                elif expert in first_received:
                    duplicates.append((gpu, slot, expert, first_received[expert]))
                elif not here and allow_reload:
                    first_received[expert] = slot
                    out[gpu, slot] = (layer, expert, -1, -1, gpu, slot, 0)
                elif not here:
                    raise ValueError(
                        f"new_phy2log needs expert {expert} in layer {layer}, which old_phy2log does not hold"
                    )
                else:
                    first_received[expert] = slot
                    needs.append((gpu, slot, expert))

        def constraint(need, holders=holders):
            gpu, slot, expert = need
            near = sum(1 for g in holders[expert] if g // per_node == gpu // per_node)
            return (near if near else num_gpus + len(holders[expert]), len(holders[expert]), gpu, slot)

        sends = [0] * num_gpus
        for gpu, slot, expert in sorted(needs, key=constraint):
            source = min(
                holders[expert], key=lambda g, gpu=gpu: (g // per_node != gpu // per_node, sends[g], total_sends[g], g)
            )
            sends[source] += 1
            total_sends[source] += 1
            out[gpu, slot] = (layer, expert, source, holders[expert][source], gpu, slot, 0)
        for gpu, slot, expert, first in duplicates:
            out[gpu, slot] = (layer, expert, gpu, first, gpu, slot, 1)
        rows.extend(out[key] for key in sorted(out))
    return rows


def _scatter_live(local: list[int], local_rank: list[int], live: list[bool], per_gpu: int) -> tuple[list, list]:
    """Slots of a cluster of the live GPUs alone, back on the full set of GPUs (-1 on dead ones)."""
    phy2log = [-1] * (len(live) * per_gpu)
    rank = [-1] * (len(live) * per_gpu)
    live_ids = [g for g, up in enumerate(live) if up]
    for j, (e, r) in enumerate(zip(local, local_rank, strict=True)):
        slot = live_ids[j // per_gpu] * per_gpu + j % per_gpu
        phy2log[slot], rank[slot] = e, r
    return phy2log, rank


def _log2phy(phy2log: list[int], phyrank: list[int], num_log: int) -> list[list[int]]:
    width = len(phy2log) - num_log + 1
    log2phy = [[-1] * width for _ in range(num_log)]
    for slot, (e, r) in enumerate(zip(phy2log, phyrank, strict=True)):
        if e >= 0:
            log2phy[e][r] = slot
    return log2phy


def _greedy_node(w: list, experts: list[int], live: list[bool], per_gpu: int) -> tuple[list, list, list]:
    """One node (or the whole cluster): greedy replication and LPT on its live GPUs only."""
    local = [w[e] for e in experts]
    num_phy = per_gpu * sum(live)
    p2l, rank, cnt = replicate(local, num_phy)
    loads = [F32(local[p2l[j]] * recip(cnt[p2l[j]])) for j in range(num_phy)]
    gpu, slot = pack(loads, sum(live))
    placed = [0] * num_phy
    for j in range(num_phy):
        placed[gpu[j] * per_gpu + slot[j]] = j
    phy2log, phyrank = _scatter_live([experts[p2l[j]] for j in placed], [rank[j] for j in placed], live, per_gpu)
    return phy2log, phyrank, cnt


def elastic_layer(
    weight: list[float], num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, live: list[bool]
) -> tuple[list[int], list[list[int]], list[int]]:
    """Elastic placement of one layer (``docs/algorithm.md``, "Failed GPUs"), from its description.

    Global policy (``num_groups % num_nodes`` or one node, one group): the
    greedy policy on a cluster of the live GPUs alone, scattered back.
    Hierarchical: groups to nodes as the greedy does where every node has as
    many live slots, else by live capacity (LPT, each group to the open node
    whose load after it times fl32(1 / its live slots) is least, the lowest
    node on ties), then that per node; if some node has fewer live slots than
    experts of its groups, the global rule.
    """
    w = [F32(0) if F32(x) < TINY else F32(x) for x in weight]
    num_log = len(w)
    per_gpu = num_phy // num_gpus
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    gpus_per_node = num_gpus // num_nodes
    node_live = [live[n * gpus_per_node : (n + 1) * gpus_per_node] for n in range(num_nodes)]
    if any(sum(nl) * per_gpu < num_log // num_nodes for nl in node_live):
        num_groups, num_nodes, gpus_per_node, node_live = 1, 1, num_gpus, [list(live)]
    gsize, gpn = num_log // num_groups, num_groups // num_nodes
    group_load = []
    for g in range(num_groups):
        s = w[g * gsize]
        for k in range(1, gsize):
            s = F32(s + w[g * gsize + k])
        group_load.append(s)
    node_slots = [sum(nl) * per_gpu for nl in node_live]
    if len(set(node_slots)) == 1:
        gpack, grank = pack(group_load, num_nodes)
    else:
        gpack, grank = [0] * num_groups, [0] * num_groups
        node_load, node_count = [F32(0)] * num_nodes, [0] * num_nodes
        for g in sorted(range(num_groups), key=lambda g: (-float(group_load[g]), g)):
            keys = [F32(F32(node_load[n] + group_load[g]) * recip(node_slots[n])) for n in range(num_nodes)]
            best = min((n for n in range(num_nodes) if node_count[n] < gpn), key=lambda n: (keys[n], n))
            gpack[g], grank[g] = best, node_count[best]
            node_load[best] = F32(node_load[best] + group_load[g])
            node_count[best] += 1
    phy2log: list[int] = []
    phyrank: list[int] = []
    logcnt = [0] * num_log
    for node in range(num_nodes):
        experts: list[int] = []
        for r in range(gpn):
            g = next(g for g in range(num_groups) if gpack[g] == node and grank[g] == r)
            experts.extend(range(g * gsize, (g + 1) * gsize))
        p2l, rank, cnt = _greedy_node(w, experts, node_live[node], per_gpu)
        for i, e in enumerate(experts):
            logcnt[e] = cnt[i]
        phy2log.extend(p2l)
        phyrank.extend(rank)
    return phy2log, _log2phy(phy2log, phyrank, num_log), logcnt


def elastic(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, live) -> tuple:
    live = [bool(x) for x in live]
    layers = [elastic_layer(list(row), num_phy, num_groups, num_nodes, num_gpus, live) for row in weight]
    return tuple(np.array([layer[k] for layer in layers], dtype=np.int64) for k in range(3))


# ---------------------------------------------------------------- active_gpus with previous=


def best_relabel_moves(old: np.ndarray, new: np.ndarray, live, num_gpus: int) -> np.ndarray:
    """``[L]``: the fewest :func:`moves` of ``new`` over permutations of the live GPUs among themselves
    (each live GPU's contents moved whole to a live position; scipy's assignment solver, no eplb code)."""
    from collections import Counter

    from scipy.optimize import linear_sum_assignment

    live_ids = [g for g in range(num_gpus) if live[g]]
    per_gpu = np.asarray(new).shape[1] // num_gpus
    out = []
    for old_row, new_row in zip(np.asarray(old).tolist(), np.asarray(new).tolist(), strict=True):
        had = [Counter(e for e in old_row[g * per_gpu : (g + 1) * per_gpu] if e >= 0) for g in live_ids]
        has = [Counter(e for e in new_row[g * per_gpu : (g + 1) * per_gpu] if e >= 0) for g in live_ids]
        cost = np.array([[sum((h - o).values()) for o in had] for h in has])
        rows, cols = linear_sum_assignment(cost)
        out.append(int(cost[rows, cols].sum()))
    return np.array(out, dtype=np.int64)


def best_class_relabel_moves(old: np.ndarray, new: np.ndarray, classes: list, num_gpus: int) -> np.ndarray:
    """``[L]``: the fewest :func:`moves` of ``new`` over permutations of the GPUs that keep each GPU's
    contents whole and map it onto a GPU of its own class (``classes[g]``, any hashable: e.g. a capacity, or
    a (capacity, node) pair); scipy's assignment solver, no eplb code."""
    from collections import Counter

    from scipy.optimize import linear_sum_assignment

    per_gpu = np.asarray(new).shape[1] // num_gpus
    big = 10 * np.asarray(new).shape[1] + 1  # above any total of allowed pairs: never taken
    out = []
    for old_row, new_row in zip(np.asarray(old).tolist(), np.asarray(new).tolist(), strict=True):
        had = [Counter(e for e in old_row[g * per_gpu : (g + 1) * per_gpu] if e >= 0) for g in range(num_gpus)]
        has = [Counter(e for e in new_row[g * per_gpu : (g + 1) * per_gpu] if e >= 0) for g in range(num_gpus)]
        cost = np.array(
            [
                [sum((has[i] - had[j]).values()) if classes[i] == classes[j] else big for j in range(num_gpus)]
                for i in range(num_gpus)
            ]
        )
        rows, cols = linear_sum_assignment(cost)
        total = int(cost[rows, cols].sum())
        assert total < big, "no class-preserving permutation"
        out.append(total)
    return np.array(out, dtype=np.int64)


def plan_arrays_reference(plan, capacity=None):
    """``eplb.executors.jax.plan_arrays`` as its original loop, one Python iteration per plan row (the oracle of
    the vectorised one, and the "before" of benchmarks/executors_jax.py)."""
    import numpy as np

    from eplb.executors.jax import PlanArrays

    num_gpus, per_gpu, num_layers = plan.num_gpus, plan.slots_per_gpu, plan.num_layers
    remote = np.flatnonzero(plan.remote)
    pairs = plan.src_gpu[remote] * num_gpus + plan.dst_gpu[remote]
    need = int(np.bincount(pairs, minlength=num_gpus * num_gpus).max(initial=0))
    capacity = max(need, 1) if capacity is None else int(capacity)
    flat = num_layers * per_gpu
    send = np.zeros((num_gpus, num_gpus, capacity), dtype=np.int32)
    row = np.full((num_gpus, num_gpus, capacity), -1, dtype=np.int32)
    gather = np.tile(np.arange(flat, dtype=np.int32), (num_gpus, 1))
    second = gather.copy()
    used = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    for i in range(len(plan)):
        layer, src, dst, stage = int(plan.layer[i]), int(plan.src_gpu[i]), int(plan.dst_gpu[i]), int(plan.stage[i])
        target = layer * per_gpu + int(plan.dst_slot[i])
        source = layer * per_gpu + int(plan.src_slot[i])
        if stage == 1:
            second[dst, target] = source
        elif src == dst:
            gather[dst, target] = source
        else:
            k = used[src, dst]
            used[src, dst] += 1
            send[src, dst, k] = source
            row[dst, src, k] = i
            gather[dst, target] = flat + src * capacity + k
    return PlanArrays(send, gather, second, row)


def survivable_layer(weight: list[float], num_phy: int, num_nodes: int, num_gpus: int) -> list[int]:
    """``phy2log [R]`` of ``survivable=True`` for one layer: the greedy replication, then LPT where each replica
    goes to an open GPU on a node without its expert, else a GPU without it, else any; the lightest of that
    class, ties to the lowest GPU; visits by decreasing replica load, ties by replica index."""
    w = [F32(0) if F32(x) < TINY else F32(x) for x in weight]
    experts, _, cnt = replicate(w, num_phy)
    load = [F32(w[e] * recip(cnt[e])) for e in experts]
    cap, per_node = num_phy // num_gpus, num_gpus // num_nodes
    gpu_load, gpu_items = [F32(0)] * num_gpus, [[] for _ in range(num_gpus)]
    for item in sorted(range(num_phy), key=lambda i: (-float(load[i]), i)):
        e = experts[item]

        def klass(g: int, e: int = e) -> int:
            on_node = any(
                e in (experts[i] for i in gpu_items[h])
                for h in range(g // per_node * per_node, (g // per_node + 1) * per_node)
            )
            return int(on_node) + int(e in (experts[i] for i in gpu_items[g]))

        open_gpus = [g for g in range(num_gpus) if len(gpu_items[g]) < cap]
        best_class = min(klass(g) for g in open_gpus)
        best = min((g for g in open_gpus if klass(g) == best_class), key=lambda g: (gpu_load[g], g))
        gpu_items[best].append(item)
        gpu_load[best] = F32(gpu_load[best] + load[item])
    return [experts[i] for g in range(num_gpus) for i in gpu_items[g]]


def surviving_share(weight: list[float], phy2log: list[int], num_nodes: int) -> list[float]:
    """Per node: the share of the layer's load (float64) whose expert keeps a replica off that node."""
    per_node = len(phy2log) // num_nodes
    total = sum(float(x) for x in weight)
    shares = []
    for n in range(num_nodes):
        rest = {e for j, e in enumerate(phy2log) if j // per_node != n and e >= 0}
        kept = sum(float(x) for e, x in enumerate(weight) if e in rest)
        shares.append(kept / total if total > 0 else 1.0)
    return shares


# ---------------------------------------------------------------- gpu_capacity (GPUs of unequal speed)


def capacity_live(capacity) -> list[bool]:
    """Live GPUs as ``docs/algorithm.md`` states it: capacity read as float32, positive, at least ``2**-64`` and
    ``2**-40`` times the largest."""
    caps = [float(F32(c)) if np.isfinite(c) and c >= TINY else 0.0 for c in capacity]
    top = max(caps)
    return [c > 0 and c >= top * 2.0**-40 for c in caps]


def capacity_times64(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int, capacity) -> np.ndarray:
    """``[L, G]`` float64: each GPU's load (:func:`gpu_loads64`) over its capacity; an idle GPU (capacity 0)
    takes 0 if empty, ``inf`` if it holds load."""
    loads = gpu_loads64(weight, phy2log, num_gpus)
    live = capacity_live(capacity)
    out = np.zeros_like(loads)
    for layer in range(loads.shape[0]):
        for g in range(num_gpus):
            if live[g]:
                out[layer, g] = loads[layer, g] / float(F32(capacity[g]))
            else:
                out[layer, g] = np.inf if loads[layer, g] > 0 else 0.0
    return out


def capacity_balance64(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int, capacity) -> np.ndarray:
    """``[L]``: (total load / total live capacity) / slowest GPU's time; 1.0 for a layer without load."""
    import math

    times = capacity_times64(weight, phy2log, num_gpus, capacity)
    loads = gpu_loads64(weight, phy2log, num_gpus)
    live = capacity_live(capacity)
    total_cap = math.fsum(float(F32(c)) for c, up in zip(capacity, live, strict=True) if up)
    out = []
    for layer in range(times.shape[0]):
        peak = times[layer].max()
        out.append(1.0 if peak == 0 else (math.fsum(loads[layer]) / total_cap) / peak)
    return np.array(out)


def _greedy_min_max_replica64(w: list[float], num_slots: int) -> float:
    """Smallest achievable max of ``w[e] / n[e]`` over counts ``n >= 1`` summing to ``num_slots`` (greedy, float64)."""
    n = [1] * len(w)
    for _ in range(num_slots - len(w)):
        best = max(range(len(w)), key=lambda e: (w[e] / n[e], -e))
        n[best] += 1
    return max(x / c for x, c in zip(w, n, strict=True))


def capacity_bound64(weight: np.ndarray, num_replicas: int, num_gpus: int, capacity) -> np.ndarray:
    """``[L]`` float64: ``eplb.algorithms.bounds.capacity_bound`` from its docstring, term by term."""
    import math

    live = capacity_live(capacity)
    caps = [float(F32(c)) for c, up in zip(capacity, live, strict=True) if up]
    per_gpu = num_replicas // num_gpus
    num_live = len(caps)
    live_slots = per_gpu * num_live
    slow = sorted(caps)
    out = []
    for row in np.asarray(weight, dtype=np.float64):
        w = [float(F32(x)) if F32(x) >= TINY else 0.0 for x in row]
        num_experts = len(w)
        asc = sorted(w)
        terms = [math.fsum(w) / math.fsum(caps), _greedy_min_max_replica64(w, live_slots) / max(caps)]
        for k in range(1, num_live + 1):
            heavy = (num_live - k) * per_gpu
            terms.append(math.fsum(asc[: max(num_experts - heavy, 0)]) / math.fsum(slow[:k]))
        unreplicated = 2 * num_experts - live_slots
        j = 1
        while j * num_live < unreplicated:
            start = unreplicated - j * num_live - 1
            terms.append(math.fsum(asc[start : start + j + 1]) / max(caps))
            j += 1
        out.append(max(terms))
    return np.array(out)


def capacity_node_bound64(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, capacity
) -> np.ndarray:
    """``[L]`` float64: the hierarchical capacity bound from ``eplb.algorithms.bounds.capacity_node_bound``'s
    docstring: every labelled assignment of groups to nodes, the worst node's :func:`capacity_bound64`, the least
    over assignments, at least the global bound; the global bound if a node is short of slots."""
    import itertools

    live = capacity_live(capacity)
    flat = capacity_bound64(weight, num_replicas, num_gpus, capacity)
    per_gpu, gpn, gsize = num_replicas // num_gpus, num_gpus // num_nodes, weight.shape[1] // num_groups
    caps = [[float(capacity[n * gpn + k]) if live[n * gpn + k] else 0.0 for k in range(gpn)] for n in range(num_nodes)]
    if any(sum(c > 0 for c in node) * per_gpu < weight.shape[1] // num_nodes for node in caps):
        return flat
    per_node = num_groups // num_nodes

    def assignments(groups: tuple[int, ...], nodes_left: int):
        if nodes_left == 0:
            yield []
            return
        for chosen in itertools.combinations(groups, per_node):
            rest = tuple(g for g in groups if g not in chosen)
            for tail in assignments(rest, nodes_left - 1):
                yield [chosen, *tail]

    out = []
    for layer, row in enumerate(np.asarray(weight)):
        best = np.inf
        for split in assignments(tuple(range(num_groups)), num_nodes):
            worst = 0.0
            for node, groups in enumerate(split):
                experts = [g * gsize + k for g in groups for k in range(gsize)]
                node_row = row[experts][None, :]
                worst = max(worst, capacity_bound64(node_row, num_replicas // num_nodes, gpn, caps[node])[0])
            best = min(best, worst)
        out.append(max(best, flat[layer]))
    return np.array(out)


def pair_bound64(weight: np.ndarray, start, num_gpus: int, capacity=None) -> np.ndarray:
    """``[L]`` float64: ``eplb.algorithms.pair_bound.pair_bound`` from its module docstring, each expert's least
    count cost found by trying every count (not only the starts of its levels), in float64."""
    import math

    slack, grid, multipliers, steps, span = 2.0**-16, 24, (0.75, 1.0), 16, 2.0
    live = [True] * num_gpus if capacity is None else capacity_live(capacity)
    caps = (
        [1.0] * num_gpus
        if capacity is None
        else [float(F32(c)) if up else 0.0 for c, up in zip(capacity, live, strict=True)]
    )
    top = max(caps)
    caps = [c / top for c, up in zip(caps, live, strict=True) if up]
    ordered = sorted(caps)
    hi_caps = [1.0] if capacity is None else [ordered[0], ordered[(len(ordered) - 1) // 2], ordered[-1]]
    slots = 2 * len(caps)

    def gpu_weight(room: float, lo: float, hi: float) -> int:
        most, least = max(lo, hi), min(lo, max(hi, 0.0))
        for level, need in ((4, 2 * most), (3, lo + hi), (2, min(most, 2 * least)), (1, least)):
            if room >= need:
                return level
        return 0

    def unreachable(t: float, w: list[float]) -> bool:
        wide = t * (1 + slack)
        most = slots - len(w) + 1
        fit = [max(1, math.ceil(x / wide)) for x in w]
        if max(fit) > most or sum(fit) > slots:
            return True
        partners = [t * 2.0 ** (-1 - 6 * j / (grid - 1)) for j in range(grid)]
        for lo in partners + [c * t * (1 + 2 * slack) for c in hi_caps]:  # and just above a class's room
            for ck in hi_caps:
                hi = ck * t * (1 + 2 * slack) - lo
                available = sum(gpu_weight(c * wide, lo, hi) for c in caps)
                for lam in multipliers:
                    need = -lam * slots
                    for x, f in zip(w, fit, strict=True):
                        over = most + 1
                        at_most_hi = max(math.ceil(x / hi), f) if hi > 0 else over
                        below_lo = max(math.floor(x / lo) + 1, f)
                        need += min(c * ((c < below_lo) + (c < at_most_hi) + lam) for c in range(f, most + 1))
                    if need > available:
                        return True
        return False

    out = []
    for row, b in zip(np.asarray(weight, np.float64), np.asarray(start, np.float64), strict=True):
        if b <= 0:
            out.append(b)
            continue
        w = [float(F32(x)) / (b * top) for x in row]  # time in units of b: load / (capacity / top) / (b * top)
        low, high = 1.0, span
        for _ in range(steps):
            middle = (low + high) / 2
            low, high = (middle, high) if unreachable(middle, w) else (low, middle)
        out.append(max(b, low * b))
    return np.array(out)


def best_time64(row, num_replicas: int, num_gpus: int, capacity) -> float:
    """The least slowest-GPU time over every placement of one small layer (exhaustive: replica counts, then
    every way to fill each live GPU's ``R / G`` slots), float64."""
    import itertools

    live = capacity_live(capacity)
    caps = [float(F32(c)) for c, up in zip(capacity, live, strict=True) if up]
    per_gpu = num_replicas // num_gpus
    slots = per_gpu * len(caps)
    w = [float(F32(x)) for x in row]
    best = np.inf

    def fill(items: list[float], gpu: int, worst: float) -> None:
        nonlocal best
        if worst >= best:
            return
        if gpu == len(caps):
            best = worst
            return
        for chosen in set(itertools.combinations(range(len(items)), per_gpu)):
            rest = [x for i, x in enumerate(items) if i not in chosen]
            fill(rest, gpu + 1, max(worst, sum(items[i] for i in chosen) / caps[gpu]))

    def counts(left: int, experts: int):
        if experts == 1:
            yield (left,)
            return
        for first in range(1, left - experts + 2):
            for tail in counts(left - first, experts - 1):
                yield (first, *tail)

    for n in counts(slots, len(w)):
        items = sorted((x / c for x, c in zip(w, n, strict=True) for _ in range(c)), reverse=True)
        fill(items, 0, 0.0)
    return best


def lpt_speed(weights: list, live: list[bool], inverse: list, per_pack: int) -> tuple[list[int], list[int]]:
    """LPT by time, from ``eplb.algorithms.speed.lpt_pack_speed``'s docstring: (pack of each item, rank inside it).

    Items after every live pack is full get pack -1."""
    n = len(weights)
    order = sorted(range(n), key=lambda i: (-float(weights[i]), i))
    loads = [F32(0)] * len(live)
    counts = [0] * len(live)
    pack_of, rank_of = [-1] * n, [-1] * n
    most = F32(np.finfo(np.float32).max)
    for item in order:
        best, best_key = None, None
        for p in range(len(live)):
            if not live[p] or counts[p] >= per_pack:
                continue
            after = min(F32(loads[p] + F32(weights[item])), most)
            key = F32(after * F32(inverse[p]))
            if best is None or key < best_key:
                best, best_key = p, key
        if best is None:
            continue
        pack_of[item], rank_of[item] = best, counts[best]
        loads[best] = min(F32(loads[best] + F32(weights[item])), most)
        counts[best] += 1
    return pack_of, rank_of


def pair_speed(weights: list, live: list[bool], inverse: list, budget: float) -> list[int]:
    """Two items per pack by a time budget, from ``eplb.algorithms.speed.pair_pack_speed``'s docstring:
    the item in each slot (pack ``p``: slots ``2p``, ``2p + 1``)."""
    packs = sorted(range(len(live)), key=lambda p: (not live[p], float(inverse[p]) if live[p] else 0.0, p))
    left = list(range(len(weights)))
    slots = [-1] * len(weights)
    for p in packs:
        first = max(left, key=lambda i: (float(weights[i]), -i))
        left.remove(first)
        live_left = [i for i in left if weights[i] >= 0]
        fits = [i for i in live_left if F32(F32(weights[first] + weights[i]) * F32(inverse[p])) <= F32(budget)]
        if fits:
            partner = max(fits, key=lambda i: (float(weights[i]), -i))
        elif live_left:
            partner = min(live_left, key=lambda i: (float(weights[i]), i))
        else:
            partner = max(left, key=lambda i: (float(weights[i]), -i))
        left.remove(partner)
        slots[2 * p], slots[2 * p + 1] = first, partner
    return slots


def budget_counts(
    weights: list, num_slots: int, live_slots: int, fastest: float, slowest: float, budget: float, margin: float,
    share: float,
) -> list[int] | None:  # fmt: skip
    """Replica counts for a time budget, from ``eplb.algorithms.capacity._budget_counts``'s docstring
    (``num_slots``: the row's slots, live or not, which do not matter: counts stop at ``live_slots - E + 1``,
    so idle GPUs count as absent; ``fastest``/``slowest``: the live GPUs' smallest and largest scaled
    inverse); ``None`` where not valid."""
    del num_slots
    w = [F32(x) for x in weights]
    num_log = len(w)
    max_count = max(live_slots - num_log + 1, 1)
    fast_budget, slow_budget = F32(F32(budget) * F32(1 - margin)), F32(F32(budget) * F32(share))

    def fewest(x: np.float32, inv: float, limit: np.float32) -> int:
        for c in range(1, max_count + 1):
            if F32(F32(x * recip(c)) * F32(inv)) <= limit:
                return c
        return max_count

    fast = [fewest(x, fastest, fast_budget) for x in w]
    if sum(fast) > live_slots:
        return None
    slow = [fewest(x, slowest, slow_budget) for x in w]
    cost = [
        slow[e] - fast[e] if F32(F32(w[e] * recip(fast[e])) * F32(slowest)) > fast_budget and slow[e] > fast[e] else 0
        for e in range(num_log)
    ]
    counts, left = list(fast), live_slots - sum(fast)
    spent = 0
    for e in sorted(range(num_log), key=lambda e: (cost[e], e)):
        spent += cost[e]
        if spent > left:
            break
        counts[e] += cost[e]
    rest = live_slots - sum(counts)
    for k in range(rest):
        counts[sorted(range(num_log), key=lambda e: (float(w[e]), e))[k % num_log]] += 1
    return counts
