"""Equals :func:`eplb.algorithms.refined.rebalance_refined` bit for bit: its candidate stage as one Pallas kernel.

Proved by ``tests/test_pallas_refined.py`` (Pallas' interpreter, the CUDA lowering, the GPU) and the
cross-backend suite (``jax:pallas-interpret``, ``jax:gpu``). For JAX arrays on NVIDIA GPUs.

:func:`eplb.algorithms.refined.rebalance_refined` under XLA spends most of
its time in loops of tiny dependent steps (replication, LPT packing, up to
``num_iters`` swap rounds per candidate), each a few kernel launches on a
GPU. Here the candidate stage is one launch, one program per (layer, node,
candidate), with the arithmetic and tie rules of ``node_candidates`` (the
helpers of :mod:`eplb.kernels.greedy_pallas`, so placements are bit-identical):

- replication: greedy, or capped at one replica per GPU (candidates
  ``c // 2 == 0`` and ``1``), by :func:`eplb.kernels.greedy_pallas._replicate`;
- start: LPT (``c % 2 == 0``, the greedy kernel's packing) or the snake
  deal (slot of visit ``v``: GPU ``v % M`` or ``M - 1 - v % M`` on odd
  rounds ``v // M``, position ``v // M``);
- swap refinement out of the heaviest GPU on ``[GPUs, slots per GPU]``
  register tiles (``[slots per GPU, GPUs, slots per GPU]`` for the swap
  candidates, compared by int32 bits: every candidate is ``>= +0.0``). The
  loop stops at the first rejected swap: a rejected round changes nothing,
  so every later round would be rejected too.

The group split stays in XLA (a few short loops), the choice among
candidates and the assembly are a few vectorised XLA ops, and the
comparison with the greedy placement runs the greedy Pallas kernel.
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

from eplb.algorithms.hierarchy import build_log2phy
from eplb.algorithms.refine import IMPROVEMENT
from eplb.algorithms.refined import keep_greedy_unless_beaten, pick_candidates, rebalance_refined
from eplb.kernels import greedy_pallas
from eplb.kernels.greedy_pallas import (
    _INT_MAX,
    I32,
    _bits,
    _float,
    _iota,
    _pack,
    _pow2,
    _replicate,
    _steps,
    _store,
    _visit_steps,
    _weights,
)

__all__ = ["candidate_stage", "fits", "placement"]

_IMPROVEMENT = np.float32(IMPROVEMENT)  # 1 - 2**-16, exact in float32

# Register tiles of a node's slots, and the [slots per GPU, GPUs, slots per GPU]
# swap candidates, stay reasonable up to these sizes (XLA runs beyond).
MAX_SLOTS_PER_NODE = 4096
MAX_SWAP_CANDIDATES = 16384


def fits(num_layers: int, num_experts: int, num_replicas: int, num_nodes: int, num_gpus: int) -> bool:
    """Whether the candidate kernel takes these sizes (global policy: ``num_nodes = 1``), int32 indices included."""
    slots, gpus = num_replicas // num_nodes, num_gpus // num_nodes
    swaps = _pow2(slots // gpus) ** 2 * _pow2(gpus)
    scratch = num_layers * num_nodes * 4 * 5 * slots  # the largest flat index
    return (
        slots <= MAX_SLOTS_PER_NODE
        and swaps <= MAX_SWAP_CANDIDATES
        and scratch < 2**31
        and greedy_pallas.fits(num_layers, num_experts, num_replicas)
    )


def _num_warps(slots: int, gpus: int) -> int:
    """One warp (int32 reductions in one ``redux.sync``, no barrier) while each thread holds at most
    64 swap candidates; four beyond."""
    swaps = _pow2(slots // gpus) ** 2 * _pow2(gpus)
    return 1 if slots <= 128 and swaps <= 2048 else 4


def _candidates_kernel(
    weight_ref,
    mlog2log_ref,
    recip_ref,
    phy2mlog_ref,
    phyrank_ref,
    mlogcnt_ref,
    pphy2phy_ref,
    node_max_ref,
    scratch_ref,
    *,
    meta: greedy_pallas.Meta,
    cands: int,
    iters: int,
) -> None:
    """Program ``(row, c)``, ``row = layer * N + node``: candidate ``c`` of ``node_candidates``.

    Writes ``pphy2phy [C, rows, S]`` (the items by slot) and ``node_max [C, rows]``
    (heaviest GPU) of the candidate and, from the LPT candidates, replication
    ``c // 2``'s ``phy2mlog``, ``phyrank`` ``[2, rows, S]`` and ``mlogcnt [2, rows, E/N]``.
    ``scratch``: ``5 * S`` int32 per program (``_pack``'s ``3 * S``, then items and
    load bits by slot).
    """
    E, R, NODES, GPUS = meta.E, meta.R, meta.NODES, meta.GPUS
    interpret = meta.interpret
    EN, S, M = E // NODES, R // NODES, GPUS // NODES
    K, X = S // M, S - EN
    row, cand = pl.program_id(0), pl.program_id(1)
    rows = pl.num_programs(0)
    layer = lax.div(row, np.int32(NODES))
    node = lax.rem(row, np.int32(NODES))
    rep, snake = lax.div(cand, np.int32(2)), lax.rem(cand, np.int32(2)) == 1
    base = (row * cands + cand) * 5 * S

    def barrier() -> None:
        if not interpret:  # the interpreter runs one lane at a time, in program order
            plgpu.debug_barrier()

    q, x = _iota(meta.P_EN), _iota(meta.P_X)
    q_valid, x_valid = q < EN, x < X
    expert = plgpu.load(mlog2log_ref.at[layer * E + node * EN + q], mask=q_valid, other=0)
    w = _weights(weight_ref, layer * E + expert, q_valid)

    # Replication (the node's experts in node-major order; greedy, or capped at M).
    count, x_pick, x_rank = _replicate(w, recip_ref, meta=meta, cap=M + (1 - rep) * (S + 1 - M))  # rep 1: M
    lpt = jnp.logical_not(snake)
    out = (rep * rows + row) * S
    _store(phy2mlog_ref, out + q, q, q_valid & lpt, interpret)
    _store(phyrank_ref, out + q, 0, q_valid & lpt, interpret)
    _store(phy2mlog_ref, out + EN + x, x_pick, x_valid & lpt, interpret)
    _store(phyrank_ref, out + EN + x, x_rank, x_valid & lpt, interpret)
    _store(mlogcnt_ref, (rep * rows + row) * EN + q, count, q_valid & lpt, interpret)

    # Item loads w * fl(1/count) as int32 bits: originals (items q), extras (items EN + x).
    bits_o = jnp.where(q_valid, _bits(w * plgpu.load(recip_ref.at[count], mask=q_valid, other=0.0)), -1)
    x_count = 1 + jnp.sum(((x_pick[None, :] == x_pick[:, None]) & x_valid[None, :]).astype(I32), axis=1, dtype=I32)
    x_w = jnp.sum(jnp.where(x_pick[:, None] == q[None, :], w[None, :], 0.0), axis=1)  # one non-zero term: exact
    bits_x = jnp.where(x_valid, _bits(x_w * plgpu.load(recip_ref.at[x_count], mask=x_valid, other=0.0)), -1)

    # The start: the slot of every item, from its visit step (LPT: the greedy kernel's packing).
    steps = _visit_steps(bits_o, bits_x, scratch_ref, barrier, meta=meta, base=base)
    if K == 1:
        lpt_o, lpt_x = q, EN + x  # one slot per GPU: item i on GPU i
    else:
        lpt_o, lpt_x = _pack(bits_o, bits_x, scratch_ref, barrier, meta=meta, base=base, steps=steps)

    def snake_slot(step: jax.Array) -> jax.Array:
        turn, place = lax.div(step, np.int32(M)), lax.rem(step, np.int32(M))
        return jnp.where(lax.rem(turn, np.int32(2)) == 0, place, M - 1 - place) * K + turn

    pos_o = jnp.where(snake, snake_slot(steps[0]), lpt_o)
    pos_x = jnp.where(snake, snake_slot(steps[1]), lpt_x)

    # Items and load bits by slot, as [P_M, P_K] tiles (GPU m holds slots m*K .. m*K + K - 1).
    items, loads = base + 3 * S, base + 4 * S
    barrier()  # _pack's readers of the scratch are done
    _store(scratch_ref, items + pos_o, q, q_valid, interpret)
    _store(scratch_ref, items + pos_x, EN + x, x_valid, interpret)
    _store(scratch_ref, loads + pos_o, bits_o, q_valid, interpret)
    _store(scratch_ref, loads + pos_x, bits_x, x_valid, interpret)
    barrier()
    P_M, P_K = _pow2(M), _pow2(K)
    m = _iota(P_M)
    mm, kk = m[:, None], _iota(P_K)[None, :]
    valid = (mm < M) & (kk < K)
    slot = jnp.where(valid, mm * K + kk, 0)
    slot_item = plgpu.load(scratch_ref.at[items + slot], mask=valid, other=0)
    slot_bits = plgpu.load(scratch_ref.at[loads + slot], mask=valid, other=0)  # padding: +0.0

    def gpu_loads(slot_bits: jax.Array) -> jax.Array:
        """``[P_M]`` float32: each GPU's slots summed left to right (a column is one non-zero term)."""

        def column(k: Any) -> jax.Array:
            return _float(jnp.sum(jnp.where(kk == k, slot_bits, 0), axis=1, dtype=I32))

        return _steps(K - 1, lambda k, total: total + column(k + 1), column(0), 8)

    if iters > 0 and M > 1:
        i3 = _iota(P_K)[:, None, None]
        b3 = m[None, :, None]
        j3 = _iota(P_K)[None, None, :]
        valid3 = (i3 < K) & (b3 < M) & (j3 < K)
        flat3 = (i3 * M + b3) * K + j3  # row-major index over the real (K, M, K)

        def swap_round(state: Any) -> Any:
            """``refine_by_swaps``' round: the best swap out of the heaviest GPU, applied if it lowers it."""
            slot_item, slot_bits, step, _ = state
            load = gpu_loads(slot_bits)
            load_bits = jnp.where(m < M, _bits(load), -1)
            top = jnp.max(load_bits)
            heavy = jnp.min(jnp.where(load_bits == top, m, _INT_MAX))  # the heaviest GPU, first on ties
            heavy_load = _float(top)
            out_i = _float(jnp.sum(jnp.where(mm == heavy, slot_bits, 0), axis=0, dtype=I32))[:, None, None]
            in_j = _float(slot_bits)[None, :, :]
            partner = jnp.where(m == heavy, np.float32(np.inf), load)[None, :, None]
            worst = jnp.maximum((heavy_load - out_i) + in_j, (partner - in_j) + out_i)
            worst_bits = jnp.where(valid3, _bits(worst), _INT_MAX)  # every candidate is >= +0.0
            lowest = jnp.min(worst_bits)
            best = jnp.min(jnp.where(worst_bits == lowest, flat3, _INT_MAX))  # first in (i, b, j) order
            accept = _float(lowest) < heavy_load * _IMPROVEMENT
            give = accept & (mm == heavy) & (kk == lax.div(best, np.int32(M * K)))
            take = (
                accept & (mm == lax.rem(lax.div(best, np.int32(K)), np.int32(M))) & (kk == lax.rem(best, np.int32(K)))
            )

            def exchange(values: jax.Array) -> jax.Array:
                given = jnp.sum(jnp.where(give, values, 0), dtype=I32)
                taken = jnp.sum(jnp.where(take, values, 0), dtype=I32)
                return jnp.where(give, taken, jnp.where(take, given, values))

            return exchange(slot_item), exchange(slot_bits), step + 1, accept & (step + 1 < iters)

        state = (slot_item, slot_bits, np.int32(0), jnp.bool_(True))
        slot_item, slot_bits, _, _ = lax.while_loop(lambda s: s[3], swap_round, state)

    load = gpu_loads(slot_bits)
    node_max = jnp.max(jnp.where(m < M, load, 0.0))
    plgpu.store(node_max_ref.at[cand * rows + row], node_max)
    _store(pphy2phy_ref, (cand * rows + row) * S + slot, slot_item, valid, interpret)


