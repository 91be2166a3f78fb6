"""Equals :func:`eplb.algorithms.polish.polish` bit for bit (numba).

Proved by ``tests/test_polish.py``: against the array-API function on random
inputs (hierarchical and global, 1..4 nodes, 1..4 GPUs per node, 1..5 slots
per GPU, one expert, tied and all-zero loads, limits below and above the
placement's heaviest GPU, a short ``max_iters``), on the arguments
:func:`eplb.algorithms.stability.stabilize` passes it for real DeepSeek-V3
loads, and end to end through the numpy adapter.

Row by row, the same choices with the same float32 arithmetic: slot loads
``w * fl(1/c)`` (the table of :func:`eplb._xp.reciprocal_table`), GPU loads
summed left to right from the first slot, a swap's changed loads
``(load - out) + in``; numba compiles without fast-math, so nothing is
reassociated or contracted. The reference scores every pair ``(i, j)`` of
the row each step; here a pair is visited from a slot ``s`` that holds a
new pair, with a partner ``u`` on a GPU that held ``s``'s expert in
``old``. Every swap that lowers the moves is visited so: its change
``[x_i not in old on g_j] + [x_j not in old on g_i] - new_i - new_j`` is
below 0 only if some side ``s`` holds a new pair and its expert was on the
other GPU in ``old`` (if only one side holds a new pair, both brackets are
0; if both do, one bracket is). The best is kept as a running minimum of the reference's order (lowest
change in moves, then lowest max of the two changed loads, then the first
``(i, j)`` row-major, ``i < j``), so a pair seen from both sides keeps the
same key. Copies per ``(GPU, expert)``, now and in ``old``, are tables
updated in place after a swap; the two changed GPUs are summed again (the
reference sums every GPU again each step: the others keep their slots, so
their bits).

Compiled on first use, then cached on disk (:mod:`eplb.kernels._numba_jit`);
:func:`warm_up` compiles (or loads) it on a tiny input. This module imports
numba.
"""

from __future__ import annotations

import numpy as np

from eplb import _xp
from eplb.kernels._numba_jit import njit
from eplb.kernels._threads import map_rows

__all__ = ["polish", "warm_up"]

_jit = njit()
INF32 = np.float32(np.inf)

# Rows per thread at least (fewer: one thread): a row's search is a few steps of a few thousand operations.
MIN_ROWS_PER_THREAD = 16


@_jit
def _polish(
    start: np.ndarray,
    counts: np.ndarray,
    old: np.ndarray,
    weight: np.ndarray,
    limit: np.ndarray,
    recip: np.ndarray,
    num_gpus: int,
    num_nodes: int,
    max_iters: int,
    out: np.ndarray,
) -> None:
    batch, num_phy = start.shape
    num_log = weight.shape[1]
    per_gpu = num_phy // num_gpus
    per_node = num_phy // num_nodes
    slot_load = np.empty(num_phy, np.float32)
    loads = np.empty(num_gpus, np.float32)
    now = np.zeros((num_gpus, num_log), np.int64)  # copies of each expert on each GPU, now and in old
    was = np.zeros((num_gpus, num_log), np.int64)
    head = np.zeros(num_log + 1, np.int64)  # CSR of old: the slots of each expert
    old_slots = np.empty(num_phy, np.int64)
    fill = np.empty(num_log, np.int64)
    for b in range(batch):
        cur = out[b]
        cur[:] = start[b]
        old_b = old[b]
        w = weight[b]
        lim = limit[b]
        for t in range(num_phy):
            g = t // per_gpu
            now[g, cur[t]] += 1
            was[g, old_b[t]] += 1
            slot_load[t] = w[cur[t]] * recip[counts[b, cur[t]]]
        for g in range(num_gpus):
            total = slot_load[g * per_gpu]
            for t in range(g * per_gpu + 1, (g + 1) * per_gpu):
                total = total + slot_load[t]
            loads[g] = total
        head[:] = 0
        for t in range(num_phy):
            head[old_b[t] + 1] += 1
        for e in range(num_log):
            head[e + 1] += head[e]
            fill[e] = head[e]
        for t in range(num_phy):
            old_slots[fill[old_b[t]]] = t
            fill[old_b[t]] += 1
        for _ in range(max_iters):
            found = False
            best_change = 0
            best_changed = INF32
            best_i = 0
            best_j = 0
            for s in range(num_phy):
                x_s = cur[s]
                g_s = s // per_gpu
                if not now[g_s, x_s] > was[g_s, x_s]:
                    continue  # s holds no new pair: its pairs lower the moves only from the other side
                node = s // per_node
                for k in range(head[x_s], head[x_s + 1]):  # the GPUs that held x_s in old (see above)
                    g_u = old_slots[k] // per_gpu
                    if g_u == g_s or (g_u * per_gpu) // per_node != node or now[g_u, x_s] != 0:
                        continue
                    for u in range(g_u * per_gpu, (g_u + 1) * per_gpu):
                        x_u = cur[u]
                        if x_u == x_s or now[g_s, x_u] != 0:
                            continue
                        if s < u:
                            i, j, x_i, x_j, g_i, g_j = s, u, x_s, x_u, g_s, g_u
                        else:
                            i, j, x_i, x_j, g_i, g_j = u, s, x_u, x_s, g_u, g_s
                        change = (1 if was[g_j, x_i] == 0 else 0) + (1 if was[g_i, x_j] == 0 else 0)
                        change -= 1 if now[g_i, x_i] > was[g_i, x_i] else 0
                        change -= 1 if now[g_j, x_j] > was[g_j, x_j] else 0
                        if change >= 0 or change > best_change:
                            continue
                        new_i = (loads[g_i] - slot_load[i]) + slot_load[j]
                        new_j = (loads[g_j] - slot_load[j]) + slot_load[i]
                        if not (new_i <= lim and new_j <= lim):
                            continue
                        changed = new_i if new_i >= new_j else new_j
                        if found and change == best_change:
                            if changed > best_changed:
                                continue
                            if changed == best_changed and (i > best_i or (i == best_i and j >= best_j)):
                                continue
                        found = True
                        best_change, best_changed, best_i, best_j = change, changed, i, j
            if not found:
                break
            i, j = best_i, best_j
            x_i, x_j = cur[i], cur[j]
            g_i, g_j = i // per_gpu, j // per_gpu
            cur[i], cur[j] = x_j, x_i
            slot_load[i], slot_load[j] = slot_load[j], slot_load[i]
            now[g_i, x_i] -= 1
            now[g_j, x_i] += 1
            now[g_j, x_j] -= 1
            now[g_i, x_j] += 1
            for g in (g_i, g_j):
                total = slot_load[g * per_gpu]
                for t in range(g * per_gpu + 1, (g + 1) * per_gpu):
                    total = total + slot_load[t]
                loads[g] = total
        # Back to zero for the next row: only the entries this row touched (a full reset is G x E writes).
        for t in range(num_phy):
            g = t // per_gpu
            now[g, cur[t]] = 0
            was[g, old_b[t]] = 0


