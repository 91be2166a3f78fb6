"""Equals :func:`eplb.algorithms.relabel.relabel` bit for bit: ``previous=``'s relabelling on JAX GPUs (Pallas).

Proved by ``tests/test_pallas_relabel.py``: Pallas' interpreter on the CPU
against :func:`eplb.kernels.relabel_numba.relabel` and the array-API function
on random, permuted, one-expert, one-slot-per-GPU and tied placements
(hierarchical and global; also under ``jax_enable_x64``), the kernel's
lowering to Triton for CUDA, and on a JAX GPU ``rebalance_experts(...,
previous=)`` (which runs it) against numpy on the real DeepSeek-V3 loads at
288 slots on 32 GPUs in 4 nodes and on 144 GPUs.

A port of the assignment part of :mod:`eplb.kernels.relabel_triton` to
``jax.experimental.pallas`` (Triton lowering, one program per layer), in
int32 arithmetic (JAX without x64 has no 64-bit integers):

- ``kept [B, G, G]`` (:func:`eplb.algorithms.relabel.gpu_overlap`) and the
  slot alignment (:func:`eplb.algorithms.relabel.align_slots`) are the
  array-API functions under XLA (a few fused element-wise ops, no loop);
- the kernel (:func:`assignment`) runs the array-API solver's Hungarian
  algorithm (:func:`eplb.algorithms.assignment.max_assignment`: shortest
  augmenting paths, rows added one by one, Dijkstra on reduced costs, among
  the closest columns a free one, then the first) step for step, with
  relabel_triton's bookkeeping (distances kept from the start of a search,
  potentials shifted once it ends, records of ``(potential, way, row)`` per
  column for the augmenting path). Several problems run in lock-step as the
  rows of ``[problems, columns]`` tensors; where relabel_triton packs the
  distance into an int64 key, a step here takes two int32 ``min``
  reductions (the least distance among the open columns, then the least
  ``taken << 24 | column << 12 | row`` among those at it: a free column
  first, then the first). With nodes: the ``nodes**2`` GPU matchings between
  every pair of nodes in lock-step, then the node matching on their values
  (read back from a scratch buffer); else one matching over all GPUs. It
  writes ``holder [B, G]``, the new GPU placed at each old position.

:func:`relabel_pinned` equals :func:`eplb.algorithms.elastic.relabel_pinned` (failed GPUs pinned to failed
positions, and with nodes each GPU to its own node: the allowed pairs' profits raised by ``R + 1`` under XLA,
then one assignment over all GPUs by the same kernel, as relabel_triton's ``PINNED`` step); proved by
``tests/test_pallas_elastic.py`` (the interpreter on random masks, every GPU but one down and every GPU down;
on a JAX GPU the arguments ``place_elastic_stable`` passes it for the DeepSeek-V3 loads).

Integer arithmetic only (no division decides anything); :func:`fits` bounds
the sizes (12-bit columns and rows in the packed keys, int32 flat indices).
On an H200 (JAX 0.11.2, Triton 3.6, 61 layers of real DeepSeek-V3 loads) the
assignment kernel takes 0.11 ms at 288 slots on 32 GPUs in 4 nodes (one or
four warps alike) and 0.43-0.53 ms on 144 GPUs (one warp; four: 0.64-0.68);
the whole relabelling (with the XLA ops) 0.14-0.17 ms and 0.5-0.77 ms; and
``rebalance_experts(..., previous=)`` on JAX GPU arrays, which runs it after
the greedy Pallas kernel, 0.27 ms and 1.04 ms (median of 20 warm calls),
against 3.6 ms and 147 ms for the XLA path (``docs/benchmarks.md``,
"Keep-in-place planning speed").
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
from eplb.algorithms.assignment import BIG
from eplb.algorithms.relabel import align_slots, gpu_overlap

__all__ = ["MAX_GPUS", "assignment", "fits", "relabel", "relabel_pinned"]

I32 = jnp.int32
_INT_MAX = np.int32(2**31 - 1)
_BITS = 12  # columns and rows (1-based, 0: the dummy) packed in 12 bits each
_MASK = (1 << _BITS) - 1

# A GPU row of the register tensors stays reasonable up to this size (relabel_triton's bound).
MAX_GPUS = 1024


def _pow2(n: int) -> int:
    """The next power of two ``>= n``, at least 2 (Triton tensor sizes are powers of two)."""
    return max(2, 1 << (n - 1).bit_length())


def fits(num_layers: int, num_phy: int, num_gpus: int, num_nodes: int, *, pinned: bool = False) -> bool:
    """Whether :func:`relabel` (``pinned``: :func:`relabel_pinned`) takes these sizes (else the array-API path
    runs).

    Columns and rows fit the packed 12-bit fields, flat indices of ``kept``
    int32, and every distance and potential stays below ``BIG = 2**30``
    (profits are at most ``R``, pinned ``2 R + 1``; a search sums at most ``G`` of them).
    """
    top = 2 * num_phy + 1 if pinned else num_phy
    return (
        0 < num_gpus <= MAX_GPUS
        and num_nodes > 0
        and num_phy % num_gpus == 0
        and num_gpus % num_nodes == 0
        and num_layers * num_gpus * num_gpus < 2**31
        and 8 * num_gpus * (top + 1) < BIG
    )


def _loop(lower: int, upper: int, body: Any, init: Any) -> Any:
    """``lax.fori_loop`` with an int32 counter (also when the user enables x64)."""
    return lax.fori_loop(np.int32(lower), np.int32(upper), body, init)


def _store(ref: Any, index: jax.Array, values: Any, mask: Any, interpret: bool) -> None:
    """Masked scatter (the interpreter stores every lane: masked-off ones are sent past the end)."""
    if interpret:
        index = jnp.where(mask, index, ref.shape[0])
    values = jnp.broadcast_to(jnp.asarray(values, ref.dtype), jnp.shape(index))
    plgpu.store(ref.at[index], values, mask=mask)


def _load(ref: Any, index: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked gather, 0 where masked off (indices clamped there: the interpreter reads every lane)."""
    return plgpu.load(ref.at[jnp.where(mask, index, 0)], mask=mask, other=0)


