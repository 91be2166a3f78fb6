"""Equals :mod:`eplb.kernels.repair_numba` bit for bit: the knobs of ``previous=`` on CUDA (Triton).

:func:`sticky_pack`, :func:`repair`, :func:`align_slots` and :func:`replica_counts` equal the numba kernels
of the same names, and so :func:`eplb.algorithms.repair.sticky_pack`, :func:`eplb.algorithms.repair.repair`,
:func:`eplb.algorithms.relabel.align_slots` and :func:`eplb.algorithms.relabel.replica_counts` (same
arguments as :func:`eplb.algorithms.stability.stabilize` passes them; ``xp`` is accepted and not used).

Proved by ``tests/test_kernels_repair_triton.py``: Triton's CPU interpreter against the numba kernels and
the array-API functions on random small inputs (hierarchical and global, one expert per group, one slot per
GPU, all-zero and tied loads, invalid rows, budgets around the start's moves, short ``max_iters``) and on
the arguments ``stabilize`` passes them for small configs; an sm_90 compile whose PTX has no fused
multiply-add; on CUDA, ``previous=`` with ``balance_tolerance`` and ``max_moves`` on torch CUDA tensors
against numpy on the DeepSeek-V3 loads (288 slots on 32 GPUs in 4 nodes, and on 144 GPUs), without a
host sync.

With failed GPUs (``active_gpus=`` with ``previous=``, :func:`eplb.algorithms.elastic.stabilize_elastic`): the
same kernels take the ``-1`` slots of failed GPUs (they weigh nothing, are never a swap partner or a donor, and a
failed GPU is never the heavy one), and :func:`sticky_pack` takes ``initial_load`` (closed packs) and
``reserve``, as the array-API functions do; proved by ``tests/test_kernels_elastic_triton.py`` (the interpreter
on random and degenerate inputs and ``place_elastic_stable`` end to end; an sm_90 compile; on CUDA, the
DeepSeek-V3 arguments and the torch CUDA call without a host sync).

One program per row (grid ``[B]``), in the steps of :mod:`eplb.kernels.repair_numba` with the same
float32 arithmetic and tie rules, vectorised over a row's candidates instead of scalar loops:

- replica loads ``w * fl(1/c)`` (the table of :func:`eplb._xp.reciprocal_table`), GPU loads summed left
  to right from the first slot; every ``+``, ``-``, ``*`` has two float32 operands, and the launchers
  compile with ``enable_fp_fusion=False`` (no multiply-add contracted into an FMA); no division decides
  anything;
- :func:`repair`: a ``while`` loop of steps, each evaluating every candidate of the heaviest GPU ``a``
  at once: the swaps as one ``[slots of a, slots of a's node]`` tile, the ``3 * slots`` single-slot
  changes (replicate out, replace in with the coldest, with the hottest expert) as one ``[candidates,
  GPUs]`` tile that re-sums every GPU left to right (a GPU the change does not touch sums the same
  values, so to ``loads[g]`` bit for bit: the new heaviest GPU is the numba kernel's). The best is the
  lexicographic minimum (``max(peak, limit)``, moves, changed load, index) of the allowed candidates, by
  four reductions, which is the numba kernel's running minimum with strict comparisons (first wins
  ties); swaps come before single-slot changes. A row stops at the first step without a change or after
  ``max_iters`` steps, on the device (no host sync). The state (``phy2log``, counts) lives in the output
  buffers, the per-step tables (replica loads, slot loads, GPU loads, groups present on the node) in a
  scratch buffer, written and read back across ``tl.debug_barrier()``;
- :func:`sticky_pack`: the items ranked by decreasing load (ties by index) by counting, each item's old
  pack from occurrence-numbered keys, then one sequential step per item over ``[packs]`` registers
  (lightest open pack: first minimum; loads saturating at float32 max);
- :func:`align_slots`: the last step of :mod:`eplb.kernels.relabel_triton` (kept copies to their old
  slots, the others to the free ones in order); :func:`replica_counts`: counts by comparison tiles.

Shapes beyond :func:`fits` go to the array-API path. On an H200 (Triton 3.6, torch 2.11; the 58 MoE layers
of the DeepSeek-V3 loads, ``previous`` another file's placement; ``balance_tolerance=0.005``): repair 0.48 ms
(116 rows) at 288 slots on 32 GPUs in 4 nodes and 0.50-0.59 ms on 144 GPUs, sticky_pack 0.09 / 0.28 ms,
align_slots 0.05 ms, replica_counts 0.06 ms; the whole torch CUDA ``previous=`` call with
``balance_tolerance=0.005`` or ``max_moves=16`` 3.1 ms at 32 GPUs and 2.6-3.4 ms at 144 (medians of 20 warm
calls; 4.2-5.5 ms in ``benchmarks/keep_speed.py``'s run, the rest being host launches of stabilize's torch
ops), from 585-1349 ms with torch ops.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from eplb import _xp
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.refine import IMPROVEMENT
from eplb.kernels.greedy_triton import ensure_cache_dir
from eplb.kernels.relabel_triton import _align, _keys, _on_device

__all__ = ["align_slots", "fits", "repair", "replica_counts", "sticky_pack"]

_BIG = tl.constexpr(2**30)
_IMPROVEMENT = tl.constexpr(IMPROVEMENT)  # 1 - 2**-16, exact in float32
_MAX_LOAD = tl.constexpr(MAX_LOAD)

MAX_SLOTS = 4096
_REPAIR_WARPS = 4
# On an H200, DeepSeek-V3 loads: sticky_pack 0.088 ms at 232 rows of 72 slots in 8 packs, 0.31 ms at 58 rows of
# 288 slots in 144 packs (one warp: 0.12 / 0.44 ms, two: 0.13 / 0.43); repair 0.49 / 0.50 ms (two: 0.68 / 0.45,
# eight: 0.48 / 0.40), equal results with each.
_STICKY_WARPS = 4
MAX_TILE = 16384  # elements of a register tile (the swaps', the single-slot changes', the experts')


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def fits(num_phy: int, num_log: int, num_gpus: int, num_nodes: int) -> bool:
    """Whether the kernels take ``stabilize``'s arrays at these sizes (else the array-API path runs)."""
    if not (num_gpus > 0 and num_nodes > 0 and num_phy % num_gpus == 0 and num_gpus % num_nodes == 0):
        return False
    if not (0 < num_log <= MAX_SLOTS and 0 < num_phy <= MAX_SLOTS):
        return False
    per_gpu, per_node = num_phy // num_gpus, num_phy // num_nodes
    tiles = (_pow2(per_gpu) * _pow2(per_node), _pow2(3 * per_gpu) * _pow2(num_gpus), _pow2(num_log))
    return per_gpu <= 64 and max(tiles) <= MAX_TILE