def polish(
    phy2log: np.ndarray,
    counts: np.ndarray,
    old: np.ndarray,
    weight: np.ndarray,
    limit: np.ndarray,
    num_gpus: int,
    num_nodes: int,
    max_iters: int,
) -> np.ndarray:
    """:func:`eplb.algorithms.polish.polish` (same arguments but ``xp``).

    ``phy2log``, ``old`` ``[B, R]`` and ``counts [B, E]`` integer with ids in
    ``[0, E)`` (``ValueError`` otherwise: the kernel does not check bounds),
    ``weight [B, E]`` and ``limit [B, 1]`` float32 (``TypeError``
    otherwise). Returns ``phy2log [B, R]`` in its dtype. Rows run on up to
    :data:`eplb.kernels._threads.THREADS` threads; each row's result is the
    one-thread result.
    """
    if weight.dtype != np.float32 or np.asarray(limit).dtype != np.float32:
        raise TypeError(f"weight and limit must be float32, got {weight.dtype} and {np.asarray(limit).dtype}")
    num_log = weight.shape[1]
    for name, ids in (("phy2log", phy2log), ("old", old)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_log):
            raise ValueError(f"{name} must hold expert ids in [0, {num_log}), got {ids.min()} to {ids.max()}")
    batch, num_phy = phy2log.shape
    recip = np.asarray(_xp.reciprocal_table(num_phy, xp=np), dtype=np.float32)
    rows = (
        np.ascontiguousarray(phy2log, dtype=np.int64),
        np.ascontiguousarray(counts, dtype=np.int64),
        np.ascontiguousarray(old, dtype=np.int64),
        np.ascontiguousarray(weight),
        np.ascontiguousarray(np.reshape(limit, (-1,))),
    )

    def run(part: np.ndarray | None) -> tuple[np.ndarray]:
        mine = rows if part is None else tuple(a[part] for a in rows)
        out = np.empty(mine[0].shape, np.int64)
        _polish(*mine, recip, num_gpus, num_nodes, max_iters, out)
        return (out,)

    (out,) = map_rows(run, batch, MIN_ROWS_PER_THREAD)
    return out.astype(phy2log.dtype, copy=False)


def warm_up() -> None:
    """Run the kernel once on a tiny input, so that numba compiles (or loads from its cache) what eplb uses."""
    phy2log = np.arange(8, dtype=np.int64).reshape(1, 8) % 4
    counts = np.full((1, 4), 2, np.int64)
    polish(phy2log, counts, phy2log[:, ::-1].copy(), np.ones((1, 4), np.float32), np.ones((1, 1), np.float32), 4, 2, 4)
