"""Equals :func:`eplb.algorithms.refined.rebalance_refined` bit for bit: fused Triton kernels, torch launchers.

Proved by ``tests/test_triton_refined.py`` (torch ops on CUDA, Triton's CPU interpreter) and the
cross-backend suite (``torch:cuda``; the Triton interpreter test).

:func:`eplb.algorithms.refined.rebalance_refined` runs in three stages; on
torch ops they are thousands of tiny kernels, and the swap refinement must
run every round on CUDA (stopping early would need a host sync). Here each
stage is one or two launches with the same arithmetic as the array-API path
(the rules of :mod:`eplb.kernels.greedy_triton`), so placements are
bit-identical:

- **split stage** (:func:`split_stage`, as ``group_split``):
  :func:`split_bounds_kernel`, one program per (layer, node set): the
  greedy LPT split of the groups (the programs of its nodes write it) and
  each node set's lower bound ``max(sum * fl(1/m), replication bound,
  pigeonhole bound)``; then :func:`split_choice_kernel`, one program per
  layer: the split whose worst node bound is lowest, where it beats the
  greedy split's by the ``IMPROVEMENT`` margin.
- **candidate stage** (:func:`candidate_stage`, as ``node_candidates`` up to
  its choice): :func:`candidates_kernel`, one program per (layer, node,
  candidate) (or per (layer, node), taking its candidates in turn): greedy
  or capped replication, packed by LPT or by a snake deal, refined by swaps
  out of the heaviest GPU. The swap loop stops at the first rejected swap: a
  rejected round changes nothing, so every later round would be rejected
  too, and the result is that of all ``num_iters`` rounds.
- **final stage** (:func:`final_stage`, as ``keep_greedy_unless_beaten``):
  :func:`final_kernel`, one program per layer: per node the candidate with
  the lightest heaviest GPU (candidate 0 unless beaten by the margin), then
  ``assemble`` and, where the split may differ from greedy, the comparison
  with the fused greedy kernel's placement (:mod:`eplb.backends._triton`).

Between them a few torch ops remain (``expert_order``, ``build_log2phy``);
no host sync. The first call on a device copies the split tables there
(like :func:`eplb._xp.constant`). Loads must be finite and non-negative, as
validated by the public API; ``-0.0`` is read as ``+0.0`` where a sort key
or packed key is built from a load's bits.
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat.torch as xp
import torch
import triton
import triton.language as tl

from eplb.algorithms.bounds import MAX_ASSIGNMENTS, count_assignments, group_assignments
from eplb.algorithms.hierarchy import build_log2phy
from eplb.algorithms.refine import IMPROVEMENT
from eplb.algorithms.refined import rebalance_refined
from eplb.kernels import greedy_triton, pairs_triton
from eplb.kernels.greedy_triton import _desc_order_keys, _greedy_groups, _load_nonneg, _pick, ensure_cache_dir

__all__ = [
    "candidate_stage",
    "candidates_kernel",
    "default_num_warps",
    "final_kernel",
    "final_stage",
    "kernel_fits",
    "rebalance_refined_cuda",
    "split_bounds_kernel",
    "split_choice_kernel",
    "split_stage",
]

_IMPROVEMENT: tl.constexpr = tl.constexpr(IMPROVEMENT)  # 1 - 2**-16, exact in float32
_INT64_MAX: tl.constexpr = tl.constexpr(9223372036854775807)
_INT64_MIN: tl.constexpr = tl.constexpr(-9223372036854775808)


@triton.jit
def _bits(value):
    """int64 bit pattern of float32 ``value``: orders like the value when ``value >= +0.0``."""
    return value.to(tl.int32, bitcast=True).to(tl.int64)


@triton.jit
def _float(bits):
    """float32 from the low 32 bits of an int64 bit pattern."""
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def split_bounds_kernel(
    weight_ptr,
    recip_ptr,
    sets_ptr,
    bounds_ptr,
    greedy_ptr,
    E: tl.constexpr,
    GROUPS: tl.constexpr,
    NODES: tl.constexpr,
    S: tl.constexpr,
    M: tl.constexpr,
    NSETS: tl.constexpr,
    BOUNDS: tl.constexpr,
    P_G: tl.constexpr,
    P_N: tl.constexpr,
    P_GPN: tl.constexpr,
    P_EN: tl.constexpr,
):
    """Program ``(layer, s)``: ``s < NODES`` is node ``s`` of the greedy split (it writes its
    groups to ``greedy [L, GROUPS]``), ``s >= NODES`` the node set ``sets[s - NODES]``; with
    ``BOUNDS``, the set's lower bound goes to ``bounds [L, NODES + NSETS]`` (``node_set_bound``
    with ``S`` slots and ``M`` GPUs per node).
    """
    layer = tl.program_id(0)
    s = tl.program_id(1)
    GS: tl.constexpr = E // GROUPS
    GPN: tl.constexpr = GROUPS // NODES
    EN: tl.constexpr = E // NODES
    row = weight_ptr + layer * E
    r = tl.arange(0, P_GPN)
    r_valid = r < GPN
    if s < NODES:
        groups = _greedy_groups(row, s, E, GROUPS, NODES, P_G, P_N, P_GPN)
        tl.store(greedy_ptr + layer * GROUPS + s * GPN + r, groups, mask=r_valid)
    else:
        groups = tl.load(sets_ptr + (s - NODES) * GPN + r, mask=r_valid, other=0)
    if BOUNDS:
        # The set's total, summed left to right in its expert order, spread over M GPUs.
        # (Plain loads: the reference adds -0.0 as it is, and the sum decides nothing by its bits.)
        first = _pick(groups, r, 0)
        total = tl.load(row + first * GS)
        for k in tl.static_range(1, GS):
            total = total + tl.load(row + first * GS + k)
        for i in tl.static_range(1, GPN):
            grp = _pick(groups, r, i)
            for k in tl.static_range(GS):
                total = total + tl.load(row + grp * GS + k)
        bound = total * tl.load(recip_ptr + M)  # fl(1/M) = float32(1.0 / M)
        # Replication bound: greedy replication into S slots, the largest load per replica.
        q = tl.arange(0, P_EN)
        q_valid = q < EN
        group_of_q = tl.sum(tl.where((q // GS)[:, None] == r[None, :], groups[None, :], 0), axis=1)
        w = _load_nonneg(row + group_of_q * GS + q % GS, q_valid)
        count = tl.where(q_valid, 1, 0)
        key = tl.where(q_valid, _replica_key(w, q, count), _INT64_MIN)
        for _ in range(S - EN):
            best = tl.max(key, axis=0)
            e = (65535 - ((best >> 16) & 65535)).to(tl.int32)
            c = (best & 65535).to(tl.int32)
            key = tl.where(q == e, _replica_key(_pick(w, q, e) * tl.load(recip_ptr + c + 1), e, c + 1), key)
        count = tl.where(q_valid, (key & 65535).to(tl.int32), 0)
        per_replica = w * tl.load(recip_ptr + count, mask=q_valid, other=0.0)
        bound = tl.maximum(bound, tl.max(tl.where(q_valid, per_replica, 0.0), axis=0))
        # Pigeonhole bound over the U lightest experts (ascending loads y).
        U: tl.constexpr = 2 * EN - S
        if U > M:
            y = tl.sort(tl.where(q_valid, w, float("inf")))
            for j in tl.static_range(1, (U - 1) // M + 1):
                start = U - j * M - 1
                part = _pick(y, q, start)
                for t in tl.static_range(1, j + 1):
                    part = part + _pick(y, q, start + t)
                bound = tl.maximum(bound, part)
        tl.store(bounds_ptr + layer * (NODES + NSETS) + s, bound)


@triton.jit
def split_choice_kernel(
    bounds_ptr,
    which_ptr,
    table_ptr,
    greedy_ptr,
    out_ptr,
    GROUPS: tl.constexpr,
    NODES: tl.constexpr,
    NSETS: tl.constexpr,
    NSPLITS: tl.constexpr,
    P_A: tl.constexpr,
    P_N: tl.constexpr,
    P_G: tl.constexpr,
):
    """Program ``layer``: ``mgroup2group`` into ``out [L, GROUPS]``: the split with the lowest
    worst-node bound (``which [A, NODES]`` indexes its node sets, ``table [A, GROUPS]`` lists
    it), first on ties, where it beats the greedy split's bound by the margin; else the greedy split."""
    layer = tl.program_id(0)
    row = bounds_ptr + layer * (NODES + NSETS)
    n = tl.arange(0, P_N)
    n_valid = n < NODES
    greedy_bound = tl.max(tl.load(row + n, mask=n_valid, other=0.0), axis=0)
    a = tl.arange(0, P_A)
    a_valid = a < NSPLITS
    valid = a_valid[:, None] & n_valid[None, :]
    which = tl.load(which_ptr + a[:, None] * NODES + n[None, :], mask=valid, other=0)
    per_split = tl.max(tl.load(row + NODES + which, mask=valid, other=0.0), axis=1)
    per_split = tl.where(a_valid, per_split, float("inf"))
    lowest = tl.min(per_split, axis=0)
    best = tl.argmin(per_split, axis=0, tie_break_left=True)
    # _best over [greedy, splits...]: a split wins only below greedy * IMPROVEMENT.
    beaten = lowest < greedy_bound * _IMPROVEMENT
    g = tl.arange(0, P_G)
    g_valid = g < GROUPS
    listed = tl.load(table_ptr + best * GROUPS + g, mask=g_valid, other=0)
    kept = tl.load(greedy_ptr + layer * GROUPS + g, mask=g_valid, other=0)
    tl.store(out_ptr + layer * GROUPS + g, tl.where(beaten, listed, kept), mask=g_valid)