# ---------------------------------------------------------------- repair


@triton.jit
def _lexmin(ok, key, moves, second, idx):
    """Among ``ok``: least ``key``, then ``moves``, then ``second``, then ``idx`` (1-D tensors)."""
    k = tl.where(ok, key, float("inf"))
    kmin = tl.min(k, axis=0)
    sel = ok & (k == kmin)
    m = tl.where(sel, moves, _BIG)
    mmin = tl.min(m, axis=0)
    sel = sel & (m == mmin)
    s = tl.where(sel, second, float("inf"))
    smin = tl.min(s, axis=0)
    sel = sel & (s == smin)
    imin = tl.min(tl.where(sel, idx, _BIG), axis=0)
    has = tl.max(ok.to(tl.int32), axis=0) > 0
    return has, kmin, mmin, smin, imin


@triton.jit
def _one_value(cur, slot_load, g, g_ok, k, sl, xx, gone, diff, l_in, l_gone, K: tl.constexpr):
    """``[C, G]``: the load of slot ``k`` of every GPU after each change ``cur[sl] = xx``."""
    ts = g * K + k
    ek = tl.load(cur + ts, mask=g_ok, other=-1).to(tl.int32)
    sv = tl.load(slot_load + ts, mask=g_ok, other=0.0)
    ev = tl.where(ts[None, :] == sl[:, None], xx[:, None], ek[None, :])
    gone_val = tl.where(diff[:, None] & (ev == gone[:, None]), l_gone[:, None], sv[None, :])
    return tl.where(diff[:, None] & (ev == xx[:, None]), l_in[:, None], gone_val)