def candidate_stage(
    weight: jax.Array,
    mlog2log: jax.Array,
    num_phy: int,
    num_nodes: int,
    num_gpus: int,
    num_iters: int,
    *,
    xp: Any = jnp,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """``node_candidates`` of float32 ``weight [L, E]``: one kernel launch, then the choice in XLA."""
    num_layers, num_experts = weight.shape
    rows = num_layers * num_nodes
    slots, gpus, log_per_node = num_phy // num_nodes, num_gpus // num_nodes, num_experts // num_nodes
    num_cands = 4 if gpus > 1 and slots > log_per_node else 2
    # kernel_meta's hierarchy sizes: groups play no part here.
    meta = greedy_pallas.kernel_meta(
        num_experts, num_phy, num_nodes, num_nodes, num_gpus, num_warps=_num_warps(slots, gpus), interpret=interpret
    )
    out_shape = (
        jax.ShapeDtypeStruct((2 * rows * slots,), I32),  # phy2mlog
        jax.ShapeDtypeStruct((2 * rows * slots,), I32),  # phyrank
        jax.ShapeDtypeStruct((2 * rows * log_per_node,), I32),  # mlogcnt
        jax.ShapeDtypeStruct((num_cands * rows * slots,), I32),  # pphy2phy
        jax.ShapeDtypeStruct((num_cands * rows,), jnp.float32),  # node_max
        jax.ShapeDtypeStruct((rows * num_cands * 5 * slots,), I32),  # scratch
    )
    kernel = functools.partial(_candidates_kernel, meta=meta, cands=num_cands, iters=num_iters if gpus > 1 else 0)
    phy2mlog, phyrank, mlogcnt, pphy2phy, node_max, _ = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(rows, num_cands),
        compiler_params=plgpu.CompilerParams(num_warps=meta.num_warps, num_stages=1),
        interpret=interpret,
        name="eplb_refined_candidates",
    )(
        weight.reshape(-1),
        mlog2log.astype(I32).reshape(-1),
        jnp.asarray(greedy_pallas.reciprocal_table(meta.MAXCNT)),
    )
    index = mlog2log.dtype
    phy2mlog, phyrank = (a.reshape(2, rows, slots).astype(index) for a in (phy2mlog, phyrank))
    mlogcnt = mlogcnt.reshape(2, rows, log_per_node).astype(index)
    pphy2phy = pphy2phy.reshape(num_cands, rows, slots).astype(index)
    node_arrays = [(phy2mlog[c // 2], phyrank[c // 2], mlogcnt[c // 2]) for c in range(num_cands)]
    return pick_candidates(node_max.reshape(num_cands, rows), list(pphy2phy), node_arrays, xp=jnp)


def _greedy_stage(
    weight: jax.Array, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, *, interpret: bool, xp: Any = jnp
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``rebalance_hierarchical`` by the greedy Pallas kernel: ``phy2log, phyrank, logcnt``."""
    phy2log, log2phy, logcnt = greedy_pallas.placement(
        weight, (num_phy, num_groups, num_nodes, num_gpus), True, interpret=interpret
    )
    # phyrank from log2phy: replica c of expert e sits in slot log2phy[e, c] (-1: none, dropped).
    num_layers, _, max_count = log2phy.shape
    slots = jnp.where(log2phy >= 0, log2phy, num_phy).reshape(num_layers, -1)
    rank = jnp.broadcast_to(jnp.arange(max_count, dtype=phy2log.dtype), log2phy.shape).reshape(num_layers, -1)
    layer = jnp.arange(num_layers, dtype=phy2log.dtype)[:, None]
    phyrank = jnp.zeros_like(phy2log).at[layer, slots].set(rank, mode="drop")
    return phy2log, phyrank, logcnt


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("interpret", "num_iters"))
def placement(
    weight: jax.Array,
    config: tuple[int, int, int, int],
    hierarchical: bool,
    *,
    interpret: bool = False,
    num_iters: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Refined placement of ``weight [L, E]`` (any real dtype, compared as float32).

    ``config = (num_replicas, num_groups, num_nodes, num_gpus)``, validated by
    the caller; the sizes must pass :func:`fits`. Returns ``phy2log [L, R]``,
    ``log2phy [L, E, R - E + 1]`` (``-1`` padded), ``logcnt [L, E]``, JAX's
    default integer, as the XLA path. Lowers on CUDA only, unless
    ``interpret`` (Pallas' interpreter, any platform). Under ``vmap`` the
    batch is folded into the layers. ``num_iters``: swap rounds (default
    :func:`eplb.algorithms.refined.default_iterations`).
    """
    num_replicas, num_groups, num_nodes, num_gpus = config
    sizes = (num_nodes if hierarchical else 1, num_gpus)

    @jax.custom_batching.custom_vmap
    def run(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        w = w.astype(jnp.float32)
        phy2log, phyrank, logcnt = rebalance_refined(
            w,
            num_replicas,
            num_groups,
            num_nodes,
            num_gpus,
            hierarchical=hierarchical,
            xp=jnp,
            num_iters=num_iters,
            candidate_stage=functools.partial(candidate_stage, interpret=interpret),
            final_stage=functools.partial(
                keep_greedy_unless_beaten, greedy_stage=functools.partial(_greedy_stage, interpret=interpret)
            ),
        )
        return phy2log, build_log2phy(phy2log, phyrank, w.shape[1], xp=jnp), logcnt

    @run.def_vmap
    def _fold(axis_size: int, in_batched: list[bool], w: jax.Array) -> Any:
        del in_batched  # one input, batched (or this rule would not run)
        if fits(axis_size * w.shape[1], w.shape[2], num_replicas, *sizes):
            out = run(w.reshape((-1, w.shape[-1])))  # [B, L, E] -> [B * L, E]: layers are independent
            out = tuple(a.reshape((axis_size, -1, *a.shape[1:])) for a in out)
        else:
            out = lax.map(run, w)  # one launch per batch entry keeps the indices in int32
        return out, (True, True, True)

    return run(weight)