@triton.jit
def _replica_key(score, expert, count):
    """``score bits << 32 | (65535 - expert) << 16 | count``: a max takes the highest score, then
    the lowest expert (scores are >= +0.0, or -1 for a capped expert: below every other)."""
    return (_bits(score) << 32) | ((65535 - expert).to(tl.int64) << 16) | count.to(tl.int64)


@triton.jit
def _replicate(w, q, q_valid, s, recip_ptr, max_count, EN: tl.constexpr, S: tl.constexpr):
    """Greedy replication of the node's ``w [P_EN]`` into ``S`` slots, capped at ``max_count``
    replicas while another expert can take one (no cap: ``max_count > S``), as ``replicate_experts``.

    Returns ``count [P_EN]``, ``slot_expert [P_S]``, ``slot_rank [P_S]``.
    """
    key = tl.where(q_valid, _replica_key(w, q, tl.where(q_valid, 1, 0)), _INT64_MIN)
    slot_expert = tl.where(s < EN, s, 0)
    slot_rank = tl.zeros_like(s)
    for t in range(S - EN):
        best = tl.max(key, axis=0)  # the largest score, the lowest expert on ties
        e = (65535 - ((best >> 16) & 65535)).to(tl.int32)
        c = (best & 65535).to(tl.int32)
        score = _pick(w, q, e) * tl.load(recip_ptr + c + 1)
        score = tl.where(c + 1 >= max_count, -1.0, score)
        key = tl.where(q == e, _replica_key(score, e, c + 1), key)
        slot_expert = tl.where(s == EN + t, e, slot_expert)
        slot_rank = tl.where(s == EN + t, c, slot_rank)
    count = tl.where(q_valid, (key & 65535).to(tl.int32), 0)
    return count, slot_expert, slot_rank