@triton.jit
def repair_kernel(
    cur_ptr,
    cnt_ptr,
    old_ptr,
    w_ptr,
    limit_ptr,
    budget_ptr,
    valid_ptr,
    recip_ptr,
    moved_ptr,
    fs_ptr,
    is_ptr,
    max_iters,
    R: tl.constexpr,
    E: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    GN: tl.constexpr,
    PNODE: tl.constexpr,
    GS: tl.constexpr,
    NG: tl.constexpr,
    BS: tl.constexpr,
    P_E: tl.constexpr,
    P_G: tl.constexpr,
    P_K: tl.constexpr,
    P_N: tl.constexpr,
    P_C: tl.constexpr,
):
    """``cur [B, R]`` and ``cnt [B, E]`` (int64, holding the start) repaired in place; ``moved [B]``."""
    row = tl.program_id(0).to(tl.int64)
    cur = cur_ptr + row * R
    cnt = cnt_ptr + row * E
    old = old_ptr + row * R
    w = w_ptr + row * E
    prl = fs_ptr + row * (2 * E + R + G)  # replica loads, with one more replica, slot loads, GPU loads
    ext = prl + E
    slot = ext + E
    ldb = slot + R
    here = is_ptr + row * (NG + 9 * K)  # step at which each group was last seen on a's node
    cs = here + NG  # the single-slot changes: slot, expert, allowed
    cx = cs + 3 * K
    cok = cx + 3 * K
    lim = tl.load(limit_ptr + row)
    cap = tl.load(budget_ptr + row).to(tl.int32)
    valid = tl.load(valid_ptr + row) != 0
    inf = float("inf")

    s = tl.arange(0, BS)
    for first in range(0, NG, BS):
        tl.store(here + first + s, tl.full([BS], -1, tl.int32), mask=first + s < NG)
    kept = tl.zeros([BS], tl.int32)
    for first in range(0, R, BS):  # count_moves: copies of new beyond the old ones, per GPU
        t = first + s
        ok = t < R
        q = t % K
        lo = t - q
        x = tl.load(cur + t, mask=ok, other=-1)
        earlier = tl.zeros([BS], tl.int32)
        have = tl.zeros([BS], tl.int32)
        for d in range(K):
            y = tl.load(cur + lo + d, mask=ok, other=-2)
            z = tl.load(old + lo + d, mask=ok, other=-2)
            earlier += ((d < q) & (y == x)).to(tl.int32)
            have += (z == x).to(tl.int32)
        kept += (ok & (have > earlier)).to(tl.int32)
    moved = R - tl.sum(kept, axis=0)
    tl.debug_barrier()

    e = tl.arange(0, P_E)
    e_ok = e < E
    g = tl.arange(0, P_G)
    g_ok = g < G
    i = tl.arange(0, P_K)
    i_ok = i < K
    u = tl.arange(0, P_N)
    u_ok = u < PNODE
    c = tl.arange(0, P_C)
    c_ok = c < 3 * K
    it = 0
    going = valid & (max_iters > 0)
    while going:
        # Replica loads, slot loads, GPU loads (left to right), the heaviest GPU (first on ties).
        ce = tl.load(cnt + e, mask=e_ok, other=0).to(tl.int32)
        we = tl.load(w + e, mask=e_ok, other=0.0)
        pr = we * tl.load(recip_ptr + ce, mask=e_ok, other=0.0)
        ex = we * tl.load(recip_ptr + ce + 1, mask=e_ok, other=0.0)
        tl.store(prl + e, pr, mask=e_ok)
        tl.store(ext + e, ex, mask=e_ok)
        tl.debug_barrier()
        for first in range(0, R, BS):
            ts = first + s
            ts_ok = ts < R
            xs = tl.load(cur + ts, mask=ts_ok, other=0)
            # an empty slot (-1, a failed GPU's) weighs nothing
            tl.store(slot + ts, tl.load(prl + xs, mask=ts_ok & (xs >= 0), other=0.0), mask=ts_ok)
        tl.debug_barrier()
        total = tl.load(slot + g * K, mask=g_ok, other=0.0)
        for k in range(1, K):
            total = total + tl.load(slot + g * K + k, mask=g_ok, other=0.0)
        tl.store(ldb + g, total, mask=g_ok)
        loads = tl.where(g_ok, total, -inf)
        # The heavy GPU among the live ones (a failed GPU's slots are all -1; it weighs 0 elsewhere).
        pick = tl.where(tl.load(cur + g * K, mask=g_ok, other=-1) >= 0, loads, -inf)
        heavy_load = tl.max(pick, axis=0)
        heavy = tl.min(tl.where(pick == heavy_load, g, _BIG), axis=0)
        act = heavy_load > lim  # (no live GPU: -inf, nothing to do)
        threshold = heavy_load * _IMPROVEMENT
        a0 = heavy * K
        node = heavy // GN
        n0 = node * PNODE
        tl.debug_barrier()

        # The heavy GPU's slots and the node's slots, their copies now and in old.
        oe = tl.load(cur + a0 + i, mask=i_ok, other=-1).to(tl.int32)
        ox = tl.load(slot + a0 + i, mask=i_ok, other=0.0)
        oa = tl.load(old + a0 + i, mask=i_ok, other=-1).to(tl.int32)
        now_a_e = tl.sum(((oe[:, None] == oe[None, :]) & i_ok[None, :]).to(tl.int32), axis=1)
        was_a_e = tl.sum(((oe[:, None] == oa[None, :]) & i_ok[None, :]).to(tl.int32), axis=1)
        moves_i = tl.where(now_a_e > was_a_e, -1, 0)
        tn = n0 + u
        ct = tl.load(cur + tn, mask=u_ok, other=-1).to(tl.int32)
        gt = tn // K
        yn = tl.load(slot + tn, mask=u_ok, other=0.0)
        room = tl.load(ldb + gt, mask=u_ok, other=0.0) - yn
        now_a_f = tl.sum(((ct[:, None] == oe[None, :]) & i_ok[None, :]).to(tl.int32), axis=1)
        was_a_f = tl.sum(((ct[:, None] == oa[None, :]) & i_ok[None, :]).to(tl.int32), axis=1)
        now_b_f = tl.zeros([P_N], tl.int32)
        was_b_f = tl.zeros([P_N], tl.int32)
        now_b_e = tl.zeros([P_K, P_N], tl.int32)
        was_b_e = tl.zeros([P_K, P_N], tl.int32)
        for d in range(K):
            cd = tl.load(cur + gt * K + d, mask=u_ok, other=-1).to(tl.int32)
            od = tl.load(old + gt * K + d, mask=u_ok, other=-1).to(tl.int32)
            now_b_f += (cd == ct).to(tl.int32)
            was_b_f += (od == ct).to(tl.int32)
            now_b_e += (cd[None, :] == oe[:, None]).to(tl.int32)
            was_b_e += (od[None, :] == oe[:, None]).to(tl.int32)
        swap_moves = (now_a_f >= was_a_f).to(tl.int32) - (now_b_f > was_b_f).to(tl.int32)

        # Swaps: slot i of a <-> slot t of another GPU of its node.
        others = tl.where(g_ok & (g != heavy), loads, -inf)
        top_load = tl.max(others, axis=0)
        top = tl.min(tl.where(others == top_load, g, _BIG), axis=0)
        second = tl.max(tl.where(g_ok & (g != heavy) & (g != top), loads, -inf), axis=0)
        rest = tl.where(gt == top, second, top_load)
        floor = tl.where(rest >= lim, rest, lim)
        less_a = heavy_load - ox
        new_a = less_a[:, None] + yn[None, :]
        new_b = room[None, :] + ox[:, None]
        changed = tl.where(new_a >= new_b, new_a, new_b)
        smv = moves_i[:, None] + swap_moves[None, :] + (now_b_e >= was_b_e).to(tl.int32)
        sok = (i_ok[:, None] & (u_ok & (gt != heavy) & (ct >= 0))[None, :]) & (ct[None, :] != oe[:, None])
        sok = sok & (changed < threshold) & (moved + smv <= cap)
        skey = tl.where(changed >= floor[None, :], changed, floor[None, :])
        sidx = i[:, None] * P_N + u[None, :]
        s_has, s_key, s_mv, s_sec, s_idx = _lexmin(
            tl.reshape(sok, [P_K * P_N]),
            tl.reshape(skey, [P_K * P_N]),
            tl.reshape(smv, [P_K * P_N]),
            tl.reshape(changed, [P_K * P_N]),
            tl.reshape(sidx, [P_K * P_N]),
        )

        # Replicate out: expert i of a takes the donor slot that its change leaves lightest (first on ties).
        cnt_t = tl.load(cnt + ct, mask=u_ok & (ct >= 0), other=0)  # an empty slot gives nothing
        dok = ((u_ok & (cnt_t >= 2))[None, :] & (ct[None, :] != oe[:, None])) & i_ok[:, None]
        # (oe is -1 only where no GPU is live: a is then a failed GPU and nothing is applied; never read there)
        grown = tl.load(ext + oe, mask=i_ok & (oe >= 0), other=0.0)
        vv = tl.where(dok, room[None, :] + grown[:, None], inf)
        vmin = tl.min(vv, axis=1)
        tu = tl.min(tl.where(dok & (vv == vmin[:, None]), u[None, :], _BIG), axis=1)
        target = tl.where(vmin < inf, n0 + tu, 0)
        has_donor = tl.max(dok.to(tl.int32), axis=1) > 0

        # Replace in: the coldest and the hottest expert (other than a's) of the groups on the node.
        tl.store(here + ct // GS, tl.zeros([P_N], tl.int32) + it, mask=u_ok & (ct >= 0))
        tl.debug_barrier()
        allowed = e_ok & (tl.load(here + e // GS, mask=e_ok, other=-1) == it)
        cv = tl.where(allowed, ex, inf)
        c1 = tl.min(tl.where(allowed & (cv == tl.min(cv, axis=0)), e, _BIG), axis=0)
        cv2 = tl.where(allowed & (e != c1), ex, inf)
        c2 = tl.min(tl.where(allowed & (e != c1) & (cv2 == tl.min(cv2, axis=0)), e, _BIG), axis=0)
        hv = tl.where(allowed, pr, -inf)
        h1 = tl.min(tl.where(allowed & (hv == tl.max(hv, axis=0)), e, _BIG), axis=0)
        hv2 = tl.where(allowed & (e != h1), pr, -inf)
        h2 = tl.min(tl.where(allowed & (e != h1) & (hv2 == tl.max(hv2, axis=0)), e, _BIG), axis=0)
        cold = tl.where(c1 != oe, c1, c2)
        hot = tl.where(h1 != oe, h1, h2)
        spare = i_ok & (tl.load(cnt + oe, mask=i_ok & (oe >= 0), other=0) >= 2)
        tl.store(cs + i, target, mask=i_ok)
        tl.store(cx + i, oe, mask=i_ok)
        tl.store(cok + i, has_donor.to(tl.int32), mask=i_ok)
        tl.store(cs + K + i, a0 + i, mask=i_ok)
        tl.store(cx + K + i, tl.where(cold < _BIG, cold, 0), mask=i_ok)
        tl.store(cok + K + i, (spare & (cold < _BIG)).to(tl.int32), mask=i_ok)
        tl.store(cs + 2 * K + i, a0 + i, mask=i_ok)
        tl.store(cx + 2 * K + i, tl.where(hot < _BIG, hot, 0), mask=i_ok)
        tl.store(cok + 2 * K + i, (spare & (hot < _BIG)).to(tl.int32), mask=i_ok)
        tl.debug_barrier()

        # The single-slot changes cur[sl] = xx: every GPU summed again, left to right.
        sl = tl.load(cs + c, mask=c_ok, other=0)
        xx = tl.load(cx + c, mask=c_ok, other=0)
        cex = c_ok & (tl.load(cok + c, mask=c_ok, other=0) != 0)
        gone = tl.load(cur + sl, mask=c_ok, other=0).to(tl.int32)
        diff = xx != gone
        l_in = tl.load(ext + xx, mask=c_ok & (xx >= 0), other=0.0)
        g_in = c_ok & (gone >= 0)  # (a candidate without a donor points at slot 0, perhaps a failed GPU's)
        cg = tl.load(cnt + gone, mask=g_in, other=1).to(tl.int32)
        l_gone = tl.load(w + gone, mask=g_in, other=0.0) * tl.load(recip_ptr + cg - 1, mask=g_in, other=0.0)
        acc = _one_value(cur, slot, g, g_ok, 0, sl, xx, gone, diff, l_in, l_gone, K)
        for k in range(1, K):
            acc = acc + _one_value(cur, slot, g, g_ok, k, sl, xx, gone, diff, l_in, l_gone, K)
        peak = tl.max(tl.where(g_ok[None, :], acc, -inf), axis=1)
        lo_c = (sl // K) * K
        now_x = tl.zeros([P_C], tl.int32)
        was_x = tl.zeros([P_C], tl.int32)
        now_g = tl.zeros([P_C], tl.int32)
        was_g = tl.zeros([P_C], tl.int32)
        for d in range(K):
            cc = tl.load(cur + lo_c + d, mask=c_ok, other=-1).to(tl.int32)
            oc = tl.load(old + lo_c + d, mask=c_ok, other=-1).to(tl.int32)
            now_x += (cc == xx).to(tl.int32)
            was_x += (oc == xx).to(tl.int32)
            now_g += (cc == gone).to(tl.int32)
            was_g += (oc == gone).to(tl.int32)
        omv = (now_x >= was_x).to(tl.int32) - (now_g > was_g).to(tl.int32)
        ook = cex & (peak < threshold) & (moved + omv <= cap)
        okey = tl.where(peak >= lim, peak, lim)
        o_has, o_key, o_mv, o_sec, o_idx = _lexmin(ook, okey, omv, peak, c)

        # The best change (swaps first: a single-slot change must be strictly better), applied.
        o_wins = (o_key < s_key) | ((o_key == s_key) & ((o_mv < s_mv) | ((o_mv == s_mv) & (o_sec < s_sec))))
        o_wins = o_has & (o_wins | (s_has.to(tl.int32) == 0))
        apply = act & (s_has | o_has)
        do_swap = apply & (o_wins.to(tl.int32) == 0)
        do_one = apply & o_wins
        give = a0 + tl.where(do_swap, s_idx // P_N, 0)
        take = n0 + tl.where(do_swap, s_idx % P_N, 0)
        at_give = tl.load(cur + give, mask=do_swap, other=0)
        at_take = tl.load(cur + take, mask=do_swap, other=0)
        one = tl.where(do_one, o_idx, 0)
        o_slot = tl.load(cs + one, mask=do_one, other=0)
        o_x = tl.load(cx + one, mask=do_one, other=0)
        o_gone = tl.load(cur + o_slot, mask=do_one, other=0)
        same = (o_gone == o_x).to(tl.int64)
        cnt_x = tl.load(cnt + o_x, mask=do_one, other=0)
        cnt_g = tl.load(cnt + o_gone, mask=do_one, other=0)
        tl.debug_barrier()
        tl.store(cur + give, at_take, mask=do_swap)
        tl.store(cur + take, at_give, mask=do_swap)
        tl.store(cur + o_slot, o_x.to(tl.int64), mask=do_one)
        tl.store(cnt + o_x, cnt_x + 1 - same, mask=do_one)
        tl.store(cnt + o_gone, cnt_g - 1 + same, mask=do_one)
        moved += tl.where(apply, tl.where(o_wins, o_mv, s_mv), 0)
        it += 1
        going = apply & (it < max_iters)
        tl.debug_barrier()
    tl.store(moved_ptr + row, moved.to(tl.int64))


def _meta_repair(num_phy: int, num_log: int, num_gpus: int, num_nodes: int, group_size: int) -> dict[str, int]:
    per_gpu, per_node = num_phy // num_gpus, num_phy // num_nodes
    return {
        "R": num_phy,
        "E": num_log,
        "G": num_gpus,
        "K": per_gpu,
        "GN": num_gpus // num_nodes,
        "PNODE": per_node,
        "GS": group_size,
        "NG": num_log // group_size,
        "BS": min(_pow2(num_phy), 1024),
        "P_E": _pow2(num_log),
        "P_G": _pow2(num_gpus),
        "P_K": _pow2(per_gpu),
        "P_N": _pow2(per_node),
        "P_C": _pow2(3 * per_gpu),
    }


def _recip(num_phy: int, device: torch.device) -> torch.Tensor:
    return _xp.reciprocal_table(num_phy + 1, xp=torch, device=device).to(torch.float32).contiguous()


def repair(
    start: torch.Tensor,
    start_cnt: torch.Tensor,
    old: torch.Tensor,
    weight: torch.Tensor,
    limit: torch.Tensor,
    budget: torch.Tensor,
    valid: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    group_size: int,
    max_iters: int,
    *,
    xp: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`eplb.algorithms.repair.repair` (same arguments; ``xp`` is not used): one launch.

    ``start``, ``old`` ``[B, R]`` and ``start_cnt [B, E]`` integer; ``weight [B, E]`` and ``limit [B, 1]``
    float32; ``budget [B, 1]`` integer; ``valid [B, 1]`` bool. Returns ``phy2log [B, R]`` (``start``'s
    dtype), replica counts ``[B, E]`` (``start_cnt``'s) and moves ``[B, 1]`` (int64). Expert ids must lie
    in ``[0, E)`` (not checked: that would read values on the host).
    """
    batch, num_phy = start.shape
    num_log = weight.shape[1]
    device = start.device
    if not fits(num_phy, num_log, num_gpus, num_nodes):
        raise ValueError(f"the repair kernel does not take {num_phy} slots, {num_log} experts, {num_gpus} GPUs")
    cur = start.to(torch.int64).clone().contiguous()
    cnt = start_cnt.to(device=device, dtype=torch.int64).clone().contiguous()
    moved = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return cur.to(start.dtype), cnt.to(start_cnt.dtype), moved[:, None]
    meta = _meta_repair(num_phy, num_log, num_gpus, num_nodes, group_size)
    fs = torch.empty(batch * (2 * num_log + num_phy + num_gpus), dtype=torch.float32, device=device)
    ints = torch.empty(batch * (meta["NG"] + 9 * meta["K"]), dtype=torch.int32, device=device)
    args = (
        cur,
        cnt,
        old.to(device=device, dtype=torch.int64).contiguous(),
        weight.to(device=device, dtype=torch.float32).contiguous(),
        limit.to(device=device, dtype=torch.float32).reshape(batch).contiguous(),
        budget.to(device=device, dtype=torch.int64).reshape(batch).contiguous(),
        valid.to(device=device, dtype=torch.int32).reshape(batch).contiguous(),
        _recip(num_phy, device),
        moved,
        fs,
        ints,
        int(max_iters),
    )
    ensure_cache_dir()
    with _on_device(device):
        repair_kernel[(batch,)](*args, num_warps=_REPAIR_WARPS, enable_fp_fusion=False, **meta)
    return cur.to(start.dtype), cnt.to(start_cnt.dtype), moved[:, None]


# ---------------------------------------------------------------- sticky_pack


@triton.jit
def sticky_kernel(
    base_ptr,
    old_ptr,
    load_ptr,
    limit_ptr,
    init_ptr,
    out_ptr,
    is_ptr,
    fs_ptr,
    N: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BS: tl.constexpr,
    BT: tl.constexpr,
    P_M: tl.constexpr,
    ELASTIC: tl.constexpr,
    RESERVE: tl.constexpr,
):
    """``out [B, N]``: ``base``'s items packed into ``M`` packs of ``C`` slots near ``old`` (all int64).

    ``ELASTIC``: ``init [B, M]`` holds the packs' starting loads (``+inf``: a closed pack, a failed GPU), an
    item ``-1`` (an empty slot) has no old pack, and once no open pack is left the item goes to the first
    pack with room. ``RESERVE``: an item stays home only with room kept there for the items to come."""
    row = tl.program_id(0).to(tl.int64)
    base = base_ptr + row * N
    old = old_ptr + row * N
    item_load = load_ptr + row * N
    out = out_ptr + row * N
    occ_new = is_ptr + row * (4 * N)  # copies of the same expert in the earlier slots
    occ_old = occ_new + N
    by_exp = occ_old + N  # by rank (decreasing load, ties by index): the expert, its old pack
    by_aff = by_exp + N
    by_load = fs_ptr + row * N
    s = tl.arange(0, BS)
    r = tl.arange(0, BT)
    for first in range(0, N, BS):
        t = first + s
        ok = t < N
        xb = tl.load(base + t, mask=ok, other=-1)
        xo = tl.load(old + t, mask=ok, other=-1)
        nb = tl.zeros([BS], tl.int32)
        no = tl.zeros([BS], tl.int32)
        for lo in range(0, first + BS, BT):
            q = lo + r
            earlier = (q[None, :] < t[:, None]) & (q < N)[None, :]
            yb = tl.load(base + q, mask=q < N, other=-2)
            yo = tl.load(old + q, mask=q < N, other=-2)
            nb += tl.sum((earlier & (yb[None, :] == xb[:, None])).to(tl.int32), axis=1)
            no += tl.sum((earlier & (yo[None, :] == xo[:, None])).to(tl.int32), axis=1)
        tl.store(occ_new + t, nb, mask=ok)
        tl.store(occ_old + t, no, mask=ok)
    tl.debug_barrier()
    for first in range(0, N, BS):
        t = first + s
        ok = t < N
        xb = tl.load(base + t, mask=ok, other=-1)
        kb = tl.load(occ_new + t, mask=ok, other=-1)
        x = tl.load(item_load + t, mask=ok, other=0.0)
        home = tl.full([BS], _BIG, tl.int32)
        rank = tl.zeros([BS], tl.int32)
        for lo in range(0, N, BT):
            q = lo + r
            q_ok = q < N
            yo = tl.load(old + q, mask=q_ok, other=-2)
            ko = tl.load(occ_old + q, mask=q_ok, other=-2)
            yq = tl.load(item_load + q, mask=q_ok, other=0.0)
            same = q_ok[None, :] & (yo[None, :] == xb[:, None]) & (ko[None, :] == kb[:, None])
            home = tl.minimum(home, tl.min(tl.where(same, q[None, :], _BIG), axis=1))
            ahead = (yq[None, :] > x[:, None]) | ((yq[None, :] == x[:, None]) & (q[None, :] < t[:, None]))
            rank += tl.sum((q_ok[None, :] & ahead).to(tl.int32), axis=1)
        if ELASTIC:  # an empty slot is no expert: no old pack
            home = tl.where(xb >= 0, home, _BIG)
        tl.store(by_exp + rank, xb.to(tl.int32), mask=ok)
        tl.store(by_aff + rank, tl.where(home < _BIG, home // C, -1), mask=ok)
        tl.store(by_load + rank, x, mask=ok)
    tl.debug_barrier()
    m = tl.arange(0, P_M)
    inf = float("inf")
    if ELASTIC:
        init = tl.load(init_ptr + row * M + m, mask=m < M, other=inf)
        closed = (m < M) & (init == inf)
        open_load = tl.where((m < M) & (init != inf), 0.0 + init, inf)
    else:
        closed = m < 0
        open_load = tl.where(m < M, 0.0, inf)  # +inf once a pack is full
    count = tl.zeros([P_M], tl.int32)
    lim = tl.load(limit_ptr + row)
    rem = 0.0  # RESERVE: the loads >= 0 still to come (a left-to-right sum less each visited one), and how many
    left = 0.0
    if RESERVE:
        rem = tl.maximum(tl.load(item_load), 0.0)
        left = (tl.load(item_load) >= 0).to(tl.float32)
        for t in range(1, N):
            x = tl.load(item_load + t)
            rem = rem + tl.maximum(x, 0.0)
            left = left + (x >= 0).to(tl.float32)
    for step in range(N):
        expert = tl.load(by_exp + step)
        x = tl.load(by_load + step)
        home = tl.load(by_aff + step)
        at_home = m == home
        home_load = tl.max(tl.where(at_home, open_load, -inf), axis=0)
        home_count = tl.max(tl.where(at_home, count, -1), axis=0)
        if RESERVE:
            rem = rem - tl.maximum(x, 0.0)
            left = left - (x >= 0).to(tl.float32)
            free = ((C - 1) - home_count).to(tl.float32)  # the home's free slots after this item
            open_home = home_load < inf
            over = (tl.where(open_home, home_load, 0.0) + x - lim) * left
            stay = (home >= 0) & open_home & (over <= -(free * rem))
        else:
            stay = (home >= 0) & (home_load + x <= lim) & (home_count < C)
        least = tl.min(open_load, axis=0)
        lightest = tl.min(tl.where(open_load == least, m, _BIG), axis=0)
        if ELASTIC:  # every open pack full: the first pack with room (a closed one)
            room = tl.min(tl.where((m < M) & (count < C), m, _BIG), axis=0)
            lightest = tl.where(least < inf, lightest, room)
        pack = tl.where(stay, home, lightest)
        chosen = m == pack
        rank = tl.max(tl.where(chosen, count, -1), axis=0)
        count = tl.where(chosen, count + 1, count)
        total = open_load + x
        grown = tl.where((count == C) | closed, inf, tl.where(total <= _MAX_LOAD, total, _MAX_LOAD))
        open_load = tl.where(chosen, grown, open_load)
        tl.store(out + pack * C + rank, expert.to(tl.int64))


def sticky_pack(
    base: torch.Tensor,
    old: torch.Tensor,
    item_load: torch.Tensor,
    limit: torch.Tensor,
    num_packs: int,
    *,
    initial_load: torch.Tensor | None = None,
    reserve: bool = False,
    xp: Any = None,
) -> torch.Tensor:
    """:func:`eplb.algorithms.repair.sticky_pack` (same arguments and options; ``xp`` is not used): one launch.

    ``base``, ``old`` ``[B, n]`` integer ids, ``>= 0`` but for the ``-1`` (empty) slots that go with
    ``initial_load [B or 1, m]`` (float32, ``+inf`` for a pack that takes no item while another is open: a
    failed GPU); ``item_load [B, n]`` and ``limit [B, 1]`` float32. Returns ``[B, n]`` in ``base``'s dtype.
    """
    batch, n = base.shape
    device = base.device
    out = torch.empty((batch, n), dtype=torch.int64, device=device)
    if batch == 0 or n == 0:
        return out.to(base.dtype)
    ints = torch.empty(batch * 4 * n, dtype=torch.int32, device=device)
    floats = torch.empty(batch * n, dtype=torch.float32, device=device)
    limit32 = limit.to(device=device, dtype=torch.float32).reshape(batch).contiguous()
    if initial_load is None:
        init = limit32  # not read
    else:
        init = torch.broadcast_to(initial_load.to(device=device, dtype=torch.float32), (batch, num_packs))
        init = init.contiguous()
    meta = {"N": n, "M": num_packs, "C": n // num_packs, "BS": min(_pow2(n), 64), "BT": 64, "P_M": _pow2(num_packs)}
    meta |= {"ELASTIC": initial_load is not None, "RESERVE": bool(reserve)}
    ensure_cache_dir()
    with _on_device(device):
        sticky_kernel[(batch,)](
            base.to(torch.int64).contiguous(),
            old.to(device=device, dtype=torch.int64).contiguous(),
            item_load.to(device=device, dtype=torch.float32).contiguous(),
            limit32,
            init,
            out,
            ints,
            floats,
            num_warps=_STICKY_WARPS,
            enable_fp_fusion=False,
            **meta,
        )
    return out if base.dtype == torch.int64 else out.to(base.dtype)


# ---------------------------------------------------------------- align_slots, replica_counts


@triton.jit
def align_kernel(new_ptr, old_ptr, out_ptr, scratch_ptr, R: tl.constexpr, K: tl.constexpr, BS: tl.constexpr):
    """``out [B, R]``: each GPU's slots of ``new`` reordered so that kept copies sit in their old slots."""
    row = tl.program_id(0).to(tl.int64)
    new = new_ptr + row * R
    old = old_ptr + row * R
    out = out_ptr + row * R
    knew = scratch_ptr + row * (5 * R)
    kold = knew + R
    match = kold + R  # old slot (in its GPU) of each new entry; -1 - rank among the unmatched ones if none
    free_old = match + R
    fill = free_old + R  # the free old slots of each GPU, in order
    _keys(new, knew, R, K, BS)
    _keys(old, kold, R, K, BS)
    tl.debug_barrier()
    _align(knew, kold, match, free_old, fill, new, new, out, R, K, BS, False)


def align_slots(new: torch.Tensor, old: torch.Tensor, num_gpus: int, *, xp: Any = None) -> torch.Tensor:
    """:func:`eplb.algorithms.relabel.align_slots` (same arguments; ``xp`` is not used): one launch.

    Expert ids must lie in ``[0, 2**40)``.
    """
    batch, num_phy = new.shape
    device = new.device
    new64 = new.to(torch.int64).contiguous()
    out = torch.empty_like(new64)
    if batch == 0 or num_phy == 0:
        return out.to(new.dtype)
    scratch = torch.empty(batch * 5 * num_phy, dtype=torch.int64, device=device)
    meta = {"R": num_phy, "K": num_phy // num_gpus, "BS": min(_pow2(num_phy), 1024)}
    ensure_cache_dir()
    with _on_device(device):
        align_kernel[(batch,)](
            new64, old.to(device=device, dtype=torch.int64).contiguous(), out, scratch, num_warps=4, **meta
        )
    return out if new.dtype == torch.int64 else out.to(new.dtype)


@triton.jit
def counts_kernel(phy_ptr, out_ptr, R: tl.constexpr, E: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr):
    """``out [B, E]``: slots of each expert ``0 .. E - 1`` in ``phy [B, R]``."""
    row = tl.program_id(0).to(tl.int64)
    phy = phy_ptr + row * R
    out = out_ptr + row * E
    f = tl.arange(0, BE)
    r = tl.arange(0, BT)
    for first in range(0, E, BE):
        e = first + f
        acc = tl.zeros([BE], tl.int64)
        for lo in range(0, R, BT):
            t = lo + r
            x = tl.load(phy + t, mask=t < R, other=-1)
            acc += tl.sum((x[None, :] == e[:, None]).to(tl.int64), axis=1)
        tl.store(out + e, acc, mask=e < E)


def replica_counts(phy2log: torch.Tensor, num_log: int, *, xp: Any = None) -> torch.Tensor:
    """:func:`eplb.algorithms.relabel.replica_counts` (same arguments; ``xp`` is not used): ``[B, E]``."""
    batch, num_phy = phy2log.shape
    out = torch.empty((batch, num_log), dtype=torch.int64, device=phy2log.device)
    if batch == 0 or num_log == 0:
        return out.to(phy2log.dtype)
    if num_phy == 0:
        return out.zero_().to(phy2log.dtype)
    meta = {"R": num_phy, "E": num_log, "BE": min(_pow2(num_log), 64), "BT": min(_pow2(num_phy), 64)}
    ensure_cache_dir()
    with _on_device(phy2log.device):
        counts_kernel[(batch,)](phy2log.to(torch.int64).contiguous(), out, num_warps=4, **meta)
    return out if phy2log.dtype == torch.int64 else out.to(phy2log.dtype)
