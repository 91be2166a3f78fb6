"""Equals :mod:`eplb.kernels.repair_numba` bit for bit: the knobs of ``previous=`` on JAX GPUs (Pallas).

:func:`repair` and :func:`sticky_pack` are Pallas (Triton lowering) ports of the kernels of
:mod:`eplb.kernels.repair_triton`, so they equal the numba kernels of the same names and
:func:`eplb.algorithms.repair.repair` / :func:`eplb.algorithms.repair.sticky_pack` (same arguments as
:func:`eplb.algorithms.stability.stabilize` passes them; ``xp`` is accepted and not used; ``interpret``:
Pallas' interpreter, any platform). :func:`align_slots` and :func:`replica_counts` are the array-API
functions under XLA (a few fused element-wise ops and sums, no loop), as :mod:`eplb.kernels.relabel_pallas`
aligns slots.

Proved by ``tests/test_pallas_repair.py``: Pallas' interpreter on the CPU against the numba kernels and the
array-API functions on random small inputs (hierarchical and global, one expert per group, one slot per GPU,
all-zero and tied loads, invalid rows, budgets around the start's moves, short ``max_iters``), and
``previous=`` with the knobs through the CUDA branch's computation (interpreted) against numpy; on a JAX GPU,
the kernels on the arguments ``stabilize`` passes them for the DeepSeek-V3 loads, and ``previous=`` with
``balance_tolerance`` / ``max_moves`` against numpy.

With failed GPUs (``active_gpus=`` with ``previous=``, :func:`eplb.algorithms.elastic.stabilize_elastic`) the
same kernels take failed GPUs' ``-1`` slots (they weigh nothing, are never a swap partner or a donor, and a
failed GPU is never the heavy one), and :func:`sticky_pack` takes ``initial_load`` (closed packs) and
``reserve``, as repair_triton's do; proved by ``tests/test_pallas_elastic.py`` (the interpreter on random rows
with failed GPUs and degenerate ones, and the CUDA branch of the call end to end; on a JAX GPU the
DeepSeek-V3 arguments and the call against numpy).

The steps, tie rules and float32 arithmetic are repair_triton's (its docstring describes them), in int32
(JAX without x64 has no 64-bit integers), one program per row:

- every ``+``, ``-``, ``*`` has two float32 operands, sums run left to right, no division decides
  anything. Pallas offers no switch for Triton's FMA contraction, so no product feeds an add: replica
  loads ``w * fl(1/c)`` (with the current count, one more, one fewer) are written to a scratch table and
  read back before any sum uses them (repair_triton multiplies ``w * fl(1/(c - 1))`` of a replaced expert
  in registers; here it comes from the third table: the same value);
- :func:`repair`: a ``while`` loop of steps over the heaviest GPU's candidates (the swaps as one
  ``[slots of a, slots of a's node]`` tile, the ``3 * slots`` single-slot changes as one ``[candidates,
  GPUs]`` tile re-summing every GPU left to right), the best by four reductions; the state lives in the
  output buffers, the per-step tables in scratch buffers, across ``plgpu.debug_barrier()``; no host sync;
- :func:`sticky_pack`: items ranked by counting, old packs from occurrence-numbered keys, then one
  sequential step per item over ``[packs]`` registers.

Shapes beyond :func:`fits` go to the XLA path (same placement). On an H200 (JAX 0.11.2, Triton 3.6; the 58
MoE layers of the DeepSeek-V3 loads, ``previous`` another file's placement, ``balance_tolerance=0.005``):
repair 0.71 ms (174 rows) at 288 slots on 32 GPUs in 4 nodes and 0.81 ms on 144 GPUs, sticky_pack 0.36 ms
(464 rows of 72 slots in 8 packs) and 0.47 ms (116 rows of 288 in 144 packs); the whole JAX GPU
``previous=`` call (``benchmarks/keep_speed.py --gpu-only``, median of 20 warm calls) with
``balance_tolerance=0.005`` 1.39 ms at 32 GPUs and 2.03 ms at 144, with ``max_moves=16`` 1.32 / 1.62 ms,
from 9.3 / 194 ms under XLA.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from eplb import _xp
from eplb.algorithms import relabel as _relabel
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.refine import IMPROVEMENT

__all__ = ["align_slots", "fits", "repair", "replica_counts", "sticky_pack"]

I32 = jnp.int32
F32 = jnp.float32
_BIG = np.int32(2**30)
_IMPROVEMENT = np.float32(IMPROVEMENT)  # 1 - 2**-16, exact in float32
_MAX_LOAD = np.float32(MAX_LOAD)
_INF = np.float32(np.inf)

MAX_SLOTS = 4096
MAX_TILE = 16384  # elements of a register tile (the swaps', the single-slot changes', the experts')
_REPAIR_WARPS = 4
_STICKY_WARPS = 4


def _pow2(n: int) -> int:
    """The next power of two ``>= n``, at least 2 (Triton tensor sizes are powers of two)."""
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def fits(num_phy: int, num_log: int, num_gpus: int, num_nodes: int, num_layers: int = 1) -> bool:
    """Whether the kernels take ``stabilize``'s arrays at these sizes (else the XLA path runs).

    repair_triton's bounds (tiles of at most ``MAX_TILE`` elements, at most 64 slots per GPU), and int32 flat
    indices for ``3 * num_layers`` rows (repair) and ``2 * num_layers * num_nodes`` (sticky_pack).
    """
    if not (num_gpus > 0 and num_nodes > 0 and num_phy % num_gpus == 0 and num_gpus % num_nodes == 0):
        return False
    if not (0 < num_log <= MAX_SLOTS and 0 < num_phy <= MAX_SLOTS):
        return False
    per_gpu, per_node = num_phy // num_gpus, num_phy // num_nodes
    tiles = (_pow2(per_gpu) * _pow2(per_node), _pow2(3 * per_gpu) * _pow2(num_gpus), _pow2(num_log))
    flat = 3 * max(num_layers, 1) * (3 * num_log + 2 * num_phy + num_gpus + 9 * per_gpu)
    return per_gpu <= 64 and max(tiles) <= MAX_TILE and flat < 2**31


def _loop(lower: int, upper: int, body: Any, init: Any) -> Any:
    """``lax.fori_loop`` with an int32 counter (also when the user enables x64)."""
    return lax.fori_loop(np.int32(lower), np.int32(upper), body, init)


def _load(ref: Any, index: Any, mask: Any, other: Any) -> jax.Array:
    """Masked gather, ``other`` where masked off (indices clamped there: the interpreter reads every lane)."""
    return plgpu.load(ref.at[jnp.where(mask, index, 0)], mask=mask, other=other)


def _store(ref: Any, index: Any, values: Any, mask: Any, interpret: bool) -> None:
    """Masked scatter (the interpreter stores every lane: masked-off ones are sent past the end)."""
    if interpret:
        index = jnp.where(mask, index, ref.shape[0])
    values = jnp.broadcast_to(jnp.asarray(values, ref.dtype), jnp.shape(index))
    plgpu.store(ref.at[index], values, mask=mask)


def _put(ref: Any, index: Any, value: Any, mask: Any) -> None:
    """Masked scalar store at a valid index (the interpreter writes the old value back where masked off)."""
    plgpu.store(ref.at[index], jnp.asarray(value, ref.dtype), mask=mask)


def _i32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(I32)


def _lexmin(ok: Any, key: Any, moves: Any, second: Any, idx: Any) -> tuple:
    """Among ``ok``: least ``key``, then ``moves``, then ``second``, then ``idx`` (1-D or 2-D tiles)."""

    def red(fn: Any, x: Any) -> jax.Array:
        while x.ndim > 1:
            x = fn(x, axis=x.ndim - 1)
        return fn(x, axis=0)

    k = jnp.where(ok, key, _INF)
    kmin = red(jnp.min, k)
    sel = ok & (k == kmin)
    m = jnp.where(sel, moves, _BIG)
    mmin = red(jnp.min, m)
    sel = sel & (m == mmin)
    s = jnp.where(sel, second, _INF)
    smin = red(jnp.min, s)
    sel = sel & (s == smin)
    imin = red(jnp.min, jnp.where(sel, idx, _BIG))
    has = red(jnp.max, ok.astype(I32)) > 0
    return has, kmin, mmin, smin, imin


# ---------------------------------------------------------------- repair


def _repair_kernel(
    start_ref,
    start_cnt_ref,
    old_ref,
    w_ref,
    limit_ref,
    budget_ref,
    valid_ref,
    recip_ref,
    cur_ref,
    cnt_ref,
    moved_ref,
    fs_ref,
    is_ref,
    *,
    R: int,
    E: int,
    G: int,
    K: int,
    GN: int,
    PNODE: int,
    GS: int,
    NG: int,
    BS: int,
    max_iters: int,
    interpret: bool,
) -> None:
    """``cur [B*R]`` and ``cnt [B*E]`` (from ``start``, ``start_cnt``) repaired; ``moved [B]``."""
    P_E, P_G, P_K, P_N, P_C = _pow2(E), _pow2(G), _pow2(K), _pow2(PNODE), _pow2(3 * K)
    row = pl.program_id(0)
    cur = row * R
    cnt = row * E
    old = row * R
    w = row * E
    FS = 3 * E + R + G
    prl = row * FS  # replica loads; with one more replica; with one fewer; slot loads; GPU loads
    ext = prl + E
    less = ext + E
    slot = less + E
    ldb = slot + R
    here = row * (NG + 9 * K)  # step at which each group was last seen on a's node
    cs = here + NG  # the single-slot changes: slot, expert, allowed
    cx = cs + 3 * K
    cok = cx + 3 * K
    lim = plgpu.load(limit_ref.at[row])
    cap = plgpu.load(budget_ref.at[row])
    valid = plgpu.load(valid_ref.at[row]) != 0

    def barrier() -> None:
        if not interpret:  # the interpreter runs one lane at a time, in program order
            plgpu.debug_barrier()

    s = lax.iota(I32, BS)
    for first in range(0, max(NG, R, E), BS):  # the state from the start; no group seen yet
        t = first + s
        _store(cur_ref, cur + t, _load(start_ref, cur + t, t < R, 0), t < R, interpret)
        _store(cnt_ref, cnt + t, _load(start_cnt_ref, cnt + t, t < E, 0), t < E, interpret)
        _store(is_ref, here + t, -1, t < NG, interpret)
    barrier()
    kept = jnp.zeros((BS,), I32)
    for first in range(0, R, BS):  # count_moves: copies of new beyond the old ones, per GPU
        t = first + s
        ok = t < R
        q = lax.rem(t, np.int32(K))
        lo = t - q
        x = _load(cur_ref, cur + t, ok, -1)

        def count(d: Any, carry: Any, ok=ok, q=q, lo=lo, x=x) -> Any:
            earlier, have = carry
            y = _load(cur_ref, cur + lo + d, ok, -2)
            z = _load(old_ref, old + lo + d, ok, -2)
            return earlier + ((d < q) & (y == x)).astype(I32), have + (z == x).astype(I32)

        zeros = jnp.zeros((BS,), I32)
        earlier, have = _loop(0, K, count, (zeros, zeros))
        kept = kept + (ok & (have > earlier)).astype(I32)
    moved0 = np.int32(R) - jnp.sum(kept, dtype=I32)

    e = lax.iota(I32, P_E)
    e_ok = e < E
    g = lax.iota(I32, P_G)
    g_ok = g < G
    i = lax.iota(I32, P_K)
    i_ok = i < K
    u = lax.iota(I32, P_N)
    u_ok = u < PNODE
    c = lax.iota(I32, P_C)
    c_ok = c < 3 * K
    ninf = -_INF

    def step(state: Any) -> Any:
        it, moved, _ = state
        # Replica loads (now, with one more, with one fewer replica) through memory, slot loads, GPU loads
        # (left to right), the heaviest GPU (first on ties).
        ce = _load(cnt_ref, cnt + e, e_ok, 0)
        we = _load(w_ref, w + e, e_ok, np.float32(0))
        pr = we * _load(recip_ref, ce, e_ok, np.float32(0))
        ex = we * _load(recip_ref, ce + 1, e_ok, np.float32(0))
        ls = we * _load(recip_ref, jnp.maximum(ce - 1, 0), e_ok, np.float32(0))
        _store(fs_ref, prl + e, pr, e_ok, interpret)
        _store(fs_ref, ext + e, ex, e_ok, interpret)
        _store(fs_ref, less + e, ls, e_ok, interpret)
        barrier()
        for first in range(0, R, BS):
            ts = first + s
            ts_ok = ts < R
            xs = _load(cur_ref, cur + ts, ts_ok, 0)
            # an empty slot (-1, a failed GPU's) weighs nothing
            _store(fs_ref, slot + ts, _load(fs_ref, prl + xs, ts_ok & (xs >= 0), np.float32(0)), ts_ok, interpret)
        barrier()
        total = _load(fs_ref, slot + g * K, g_ok, np.float32(0))
        for k in range(1, K):
            total = total + _load(fs_ref, slot + g * K + k, g_ok, np.float32(0))
        _store(fs_ref, ldb + g, total, g_ok, interpret)
        loads = jnp.where(g_ok, total, ninf)
        # The heavy GPU among the live ones (a failed GPU's slots are all -1; it weighs 0 elsewhere).
        pick = jnp.where(_load(cur_ref, cur + g * K, g_ok, -1) >= 0, loads, ninf)
        heavy_load = jnp.max(pick)
        heavy = jnp.min(jnp.where(pick == heavy_load, g, _BIG))
        act = heavy_load > lim  # (no live GPU: -inf, nothing to do)
        threshold = heavy_load * _IMPROVEMENT
        a0 = heavy * K
        node = lax.div(heavy, np.int32(GN))
        n0 = node * PNODE
        barrier()

        # The heavy GPU's slots and the node's slots, their copies now and in old.
        oe = _load(cur_ref, cur + a0 + i, i_ok, -1)
        ox = _load(fs_ref, slot + a0 + i, i_ok, np.float32(0))
        oa = _load(old_ref, old + a0 + i, i_ok, -1)
        now_a_e = jnp.sum(((oe[:, None] == oe[None, :]) & i_ok[None, :]).astype(I32), axis=1, dtype=I32)
        was_a_e = jnp.sum(((oe[:, None] == oa[None, :]) & i_ok[None, :]).astype(I32), axis=1, dtype=I32)
        moves_i = jnp.where(now_a_e > was_a_e, -1, 0).astype(I32)
        tn = n0 + u
        ct = _load(cur_ref, cur + tn, u_ok, -1)
        gt = lax.div(tn, np.int32(K))
        yn = _load(fs_ref, slot + tn, u_ok, np.float32(0))
        room = _load(fs_ref, ldb + gt, u_ok, np.float32(0)) - yn
        now_a_f = jnp.sum(((ct[:, None] == oe[None, :]) & i_ok[None, :]).astype(I32), axis=1, dtype=I32)
        was_a_f = jnp.sum(((ct[:, None] == oa[None, :]) & i_ok[None, :]).astype(I32), axis=1, dtype=I32)

        def node_counts(d: Any, carry: Any) -> Any:
            now_b_f, was_b_f, now_b_e, was_b_e = carry
            cd = _load(cur_ref, cur + gt * K + d, u_ok, -1)
            od = _load(old_ref, old + gt * K + d, u_ok, -1)
            return (
                now_b_f + (cd == ct).astype(I32),
                was_b_f + (od == ct).astype(I32),
                now_b_e + (cd[None, :] == oe[:, None]).astype(I32),
                was_b_e + (od[None, :] == oe[:, None]).astype(I32),
            )

        zn, zkn = jnp.zeros((P_N,), I32), jnp.zeros((P_K, P_N), I32)
        now_b_f, was_b_f, now_b_e, was_b_e = _loop(0, K, node_counts, (zn, zn, zkn, zkn))
        swap_moves = (now_a_f >= was_a_f).astype(I32) - (now_b_f > was_b_f).astype(I32)

        # Swaps: slot i of a <-> slot t of another GPU of its node.
        others = jnp.where(g_ok & (g != heavy), loads, ninf)
        top_load = jnp.max(others)
        top = jnp.min(jnp.where(others == top_load, g, _BIG))
        second = jnp.max(jnp.where(g_ok & (g != heavy) & (g != top), loads, ninf))
        rest = jnp.where(gt == top, second, top_load)
        floor = jnp.where(rest >= lim, rest, lim)
        less_a = heavy_load - ox
        new_a = less_a[:, None] + yn[None, :]
        new_b = room[None, :] + ox[:, None]
        changed = jnp.where(new_a >= new_b, new_a, new_b)
        smv = moves_i[:, None] + swap_moves[None, :] + (now_b_e >= was_b_e).astype(I32)
        sok = (i_ok[:, None] & (u_ok & (gt != heavy) & (ct >= 0))[None, :]) & (ct[None, :] != oe[:, None])
        sok = sok & (changed < threshold) & (moved + smv <= cap)
        skey = jnp.where(changed >= floor[None, :], changed, floor[None, :])
        sidx = i[:, None] * P_N + u[None, :]
        s_has, s_key, s_mv, s_sec, s_idx = _lexmin(sok, skey, smv, changed, sidx)

        # Replicate out: expert i of a takes the donor slot that its change leaves lightest (first on ties).
        cnt_t = _load(cnt_ref, cnt + ct, u_ok & (ct >= 0), 0)  # an empty slot gives nothing
        dok = ((u_ok & (cnt_t >= 2))[None, :] & (ct[None, :] != oe[:, None])) & i_ok[:, None]
        # (oe is -1 only where no GPU is live: a is then a failed GPU and nothing is applied; never read there)
        grown = _load(fs_ref, ext + oe, i_ok & (oe >= 0), np.float32(0))
        vv = jnp.where(dok, room[None, :] + grown[:, None], _INF)
        vmin = jnp.min(vv, axis=1)
        tu = jnp.min(jnp.where(dok & (vv == vmin[:, None]), u[None, :], _BIG), axis=1)
        target = jnp.where(vmin < _INF, n0 + tu, 0)
        has_donor = jnp.max(dok.astype(I32), axis=1) > 0

        # Replace in: the coldest and the hottest expert (other than a's) of the groups on the node.
        _store(is_ref, here + lax.div(ct, np.int32(GS)), it, u_ok & (ct >= 0), interpret)
        barrier()
        allowed = e_ok & (_load(is_ref, here + lax.div(e, np.int32(GS)), e_ok, -1) == it)
        cv = jnp.where(allowed, ex, _INF)
        c1 = jnp.min(jnp.where(allowed & (cv == jnp.min(cv)), e, _BIG))
        cv2 = jnp.where(allowed & (e != c1), ex, _INF)
        c2 = jnp.min(jnp.where(allowed & (e != c1) & (cv2 == jnp.min(cv2)), e, _BIG))
        hv = jnp.where(allowed, pr, ninf)
        h1 = jnp.min(jnp.where(allowed & (hv == jnp.max(hv)), e, _BIG))
        hv2 = jnp.where(allowed & (e != h1), pr, ninf)
        h2 = jnp.min(jnp.where(allowed & (e != h1) & (hv2 == jnp.max(hv2)), e, _BIG))
        cold = jnp.where(c1 != oe, c1, c2)
        hot = jnp.where(h1 != oe, h1, h2)
        spare = i_ok & (_load(cnt_ref, cnt + oe, i_ok & (oe >= 0), 0) >= 2)
        _store(is_ref, cs + i, target, i_ok, interpret)
        _store(is_ref, cx + i, oe, i_ok, interpret)
        _store(is_ref, cok + i, has_donor.astype(I32), i_ok, interpret)
        _store(is_ref, cs + K + i, a0 + i, i_ok, interpret)
        _store(is_ref, cx + K + i, jnp.where(cold < _BIG, cold, 0), i_ok, interpret)
        _store(is_ref, cok + K + i, (spare & (cold < _BIG)).astype(I32), i_ok, interpret)
        _store(is_ref, cs + 2 * K + i, a0 + i, i_ok, interpret)
        _store(is_ref, cx + 2 * K + i, jnp.where(hot < _BIG, hot, 0), i_ok, interpret)
        _store(is_ref, cok + 2 * K + i, (spare & (hot < _BIG)).astype(I32), i_ok, interpret)
        barrier()

        # The single-slot changes cur[sl] = xx: every GPU summed again, left to right.
        sl = _load(is_ref, cs + c, c_ok, 0)
        xx = _load(is_ref, cx + c, c_ok, 0)
        cex = c_ok & (_load(is_ref, cok + c, c_ok, 0) != 0)
        gone = _load(cur_ref, cur + sl, c_ok, 0)
        diff = xx != gone
        l_in = _load(fs_ref, ext + xx, c_ok & (xx >= 0), np.float32(0))
        # (a candidate without a donor points at slot 0, perhaps a failed GPU's)
        l_gone = _load(fs_ref, less + gone, c_ok & (gone >= 0), np.float32(0))

        def one_value(k: int) -> jax.Array:
            """``[C, G]``: the load of slot ``k`` of every GPU after each change ``cur[sl] = xx``."""
            ts = g * K + k
            ek = _load(cur_ref, cur + ts, g_ok, -1)
            sv = _load(fs_ref, slot + ts, g_ok, np.float32(0))
            ev = jnp.where(ts[None, :] == sl[:, None], xx[:, None], ek[None, :])
            gone_val = jnp.where(diff[:, None] & (ev == gone[:, None]), l_gone[:, None], sv[None, :])
            return jnp.where(diff[:, None] & (ev == xx[:, None]), l_in[:, None], gone_val)

        acc = one_value(0)
        for k in range(1, K):
            acc = acc + one_value(k)
        peak = jnp.max(jnp.where(g_ok[None, :], acc, ninf), axis=1)
        lo_c = lax.div(sl, np.int32(K)) * K

        def slot_counts(d: Any, carry: Any) -> Any:
            now_x, was_x, now_g, was_g = carry
            cc = _load(cur_ref, cur + lo_c + d, c_ok, -1)
            oc = _load(old_ref, old + lo_c + d, c_ok, -1)
            return (
                now_x + (cc == xx).astype(I32),
                was_x + (oc == xx).astype(I32),
                now_g + (cc == gone).astype(I32),
                was_g + (oc == gone).astype(I32),
            )

        zc = jnp.zeros((P_C,), I32)
        now_x, was_x, now_g, was_g = _loop(0, K, slot_counts, (zc, zc, zc, zc))
        omv = (now_x >= was_x).astype(I32) - (now_g > was_g).astype(I32)
        ook = cex & (peak < threshold) & (moved + omv <= cap)
        okey = jnp.where(peak >= lim, peak, lim)
        o_has, o_key, o_mv, o_sec, o_idx = _lexmin(ook, okey, omv, peak, c)

        # The best change (swaps first: a single-slot change must be strictly better), applied.
        o_wins = (o_key < s_key) | ((o_key == s_key) & ((o_mv < s_mv) | ((o_mv == s_mv) & (o_sec < s_sec))))
        o_wins = o_has & (o_wins | jnp.logical_not(s_has))
        apply = act & (s_has | o_has)
        do_swap = apply & jnp.logical_not(o_wins)
        do_one = apply & o_wins
        give = a0 + jnp.where(do_swap, lax.div(s_idx, np.int32(P_N)), 0)
        take = n0 + jnp.where(do_swap, lax.rem(s_idx, np.int32(P_N)), 0)
        at_give = plgpu.load(cur_ref.at[cur + give])
        at_take = plgpu.load(cur_ref.at[cur + take])
        one = jnp.where(do_one, o_idx, 0)
        o_slot = plgpu.load(is_ref.at[cs + one])
        o_x = plgpu.load(is_ref.at[cx + one])
        o_gone = plgpu.load(cur_ref.at[cur + o_slot])
        same = (o_gone == o_x).astype(I32)
        # (where nothing is applied, o_x or o_gone may be a failed GPU's -1: clamped, the value unused)
        cnt_x = plgpu.load(cnt_ref.at[cnt + jnp.maximum(o_x, 0)])
        cnt_g = plgpu.load(cnt_ref.at[cnt + jnp.maximum(o_gone, 0)])
        barrier()
        _put(cur_ref, cur + give, at_take, do_swap)
        _put(cur_ref, cur + take, at_give, do_swap)
        _put(cur_ref, cur + o_slot, o_x, do_one)
        _put(cnt_ref, cnt + jnp.maximum(o_x, 0), cnt_x + 1 - same, do_one)
        _put(cnt_ref, cnt + jnp.maximum(o_gone, 0), cnt_g - 1 + same, do_one & (o_gone != o_x))
        moved = moved + jnp.where(apply, jnp.where(o_wins, o_mv, s_mv), 0)
        it = it + 1
        going = (apply & (it < max_iters)).astype(I32)
        barrier()
        return it, moved, going

    going = (valid & (max_iters > 0)).astype(I32)
    _, moved, _ = lax.while_loop(lambda st: st[2] > 0, step, (np.int32(0), moved0, going))
    _put(moved_ref, row, moved, None)


@functools.partial(jax.jit, static_argnums=(7, 8, 9, 10), static_argnames=("interpret",))
def _repair_call(
    start, start_cnt, old, weight, limit, budget, valid, num_gpus, num_nodes, group_size, max_iters, *, interpret
):
    batch, num_phy = start.shape
    num_log = weight.shape[1]
    per_gpu = num_phy // num_gpus
    ng = num_log // group_size
    meta = {
        "R": num_phy,
        "E": num_log,
        "G": num_gpus,
        "K": per_gpu,
        "GN": num_gpus // num_nodes,
        "PNODE": num_phy // num_nodes,
        "GS": group_size,
        "NG": ng,
        "BS": min(_pow2(max(num_phy, num_log, ng)), 1024),
        "max_iters": int(max_iters),
        "interpret": interpret,
    }
    reciprocal = _xp.reciprocal_table(num_phy + 1, xp=np)  # float32 [R + 2], built on the host
    out_shape = (
        jax.ShapeDtypeStruct((batch * num_phy,), I32),
        jax.ShapeDtypeStruct((batch * num_log,), I32),
        jax.ShapeDtypeStruct((batch,), I32),
        jax.ShapeDtypeStruct((batch * (3 * num_log + num_phy + num_gpus),), F32),
        jax.ShapeDtypeStruct((batch * (ng + 9 * per_gpu),), I32),
    )
    cur, cnt, moved, _, _ = pl.pallas_call(
        functools.partial(_repair_kernel, **meta),
        out_shape=out_shape,
        grid=(batch,),
        compiler_params=plgpu.CompilerParams(num_warps=_REPAIR_WARPS, num_stages=1),
        interpret=interpret,
        name="eplb_repair",
    )(
        start.astype(I32).reshape(-1),
        start_cnt.astype(I32).reshape(-1),
        old.astype(I32).reshape(-1),
        weight.astype(F32).reshape(-1),
        limit.astype(F32).reshape(batch),
        budget.astype(I32).reshape(batch),
        valid.astype(I32).reshape(batch),
        jnp.asarray(reciprocal),
    )
    return cur.reshape(batch, num_phy), cnt.reshape(batch, num_log), moved.reshape(batch, 1)


def repair(
    start: Any,
    start_cnt: Any,
    old: Any,
    weight: Any,
    limit: Any,
    budget: Any,
    valid: Any,
    num_gpus: int,
    num_nodes: int,
    group_size: int,
    max_iters: int,
    *,
    xp: Any = None,
    interpret: bool = False,
) -> tuple[Any, Any, Any]:
    """:func:`eplb.algorithms.repair.repair` (same arguments; ``xp`` is not used): one Pallas launch.

    ``start``, ``old`` ``[B, R]`` and ``start_cnt [B, E]`` integer; ``weight [B, E]`` and ``limit [B, 1]``
    float32; ``budget [B, 1]`` integer; ``valid [B, 1]`` bool. Returns ``phy2log [B, R]`` (``start``'s
    dtype), replica counts ``[B, E]`` (``start_cnt``'s) and moves ``[B, 1]`` (``start``'s). Expert ids
    must lie in ``[0, E)`` (not checked: that would read values on the host).
    """
    start, start_cnt = jnp.asarray(start), jnp.asarray(start_cnt)
    batch, num_phy = start.shape
    num_log = weight.shape[1]
    if not fits(num_phy, num_log, num_gpus, num_nodes, (batch + 2) // 3):
        raise ValueError(f"the repair kernel does not take {num_phy} slots, {num_log} experts, {num_gpus} GPUs")
    if batch == 0:
        return start, start_cnt, jnp.zeros((0, 1), start.dtype)
    cur, cnt, moved = _repair_call(
        start,
        start_cnt,
        jnp.asarray(old),
        jnp.asarray(weight),
        jnp.asarray(limit),
        jnp.asarray(budget),
        jnp.asarray(valid),
        num_gpus,
        num_nodes,
        group_size,
        int(max_iters),
        interpret=interpret,
    )
    return cur.astype(start.dtype), cnt.astype(start_cnt.dtype), moved.astype(start.dtype)


# ---------------------------------------------------------------- sticky_pack


def _sticky_kernel(
    base_ref,
    old_ref,
    load_ref,
    limit_ref,
    init_ref,
    out_ref,
    is_ref,
    fs_ref,
    *,
    N: int,
    M: int,
    C: int,
    BS: int,
    BT: int,
    ELASTIC: bool,
    RESERVE: bool,
    interpret: bool,
) -> None:
    """``out [B*N]``: ``base``'s items packed into ``M`` packs of ``C`` slots near ``old``.

    ``ELASTIC``: ``init [B*M]`` holds the packs' starting loads (``+inf``: a closed pack, a failed GPU), an
    item ``-1`` (an empty slot) has no old pack, and once no open pack is left the item goes to the first
    pack with room. ``RESERVE``: an item stays home only with room kept there for the items to come."""
    P_M = _pow2(M)
    row = pl.program_id(0)
    base = row * N
    occ_new = row * (4 * N)  # copies of the same expert in the earlier slots
    occ_old = occ_new + N
    by_exp = occ_old + N  # by rank (decreasing load, ties by index): the expert, its old pack
    by_aff = by_exp + N
    by_load = row * N

    def barrier() -> None:
        if not interpret:
            plgpu.debug_barrier()

    s = lax.iota(I32, BS)
    r = lax.iota(I32, BT)
    for first in range(0, N, BS):
        t = first + s
        ok = t < N
        xb = _load(base_ref, base + t, ok, -1)
        xo = _load(old_ref, base + t, ok, -1)

        def occ(j: Any, carry: Any, t=t, xb=xb, xo=xo) -> Any:
            nb, no = carry
            q = j * BT + r
            q_ok = q < N
            earlier = (q[None, :] < t[:, None]) & q_ok[None, :]
            yb = _load(base_ref, base + q, q_ok, -2)
            yo = _load(old_ref, base + q, q_ok, -2)
            nb = nb + jnp.sum((earlier & (yb[None, :] == xb[:, None])).astype(I32), axis=1, dtype=I32)
            no = no + jnp.sum((earlier & (yo[None, :] == xo[:, None])).astype(I32), axis=1, dtype=I32)
            return nb, no

        zeros = jnp.zeros((BS,), I32)
        nb, no = _loop(0, -(-min(first + BS, N) // BT), occ, (zeros, zeros))
        _store(is_ref, occ_new + t, nb, ok, interpret)
        _store(is_ref, occ_old + t, no, ok, interpret)
    barrier()
    for first in range(0, N, BS):
        t = first + s
        ok = t < N
        xb = _load(base_ref, base + t, ok, -1)
        kb = _load(is_ref, occ_new + t, ok, -1)
        x = _load(load_ref, base + t, ok, np.float32(0))

        def rank_home(j: Any, carry: Any, t=t, xb=xb, kb=kb, x=x) -> Any:
            home, rank = carry
            q = j * BT + r
            q_ok = q < N
            yo = _load(old_ref, base + q, q_ok, -2)
            ko = _load(is_ref, occ_old + q, q_ok, -2)
            yq = _load(load_ref, base + q, q_ok, np.float32(0))
            same = q_ok[None, :] & (yo[None, :] == xb[:, None]) & (ko[None, :] == kb[:, None])
            home = jnp.minimum(home, jnp.min(jnp.where(same, q[None, :], _BIG), axis=1))
            ahead = (yq[None, :] > x[:, None]) | ((yq[None, :] == x[:, None]) & (q[None, :] < t[:, None]))
            rank = rank + jnp.sum((q_ok[None, :] & ahead).astype(I32), axis=1, dtype=I32)
            return home, rank

        home, rank = _loop(0, -(-N // BT), rank_home, (jnp.full((BS,), _BIG, I32), jnp.zeros((BS,), I32)))
        if ELASTIC:  # an empty slot is no expert: no old pack
            home = jnp.where(xb >= 0, home, _BIG)
        _store(is_ref, by_exp + rank, xb, ok, interpret)
        _store(is_ref, by_aff + rank, jnp.where(home < _BIG, lax.div(home, np.int32(C)), -1), ok, interpret)
        _store(fs_ref, by_load + rank, x, ok, interpret)
    barrier()
    m = lax.iota(I32, P_M)
    lim = plgpu.load(limit_ref.at[row])

    if ELASTIC:
        init = _load(init_ref, row * M + m, m < M, _INF)
        closed = (m < M) & (init == _INF)
        open_load = jnp.where((m < M) & (init != _INF), np.float32(0) + init, _INF)
    else:
        closed = m < 0
        open_load = jnp.where(m < M, np.float32(0), _INF)  # +inf once a pack is full
    # RESERVE: the loads >= 0 still to come (a left-to-right sum, less each visited one), and how many.
    rem = left = np.float32(0)
    if RESERVE:
        x0 = plgpu.load(load_ref.at[base])
        rem, left = jnp.maximum(x0, np.float32(0)), (x0 >= 0).astype(F32)

        def more(t: Any, carry: Any) -> Any:
            x = plgpu.load(load_ref.at[base + t])
            return carry[0] + jnp.maximum(x, np.float32(0)), carry[1] + (x >= 0).astype(F32)

        rem, left = _loop(1, N, more, (rem, left))

    def visit(step: Any, carry: Any) -> Any:
        open_load, count, rem, left = carry
        expert = plgpu.load(is_ref.at[by_exp + step])
        x = plgpu.load(fs_ref.at[by_load + step])
        home = plgpu.load(is_ref.at[by_aff + step])
        at_home = m == home
        home_load = jnp.max(jnp.where(at_home, open_load, -_INF))
        home_count = jnp.max(jnp.where(at_home, count, -1))
        if RESERVE:
            rem = rem - jnp.maximum(x, np.float32(0))
            left = left - (x >= 0).astype(F32)
            free = ((C - 1) - home_count).astype(F32)  # the home's free slots after this item
            open_home = home_load < _INF
            over = (jnp.where(open_home, home_load, np.float32(0)) + x - lim) * left
            stay = (home >= 0) & open_home & (over <= -(free * rem))
        else:
            stay = (home >= 0) & (home_load + x <= lim) & (home_count < C)
        least = jnp.min(open_load)
        lightest = jnp.min(jnp.where(open_load == least, m, _BIG))
        if ELASTIC:  # every open pack full: the first pack with room (a closed one)
            room = jnp.min(jnp.where((m < M) & (count < C), m, _BIG))
            lightest = jnp.where(least < _INF, lightest, room)
        pack = jnp.where(stay, home, lightest)
        chosen = m == pack
        rank = jnp.max(jnp.where(chosen, count, -1))
        count = jnp.where(chosen, count + 1, count)
        total = open_load + x
        grown = jnp.where((count == C) | closed, _INF, jnp.where(total <= _MAX_LOAD, total, _MAX_LOAD))
        open_load = jnp.where(chosen, grown, open_load)
        _put(out_ref, base + pack * C + rank, expert, None)
        return open_load, count, rem, left

    _loop(0, N, visit, (open_load, jnp.zeros((P_M,), I32), rem, left))


@functools.partial(jax.jit, static_argnums=(5,), static_argnames=("reserve", "interpret"))
def _sticky_call(base, old, item_load, limit, initial_load, num_packs, *, reserve, interpret):
    batch, n = base.shape
    meta = {"N": n, "M": num_packs, "C": n // num_packs, "BS": min(_pow2(n), 64), "BT": min(_pow2(n), 64)}
    meta |= {"ELASTIC": initial_load is not None, "RESERVE": bool(reserve)}
    limit = limit.astype(F32).reshape(batch)
    # (without initial_load the kernel does not read init)
    init = limit if initial_load is None else jnp.broadcast_to(initial_load.astype(F32), (batch, num_packs))
    out, _, _ = pl.pallas_call(
        functools.partial(_sticky_kernel, interpret=interpret, **meta),
        out_shape=(
            jax.ShapeDtypeStruct((batch * n,), I32),
            jax.ShapeDtypeStruct((batch * 4 * n,), I32),
            jax.ShapeDtypeStruct((batch * n,), F32),
        ),
        grid=(batch,),
        compiler_params=plgpu.CompilerParams(num_warps=_STICKY_WARPS, num_stages=1),
        interpret=interpret,
        name="eplb_sticky_pack",
    )(
        base.astype(I32).reshape(-1),
        old.astype(I32).reshape(-1),
        item_load.astype(F32).reshape(-1),
        limit,
        init.reshape(-1),
    )
    return out.reshape(batch, n)


def sticky_pack(
    base: Any,
    old: Any,
    item_load: Any,
    limit: Any,
    num_packs: int,
    *,
    initial_load: Any = None,
    reserve: bool = False,
    xp: Any = None,
    interpret: bool = False,
) -> Any:
    """:func:`eplb.algorithms.repair.sticky_pack` (same arguments and options; ``xp`` is not used).

    ``base``, ``old`` ``[B, n]`` integer ids, ``>= 0`` but for the ``-1`` (empty) slots that go with
    ``initial_load [B or 1, m]`` (float32, ``+inf`` for a pack that takes no item while another is open: a
    failed GPU); ``item_load [B, n]`` and ``limit [B, 1]`` float32. Returns ``[B, n]`` in ``base``'s dtype.
    One Pallas launch.
    """
    base = jnp.asarray(base)
    batch, n = base.shape
    if batch == 0 or n == 0:
        return base
    initial = None if initial_load is None else jnp.asarray(initial_load)
    out = _sticky_call(
        base,
        jnp.asarray(old),
        jnp.asarray(item_load),
        jnp.asarray(limit),
        initial,
        num_packs,
        reserve=bool(reserve),
        interpret=interpret,
    )
    return out.astype(base.dtype)


# ---------------------------------------------------------------- align_slots, replica_counts


def align_slots(new: Any, old: Any, num_gpus: int, *, xp: Any = None, interpret: bool = False) -> Any:
    """:func:`eplb.algorithms.relabel.align_slots` under XLA (element-wise ops and sums, no loop)."""
    return _relabel.align_slots(jnp.asarray(new), jnp.asarray(old), num_gpus, xp=jnp)


def replica_counts(phy2log: Any, num_log: int, *, xp: Any = None, interpret: bool = False) -> Any:
    """:func:`eplb.algorithms.relabel.replica_counts` under XLA (one comparison tile summed)."""
    return _relabel.replica_counts(jnp.asarray(phy2log), num_log, xp=jnp)
