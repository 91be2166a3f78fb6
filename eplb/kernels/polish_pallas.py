"""Equals :func:`eplb.algorithms.polish.polish` bit for bit (Pallas): the swap-back polish on JAX GPUs.

:func:`polish` is a Pallas (Triton lowering) kernel, one program per row, the whole search on the device (a
``while`` loop of steps per row; no host sync, usable inside ``jax.jit``); ``interpret``: Pallas' interpreter,
any platform. Same arguments as the array-API function (``xp`` is accepted and not used) and as
:mod:`eplb.kernels.polish_numba`, whose choices it makes step for step.

Proved by ``tests/test_polish_pallas.py``: Pallas' interpreter on the CPU against the array-API function and
the numba twin on random small inputs (1..4 nodes, 1..4 GPUs per node, 1..5 slots per GPU, one expert, one
slot per GPU, tied and all-zero loads, limits below and above the heaviest GPU, ``max_iters`` 1, 2 and
large; also under ``jax_enable_x64``) and on the arguments :func:`eplb.algorithms.stability.stabilize` passes
it for the DeepSeek-V3 loads, ``previous=`` with a tolerance through the CUDA branch's computation
(interpreted) against numpy, and the lowering to Triton for CUDA; on a JAX GPU, the kernel on those
DeepSeek-V3 arguments against numba, and ``rebalance_experts(..., previous=, balance_tolerance=0.005)`` on
JAX GPU arrays against numpy, also inside ``jit``.

Each step, per row (int32 throughout: JAX without x64 has no 64-bit integers):

- every slot's load ``y`` (its expert's replica load), whether it holds a *new pair* (more copies of its
  expert on its GPU than ``old`` has there, counted over the GPU's slots), and the list of the slots that
  do, in slot order (a ``cumsum`` rank), so each node's list is one run of it; then every GPU's load, summed
  left to right from its first slot; all through scratch buffers across ``plgpu.debug_barrier()``;
- the candidates, from every listed slot ``s`` to every slot ``u`` of its node, as ``[listed slots, slots
  of the node]`` tiles: polish_numba's restriction to slots ``s`` holding a new pair, without its filter on
  ``u``'s GPU (a superset of its candidates); a swap lowers the moves only if one side holds a new pair, so
  every allowed swap is seen, a pair of two listed slots twice with the same key. A tile's copies of
  ``x_s`` on ``u``'s GPU (now, in ``old``) and of ``x_u`` on ``s``'s come from a loop over the slots of a
  GPU; change in moves, changed loads ``(load - y_out) + y_in`` and the tests are the reference's;
- the best swap as a running minimum of ``(change, max of the changed loads, i * R + j)`` with
  ``i = min(s, u)``, ``j = max(s, u)`` (the reference's order: lowest change, lowest max, first ``(i, j)``
  row-major), each tile's by three ``min`` reductions; it is applied in place (the state lives in the output
  buffer), and the next step prices everything again, as the reference does. A row stops when no allowed
  swap is left or after ``max_iters`` steps.

Arithmetic: every float ``+``, ``-`` has two float32 operands and runs in the reference's order; no division
decides anything. Pallas offers no switch for Triton's FMA contraction, so no product is computed in the
kernel: the replica loads ``w * fl(1/c)`` (:func:`eplb._xp.reciprocal_table`; the counts never change
during the search) are one XLA multiplication before it, the kernel only reads them.

Shapes beyond :func:`fits` go to the XLA path (same placement). Timed on an H100 (``docs/benchmarks.md``, the
failure re-plan's polish): 4.2 ms for 58 rows of up to 58 swaps at 144 GPUs, 0.2-0.5 ms at 32 GPUs; 8 or 16
warps and larger tiles were no faster.
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
from eplb.algorithms.replication import replica_load
from eplb.kernels.repair_pallas import _BIG, _INF, F32, I32, MAX_SLOTS, _load, _loop, _pow2, _put, _store

__all__ = ["fits", "polish"]

TILE = 2048  # elements of a candidate tile [listed slots, slots of a node] (more rows where a node is small)
_WARPS = 4


def fits(num_phy: int, num_log: int, num_gpus: int, num_nodes: int, batch: int = 1) -> bool:
    """Whether the kernel takes ``stabilize``'s arrays at these sizes (else the XLA path runs).

    At most ``MAX_SLOTS`` slots and experts (a node's slots are one register vector), and int32 flat indices
    over ``batch`` rows (the scratch buffers' and the pair keys ``i * R + j``).
    """
    if not (num_gpus > 0 and num_nodes > 0 and num_phy % num_gpus == 0 and num_gpus % num_nodes == 0):
        return False
    if not (0 < num_log <= MAX_SLOTS and 0 < num_phy <= MAX_SLOTS):
        return False
    flat = max(batch, 1) * (4 * num_phy + 1 + num_gpus + num_log)
    return flat < 2**31


def _least(ok: Any, change: Any, changed: Any, idx: Any) -> tuple:
    """Among ``ok`` of a 2-D tile: least ``change``, then ``changed``, then ``idx`` (``_BIG, inf, _BIG`` if none)."""

    def red(x: Any) -> jax.Array:
        return jnp.min(jnp.min(x, axis=1), axis=0)

    c = jnp.where(ok, change, _BIG)
    cmin = red(c)
    sel = ok & (c == cmin)
    m = jnp.where(sel, changed, _INF)
    mmin = red(m)
    sel = sel & (m == mmin)
    return cmin, mmin, red(jnp.where(sel, idx, _BIG))


def _before(a: tuple, b: tuple) -> Any:
    """Whether key ``a = (change, changed, idx)`` comes before ``b`` (lexicographic; indices unique)."""
    return (a[0] < b[0]) | ((a[0] == b[0]) & ((a[1] < b[1]) | ((a[1] == b[1]) & (a[2] < b[2]))))


def _polish_kernel(
    start_ref,
    old_ref,
    prl_ref,
    limit_ref,
    cur_ref,
    is_ref,
    fs_ref,
    *,
    R: int,
    E: int,
    G: int,
    K: int,
    PNODE: int,
    NN: int,
    BS: int,
    BG: int,
    BI: int,
    max_iters: int,
    interpret: bool,
) -> None:
    """``cur [B*R]``: ``start`` polished toward ``old`` (``prl [B*E]`` the replica loads, ``limit [B]``)."""
    P_N = _pow2(PNODE)
    row = pl.program_id(0)
    cur = row * R  # start's, cur's and old's row
    prl = row * E
    flags = row * (3 * R + 1)  # per slot: holds a new pair; its rank among those (R + 1: the total); the list
    rank = flags + R
    listed = rank + R + 1
    slot = row * (R + G)  # slot loads, GPU loads
    ldb = slot + R
    lim = plgpu.load(limit_ref.at[row])

    def barrier() -> None:
        if not interpret:  # the interpreter runs one lane at a time, in program order
            plgpu.debug_barrier()

    s = lax.iota(I32, BS)
    for first in range(0, R, BS):
        t = first + s
        _store(cur_ref, cur + t, _load(start_ref, cur + t, t < R, 0), t < R, interpret)
    barrier()

    def price_slots() -> None:
        """Slot loads, new-pair flags, their ranks and the list of slots holding a new pair (slot order)."""
        total = np.int32(0)
        for first in range(0, R, BS):
            t = first + s
            ok = t < R
            x = _load(cur_ref, cur + t, ok, -1)
            lo = t - lax.rem(t, np.int32(K))  # the GPU's first slot

            def count(d: Any, carry: Any, ok=ok, lo=lo, x=x) -> Any:
                now, was = carry
                now = now + (_load(cur_ref, cur + lo + d, ok, -2) == x).astype(I32)
                return now, was + (_load(old_ref, cur + lo + d, ok, -2) == x).astype(I32)

            zeros = jnp.zeros((BS,), I32)
            now, was = _loop(0, K, count, (zeros, zeros))
            new = (ok & (now > was)).astype(I32)
            before = total + lax.cumsum(new, axis=0) - new
            _store(fs_ref, slot + t, _load(prl_ref, prl + x, ok, np.float32(0)), ok, interpret)
            _store(is_ref, flags + t, new, ok, interpret)
            _store(is_ref, rank + t, before, ok, interpret)
            _store(is_ref, listed + before, t, new > 0, interpret)
            total = total + jnp.sum(new, dtype=I32)
        _put(is_ref, rank + R, total, None)

    def sum_gpus() -> None:
        """GPU loads, left to right from each GPU's first slot."""
        g_lane = lax.iota(I32, BG)
        for first in range(0, G, BG):
            g = first + g_lane
            ok = g < G

            def add(k: Any, total: Any, g=g, ok=ok) -> Any:
                return total + _load(fs_ref, slot + g * K + k, ok, np.float32(0))

            total = _loop(1, K, add, _load(fs_ref, slot + g * K, ok, np.float32(0)))
            _store(fs_ref, ldb + g, total, ok, interpret)

    def best_in_node(n: Any, best: tuple) -> tuple:
        """``best`` updated with the swaps from the listed slots of node ``n`` to every slot of it."""
        n0 = n * PNODE
        lane = lax.iota(I32, P_N)
        u_ok = lane < PNODE
        u = n0 + lane
        x_u = _load(cur_ref, cur + u, u_ok, -3)
        g_u = lax.div(u, np.int32(K))
        y_u = _load(fs_ref, slot + u, u_ok, np.float32(0))
        rest_u = _load(fs_ref, ldb + g_u, u_ok, np.float32(0)) - y_u  # load[g_u] - y_u
        new_u = _load(is_ref, flags + u, u_ok, 0)
        end = plgpu.load(is_ref.at[rank + n0 + PNODE])  # node n's listed slots: list[rank[n0] : end]
        p_lane = lax.iota(I32, BI)

        def block(state: tuple) -> tuple:
            p0, best = state
            p = p0 + p_lane
            p_ok = p < end
            s_ = _load(is_ref, listed + p, p_ok, 0)
            x_s = _load(cur_ref, cur + s_, p_ok, -4)
            g_s = lax.div(s_, np.int32(K))
            y_s = _load(fs_ref, slot + s_, p_ok, np.float32(0))
            rest_s = _load(fs_ref, ldb + g_s, p_ok, np.float32(0)) - y_s

            def count(d: Any, carry: Any) -> Any:
                # x_s on u's GPU, x_u on s's GPU: now and in old
                s_now, s_was, u_now, u_was = carry
                at_u = g_u * K + d
                at_s = g_s * K + d
                cu = _load(cur_ref, cur + at_u, u_ok, -1)[None, :]
                ou = _load(old_ref, cur + at_u, u_ok, -1)[None, :]
                cs = _load(cur_ref, cur + at_s, p_ok, -2)[:, None]
                os_ = _load(old_ref, cur + at_s, p_ok, -2)[:, None]
                return (
                    s_now + (cu == x_s[:, None]).astype(I32),
                    s_was + (ou == x_s[:, None]).astype(I32),
                    u_now + (cs == x_u[None, :]).astype(I32),
                    u_was + (os_ == x_u[None, :]).astype(I32),
                )

            zeros = jnp.zeros((BI, P_N), I32)
            s_now, s_was, u_now, u_was = _loop(0, K, count, (zeros,) * 4)
            # s holds a new pair (it is listed): its side gives one move back
            change = (s_was == 0).astype(I32) + (u_was == 0).astype(I32) - 1 - new_u[None, :]
            load_s = rest_s[:, None] + y_u[None, :]  # (load[g_s] - y_s) + y_u
            load_u = rest_u[None, :] + y_s[:, None]  # (load[g_u] - y_u) + y_s
            changed = jnp.maximum(load_s, load_u)
            ok = (p_ok[:, None] & u_ok[None, :]) & (g_s[:, None] != g_u[None, :]) & (x_s[:, None] != x_u[None, :])
            ok = ok & (s_now == 0) & (u_now == 0) & (change < 0) & (load_s <= lim) & (load_u <= lim)
            idx = jnp.minimum(s_[:, None], u[None, :]) * R + jnp.maximum(s_[:, None], u[None, :])
            here = _least(ok, change, changed, idx)
            take = _before(here, best)
            best = tuple(jnp.where(take, h, b) for h, b in zip(here, best, strict=True))
            return p0 + BI, best

        start = plgpu.load(is_ref.at[rank + n0])
        return lax.while_loop(lambda state: state[0] < end, block, (start, best))[1]

    def step(state: Any) -> Any:
        it, _ = state
        price_slots()
        barrier()
        sum_gpus()
        barrier()
        none = (np.int32(_BIG), _INF, np.int32(_BIG))
        change, _, idx = _loop(0, NN, best_in_node, none)
        found = change < 0
        i = jnp.where(found, lax.div(idx, np.int32(R)), 0)
        j = jnp.where(found, lax.rem(idx, np.int32(R)), 0)
        at_i = plgpu.load(cur_ref.at[cur + i])
        at_j = plgpu.load(cur_ref.at[cur + j])
        barrier()
        _put(cur_ref, cur + i, at_j, found)
        _put(cur_ref, cur + j, at_i, found)
        barrier()
        it = it + 1
        return it, (found & (it < max_iters)).astype(I32)

    lax.while_loop(lambda state: state[1] > 0, step, (np.int32(0), np.int32(1)))


@functools.partial(jax.jit, static_argnums=(5, 6, 7), static_argnames=("interpret",))
def _polish_call(phy2log, counts, old, weight, limit, num_gpus, num_nodes, max_iters, *, interpret):
    batch, num_phy = phy2log.shape
    num_log = weight.shape[1]
    per_node = num_phy // num_nodes
    p_node = _pow2(per_node)
    meta = {
        "R": num_phy,
        "E": num_log,
        "G": num_gpus,
        "K": num_phy // num_gpus,
        "PNODE": per_node,
        "NN": num_nodes,
        "BS": min(_pow2(num_phy), 1024),
        "BG": min(_pow2(num_gpus), 1024),
        "BI": max(2, min(_pow2(per_node), TILE // p_node)),
        "max_iters": min(max_iters, 2**31 - 1),
        "interpret": interpret,
    }
    # The replica loads w * fl(1/c) under XLA: a product computed in the kernel could be contracted into an add.
    reciprocal = jnp.asarray(_xp.reciprocal_table(num_phy, xp=np))
    prl = replica_load(weight.astype(F32), counts.astype(I32), reciprocal, xp=jnp)
    out_shape = (
        jax.ShapeDtypeStruct((batch * num_phy,), I32),
        jax.ShapeDtypeStruct((batch * (3 * num_phy + 1),), I32),
        jax.ShapeDtypeStruct((batch * (num_phy + num_gpus),), F32),
    )
    cur, _, _ = pl.pallas_call(
        functools.partial(_polish_kernel, **meta),
        out_shape=out_shape,
        grid=(batch,),
        compiler_params=plgpu.CompilerParams(num_warps=_WARPS, num_stages=1),
        interpret=interpret,
        name="eplb_polish",
    )(
        phy2log.astype(I32).reshape(-1),
        old.astype(I32).reshape(-1),
        prl.reshape(-1),
        limit.astype(F32).reshape(batch),
    )
    return cur.reshape(batch, num_phy)


def polish(
    phy2log: Any,
    counts: Any,
    old: Any,
    weight: Any,
    limit: Any,
    num_gpus: int,
    num_nodes: int,
    max_iters: int,
    *,
    xp: Any = None,
    interpret: bool = False,
) -> Any:
    """:func:`eplb.algorithms.polish.polish` (same arguments; ``xp`` is not used): one Pallas launch.

    ``phy2log``, ``old`` ``[B, R]`` and ``counts [B, E]`` integer (int32, or int64 under x64), ``weight
    [B, E]`` and ``limit [B, 1]`` float32; sizes and ``max_iters`` static. Returns ``phy2log [B, R]`` in its
    dtype. Expert ids must lie in ``[0, E)`` (not checked: that would read values on the host).
    """
    phy2log = jnp.asarray(phy2log)
    batch, num_phy = phy2log.shape
    num_log = weight.shape[1]
    if not fits(num_phy, num_log, num_gpus, num_nodes, batch):
        raise ValueError(f"the polish kernel does not take {num_phy} slots, {num_log} experts, {num_gpus} GPUs")
    if batch == 0 or max_iters <= 0:
        return phy2log
    out = _polish_call(
        phy2log,
        jnp.asarray(counts),
        jnp.asarray(old),
        jnp.asarray(weight),
        jnp.asarray(limit),
        num_gpus,
        num_nodes,
        int(max_iters),
        interpret=interpret,
    )
    return out.astype(phy2log.dtype)
