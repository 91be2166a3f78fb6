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