@triton.jit
def _item_loads(w, count, slot_expert, q_valid, s_valid, recip_ptr):
    """``[P_S]``: each slot's replica load ``w[e] * fl(1/count[e])`` (``replicate_on_nodes``)."""
    per_replica = w * tl.load(recip_ptr + count, mask=q_valid, other=0.0)
    return tl.where(s_valid, tl.gather(per_replica, slot_expert, 0), 0.0)


@triton.jit
def _start(
    item_load,
    s,
    s_valid,
    mm,
    kk,
    scratch,
    snake,
    S: tl.constexpr,
    M: tl.constexpr,
    K: tl.constexpr,
    P_S: tl.constexpr,
    P_M: tl.constexpr,
    P_K: tl.constexpr,
):
    """The LPT packing (``lpt_pack`` + ``slots_by_pack``) or, with ``snake``, the snake deal
    (``snake_pack``) of ``item_load [P_S]``: items and loads by slot, ``[P_M, P_K]`` each.

    Both visit the items heaviest first (stable order), parked in this program's ``scratch``
    (load bits, then items). LPT puts each on the open GPU with the lowest running load, first
    on ties (one min over packed keys: load bits, GPU, items so far; each step reads its item
    with two scalar loads), or item ``i`` on GPU ``i`` when ``K == 1``. The snake deals GPUs
    ``0..M-1``, then ``M-1..0``, ...: slot ``(m, k)`` takes visit ``k * M + m`` (``k`` even) or
    ``k * M + M - 1 - m`` (``k`` odd), two gathers.
    """
    keys = tl.sort(_desc_order_keys(item_load, s, s_valid), descending=True)
    tl.debug_barrier()  # earlier readers of the scratch are done
    tl.store(scratch + s, (keys >> 32).to(tl.int32), mask=s_valid)
    tl.store(scratch + P_S + s, (4294967295 - (keys & 4294967295)).to(tl.int32), mask=s_valid)
    tl.debug_barrier()
    valid = (mm < M) & (kk < K)
    if snake:
        visit = kk * M + tl.where(kk % 2 == 0, mm, M - 1 - mm)
        slot_load = tl.load(scratch + visit, mask=valid, other=0).to(tl.float32, bitcast=True)
        slot_item = tl.load(scratch + P_S + visit, mask=valid, other=0)
    elif K == 1:
        slot_item = tl.where(valid, mm + tl.zeros([P_M, P_K], tl.int32), 0)
        slot_load = tl.where(valid, item_load[:, None] + tl.zeros([P_M, P_K], tl.float32), 0.0)
    else:
        m = tl.arange(0, P_M)
        slot_item = tl.zeros([P_M, P_K], tl.int32)
        slot_load = tl.zeros([P_M, P_K], tl.float32)
        gpu_key = tl.where(m < M, m.to(tl.int64) << 16, _INT64_MAX)
        for t in range(S):
            load = tl.load(scratch + t).to(tl.float32, bitcast=True)
            item = tl.load(scratch + P_S + t)
            best = tl.min(gpu_key, axis=0)  # the lightest open GPU, the lowest index on ties
            chosen = ((best >> 16) & 65535).to(tl.int32)
            rank = (best & 65535).to(tl.int32)
            hit = (mm == chosen) & (kk == rank)
            slot_item = tl.where(hit, item, slot_item)
            slot_load = tl.where(hit, load, slot_load)
            gpu_load = _float(best >> 32) + load
            new_key = (_bits(gpu_load) << 32) | (chosen.to(tl.int64) << 16) | (rank + 1).to(tl.int64)
            gpu_key = tl.where(m == chosen, tl.where(rank + 1 < K, new_key, _INT64_MAX), gpu_key)
    return slot_item, slot_load