def _assign(ref: Any, base: Any, row_off: Any, col_off: Any, ok: Any, n: int, width: int, stride: int) -> jax.Array:
    """``p [NP, width]``: the row (1-based) matched to column ``j`` (1..n) in each problem ``k`` (``ok[k]``).

    Problem ``k`` is :func:`eplb.algorithms.assignment.max_assignment` of the
    ``n x n`` profits ``ref[base + (row_off[k] + i) * stride + col_off[k] + j]``.
    Column 0 is the dummy; ``u`` is kept per column (the potential of the row
    matched to it; column 0: the row being added), so every value a step
    needs comes from the column it picked. Distances count from the start of
    the search (``dist = minv + D``, ``D`` the deltas so far) and ``before``
    holds ``D`` when each column was used (-1: not yet), so the potentials
    are shifted once a search ends, by ``D - before``.
    """
    num = row_off.shape[0]
    col = lax.broadcasted_iota(I32, (num, width), 1)
    real = (col >= 1) & (col <= n)
    okc = ok[:, None]
    rows = base + row_off[:, None] * stride + col_off[:, None] + (col - 1)

    def profit_row(i: jax.Array, live: jax.Array) -> jax.Array:  # i [NP]: 0-based rows
        return _load(ref, rows + i[:, None] * stride, real & live)

    def row_max(i: jax.Array, top: jax.Array) -> jax.Array:
        return jnp.maximum(top, jnp.max(profit_row(jnp.full((num,), i, I32), okc), axis=1))

    top = _loop(0, n, row_max, jnp.zeros((num,), I32))  # cost = top - profit

    def add_row(row: jax.Array, carry: Any) -> Any:
        v, u, p, rec_u, rec_way = carry
        p = jnp.where(col == 0, row, p)
        u = jnp.where(col == 0, 0, u)
        # The low bits of each column's key (p is fixed during a search): taken, column, its row.
        low = ((p != 0).astype(I32) << 24) | (col << _BITS) | p

        def step(state: Any) -> Any:  # one Dijkstra step from column j0 (row i0) in every active problem
            dist, before, rec_u, rec_way, j0, i0, u0, total, active, _ = state
            live = active[:, None]
            before = jnp.where((col == j0[:, None]) & live, total[:, None], before)
            open_col = real & (before < 0)
            profit = profit_row(i0 - 1, live)
            reduced = (top + total - u0)[:, None] - profit - v  # cost - u0 - v, plus D
            better = open_col & live & (reduced < dist)
            dist = jnp.where(better, reduced, dist)
            rec_u = jnp.where(better, (u0 - total)[:, None], rec_u)
            rec_way = jnp.where(better, ((j0 << _BITS) | i0)[:, None], rec_way)
            # Among the closest open columns a free one, then the first: two int32 min reductions.
            nearest = jnp.min(jnp.where(open_col, dist, _INT_MAX), axis=1)
            best = jnp.min(jnp.where(open_col & (dist == nearest[:, None]), low, _INT_MAX), axis=1)
            total = jnp.where(active, nearest, total)
            j0 = jnp.where(active, (best >> _BITS) & _MASK, j0)
            i0 = jnp.where(active, best & _MASK, 0)
            u0 = jnp.sum(jnp.where(col == j0[:, None], u, 0), axis=1, dtype=I32)
            active = i0 != 0  # the search ends at a free column
            going = jnp.max(active.astype(I32))
            return dist, before, rec_u, rec_way, j0, i0, u0, total, active, going

        zeros = jnp.zeros((num,), I32)
        state = (
            jnp.full((num, width), BIG, I32),
            jnp.full((num, width), -1, I32),
            rec_u,
            rec_way,
            zeros,
            zeros + row,
            zeros,
            zeros,
            ok,
            jnp.max(ok.astype(I32)),
        )
        _, before, rec_u, rec_way, j0, _, _, total, _, _ = lax.while_loop(lambda s: s[-1] > 0, step, state)
        used = before >= 0
        shift = total[:, None] - before
        u = jnp.where(used, u + shift, u)
        v = jnp.where(used, v - shift, v)

        def hop(state: Any) -> Any:  # the augmenting path: p[j] = p[way[j]] back to column 0
            p, u, jc, _ = state
            here = col == jc[:, None]
            way = jnp.sum(jnp.where(here, rec_way, 0), axis=1, dtype=I32)
            pot = jnp.sum(jnp.where(here, rec_u, 0), axis=1, dtype=I32)
            moving = here & (jc != 0)[:, None]
            p = jnp.where(moving, (way & _MASK)[:, None], p)
            u = jnp.where(moving, (pot + total)[:, None], u)
            jc = jnp.where(jc != 0, (way >> _BITS) & _MASK, 0)
            return p, u, jc, jnp.max((jc != 0).astype(I32))

        jc = jnp.where(ok, j0, 0)
        p, u, _, _ = lax.while_loop(lambda s: s[-1] > 0, hop, (p, u, jc, jnp.max((jc != 0).astype(I32))))
        return v, u, p, rec_u, rec_way

    zeros = jnp.zeros((num, width), I32)
    _, _, p, _, _ = _loop(1, n + 1, add_row, (zeros,) * 5)
    return p


