"""Equals :func:`eplb.algorithms.relabel.relabel` bit for bit: the relabelling behind ``previous=``, compiled (numba).

Proved by ``tests/test_kernels_relabel.py`` (against the array-API function on
random, tied, degenerate and real placements, hierarchical and global) and by
the cross-backend suite (numpy and torch CPU inputs run this kernel).

Per layer, the same three steps with the same integer arithmetic and tie rules:

1. ``kept[i, j]``: the multiset intersection of new GPU ``i``'s and old GPU
   ``j``'s experts; here from the old GPUs that hold each expert (a short
   list per expert), not from every pair of slots;
2. the exact assignment: with nodes, the best GPU matching between every pair
   of nodes, then the best node matching on those values; each is the
   array-API solver's Hungarian algorithm (shortest augmenting paths, rows
   added one by one, Dijkstra on reduced costs, among the closest columns a
   free one, then the first), step for step;
3. each GPU's slots ordered so that kept experts stay in their old slots.

The array-API version runs the augmenting-path searches as batched array
operations, one Python step at a time (20-500 ms at the DeepSeek-V3 shapes);
a search on a placement that barely changed ends after a step or two, so
compiled loops do a layer in microseconds. Compiled on first use and cached
on disk (``cache=True``; numba falls back to compiling in memory where the
cache folder is not writable).
"""

from __future__ import annotations

import numpy as np

from eplb.kernels._numba_jit import njit
from eplb.kernels._threads import map_rows

__all__ = ["log2phy_in_slot_order", "relabel"]

BIG = 2**30  # eplb.algorithms.assignment.BIG
# A used column: its distance is above every real one (< BIG), and its potential so low that no reduced
# cost (potentials stay far below 2**40 here) gets under that distance: it takes no part in a step.
USED_DIST = 2**61
USED_POTENTIAL = 2**62

_jit = njit()


@_jit
def _max_assignment(profit: np.ndarray, col_of_row: np.ndarray, work: np.ndarray) -> None:
    """``col_of_row [n]`` maximising ``sum profit[i, col_of_row[i]]`` for ``profit [n, n]`` int64.

    :func:`eplb.algorithms.assignment.max_assignment`, one problem: row and
    column 0 are the dummies, potentials ``u``, ``v``, matching ``p``, the
    same choices step for step. One change of bookkeeping, not of result: the
    reference shifts every column's distance and every visited row's and
    column's potential by ``delta`` at each step; here distances are kept
    from the start of the search (``dist = minv + D``, ``D`` the sum of the
    deltas so far: the same comparisons and ties) and the potentials are
    shifted once when the search ends, by the deltas of the steps since each
    row and column was visited (integers: the same values). So a step is one
    pass over the columns, not three. ``work``: int64 of ``9 * (n + 1)``.
    """
    n = profit.shape[0]
    if n == 1:
        col_of_row[0] = 0
        return
    m = n + 1
    top = profit[0, 0]
    for i in range(n):
        for j in range(n):
            top = max(top, profit[i, j])
    u = work[0:m]
    v = work[m : 2 * m]
    p = work[2 * m : 3 * m]
    way = work[3 * m : 4 * m]
    dist = work[4 * m : 5 * m]
    visited = work[6 * m : 7 * m]  # column used at each step of the search
    before = work[7 * m : 8 * m]  # D before that step
    for j in range(m):
        u[j] = 0
        v[j] = 0
        p[j] = 0
        way[j] = 0
    # Used columns take no part in a step (USED_DIST, USED_POTENTIAL), so a step is two plain passes.
    vv = work[8 * m : 9 * m]
    for row in range(1, m):
        p[0] = row
        for j in range(m):
            dist[j] = BIG
            vv[j] = v[j]
        j0 = 0
        total = 0  # D: the deltas of the steps so far
        steps = 0
        for _ in range(row):  # the search ends at a free column within `row` steps
            i0 = p[j0]
            if i0 == 0:
                break
            dist[j0] = USED_DIST
            vv[j0] = -USED_POTENTIAL
            visited[steps] = j0
            before[steps] = total
            steps += 1
            shift = top + total - u[i0]
            best = USED_DIST
            for j in range(1, m):
                reduced = shift - profit[i0 - 1, j - 1] - vv[j]
                if reduced < dist[j]:
                    dist[j] = reduced
                    way[j] = j0
                best = min(best, dist[j])
            # Among the closest columns a free one, the first; else the first closest.
            first = -1
            for j in range(1, m):
                if dist[j] == best:
                    if first < 0:
                        first = j
                    if p[j] == 0:
                        first = j
                        break
            total = best
            j0 = first
        for k in range(steps):  # the potentials as the reference leaves them
            j = visited[k]
            u[p[j] if j != 0 else row] += total - before[k]
            v[j] -= total - before[k]
        for _ in range(row):  # the augmenting path
            if j0 == 0:
                break
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    for j in range(1, m):
        col_of_row[p[j] - 1] = j - 1