@triton.jit
def _pack_loads(slot_load, kk, K: tl.constexpr):
    """``[P_M]``: each GPU's load, its slots summed left to right."""
    total = tl.sum(tl.where(kk == 0, slot_load, 0.0), axis=1)
    if K <= 16:
        for k in tl.static_range(1, K):
            total = total + tl.sum(tl.where(kk == k, slot_load, 0.0), axis=1)
    else:
        for k in range(1, K):
            total = total + tl.sum(tl.where(kk == k, slot_load, 0.0), axis=1)
    return total


@triton.jit
def _refine(
    slot_item,
    slot_load,
    mm,
    kk,
    M: tl.constexpr,
    K: tl.constexpr,
    ITERS: tl.constexpr,
    P_M: tl.constexpr,
    P_K: tl.constexpr,
):
    """``refine_by_swaps`` on one row, stopping at the first rejected swap: returns the items by
    slot and the heaviest GPU's load.

    Each round takes the heaviest GPU ``a`` (first on ties) and, over ``(i in a, b, j in b)``,
    the swap with the lowest ``max((L_a - x_i) + x_j, (L_b - x_j) + x_i)`` (``b = a``: +inf),
    first in row-major ``(i, b, j)`` order on ties; it is applied if below ``L_a * IMPROVEMENT``.
    A rejected round changes nothing, so every later round would be rejected too: stopping
    there gives the result of all ``ITERS`` rounds.
    """
    m = tl.arange(0, P_M)
    if ITERS > 0:  # (the launcher passes 0 with one GPU per node: no swap is possible)
        i3 = tl.arange(0, P_K)[:, None, None]
        b3 = tl.arange(0, P_M)[None, :, None]
        j3 = tl.arange(0, P_K)[None, None, :]
        valid3 = (i3 < K) & (b3 < M) & (j3 < K)
        flat3 = (i3 * M + b3) * K + j3  # row-major index over the real (K, M, K)
        going = tl.full([], True, tl.int1)
        step = 0
        while going:
            loads = _pack_loads(slot_load, kk, K)
            top = tl.max(tl.where(m < M, (_bits(loads) << 32) | (65535 - m).to(tl.int64), -1), axis=0)
            heavy = (65535 - (top & 65535)).to(tl.int32)  # the heaviest GPU, the lowest index on ties
            heavy_load = _float(top >> 32)
            out_i = tl.sum(tl.where(mm == heavy, slot_load, 0.0), axis=0)[:, None, None]  # [P_K, 1, 1]
            in_j = slot_load[None, :, :]  # [1, P_M, P_K]
            partner = tl.where(m == heavy, float("inf"), loads)[None, :, None]
            worst = tl.maximum((heavy_load - out_i) + in_j, (partner - in_j) + out_i)
            worst = tl.where(valid3, worst, float("inf"))
            lowest = tl.min(worst)
            best = tl.min(tl.where(valid3 & (worst == lowest), flat3, 2147483647))
            accept = lowest < heavy_load * _IMPROVEMENT
            give = tl.where(accept, (mm == heavy) & (kk == best // (M * K)), False)
            take = tl.where(accept, (mm == (best // K) % M) & (kk == best % K), False)
            packed = (_bits(slot_load) << 32) | slot_item.to(tl.int64)
            given = tl.sum(tl.where(give, packed, 0))
            taken = tl.sum(tl.where(take, packed, 0))
            slot_item = tl.where(give, (taken & 4294967295).to(tl.int32), slot_item)
            slot_item = tl.where(take, (given & 4294967295).to(tl.int32), slot_item)
            slot_load = tl.where(give, _float(taken >> 32), slot_load)
            slot_load = tl.where(take, _float(given >> 32), slot_load)
            step += 1
            going = accept & (step < ITERS)
    node_max = tl.max(tl.where(m < M, _pack_loads(slot_load, kk, K), 0.0), axis=0)
    return slot_item, node_max


@triton.jit
def candidates_kernel(
    weight_ptr,
    mlog2log_ptr,
    recip_ptr,
    scratch_ptr,
    phy2mlog_ptr,
    phyrank_ptr,
    mlogcnt_ptr,
    pphy2phy_ptr,
    node_max_ptr,
    E: tl.constexpr,
    NODES: tl.constexpr,
    S: tl.constexpr,
    M: tl.constexpr,
    ITERS: tl.constexpr,
    PER_PROGRAM: tl.constexpr,
    P_EN: tl.constexpr,
    P_S: tl.constexpr,
    P_M: tl.constexpr,
    P_K: tl.constexpr,
):
    """Program ``(row, p)``, ``row = layer * NODES + node``: candidates ``p * PER_PROGRAM`` to
    ``(p + 1) * PER_PROGRAM - 1`` of ``node_candidates`` for that row, refined by swaps.

    Candidate ``c``: replication ``c // 2`` (0 greedy, 1 capped at ``M`` replicas), start
    ``c % 2`` (0 LPT, 1 snake). Writes ``pphy2phy [C, L*N, S]`` (slot order) and ``node_max
    [C, L*N]`` (heaviest GPU) of each candidate, and replication ``r``'s ``phy2mlog``,
    ``phyrank`` ``[2, L*N, S]`` and ``mlogcnt [2, L*N, E/N]`` (from its LPT candidate);
    :func:`final_kernel` picks among them. ``scratch``: ``2 * P_S`` int32 per program.
    """
    row = tl.program_id(0)
    part = tl.program_id(1)
    ROWS = tl.num_programs(0)
    layer = row // NODES
    node = row % NODES
    EN: tl.constexpr = E // NODES
    K: tl.constexpr = S // M
    q = tl.arange(0, P_EN)
    q_valid = q < EN
    expert = tl.load(mlog2log_ptr + layer * E + node * EN + q, mask=q_valid, other=0)
    w = _load_nonneg(weight_ptr + layer * E + expert, q_valid)
    s = tl.arange(0, P_S)
    s_valid = s < S
    mm = tl.arange(0, P_M)[:, None]
    kk = tl.arange(0, P_K)[None, :]
    scratch = scratch_ptr + (row * tl.num_programs(1) + part) * 2 * P_S
    # A loop from 0 with the offset added inside: Triton 3.6's interpreter cannot turn a
    # program-id-dependent range start into a Python index.
    for c in range(PER_PROGRAM):
        cand = part * PER_PROGRAM + c
        rep = cand // 2
        count, slot_expert, slot_rank = _replicate(w, q, q_valid, s, recip_ptr, tl.where(rep == 1, M, S + 1), EN, S)
        if cand % 2 == 0:
            out = (rep * ROWS + row) * S
            tl.store(phy2mlog_ptr + out + s, slot_expert, mask=s_valid)
            tl.store(phyrank_ptr + out + s, slot_rank, mask=s_valid)
            tl.store(mlogcnt_ptr + (rep * ROWS + row) * EN + q, count, mask=q_valid)
        item_load = _item_loads(w, count, slot_expert, q_valid, s_valid, recip_ptr)
        start_item, start_load = _start(item_load, s, s_valid, mm, kk, scratch, cand % 2 == 1, S, M, K, P_S, P_M, P_K)
        slot_item, node_max = _refine(start_item, start_load, mm, kk, M, K, ITERS, P_M, P_K)
        tl.store(pphy2phy_ptr + (cand * ROWS + row) * S + mm * K + kk, slot_item, mask=(mm < M) & (kk < K))
        tl.store(node_max_ptr + cand * ROWS + row, node_max)


@triton.jit
def _chosen(node_max_ptr, row, valid, ROWS, C: tl.constexpr):
    """``_best`` over the ``C`` candidates of each row in ``row``: the lowest heaviest GPU (first
    on ties) if below candidate 0's by the margin, else candidate 0. Returns (candidate, its load)."""
    first = tl.load(node_max_ptr + row, mask=valid, other=0.0)
    best = first
    chosen = tl.zeros_like(row)
    for c in tl.static_range(1, C):
        value = tl.load(node_max_ptr + c * ROWS + row, mask=valid, other=0.0)
        chosen = tl.where(value < best, c, chosen)
        best = tl.where(value < best, value, best)
    beaten = best < first * _IMPROVEMENT
    return tl.where(beaten, chosen, 0), tl.where(beaten, best, first)


@triton.jit
def final_kernel(
    weight_ptr,
    recip_ptr,
    mlog2log_ptr,
    phy2mlog_ptr,
    phyrank_ptr,
    mlogcnt_ptr,
    pphy2phy_ptr,
    node_max_ptr,
    greedy_phy2log_ptr,
    greedy_log2phy_ptr,
    greedy_logcnt_ptr,
    phy2log_out,
    phyrank_out,
    logcnt_out,
    E: tl.constexpr,
    R: tl.constexpr,
    NODES: tl.constexpr,
    GPUS: tl.constexpr,
    C: tl.constexpr,
    GREEDY: tl.constexpr,
    MAXCNT: tl.constexpr,
    P_R: tl.constexpr,
    P_E: tl.constexpr,
    P_N: tl.constexpr,
    P_G: tl.constexpr,
):
    """Program ``layer``: the end of ``node_candidates`` (each row's candidate by ``_best`` among
    the ``C`` of :func:`candidates_kernel`) and ``keep_greedy_unless_beaten``: ``assemble`` of the
    chosen candidates into ``phy2log [L, R]``, ``phyrank [L, R]``, ``logcnt [L, E]``; with
    ``GREEDY``, the greedy placement (``phy2log``, ``log2phy``, ``logcnt`` of the greedy kernel)
    instead unless the candidates' heaviest GPU is lighter by the margin."""
    layer = tl.program_id(0)
    ROWS = tl.num_programs(0) * NODES
    S: tl.constexpr = R // NODES
    EN: tl.constexpr = E // NODES
    K: tl.constexpr = R // GPUS
    q = tl.arange(0, P_E)
    q_valid = q < E
    j = tl.arange(0, P_R)
    j_valid = j < R
    refined = True
    if GREEDY:
        n = tl.arange(0, P_N)
        _node_cand, node_peak = _chosen(node_max_ptr, layer * NODES + n, n < NODES, ROWS, C)
        refined_peak = tl.max(tl.where(n < NODES, node_peak, 0.0), axis=0)
        # max_gpu_load of the greedy placement: each GPU's slots summed left to right.
        g = tl.arange(0, P_G)
        g_valid = g < GPUS
        on_gpu = tl.load(greedy_phy2log_ptr + layer * R + g * K, mask=g_valid, other=0)
        its_count = tl.load(greedy_logcnt_ptr + layer * E + on_gpu, mask=g_valid, other=0)
        total = tl.load(weight_ptr + layer * E + on_gpu, mask=g_valid, other=0.0) * tl.load(recip_ptr + its_count)
        for k in range(1, K):
            on_gpu = tl.load(greedy_phy2log_ptr + layer * R + g * K + k, mask=g_valid, other=0)
            its_count = tl.load(greedy_logcnt_ptr + layer * E + on_gpu, mask=g_valid, other=0)
            replica = tl.load(weight_ptr + layer * E + on_gpu, mask=g_valid, other=0.0) * tl.load(recip_ptr + its_count)
            total = total + replica
        greedy_peak = tl.max(tl.where(g_valid, total, 0.0), axis=0)
        refined = refined_peak < greedy_peak * _IMPROVEMENT
    if refined:
        # assemble: slot j of node j // S holds the node's candidate slot order pphy2phy.
        row = layer * NODES + j // S
        cand, _slot_peak = _chosen(node_max_ptr, row, j_valid, ROWS, C)
        phy = tl.load(pphy2phy_ptr + (cand * ROWS + row) * S + j % S, mask=j_valid, other=0)
        replication = (cand // 2 * ROWS + row) * S  # candidates 2c and 2c + 1 share replication c
        local = tl.load(phy2mlog_ptr + replication + phy, mask=j_valid, other=0)
        logical = tl.load(mlog2log_ptr + layer * E + (j // S) * EN + local, mask=j_valid, other=0)
        tl.store(phy2log_out + layer * R + j, logical, mask=j_valid)
        rank = tl.load(phyrank_ptr + replication + phy, mask=j_valid, other=0)
        tl.store(phyrank_out + layer * R + j, rank, mask=j_valid)
        # the rows of mlogcnt follow mlog2log's order
        expert_row = layer * NODES + q // EN
        expert_cand, _expert_peak = _chosen(node_max_ptr, expert_row, q_valid, ROWS, C)
        expert = tl.load(mlog2log_ptr + layer * E + q, mask=q_valid, other=0)
        count = tl.load(mlogcnt_ptr + (expert_cand // 2 * ROWS + expert_row) * EN + q % EN, mask=q_valid, other=0)
        tl.store(logcnt_out + layer * E + expert, count, mask=q_valid)
    else:
        logical = tl.load(greedy_phy2log_ptr + layer * R + j, mask=j_valid, other=0)
        tl.store(phy2log_out + layer * R + j, logical, mask=j_valid)
        count = tl.load(greedy_logcnt_ptr + layer * E + q, mask=q_valid, other=0)
        tl.store(logcnt_out + layer * E + q, count, mask=q_valid)
        for c in range(MAXCNT):  # replica c of expert q sits in slot log2phy[q, c] (-1: none)
            slot = tl.load(greedy_log2phy_ptr + (layer * E + q) * MAXCNT + c, mask=q_valid, other=-1)
            tl.store(phyrank_out + layer * R + slot, tl.zeros_like(slot) + c, mask=q_valid & (slot >= 0))


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


# Register tensors of a node's slots, and the [slots per GPU, GPUs, slots per GPU]
# swap candidates, stay reasonable up to these sizes (torch ops run beyond).
MAX_SLOTS_PER_NODE = 4096
MAX_SWAP_CANDIDATES = 16384
MAX_SPLIT_EXPERTS_PER_NODE = 1024  # loads summed by unrolled code when splits are enumerated


def kernel_fits(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> bool:
    """Whether the kernels take these sizes (global policy: ``num_groups = num_nodes = 1``)."""
    slots, gpus = num_replicas // num_nodes, num_gpus // num_nodes
    per_gpu = slots // gpus
    if slots > MAX_SLOTS_PER_NODE:
        return False
    if gpus > 1 and _pow2(per_gpu) ** 2 * _pow2(gpus) > MAX_SWAP_CANDIDATES:
        return False
    enumerated = num_groups != num_nodes and count_assignments(num_groups, num_nodes) <= MAX_ASSIGNMENTS
    if enumerated and num_experts // num_nodes > MAX_SPLIT_EXPERTS_PER_NODE:
        return False
    greedy_fits = getattr(greedy_triton, "kernel_fits", None)  # the greedy kernel compares with the split
    return not enumerated or greedy_fits is None or greedy_fits(num_experts, num_replicas, num_nodes)


def default_num_warps(num_replicas: int, num_nodes: int, num_gpus: int) -> int:
    """Warps per program of :func:`candidates_kernel`: one (reductions need no shared memory or
    barrier; the steps are latency-bound) while each thread holds at most 64 swap candidates."""
    slots, gpus = num_replicas // num_nodes, num_gpus // num_nodes
    candidates = _pow2(slots // gpus) ** 2 * _pow2(gpus)
    return 1 if slots <= 128 and candidates <= 2048 else 4


@functools.lru_cache(maxsize=64)
def _reciprocal(n: int, device: torch.device) -> torch.Tensor:
    """float32 ``1/k`` for ``k <= n`` from torch's correctly rounded division, once per device."""
    counts = torch.arange(n + 1, dtype=torch.float32, device=device)
    return torch.where(counts > 0, 1.0 / counts, torch.zeros_like(counts))


@functools.lru_cache(maxsize=64)
def _split_tables(num_groups: int, num_nodes: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """int32 ``sets [K, groups/node]`` (distinct node sets, in ``split_bounds``' order), ``which [A, nodes]``
    (each split's node sets) and ``table [A, groups]`` (each split, node by node), once per device.

    The first call on a device copies them from the host (a sync); later calls reuse them.
    """
    set_index: dict[tuple[int, ...], int] = {}
    splits = group_assignments(num_groups, num_nodes)
    which = [[set_index.setdefault(node, len(set_index)) for node in split] for split in splits]
    table = [[g for node in split for g in node] for split in splits]
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return as_tensor(list(set_index)), as_tensor(which), as_tensor(table)


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, num_warps: int = 1, **meta: Any) -> None:
    ensure_cache_dir()
    kernel[grid](*args, num_warps=num_warps, enable_fp_fusion=False, **meta)


def split_stage(
    weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, *, xp: Any = xp
) -> tuple[torch.Tensor, bool]:
    """``group_split`` of float32 ``weight [L, E]`` by :func:`split_bounds_kernel` and :func:`split_choice_kernel`."""
    num_layers, num_experts = weight.shape
    device = weight.device
    index = torch.arange(num_groups, dtype=torch.int64, device=device)
    if num_groups == num_nodes:
        return index.expand(num_layers, num_groups), False  # one group per node: group g on node g
    may_differ = count_assignments(num_groups, num_nodes) <= MAX_ASSIGNMENTS
    greedy = torch.empty((num_layers, num_groups), dtype=torch.int32, device=device)
    if may_differ:
        sets, which, table = _split_tables(num_groups, num_nodes, device)
        num_sets, num_splits = sets.shape[0], which.shape[0]
    else:
        sets = which = table = greedy  # unused
        num_sets = num_splits = 0
    slots, gpus = num_phy // num_nodes, num_gpus // num_nodes
    bounds = torch.empty((num_layers, num_nodes + num_sets), dtype=torch.float32, device=device)
    _launch(
        split_bounds_kernel,
        (num_layers, num_nodes + num_sets),
        weight,
        _reciprocal(max(slots, gpus) + 1, device),
        sets,
        bounds,
        greedy,
        E=num_experts,
        GROUPS=num_groups,
        NODES=num_nodes,
        S=slots,
        M=gpus,
        NSETS=num_sets,
        BOUNDS=may_differ,
        P_G=_pow2(num_groups),
        P_N=_pow2(num_nodes),
        P_GPN=_pow2(num_groups // num_nodes),
        P_EN=_pow2(num_experts // num_nodes),
    )
    if not may_differ:
        return greedy.to(torch.int64), False
    mgroup2group = torch.empty((num_layers, num_groups), dtype=torch.int64, device=device)
    _launch(
        split_choice_kernel,
        (num_layers,),
        bounds,
        which,
        table,
        greedy,
        mgroup2group,
        GROUPS=num_groups,
        NODES=num_nodes,
        NSETS=num_sets,
        NSPLITS=num_splits,
        P_A=_pow2(num_splits),
        P_N=_pow2(num_nodes),
        P_G=_pow2(num_groups),
    )
    return mgroup2group, True


def candidate_stage(
    weight: torch.Tensor,
    mlog2log: torch.Tensor,
    num_phy: int,
    num_nodes: int,
    num_gpus: int,
    num_iters: int,
    *,
    xp: Any = xp,
    num_warps: int | None = None,
    parallel: bool = True,
) -> tuple[torch.Tensor, ...]:
    """``node_candidates`` by :func:`candidates_kernel`, up to the choice (made by :func:`final_stage`).

    Returns ``phy2mlog``, ``phyrank`` ``[2, L*N, R/N]`` and ``mlogcnt [2, L*N, E/N]`` of
    each replication, ``pphy2phy [C, L*N, R/N]`` and ``node_max [C, L*N]`` of each of the
    ``C`` candidates (4, or 2 without the capped replication). ``parallel``: one program per
    (row, candidate); else one program per row, taking its candidates in turn.
    """
    num_layers, num_experts = weight.shape
    device = weight.device
    rows = num_layers * num_nodes
    slots, gpus, log_per_node = num_phy // num_nodes, num_gpus // num_nodes, num_experts // num_nodes
    num_cands = 4 if gpus > 1 and slots > log_per_node else 2
    per_program = 1 if parallel else num_cands
    programs = num_cands // per_program
    phy2mlog = torch.empty((2, rows, slots), dtype=torch.int64, device=device)
    phyrank = torch.empty((2, rows, slots), dtype=torch.int64, device=device)
    mlogcnt = torch.empty((2, rows, log_per_node), dtype=torch.int64, device=device)
    pphy2phy = torch.empty((num_cands, rows, slots), dtype=torch.int64, device=device)
    node_max = torch.empty((num_cands, rows), dtype=torch.float32, device=device)
    scratch = torch.empty((rows * programs * 2 * _pow2(slots),), dtype=torch.int32, device=device)
    if num_warps is None:
        num_warps = default_num_warps(num_phy, num_nodes, num_gpus)
    _launch(
        candidates_kernel,
        (rows, programs),
        weight,
        mlog2log.contiguous(),
        _reciprocal(slots + 1, device),
        scratch,
        phy2mlog,
        phyrank,
        mlogcnt,
        pphy2phy,
        node_max,
        num_warps=num_warps,
        E=num_experts,
        NODES=num_nodes,
        S=slots,
        M=gpus,
        ITERS=num_iters if gpus > 1 else 0,  # one GPU: every swap is rejected
        PER_PROGRAM=per_program,
        P_EN=_pow2(log_per_node),
        P_S=_pow2(slots),
        P_M=_pow2(gpus),
        P_K=_pow2(slots // gpus),
    )
    return phy2mlog, phyrank, mlogcnt, pphy2phy, node_max


def final_stage(
    weight: torch.Tensor,
    mlog2log: torch.Tensor,
    node_arrays: tuple[torch.Tensor, ...],
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    split_may_differ: bool,
    *,
    xp: Any = xp,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``keep_greedy_unless_beaten`` by :func:`final_kernel` (and the fused greedy kernel when
    the split may differ): ``phy2log, phyrank, logcnt``. ``node_arrays`` from :func:`candidate_stage`."""
    phy2mlog, phyrank, mlogcnt, pphy2phy, node_max = node_arrays
    num_layers, num_experts = weight.shape
    device = weight.device
    if split_may_differ:
        from eplb.backends._triton import rebalance_greedy_cuda

        greedy = rebalance_greedy_cuda(weight, num_phy, num_groups, num_nodes, num_gpus, True)
    else:
        greedy = (pphy2phy, pphy2phy, mlogcnt)  # unused
    out = (
        torch.empty((num_layers, num_phy), dtype=torch.int64, device=device),
        torch.empty((num_layers, num_phy), dtype=torch.int64, device=device),
        torch.empty((num_layers, num_experts), dtype=torch.int64, device=device),
    )
    _launch(
        final_kernel,
        (num_layers,),
        weight,
        _reciprocal(num_phy - num_experts + 1, device),
        mlog2log.contiguous(),
        phy2mlog,
        phyrank,
        mlogcnt,
        pphy2phy,
        node_max,
        *greedy,
        *out,
        num_warps=4,
        E=num_experts,
        R=num_phy,
        NODES=num_nodes,
        GPUS=num_gpus,
        C=pphy2phy.shape[0],
        GREEDY=split_may_differ,
        MAXCNT=num_phy - num_experts + 1,
        P_R=_pow2(num_phy),
        P_E=_pow2(num_experts),
        P_N=_pow2(num_nodes),
        P_G=_pow2(num_gpus),
    )
    return out


def rebalance_refined_cuda(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    hierarchical: bool,
    *,
    num_iters: int | None = None,
    num_warps: int | None = None,
    parallel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refined placement of ``weight [L, E]`` (any real dtype) on its device: int64 ``phy2log, log2phy, logcnt``.

    :func:`eplb.algorithms.refined.rebalance_refined` with its three stages
    replaced by the kernels of this module (and, with two slots per GPU, the
    pair stage's search by :mod:`eplb.kernels.pairs_triton`); same placement.
    """
    if weight.device.type == "cuda" and weight.device.index != torch.cuda.current_device():
        # Triton launches on the current device: make the tensor's device current.
        with torch.cuda.device(weight.device):
            return rebalance_refined_cuda(
                weight,
                num_replicas,
                num_groups,
                num_nodes,
                num_gpus,
                hierarchical,
                num_iters=num_iters,
                num_warps=num_warps,
                parallel=parallel,
            )
    sizes = (num_groups, num_nodes) if hierarchical else (1, 1)
    if not kernel_fits(weight.shape[1], num_replicas, *sizes, num_gpus):
        raise ValueError(
            f"the refined-policy kernels take at most {MAX_SLOTS_PER_NODE} slots per node and "
            f"{MAX_SWAP_CANDIDATES} swap candidates per round; use impl='torch'"
        )
    weight32 = weight.detach().to(torch.float32).contiguous()
    candidates = functools.partial(candidate_stage, num_warps=num_warps, parallel=parallel)
    # Two slots per GPU: the pair stage's count search as one launch (eplb.kernels.pairs_triton) where it fits.
    log_per_node, slots = weight.shape[1] // sizes[1], num_replicas // sizes[1]
    searched = {"pair_counts_fn": pairs_triton.pair_counts} if pairs_triton.fits(log_per_node, slots) else {}
    phy2log, phyrank, logcnt = rebalance_refined(
        weight32,
        num_replicas,
        num_groups,
        num_nodes,
        num_gpus,
        hierarchical=hierarchical,
        xp=xp,
        num_iters=num_iters,
        split_stage=split_stage,
        candidate_stage=candidates,
        final_stage=final_stage,
        **searched,
    )
    return phy2log, build_log2phy(phy2log, phyrank, weight.shape[1], xp=xp), logcnt