def _kernel(kept_ref, holder_ref, scratch_ref, *, G: int, NODES: int, interpret: bool) -> None:
    """``holder [G]`` of one layer (program): the new GPU placed at each old position."""
    layer = pl.program_id(0)
    base = layer * (G * G)
    out = layer * G

    def barrier() -> None:
        if not interpret:  # the interpreter runs one lane at a time, in program order
            plgpu.debug_barrier()

    if NODES == 1:
        lanes = lax.iota(I32, 2)  # one problem in lane 0 of two (one-lane tensors: see relabel_triton)
        width = _pow2(G + 1)
        p = _assign(kept_ref, base, lanes * 0, lanes * 0, lanes == 0, G, width, G)
        col = lax.iota(I32, width)
        p0 = jnp.sum(jnp.where(lanes[:, None] == 0, p, 0), axis=0, dtype=I32)
        real = (col >= 1) & (col <= G)
        _store(holder_ref, out + col - 1, p0 - 1, real, interpret)
        return
    gn = G // NODES
    num = _pow2(NODES * NODES)
    width = _pow2(gn + 1)
    outer_width = _pow2(NODES + 1)
    scratch = layer * (num * width + num + outer_width)
    pair = lax.iota(I32, num)
    a, c = pair // NODES, pair % NODES
    pair_ok = pair < NODES * NODES
    p = _assign(kept_ref, base, a * gn, c * gn, pair_ok, gn, width, G)
    col = lax.broadcasted_iota(I32, (num, width), 1)
    real = (col >= 1) & (col <= gn) & pair_ok[:, None]
    _store(scratch_ref, scratch + pair[:, None] * width + col, p, real, interpret)
    picked = _load(kept_ref, base + (a[:, None] * gn + p - 1) * G + c[:, None] * gn + col - 1, real)
    _store(scratch_ref, scratch + num * width + pair, jnp.sum(picked, axis=1, dtype=I32), pair_ok, interpret)
    barrier()
    lanes = lax.iota(I32, 2)
    values = scratch + num * width
    q = _assign(scratch_ref, values, lanes * 0, lanes * 0, lanes == 0, NODES, outer_width, NODES)
    ocol = lax.iota(I32, outer_width)
    q0 = jnp.sum(jnp.where(lanes[:, None] == 0, q, 0), axis=0, dtype=I32)
    outer = scratch + num * width + num
    _store(scratch_ref, outer + ocol, q0, (ocol >= 1) & (ocol <= NODES), interpret)
    barrier()
    pos = lax.iota(I32, _pow2(G))
    pos_ok = pos < G
    node, j = pos // gn, pos % gn  # old position: node and GPU within it
    from_node = _load(scratch_ref, outer + node + 1, pos_ok) - 1  # the new node placed at this old node
    row = _load(scratch_ref, scratch + (from_node * NODES + node) * width + j + 1, pos_ok) - 1
    _store(holder_ref, out + pos, from_node * gn + row, pos_ok, interpret)


