"""Equals :func:`eplb.algorithms.relabel.relabel` bit for bit: the relabelling behind ``previous=`` on CUDA (Triton).

Proved by ``tests/test_kernels_relabel_triton.py``: Triton's CPU interpreter
against :func:`eplb.kernels.relabel_numba.relabel` and the array-API function
on random, permuted, one-expert, one-slot-per-GPU and tied placements
(hierarchical and global) and on real-shaped ones; on CUDA against numpy on
the DeepSeek-V3 shapes (hierarchical and global), and ``previous=`` on torch
CUDA tensors without a host sync. :func:`log2phy_in_slot_order` equals
:func:`eplb.kernels.relabel_numba.log2phy_in_slot_order` (``build_log2phy``
of the slot-order replica numbers), proved by the same tests.

One program relabels one layer (:func:`relabel_kernel`, grid ``[B]``), in the
steps of :mod:`eplb.kernels.relabel_numba` with the same integer arithmetic
and tie rules; the per-layer tables live in a ``scratch`` buffer (int64) in
global memory, written and read back across ``tl.debug_barrier()``:

1. **keys**: each slot's ``expert * K + k`` (``K`` slots per GPU, ``k`` the
   copies of that expert earlier on its GPU), for ``new`` and ``old``; the
   k-th copy of an expert on new GPU ``i`` is kept on old GPU ``j`` iff old
   GPU ``j`` holds the same key, so ``kept [G, G]`` (the multiset
   intersections) is a count of equal keys, summed over ``[rows, GPUs,
   slots]`` tiles;
2. **assignment** (:func:`_assign`): the array-API solver's Hungarian
   algorithm (shortest augmenting paths, rows added one by one, Dijkstra on
   reduced costs, among the closest columns a free one, then the first),
   step for step, with the bookkeeping of ``relabel_numba._max_assignment``
   (distances kept from the start of a search, potentials shifted when it
   ends). Several problems run in lock-step as the rows of ``[problems,
   columns]`` register tensors: a search step is one gather of a profit row
   and one ``min`` over packed keys ``(distance, taken, column, its row)``,
   which gives the next column and its row at once; an augmenting-path hop
   is one reduction over packed ``(potential, way, row)`` records written
   when a column's ``way`` changes. A search runs only while some problem's
   search is running, so on placements that barely changed (searches ending
   after a step or two) a layer takes a few hundred steps. With nodes: the
   ``nodes**2`` GPU matchings between every pair of nodes in lock-step, then
   the node matching on their values; else one matching over all GPUs;
3. each GPU's slots ordered so that kept experts stay in their old slots
   (``align_slots``): a kept key goes to the old slot holding it, the
   others fill the free old slots in order.

:func:`relabel_pinned` equals :func:`eplb.algorithms.elastic.relabel_pinned` (failed GPUs pinned to failed
positions; ``PINNED``: the allowed pairs' profits raised by ``R + 1`` in step 2, one assignment over all GPUs),
proved by ``tests/test_kernels_elastic_triton.py``.

Integer arithmetic only (no division decides anything); a call queues one
launch on the current stream, no host sync. Shapes beyond :func:`fits` go to
the array-API path. On an H200 (Triton 3.6, four warps, 61 layers) a call
takes 0.10 ms at 288 slots on 32 GPUs in 4 nodes and 0.84 ms at 288 slots
on 144 GPUs (torch ops: 41 ms and 6.8 s). Two Triton 3.6 miscompiles are
avoided: a single problem runs in lane 0 of two (``LANES``; one lane of
``[1, P]`` tensors gave wrong matchings with one warp), and each ``while``
loop of :func:`_assign` has its own condition variable (a shared one
crashed the layout pass).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl

from eplb.kernels.greedy_triton import ensure_cache_dir

__all__ = [
    "MAX_GPUS",
    "MAX_SLOTS",
    "fits",
    "log2phy_in_slot_order",
    "log2phy_kernel",
    "relabel",
    "relabel_kernel",
    "relabel_pinned",
]

BIG = 2**30  # eplb.algorithms.assignment.BIG: above every distance of a search
_BIG = tl.constexpr(BIG)
_KEY_MAX = tl.constexpr(2**63 - 1)

# Columns and rows of an assignment are packed in 12 bits (column 0 is the dummy); register tensors of
# a GPU row stay reasonable up to this size. Slots: the keys' and tiles' sizes.
MAX_GPUS = 1024
MAX_SLOTS = 65536


@triton.jit
def _keys(x_ptr, key_ptr, R: tl.constexpr, K: tl.constexpr, BS: tl.constexpr):
    """``key[t] = x[t] * K + k``: ``k`` the copies of ``x[t]`` in the earlier slots of its GPU (``t // K``)."""
    s = tl.arange(0, BS)
    for first in range(0, R, BS):
        t = first + s
        valid = t < R
        x = tl.load(x_ptr + t, mask=valid, other=0)
        q = t % K
        copies = tl.zeros([BS], tl.int64)
        for d in range(K - 1):
            earlier = valid & (d < q)
            y = tl.load(x_ptr + (t - q + d), mask=earlier, other=0)
            copies += (earlier & (y == x)).to(tl.int64)
        tl.store(key_ptr + t, x * K + copies, mask=valid)


@triton.jit
def _overlap(knew, kold, kept, G: tl.constexpr, K: tl.constexpr, P_G: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr):
    """``kept[i, j]``: keys of new GPU ``i`` held by old GPU ``j`` (the multiset intersection)."""
    ii = tl.arange(0, BI)
    jj = tl.arange(0, P_G)
    bb = tl.arange(0, BK)
    j_ok = jj < G
    for first in range(0, G, BI):
        i = first + ii
        i_ok = i < G
        acc = tl.zeros([BI, P_G], tl.int32)
        for b0 in range(0, K, BK):
            b = b0 + bb
            o_ok = j_ok[:, None] & (b < K)[None, :]
            ko = tl.load(kold + jj[:, None] * K + b[None, :], mask=o_ok, other=0)
            for a in range(K):
                kn = tl.load(knew + i * K + a, mask=i_ok, other=0)
                hit = (kn[:, None, None] == ko[None, :, :]) & o_ok[None, :, :]
                acc += tl.sum(hit.to(tl.int32), axis=2)
        tl.store(kept + i[:, None] * G + jj[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def _assign(
    profit, row_off, col_off, pair_ok, out, STRIDE: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, P: tl.constexpr
):
    """For each problem ``k`` (``pair_ok[k]``) of ``NP``: ``out[k * N + i]``, the column of row ``i`` in
    :func:`eplb.algorithms.assignment.max_assignment` of the ``N x N`` profit matrix
    ``profit[(row_off[k] + i) * STRIDE + col_off[k] + j]`` (integers, non-negative).

    Columns ``1..N`` of ``[NP, P]`` tensors are the real ones, column 0 the dummy; ``u`` is kept per column
    (the potential of the row matched to it; column 0: the row being added), so every value a step needs
    comes from the column it picked. Distances count from the start of the search (``dist = minv + D``,
    ``D`` the deltas so far) and ``before`` holds ``D`` when each column was used (-1: not yet), so the
    potentials are shifted once a search ends, by ``D - before`` (the reference's sums of deltas).
    """
    col = tl.arange(0, P)[None, :].to(tl.int64)
    real = (col >= 1) & (col <= N)
    ok = pair_ok[:, None]
    rows = profit + row_off[:, None].to(tl.int64) * STRIDE + col_off[:, None].to(tl.int64) + (col - 1)
    top = tl.zeros([NP], tl.int64)  # the profits' maximum: cost = top - profit
    for i in range(N):
        top = tl.maximum(top, tl.max(tl.load(rows + i * STRIDE, mask=real & ok, other=0).to(tl.int64), axis=1))
    v = tl.zeros([NP, P], tl.int64)
    u = tl.zeros([NP, P], tl.int64)
    p = tl.zeros([NP, P], tl.int64)  # row (1-based) matched to each column, 0: free
    # When column j's way changes at a step from column j0: (u[j0] - D) << 24 | j0 << 12 | p[j0], all the
    # augmenting path needs (u[j0] after the search is that plus the final D).
    record = tl.zeros([NP, P], tl.int64)
    for row in range(1, N + 1):
        p = tl.where(col == 0, row, p)
        u = tl.where(col == 0, 0, u)
        dist = tl.full([NP, P], _BIG, tl.int64)
        before = tl.full([NP, P], -1, tl.int64)
        j0 = tl.zeros([NP], tl.int64)
        i0 = tl.zeros([NP], tl.int64) + row
        u0 = tl.zeros([NP], tl.int64)
        total = tl.zeros([NP], tl.int64)
        active = pair_ok
        going = tl.max(active.to(tl.int32), axis=0) > 0
        # The low bits of each column's key (p is fixed during a search): taken, column, its row.
        low = ((p != 0).to(tl.int64) << 24) | (col << 12) | p
        while going:  # one Dijkstra step from column j0 (row i0) in every active problem
            live = active[:, None]
            before = tl.where((col == j0[:, None]) & live, total[:, None], before)
            open_col = real & (before < 0)
            cost_row = tl.load(rows + (i0[:, None] - 1) * STRIDE, mask=real & live, other=0).to(tl.int64)
            reduced = (top + total - u0)[:, None] - cost_row - v
            better = open_col & live & (reduced < dist)
            dist = tl.where(better, reduced, dist)
            step = ((u0 - total) << 24) | (j0 << 12) | i0
            record = tl.where(better, step[:, None], record)
            # Among the closest open columns a free one, then the first: one min over packed keys.
            key = tl.where(open_col, (dist << 25) | low, _KEY_MAX)
            best = tl.min(key, axis=1)
            total = tl.where(active, best >> 25, total)
            j0 = tl.where(active, (best >> 12) & 4095, j0)
            i0 = tl.where(active, best & 4095, 0)
            u0 = tl.sum(tl.where(col == j0[:, None], u, 0), axis=1)
            active = i0 != 0  # the search ends at a free column
            going = tl.max(active.to(tl.int32), axis=0) > 0
        used = before >= 0
        u = tl.where(used, u + (total[:, None] - before), u)
        v = tl.where(used, v - (total[:, None] - before), v)
        jc = tl.where(pair_ok, j0, 0)
        # (its own condition variable: one shared with the search loop crashes Triton 3.6's layout pass)
        walking = tl.max((jc != 0).to(tl.int32), axis=0) > 0
        while walking:  # the augmenting path: p[j] = p[way[j]] back to column 0
            here = col == jc[:, None]
            hop = tl.sum(tl.where(here, record, 0), axis=1)
            moving = here & (jc != 0)[:, None]
            p = tl.where(moving, (hop & 4095)[:, None], p)
            u = tl.where(moving, ((hop >> 24) + total)[:, None], u)
            jc = tl.where(jc != 0, (hop >> 12) & 4095, 0)
            walking = tl.max((jc != 0).to(tl.int32), axis=0) > 0
    k = tl.arange(0, NP)[:, None].to(tl.int64)
    tl.store(out + k * N + p - 1, col - 1, mask=real & ok)


@triton.jit
def _align(kmov, kold, match, free_old, fill, new, holder, out, R: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
           MOVED: tl.constexpr):  # fmt: skip
    """Each GPU's slots ordered so that kept experts stay in their old slots (``align_slots``): the entry keyed
    ``kmov[t]`` goes to the old slot of its GPU holding the same ``kold`` key, the others fill the free old slots
    in order. The entry at slot ``t`` is ``new[t]``, or with ``MOVED`` the entry of the new GPU ``holder``
    placed at ``t``'s GPU. ``match``, ``free_old``, ``fill``: ``[R]`` int64 scratch."""
    s = tl.arange(0, BS)
    for first in range(0, R, BS):  # keys are unique within a GPU: one match at most each way
        t = first + s
        ok = t < R
        base = t - t % K
        mine = tl.load(kmov + t, mask=ok, other=0)
        theirs = tl.load(kold + t, mask=ok, other=0)
        at = tl.full([BS], -1, tl.int64)
        held = tl.zeros([BS], tl.int64)
        for d in range(K):
            at = tl.where(tl.load(kold + base + d, mask=ok, other=0) == mine, d, at)
            held += (tl.load(kmov + base + d, mask=ok, other=0) == theirs).to(tl.int64)
        tl.store(match + t, at, mask=ok)
        tl.store(free_old + t, (held == 0).to(tl.int64), mask=ok)
    tl.debug_barrier()
    for first in range(0, R, BS):  # ranks among the free new entries and among the free old slots
        t = first + s
        ok = t < R
        q = t % K
        base = t - q
        rank_new = tl.zeros([BS], tl.int64)
        rank_old = tl.zeros([BS], tl.int64)
        for d in range(K - 1):
            earlier = ok & (d < q)
            rank_new += (earlier & (tl.load(match + base + d, mask=earlier, other=0) < 0)).to(tl.int64)
            rank_old += (earlier & (tl.load(free_old + base + d, mask=earlier, other=0) != 0)).to(tl.int64)
        free = tl.load(free_old + t, mask=ok, other=0) != 0
        tl.store(fill + base + rank_old, q.to(tl.int64), mask=ok & free)
        at = tl.load(match + t, mask=ok, other=0)
        # (a rewritten entry keeps its sign, all the loop above reads of its neighbours)
        tl.store(match + t, tl.where(at < 0, -1 - rank_new, at), mask=ok)
    tl.debug_barrier()
    for first in range(0, R, BS):
        t = first + s
        ok = t < R
        base = t - t % K
        at = tl.load(match + t, mask=ok, other=0)
        dest = tl.where(at >= 0, at, tl.load(fill + base + (-1 - at), mask=ok & (at < 0), other=0))
        if MOVED:  # noqa: SIM108 (a constexpr branch: the other side is not compiled)
            src = tl.load(holder + t // K, mask=ok, other=0) * K + t % K
        else:
            src = t
        tl.store(out + base + dest, tl.load(new + src, mask=ok, other=0), mask=ok)


@triton.jit
def relabel_kernel(
    new_ptr,
    old_ptr,
    out_ptr,
    scratch_ptr,
    live_ptr,
    R: tl.constexpr,
    G: tl.constexpr,
    NODES: tl.constexpr,
    SCRATCH: tl.constexpr,
    BS: tl.constexpr,
    P_G: tl.constexpr,
    P_G1: tl.constexpr,
    P_GN1: tl.constexpr,
    P_NN: tl.constexpr,
    P_N1: tl.constexpr,
    BI: tl.constexpr,
    BK: tl.constexpr,
    LANES: tl.constexpr,
    PINNED: tl.constexpr,
):
    """``out [B, R]``: ``new [B, R]`` relabelled to keep the most pairs of ``old [B, R]`` (all int64).

    ``PINNED`` (:func:`eplb.algorithms.elastic.relabel_pinned`): ``live [B, G]`` (int32) marks the live GPUs;
    one assignment over all GPUs whose allowed pairs (live onto live, failed onto failed, and with ``NODES >
    1`` within a node) get ``R + 1`` more profit than any kept-pairs total."""
    layer = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = R // G
    GN: tl.constexpr = G // NODES
    new = new_ptr + layer * R
    old = old_ptr + layer * R
    out = out_ptr + layer * R
    knew = scratch_ptr + layer * SCRATCH
    kold = knew + R
    kmov = kold + R  # key of the new entry moved to each slot (its GPU relabelled)
    match = kmov + R  # old slot (in its GPU) of each moved entry; -1 - rank among the free ones if none
    free_old = match + R
    fill = free_old + R  # the free old slots of each GPU, in order
    kept = (fill + R).to(tl.pointer_type(tl.int32))  # int32: the search steps read its rows
    inner = fill + R + (G * G + 1) // 2
    value = inner + NODES * NODES * GN
    outer = value + NODES * NODES
    holder = outer + NODES  # new GPU placed at each old position

    # ---- 1. keys and kept pairs
    _keys(new, knew, R, K, BS)
    _keys(old, kold, R, K, BS)
    tl.debug_barrier()
    _overlap(knew, kold, kept, G, K, P_G, BI, BK)
    tl.debug_barrier()

    # ---- 2. the assignment: new GPU x goes to old position perm[x]; holder is its inverse
    x = tl.arange(0, P_G)
    x_ok = x < G
    if PINNED:
        live = live_ptr + layer * G
        ii = tl.arange(0, BI)
        j_ok = x_ok
        live_j = tl.load(live + x, mask=j_ok, other=0)
        for first in range(0, G, BI):
            i = first + ii
            i_ok = i < G
            allowed = tl.load(live + i, mask=i_ok, other=0)[:, None] == live_j[None, :]
            if NODES > 1:
                allowed = allowed & ((i // GN)[:, None] == (x // GN)[None, :])
            at = kept + i[:, None] * G + x[None, :]
            both = i_ok[:, None] & j_ok[None, :]
            tl.store(at, tl.load(at, mask=both, other=0) + allowed.to(tl.int32) * (R + 1), mask=both)
        tl.debug_barrier()
    if NODES == 1 or PINNED:
        one = tl.arange(0, LANES)
        _assign(kept, one * 0, one * 0, one == 0, inner, G, G, LANES, P_G1)
        tl.debug_barrier()
        perm = tl.load(inner + x, mask=x_ok, other=0)
    else:
        pair = tl.arange(0, P_NN)
        a = pair // NODES
        c = pair % NODES
        pair_ok = pair < NODES * NODES
        _assign(kept, a * GN, c * GN, pair_ok, inner, G, GN, P_NN, P_GN1)
        tl.debug_barrier()
        i = tl.arange(0, P_GN1)[None, :]
        i_ok = pair_ok[:, None] & (i < GN)
        col = tl.load(inner + pair[:, None] * GN + i, mask=i_ok, other=0)
        picked = tl.load(kept + (a[:, None] * GN + i) * G + c[:, None] * GN + col, mask=i_ok, other=0)
        tl.store(value + pair, tl.sum(picked.to(tl.int64), axis=1), mask=pair_ok)
        tl.debug_barrier()
        one = tl.arange(0, LANES)
        _assign(value, one * 0, one * 0, one == 0, outer, NODES, NODES, LANES, P_N1)
        tl.debug_barrier()
        node = x // GN
        to = tl.load(outer + node, mask=x_ok, other=0)
        perm = to * GN + tl.load(inner + (node * NODES + to) * GN + x % GN, mask=x_ok, other=0)
    tl.store(holder + perm, x.to(tl.int64), mask=x_ok)
    tl.debug_barrier()

    # ---- 3. the new GPUs at their old positions, each GPU's slots aligned with the old ones
    s = tl.arange(0, BS)
    for first in range(0, R, BS):
        t = first + s
        ok = t < R
        src = tl.load(holder + t // K, mask=ok, other=0) * K + t % K
        tl.store(kmov + t, tl.load(knew + src, mask=ok, other=0), mask=ok)
    tl.debug_barrier()
    _align(kmov, kold, match, free_old, fill, new, holder, out, R, K, BS, True)


@triton.jit
def log2phy_kernel(
    phy2log_ptr,
    log2phy_ptr,
    R: tl.constexpr,
    E: tl.constexpr,
    W: tl.constexpr,
    BS: tl.constexpr,
    BT: tl.constexpr,
    BF: tl.constexpr,
):
    """``log2phy [B, E, W]``: replica ``k`` of an expert in its ``k``-th slot (slot order), ``-1`` padded."""
    layer = tl.program_id(0).to(tl.int64)
    row = phy2log_ptr + layer * R
    dst = log2phy_ptr + layer * E * W
    f = tl.arange(0, BF)
    for first in range(0, E * W, BF):
        tl.store(dst + first + f, tl.full([BF], -1, tl.int64), mask=first + f < E * W)
    tl.debug_barrier()
    s = tl.arange(0, BS)
    r = tl.arange(0, BT)
    for first in range(0, R, BS):
        t = first + s
        ok = t < R
        x = tl.load(row + t, mask=ok, other=0)
        rank = tl.zeros([BS], tl.int64)
        for start in range(0, first + BS, BT):  # copies in the earlier slots
            e = start + r
            y = tl.load(row + e, mask=e < R, other=0)
            earlier = (e[None, :] < t[:, None]) & (y[None, :] == x[:, None])
            rank += tl.sum(earlier.to(tl.int64), axis=1)
        tl.store(dst + x * W + rank, t.to(tl.int64), mask=ok)


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def fits(num_phy: int, num_gpus: int, num_nodes: int) -> bool:
    """Whether :func:`relabel` takes these sizes (else the array-API path runs)."""
    return 0 < num_gpus <= MAX_GPUS and num_phy <= MAX_SLOTS and num_phy % num_gpus == 0 and num_gpus % num_nodes == 0


def _meta(num_phy: int, num_gpus: int, num_nodes: int) -> dict[str, int]:
    per_gpu, gpus_per_node = num_phy // num_gpus, num_gpus // num_nodes
    scratch = 6 * num_phy + num_gpus * num_gpus + num_nodes * num_nodes * (gpus_per_node + 1) + num_nodes + num_gpus
    p_g = _pow2(num_gpus)
    bk = min(_pow2(per_gpu), 64)
    return {
        "R": num_phy,
        "G": num_gpus,
        "NODES": num_nodes,
        "SCRATCH": scratch,
        "BS": min(_pow2(num_phy), 1024),
        "P_G": p_g,
        "P_G1": _pow2(num_gpus + 1),
        "P_GN1": _pow2(gpus_per_node + 1),
        "P_NN": _pow2(num_nodes * num_nodes),
        "P_N1": _pow2(num_nodes + 1),
        "BI": max(1, min(16, 8192 // (p_g * bk))),  # [BI, P_G, BK] compare tiles of at most 8192
        "BK": bk,
        "LANES": 2,  # a single problem in lane 0 of two: one lane miscompiles on Triton 3.6 (one warp)
    }


def _num_warps(num_gpus: int) -> int:
    """Four warps: on an H200, 0.13 ms a call at 288 slots/32 GPUs/4 nodes (one warp: 0.20, two: 0.14) and
    0.86 ms at 288 slots/144 GPUs (one: 1.19, two: 1.01), 61 layers."""
    return 4


def _on_device(device: torch.device):
    """Triton launches on the current device: a tensor on another GPU needs that GPU made current."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(
    new: torch.Tensor, old: torch.Tensor, live_gpu: torch.Tensor | None, num_gpus: int, num_nodes: int
) -> torch.Tensor:
    """One :func:`relabel_kernel` launch (``PINNED`` with ``live_gpu [B or 1, G]``), in ``new``'s dtype."""
    batch, num_phy = new.shape
    if not fits(num_phy, num_gpus, num_nodes):
        raise ValueError(
            f"the relabelling kernel takes at most {MAX_GPUS} GPUs and {MAX_SLOTS} slots, "
            f"got {num_phy} slots on {num_gpus} GPUs in {num_nodes} nodes"
        )
    new64 = new.to(torch.int64).contiguous()
    old64 = old.to(device=new.device, dtype=torch.int64).contiguous()
    out = torch.empty_like(new64)
    if batch == 0:
        return out.to(new.dtype)
    live = out  # not read unless pinned
    if live_gpu is not None:
        live = torch.broadcast_to(live_gpu.to(device=new.device, dtype=torch.int32), (batch, num_gpus)).contiguous()
    meta = _meta(num_phy, num_gpus, num_nodes)
    scratch = torch.empty(batch * meta["SCRATCH"], dtype=torch.int64, device=new.device)
    ensure_cache_dir()
    with _on_device(new.device):
        relabel_kernel[(batch,)](
            new64, old64, out, scratch, live, num_warps=_num_warps(num_gpus), PINNED=live_gpu is not None, **meta
        )
    return out if new.dtype == torch.int64 else out.to(new.dtype)


def relabel(new: torch.Tensor, old: torch.Tensor, num_gpus: int, num_nodes: int, *, xp: Any = None) -> torch.Tensor:
    """``new [B, R]`` with nodes, GPUs within nodes and slots within GPUs permuted to match ``old [B, R]``.

    :func:`eplb.algorithms.relabel.relabel` (same arguments; ``xp`` is not
    used), one launch on ``new``'s device (CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``). Expert ids must lie in ``[0, 2**40)``.
    """
    return _launch(new, old, None, num_gpus, num_nodes)


def relabel_pinned(
    new: torch.Tensor, old: torch.Tensor, live_gpu: torch.Tensor, num_gpus: int, *, num_nodes: int = 1, xp: Any = None
) -> torch.Tensor:
    """:func:`eplb.algorithms.elastic.relabel_pinned` (same arguments; ``xp`` is not used): one launch.

    ``new``, ``old`` ``[B, R]`` integer ids (``-1``: an empty slot, in ``new`` exactly the failed GPUs'),
    ``live_gpu [B or 1, G]`` bool, or integer classes below ``2**31`` (a GPU goes onto a position of its own
    class). Expert ids must lie in ``[-1, 2**40)``.
    """
    return _launch(new, old, live_gpu, num_gpus, num_nodes)


def log2phy_in_slot_order(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``log2phy [B, E, R - E + 1]`` with replica ``k`` of an expert in its ``k``-th slot, ``-1`` padded.

    :func:`eplb.kernels.relabel_numba.log2phy_in_slot_order` (``build_log2phy(phy2log,
    occurrence(phy2log), E)``), one launch; every expert id must lie in ``[0, E)``.
    """
    batch, num_phy = phy2log.shape
    width = num_phy - num_experts + 1
    phy64 = phy2log.to(torch.int64).contiguous()
    out = torch.empty((batch, num_experts, width), dtype=torch.int64, device=phy2log.device)
    if batch == 0:
        return out.to(phy2log.dtype)
    meta = {"R": num_phy, "E": num_experts, "W": width, "BS": min(_pow2(num_phy), 64), "BT": 64, "BF": 1024}
    ensure_cache_dir()
    with _on_device(phy2log.device):
        log2phy_kernel[(batch,)](phy64, out, num_warps=4, **meta)
    return out if phy2log.dtype == torch.int64 else out.to(phy2log.dtype)