@_jit
def _kept(new: np.ndarray, old: np.ndarray, num_gpus: int, num_log: int, kept: np.ndarray, scratch: np.ndarray) -> None:
    """``kept [G, G]``: pairs of new GPU ``i`` that old GPU ``j`` holds (multisets), for one layer.

    The k-th copy of expert ``e`` on new GPU ``i`` is kept on old GPU ``j``
    iff ``j`` holds more than ``k`` copies of ``e``. ``scratch``: int64 of at
    least ``2 * E + 2 * R + 1``.
    """
    num_phy = new.shape[0]
    per_gpu = num_phy // num_gpus
    start = scratch[0 : num_log + 1]  # CSR over experts of the old slots
    slot_of = scratch[num_log + 1 : num_log + 1 + num_phy]
    fill = scratch[num_log + 1 + num_phy : 2 * num_log + 1 + num_phy]
    occ = scratch[2 * num_log + 1 + num_phy : 2 * num_log + 1 + 2 * num_phy]
    for e in range(num_log + 1):
        start[e] = 0
    for t in range(num_phy):
        start[old[t] + 1] += 1
    for e in range(num_log):
        start[e + 1] += start[e]
        fill[e] = 0
    for t in range(num_phy):
        e = old[t]
        slot_of[start[e] + fill[e]] = t
        fill[e] += 1
    for i in range(num_gpus):
        for j in range(num_gpus):
            kept[i, j] = 0
    for i in range(num_gpus):
        base = i * per_gpu
        for q in range(per_gpu):  # occurrence of each copy on new GPU i
            k = 0
            for r in range(q):
                if new[base + r] == new[base + q]:
                    k += 1
            occ[q] = k
        for q in range(per_gpu):
            e = new[base + q]
            # Old GPUs holding e, in slot order: count the copies per GPU as the list runs.
            a = start[e]
            b = start[e + 1]
            while a < b:
                j = slot_of[a] // per_gpu
                copies = 0
                while a < b and slot_of[a] // per_gpu == j:
                    copies += 1
                    a += 1
                if copies > occ[q]:
                    kept[i, j] += 1