def _num_warps(num_nodes: int) -> int:
    """On an H200, 61 layers: one matching over 144 GPUs takes 0.43 ms with one warp (two: 0.60, four: 0.64,
    eight: 0.78); 4 nodes of 8 GPUs 0.107 ms with four warps (one: 0.113, two: 0.114, eight: 0.133)."""
    return 1 if num_nodes == 1 else 4


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("interpret", "num_warps"))
def assignment(
    kept: jax.Array, num_gpus: int, num_nodes: int, *, interpret: bool = False, num_warps: int | None = None
) -> jax.Array:
    """``holder [B, G]`` (int32): the new GPU that :func:`eplb.algorithms.relabel.relabel` puts at each old
    position, from ``kept [B, G, G]`` (:func:`eplb.algorithms.relabel.gpu_overlap`). One launch, one
    program per layer; CUDA only, unless ``interpret`` (Pallas' interpreter, any platform)."""
    batch = kept.shape[0]
    if num_warps is None:
        num_warps = _num_warps(num_nodes)
    G, NODES = num_gpus, num_nodes
    if NODES == 1:
        scratch = 1
    else:
        num, width = _pow2(NODES * NODES), _pow2(G // NODES + 1)
        scratch = batch * (num * width + num + _pow2(NODES + 1))
    holder, _ = pl.pallas_call(
        functools.partial(_kernel, G=G, NODES=NODES, interpret=interpret),
        out_shape=(jax.ShapeDtypeStruct((batch * G,), I32), jax.ShapeDtypeStruct((scratch,), I32)),
        grid=(batch,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="eplb_relabel",
    )(kept.astype(I32).reshape(-1))
    return holder.reshape(batch, G)


def relabel(new: Any, old: Any, num_gpus: int, num_nodes: int, *, xp: Any = None, interpret: bool = False) -> Any:
    """``new [B, R]`` with nodes, GPUs within nodes and slots within GPUs permuted to match ``old [B, R]``.

    :func:`eplb.algorithms.relabel.relabel` (same arguments; ``xp`` is not
    used), JAX arrays: ``kept`` and the slot alignment as XLA ops, the
    assignment as one Pallas launch (:func:`assignment`). Sizes must pass
    :func:`fits`.
    """
    batch, num_phy = new.shape
    if batch == 0:
        return new
    per_gpu = num_phy // num_gpus
    kept = gpu_overlap(new, old, num_gpus, xp=jnp)
    holder = assignment(kept, num_gpus, num_nodes, interpret=interpret).astype(new.dtype)
    ids = jnp.arange(per_gpu, dtype=new.dtype)
    slots = jnp.reshape(holder[:, :, None] * per_gpu + ids, (batch, num_phy))
    return align_slots(_xp.take_along(new, slots, xp=jnp), old, num_gpus, xp=jnp)


def relabel_pinned(
    new: Any, old: Any, live_gpu: Any, num_gpus: int, *, num_nodes: int = 1, xp: Any = None, interpret: bool = False
) -> Any:
    """:func:`eplb.algorithms.elastic.relabel_pinned` (same arguments; ``xp`` is not used), JAX arrays.

    ``new``, ``old`` ``[B, R]`` integer ids (``-1``: an empty slot, in ``new`` exactly the failed GPUs'),
    ``live_gpu [B or 1, G]`` bool (or integer classes). ``kept``, the allowed pairs' ``R + 1`` and the slot
    alignment are XLA ops; the one assignment over all GPUs (nodes are folded into the allowed pairs) is
    :func:`assignment`'s kernel, as relabel_triton's ``PINNED`` step. Sizes must pass :func:`fits` with
    ``pinned=True``.
    """
    new, old = jnp.asarray(new), jnp.asarray(old)
    batch, num_phy = new.shape
    if batch == 0:
        return new
    per_gpu = num_phy // num_gpus
    kept = gpu_overlap(new, old, num_gpus, xp=jnp)  # [B, G, G]: new GPU i, old position j
    live_gpu = jnp.broadcast_to(jnp.asarray(live_gpu), (batch, num_gpus))
    allowed = live_gpu[:, :, None] == live_gpu[:, None, :]
    if num_nodes > 1:
        node = jnp.arange(num_gpus) // (num_gpus // num_nodes)
        allowed = allowed & (node[:, None] == node[None, :])
    profit = kept.astype(I32) + allowed.astype(I32) * np.int32(num_phy + 1)
    holder = assignment(profit, num_gpus, 1, interpret=interpret).astype(new.dtype)
    ids = jnp.arange(per_gpu, dtype=new.dtype)
    slots = jnp.reshape(holder[:, :, None] * per_gpu + ids, (batch, num_phy))
    return align_slots(_xp.take_along(new, slots, xp=jnp), old, num_gpus, xp=jnp)