@_jit
def _align_slots(new: np.ndarray, old: np.ndarray, per_gpu: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """:func:`eplb.algorithms.relabel.align_slots` for one GPU's slots; ``scratch``: int64 of ``6 * per_gpu``."""
    occ_new = scratch[0:per_gpu]
    occ_old = scratch[per_gpu : 2 * per_gpu]
    match = scratch[2 * per_gpu : 3 * per_gpu]  # old slot of each new entry, -1 if none
    taken = scratch[3 * per_gpu : 4 * per_gpu]  # the old slot is matched
    dest = scratch[4 * per_gpu : 5 * per_gpu]
    for q in range(per_gpu):
        a = 0
        b = 0
        for r in range(q):
            if new[r] == new[q]:
                a += 1
            if old[r] == old[q]:
                b += 1
        occ_new[q] = a
        occ_old[q] = b
        taken[q] = 0
    for q in range(per_gpu):
        match[q] = -1
        for r in range(per_gpu):
            if new[q] == old[r] and occ_new[q] == occ_old[r]:
                match[q] = r
                taken[r] = 1
                break
    # Free new entries fill the free old slots in order.
    r = 0
    for q in range(per_gpu):
        if match[q] >= 0:
            dest[q] = match[q]
        else:
            while taken[r] != 0:
                r += 1
            dest[q] = r
            r += 1
    for q in range(per_gpu):
        out[dest[q]] = new[q]


@_jit
def _relabel(new: np.ndarray, old: np.ndarray, num_gpus: int, num_nodes: int, num_log: int, out: np.ndarray) -> None:
    batch, num_phy = new.shape
    per_gpu = num_phy // num_gpus
    g = num_gpus // num_nodes
    kept = np.empty((num_gpus, num_gpus), np.int64)
    block = np.empty((g, g), np.int64)
    inner = np.empty((num_nodes, num_nodes, g), np.int64)
    value = np.empty((num_nodes, num_nodes), np.int64)
    outer = np.empty(num_nodes, np.int64)
    gpu_perm = np.empty(num_gpus, np.int64)
    holder = np.empty(num_gpus, np.int64)
    work = np.empty(9 * (max(g, num_nodes) + 1), np.int64)
    scratch = np.empty(2 * num_log + 2 * num_phy + 1, np.int64)
    slot_scratch = np.empty(6 * per_gpu, np.int64)
    moved = np.empty(num_phy, np.int64)
    for b in range(batch):
        _kept(new[b], old[b], num_gpus, num_log, kept, scratch)
        for a in range(num_nodes):
            for c in range(num_nodes):
                for i in range(g):
                    for j in range(g):
                        block[i, j] = kept[a * g + i, c * g + j]
                _max_assignment(block, inner[a, c], work)
                total = 0
                for i in range(g):
                    total += block[i, inner[a, c, i]]
                value[a, c] = total
        if num_nodes == 1:
            for i in range(g):
                gpu_perm[i] = inner[0, 0, i]
        else:
            _max_assignment(value, outer, work)
            for a in range(num_nodes):
                for i in range(g):
                    gpu_perm[a * g + i] = outer[a] * g + inner[a, outer[a], i]
        for i in range(num_gpus):
            holder[gpu_perm[i]] = i  # the new GPU placed at each old position
        for j in range(num_gpus):
            for t in range(per_gpu):
                moved[j * per_gpu + t] = new[b, holder[j] * per_gpu + t]
        for j in range(num_gpus):
            lo, hi = j * per_gpu, (j + 1) * per_gpu
            _align_slots(moved[lo:hi], old[b, lo:hi], per_gpu, out[b, lo:hi], slot_scratch)


def relabel(new: np.ndarray, old: np.ndarray, num_gpus: int, num_nodes: int, num_experts: int) -> np.ndarray:
    """``new [B, R]`` relabelled to keep the most pairs of ``old [B, R]``: ``eplb.algorithms.relabel.relabel``.

    ``new`` and ``old`` hold expert ids in ``[0, num_experts)``; returns int64 ``[B, R]``. Rows (layers)
    run on up to :data:`eplb.kernels._threads.THREADS` threads (:func:`eplb.kernels._threads.map_rows`); each
    row's result is the one-thread result. Only layers whose assignments are large (at least
    :data:`MIN_GPUS_PER_NODE_FOR_THREADS` GPUs per node, or as many nodes) are split: small ones take
    microseconds, less than handing them to a thread.
    """
    new = np.ascontiguousarray(new, dtype=np.int64)
    old = np.ascontiguousarray(old, dtype=np.int64)

    def run(rows: np.ndarray | None) -> tuple[np.ndarray]:
        mine = (new, old) if rows is None else (new[rows], old[rows])
        out = np.empty_like(mine[0])
        _relabel(*mine, num_gpus, num_nodes, num_experts, out)
        return (out,)

    # Layers are independent (one assignment each): up to THREADS threads for the larger batches.
    large = max(num_gpus // num_nodes, num_nodes) >= MIN_GPUS_PER_NODE_FOR_THREADS
    return map_rows(run, new.shape[0], MIN_ROWS_PER_THREAD if large else new.shape[0] + 1)[0]


# At least this many layers a thread (fewer: one thread). 144 GPUs: 4.8 ms for 58 layers on one thread.
MIN_ROWS_PER_THREAD = 16
# Threads only for assignments of at least this many GPUs (per node, or nodes). On a 2-core VM, 58 layers:
# 144 GPUs in one node 7.3 -> 4.8 ms on two threads; 4 nodes of 8 GPUs 0.93 -> 1.29 ms (slower).
MIN_GPUS_PER_NODE_FOR_THREADS = 32


@_jit
def _log2phy(phy2log: np.ndarray, num_log: int, log2phy: np.ndarray) -> None:
    batch, num_phy = phy2log.shape
    width = log2phy.shape[2]
    count = np.zeros(num_log, np.int64)
    for b in range(batch):
        for e in range(num_log):
            count[e] = 0
            for k in range(width):
                log2phy[b, e, k] = -1
        for t in range(num_phy):
            e = phy2log[b, t]
            if e < 0:  # an empty slot (a failed GPU's): in no expert's list
                continue
            log2phy[b, e, count[e]] = t
            count[e] += 1


def log2phy_in_slot_order(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """``log2phy [B, E, R - E + 1]`` with replica ``k`` of an expert in its ``k``-th slot, ``-1`` padded.

    Equals ``build_log2phy(phy2log, occurrence(phy2log), E)`` of
    :mod:`eplb.algorithms` (what ``previous=`` returns), without its
    ``[B, R, R]`` comparison; with ``-1`` slots (failed GPUs), what
    :func:`eplb.algorithms.elastic.stable_by_layer` returns
    (:func:`~eplb.algorithms.elastic.build_log2phy_masked`: they appear nowhere).
    """
    phy2log = np.ascontiguousarray(phy2log, dtype=np.int64)
    out = np.empty((phy2log.shape[0], num_experts, phy2log.shape[1] - num_experts + 1), np.int64)
    _log2phy(phy2log, num_experts, out)
    return out
