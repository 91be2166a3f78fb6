"""Equals :func:`eplb.algorithms.policies.place` (greedy policy, no ``spill``) bit for bit: one Pallas kernel.

Proved by ``tests/test_pallas.py`` (Pallas' interpreter on the CPU, the CUDA lowering, the GPU) and the
cross-backend suite (``jax:pallas-interpret``, ``jax:gpu``). For JAX arrays on NVIDIA GPUs (Triton backend).

A port of :mod:`eplb.kernels.greedy_triton` to ``jax.experimental.pallas``,
which ships with JAX (no ``jax-triton``). One program (one warp) places one
(layer, node): it recomputes the layer's group split, replicates the node's
experts and packs the node's replicas onto its GPUs, then writes its slots
of ``phy2log``, its experts' rows of ``log2phy`` (``-1`` past the replica
count) and ``logcnt``. Same steps, same float32 arithmetic as the array-API
path (``docs/algorithm.md``), so placements are bit-identical:

- sums are accumulated left to right, one add at a time;
- replica loads are ``w * table[c]`` with a correctly rounded reciprocal
  table made on the host with numpy, never a division;
- loads are compared as int32 bit patterns, which order like the values for
  non-negative floats (loads below ``2**-64``, ``-0.0`` included, are read as
  ``+0.0``, as on every backend: :mod:`eplb.algorithms.loads`);
- stable descending order by counting: item ``i`` goes to position
  ``#{j : v_j > v_i} + #{j < i : v_j == v_i}`` (JAX without x64 has no 64-bit
  sort keys, and Pallas Triton no sort);
- no multiply feeds an add, so FMA contraction (which Pallas offers no switch
  for) cannot change a rounding: the only products are replica loads, which
  are compared, or handed to the packing sum through their integer bits.

The work is a few hundred dependent steps per program, so a step's latency
is what counts, and each step is built from int32 ``min``/``max``
reductions, which a warp does in one ``redux.sync`` instruction (float and
``argmin`` reductions take five shuffle rounds):

- a replication step is a max over the score bits, then a min over packed
  keys ``expert << C_BITS | count`` among the lanes holding it (the lowest
  such expert and its count at once); each lane keeps its next score ready;
- a packing step is a min over the open GPUs' load bits (full GPUs hold
  ``INT32_MAX``), then a min over packed ``gpu << K_BITS | count`` among the
  lanes holding it (the lightest open GPU, lowest index on ties, and the
  item's rank in it). The step reads its item with one scalar load from a
  scratch buffer written once in visiting order (read a block of steps
  ahead) and writes its slot with one scalar store; the first
  ``min(GPUs, positive items)`` steps need no search (item ``t`` goes to
  empty GPU ``t``) and are done at once;
- tiles the steps reduce have at least one element per lane (no replicated
  lanes), so the loops carry a handful of registers.

Where the Triton kernel keeps one array of the node's ``R/N`` replicas, this
one keeps two: the originals (replica 0 of each of the node's experts, item
``q``) and the extra replicas (item ``E/N + t``, made at replication step
``t``), so that no tile is padded to the next power of two of ``R/N``.
Ranking tiles are summed inside each thread, in row chunks read from the
scratch buffer when they are big.

Loads must be finite and non-negative, as validated by the public API. Index
arithmetic is int32: callers keep ``L * E * (R - E + 1)`` below ``2**31``
(:func:`fits`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from eplb.algorithms.loads import MAX_LOAD, TINY_LOAD

__all__ = ["Meta", "fits", "kernel_meta", "placement"]

I32 = jnp.int32
F32 = jnp.float32


class Meta(NamedTuple):
    """Static sizes and settings of one launch (global policy: ``groups = nodes = 1``).

    ``P_*`` are register tile sizes (powers of two, as Triton requires):
    groups, nodes, group ranks per node, experts per node, extra replicas
    per node, GPUs per node, and the flat chunk of the ``log2phy`` padding.
    ``*_BITS`` are the widths of the counts packed under an index in int32
    keys. ``budget`` bounds a pairwise tile (in elements; bigger ones are
    summed over row chunks). ``unroll`` is how many sequential steps one
    loop iteration holds. ``select``: how a packing step finds the lightest
    open GPU (``"redux"``: two int32 min reductions, ``"arg"``: one argmin;
    a tuning aid only: at 768 slots / 32 nodes it did not finish on an H200).
    ``fill_first``: the first packing steps, which need no search (item
    ``t`` to empty GPU ``t``), are done at once. ``lanes``: the
    least length of the 1-D tiles that the sequential steps reduce (a tile
    shorter than a warp is replicated across its lanes). ``interpret``:
    Pallas' interpreter (no barrier; masked-off stores sent out of bounds).
    """

    E: int
    R: int
    GROUPS: int
    NODES: int
    GPUS: int
    MAXCNT: int
    P_G: int
    P_N: int
    P_GPN: int
    P_EN: int
    P_X: int
    P_M: int
    P_F: int
    N_BITS: int
    C_BITS: int
    K_BITS: int
    budget: int
    unroll: int
    select: str
    fill_first: bool
    lanes: int
    num_warps: int
    interpret: bool


def _pow2(n: int) -> int:
    """The next power of two ``>= n``, at least 2 (Triton tensor sizes are powers of two)."""
    return max(2, 1 << (n - 1).bit_length())


def kernel_meta(
    num_experts: int,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    num_warps: int | None = None,
    budget: int | None = None,
    unroll: int | None = None,
    select: str | None = None,
    fill_first: bool | None = None,
    lanes: int | None = None,
    interpret: bool = False,
) -> Meta:
    """Sizes for :func:`placement`; the keywords override the default settings (for tuning)."""
    max_count = num_replicas - num_experts + 1
    experts_per_node = num_experts // num_nodes
    extras = (num_replicas - num_experts) // num_nodes
    groups_per_node = num_groups // num_nodes
    if num_warps is None:
        # The steps are chains of one-warp reductions (redux.sync, no shared
        # memory, no barrier); more warps only add cross-warp round trips.
        num_warps = 1
    threads = 32 * num_warps
    if budget is None:
        budget = 64 * threads  # elements of a pairwise tile: 64 registers a thread
    if lanes is None:
        lanes = threads

    def tile(n: int) -> int:
        return max(lanes, _pow2(n))

    return Meta(
        E=num_experts,
        R=num_replicas,
        GROUPS=num_groups,
        NODES=num_nodes,
        GPUS=num_gpus,
        MAXCNT=max_count,
        P_G=tile(num_groups),
        P_N=tile(num_nodes),
        P_GPN=_pow2(groups_per_node),
        P_EN=tile(experts_per_node),
        P_X=_pow2(extras),
        P_M=tile(num_gpus // num_nodes),
        P_F=min(_pow2(experts_per_node // groups_per_node * max_count), 16 * threads),
        N_BITS=groups_per_node.bit_length(),
        C_BITS=max_count.bit_length(),
        K_BITS=(num_replicas // num_gpus).bit_length(),
        budget=budget,
        unroll=4 if unroll is None else unroll,
        select="redux" if select is None else select,
        fill_first=True if fill_first is None else fill_first,
        lanes=lanes,
        num_warps=num_warps,
        interpret=interpret,
    )


def fits(num_layers: int, num_experts: int, num_replicas: int) -> bool:
    """Whether every flat index of the outputs, and every packed key, fits the kernel's int32 arithmetic.

    The largest index is a padding lane of ``log2phy``: below ``L * E * 2 * (R - E + 1)``;
    keys hold an expert or GPU index above a count (``< 2 * R * (R - E + 1)``).
    """
    max_count = num_replicas - num_experts + 1
    return num_layers * max(num_replicas, num_experts * 2 * max_count) < 2**31 and 2 * num_replicas * max_count < 2**31


# ---- Helpers on register tensors.

_INT_MAX = np.int32(2**31 - 1)
_MINUS_ONE_BITS = np.float32(-1.0).view(np.int32)  # a capped expert's score (bitcast on the host)


def _iota(n: int) -> jax.Array:
    return lax.iota(I32, n)


def _loop(lower: int, upper: int, body: Any, init: Any) -> Any:
    """``lax.fori_loop`` with an int32 counter (also when the user enables x64)."""
    return lax.fori_loop(np.int32(lower), np.int32(upper), body, init)


def _steps(count: int, body: Any, init: Any, unroll: int) -> Any:
    """``body(t, carry)`` for ``t = 0 .. count - 1``, ``unroll`` steps per loop iteration.

    Straight-line steps let the compiler overlap one step's off-chain work
    (picks, lane updates) with the next step's reductions.
    """
    unroll = max(1, min(unroll, count))
    blocks = count // unroll

    def block(i: jax.Array, carry: Any) -> Any:
        for u in range(unroll):
            carry = body(i * unroll + u, carry)
        return carry

    carry = block(np.int32(0), init) if blocks == 1 else _loop(0, blocks, block, init)
    for t in range(blocks * unroll, count):
        carry = body(np.int32(t), carry)
    return carry


def _pick(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``values[i]`` (integers) for the one ``i`` where ``mask`` holds: a sum with one non-zero term."""
    return jnp.sum(jnp.where(mask, values, jnp.zeros_like(values)), axis=-1, dtype=values.dtype)


def _bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, I32)


def _float(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits, F32)


def _weights(ref: Any, index: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 loads (0 where masked off), kept iff ``TINY_LOAD <= value <= MAX_LOAD``, else ``+0.0``.

    As every backend reads them (:func:`eplb.algorithms.loads.clean_loads`:
    ``-0.0``, NaN, negatives and inf too). The kernel also compares
    non-negative floats by their bit patterns (int32 keys order like the
    values), where ``-0.0`` would sort below ``+0.0``.
    """
    value = plgpu.load(ref.at[index], mask=mask, other=0.0)
    return jnp.where((value >= TINY_LOAD) & (value <= MAX_LOAD), value, 0.0)


def _count_pairs(rows: tuple[jax.Array, ...], cols: tuple[jax.Array, ...], pred: Any, budget: int, load: Any = None):
    """For each column ``i``: ``#{j : pred(*rows_j, *cols_i)}``, int32 ``[len(cols[0])]``.

    A ``[m, n]`` tile summed over its rows ``j`` (inside each thread: the
    columns run along the lanes), in row chunks when it exceeds ``budget``
    elements: ``load(first, size)`` reads a chunk of ``rows`` from memory,
    else chunks are split from the registers.
    """
    n, m = cols[0].shape[0], rows[0].shape[0]
    parts = 1
    while m // parts > 1 and n * (m // parts) > budget:
        parts *= 2
    size = m // parts

    def count(part: tuple[jax.Array, ...]) -> jax.Array:
        tile = pred(*(r[:, None] for r in part), *(c[None, :] for c in cols))
        return jnp.sum(tile.astype(I32), axis=0, dtype=I32)

    if parts == 1:
        return count(rows)
    if load is not None:
        return _loop(1, parts, lambda c, total: total + count(load(c * size, size)), count(load(0, size)))
    split = [jnp.split(r, parts) for r in rows]
    total = count(tuple(s[0] for s in split))
    for p in range(1, parts):
        total = total + count(tuple(s[p] for s in split))
    return total


def _ranks(v: jax.Array, w: jax.Array, tie: str, budget: int, load: Any = None) -> jax.Array:
    """For each ``i``: how many items ``j`` of ``w`` precede item ``v_i`` in a descending order.

    ``v``, ``w``: int32 bit patterns of non-negative floats (``-1`` on padding
    lanes, below every value), items indexed by lane. ``w_j`` precedes
    ``v_i`` if greater or, when equal, by ``tie``: ``"index"`` (``j < i``,
    one list against itself), ``"all"`` or ``"none"`` (two lists, one ahead
    of the other). ``load(first, size)``: ``w[first:first + size]`` from memory.
    """
    if tie == "index":  # w_j + [j < i] > v_i: ties go to the lower index (w_j + 1 cannot overflow)

        def pred(wj, j, vi, i):
            return (wj + (j < i).astype(I32)) > vi

        rows, cols = (w, _iota(w.shape[0])), (v, _iota(v.shape[0]))
        chunk = None if load is None else (lambda first, size: (load(first, size), first + _iota(size)))
        return _count_pairs(rows, cols, pred, budget, chunk)
    pred = (lambda wj, vi: wj >= vi) if tie == "all" else (lambda wj, vi: wj > vi)
    chunk = None if load is None else (lambda first, size: (load(first, size),))
    return _count_pairs((w,), (v,), pred, budget, chunk)


def _lightest(key: jax.Array, packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(packed, key)`` of the lowest index holding the smallest ``key`` (``packed``: ``index << bits | count``).

    Two int32 reductions (one ``redux.sync`` each on a warp): the smallest
    key, then the smallest packed value among the lanes holding it.
    """
    best = jnp.min(key)
    return jnp.min(jnp.where(key == best, packed, _INT_MAX)), best


def _store(ref: Any, index: jax.Array, values: Any, mask: Any, interpret: bool) -> None:
    """Masked scatter into a flat output.

    Pallas' interpreter stores every lane (the old value where masked off),
    which would clobber a valid lane at the same index, but drops
    out-of-bounds indices: there masked-off lanes get an index past the end.
    """
    if interpret and mask is not None:
        index = jnp.where(mask, index, ref.shape[0])
    values = jnp.broadcast_to(jnp.asarray(values, ref.dtype), jnp.shape(index))
    plgpu.store(ref.at[index], values, mask=mask)


def _replicate(w: jax.Array, recip_ref: Any, *, meta: Meta, cap: Any = None) -> tuple[jax.Array, ...]:
    """Greedy replication of a node's experts ``w [P_EN]`` into its ``R / N`` slots.

    Each step gives a replica to the expert with the largest score
    ``w * fl(1/count)``, the lowest expert on ties: a max over the scores'
    int32 bits, then a min over packed keys ``expert << C_BITS | count`` among
    the lanes holding it (that expert and its count at once). Each lane keeps
    its next score ready. ``cap`` (traced, ``>= 2``): an expert's score drops
    to ``-1.0`` once it has that many replicas (``replicate_experts``'
    ``max_count``). Returns ``count [P_EN]`` and, per extra replica ``x``
    (made at step ``x``), its node-local expert and replica number ``[P_X]``.
    """
    EN, X = meta.E // meta.NODES, (meta.R - meta.E) // meta.NODES
    q, x = _iota(meta.P_EN), _iota(meta.P_X)
    q_valid = q < EN
    count_mask = (1 << meta.C_BITS) - 1
    key = jnp.where(q_valid, (q << meta.C_BITS) | 1, _INT_MAX)
    x_pick = jnp.zeros((meta.P_X,), I32)  # node-local expert of each extra replica
    x_rank = jnp.zeros((meta.P_X,), I32)  # its replica number

    def score_bits(count: jax.Array) -> jax.Array:
        """Bits of ``w * fl(1/count)`` (compared, never added), ``-1.0``'s at the cap."""
        bits = _bits(w * plgpu.load(recip_ref.at[count]))
        return bits if cap is None else jnp.where(count >= cap, _MINUS_ONE_BITS, bits)

    if X > 0:

        def add_replica(t: jax.Array, carry: Any) -> Any:
            score, next_score, key, x_pick, x_rank = carry
            best = jnp.max(score)
            best_key = jnp.min(jnp.where(score == best, key, _INT_MAX))
            chosen = key == best_key
            c = best_key & count_mask  # replicas so far
            score = jnp.where(chosen, next_score, score)
            key = jnp.where(chosen, key + 1, key)
            next_score = jnp.where(chosen, score_bits(c + 2), next_score)
            x_pick = jnp.where(x == t, best_key >> meta.C_BITS, x_pick)
            x_rank = jnp.where(x == t, c, x_rank)
            return score, next_score, key, x_pick, x_rank

        # w * fl(1/1) = w; padding lanes never win (-1.0's bits, a capped score, are above INT_MIN).
        score = jnp.where(q_valid, _bits(w), np.int32(-(2**31)))
        next_score = score_bits(jnp.full((meta.P_EN,), 2, I32))
        _, _, key, x_pick, x_rank = _steps(X, add_replica, (score, next_score, key, x_pick, x_rank), meta.unroll)
    return jnp.where(q_valid, key & count_mask, 0), x_pick, x_rank


# ---- The kernel: one program per (layer, node).


def _greedy_kernel(weight_ref, recip_ref, phy2log_ref, log2phy_ref, logcnt_ref, scratch_ref, *, meta: Meta) -> None:
    E, R, GROUPS, NODES, GPUS, MAXCNT = meta.E, meta.R, meta.GROUPS, meta.NODES, meta.GPUS, meta.MAXCNT
    interpret = meta.interpret
    layer = pl.program_id(0)
    node = pl.program_id(1)
    GS = E // GROUPS  # experts per group
    GPN = GROUPS // NODES  # groups per node
    EN = E // NODES  # experts per node
    S = R // NODES  # slots per node
    X = S - EN  # extra replicas per node
    K = R // GPUS  # slots per GPU
    row = layer * E  # flat offset of this layer's loads and logcnt row
    q = _iota(meta.P_EN)  # node-local expert index (node-major order)
    q_valid = q < EN
    x = _iota(meta.P_X)  # extra replica index: item EN + x, made at replication step x
    x_valid = x < X

    def barrier() -> None:
        if not interpret:  # the interpreter runs one lane at a time, in program order
            plgpu.debug_barrier()

    # ---- Step 1: which groups this node holds, in arrival order (group_at_rank).
    r_id = _iota(meta.P_GPN)
    if GPN == 1:
        group_at_rank = jnp.where(r_id == 0, node, 0)  # one group per node: group g on node g
    else:
        g = _iota(meta.P_G)
        g_valid = g < GROUPS

        def add_member(k: jax.Array, load: jax.Array) -> jax.Array:  # left to right inside each group
            return load + _weights(weight_ref, row + g * GS + k + 1, g_valid)

        # Independent loads in straight lines, so that they are in flight together.
        group_load = _steps(GS - 1, add_member, _weights(weight_ref, row + g * GS, g_valid), 32)
        group_bits = jnp.where(g_valid, _bits(group_load), -1)
        group_step = _ranks(group_bits, group_bits, "index", meta.budget)  # visit step of each group
        n_id = _iota(meta.P_N)
        rank_mask = (1 << meta.N_BITS) - 1

        def place_group(t: jax.Array, carry: Any) -> Any:
            node_key, node_packed, node_of_group, rank_of_group = carry
            now = group_step == t  # the group visited at step t
            best_packed, best = _lightest(node_key, node_packed)  # lightest open node, lowest index
            rank = best_packed & rank_mask
            chosen = node_packed == best_packed
            new_key = _bits(_float(best) + _float(_pick(group_bits, now)))
            node_key = jnp.where(chosen, jnp.where(rank == GPN - 1, _INT_MAX, new_key), node_key)
            node_packed = jnp.where(chosen, node_packed + 1, node_packed)
            node_of_group = jnp.where(now, best_packed >> meta.N_BITS, node_of_group)
            rank_of_group = jnp.where(now, rank, rank_of_group)
            return node_key, node_packed, node_of_group, rank_of_group

        init = (
            jnp.where(n_id < NODES, 0, _INT_MAX),  # bits of 0.0; closed and padding nodes: INT_MAX
            n_id << meta.N_BITS,
            *(jnp.zeros((meta.P_G,), I32),) * 2,
        )
        _, _, node_of_group, rank_of_group = _steps(GROUPS, place_group, init, meta.unroll)
        mine = (node_of_group[None, :] == node) & (rank_of_group[None, :] == r_id[:, None]) & g_valid[None, :]
        group_at_rank = jnp.sum(jnp.where(mine, g[None, :], 0), axis=1, dtype=I32)

    def expert_of(local: jax.Array) -> jax.Array:
        """Global expert of node-local experts: member ``local % GS`` of the group at rank ``local // GS``."""
        if GPN == 1:
            return node * EN + local
        at_rank = r_id[None, :] == lax.div(local, np.int32(GS))[:, None]
        return _pick(group_at_rank[None, :], at_rank) * GS + lax.rem(local, np.int32(GS))

    # Pad this node's rows of log2phy with -1 now (the stores drain while the
    # steps below run); each group's rows are contiguous. A barrier before
    # the real entries orders them after these.
    lane = _iota(meta.P_F)
    span = GS * MAXCNT if GPN > 1 else EN * MAXCNT
    for rank in range(GPN):
        first = (row + _pick(group_at_rank, r_id == rank) * GS) * MAXCNT

        def pad_chunk(c: jax.Array, _: Any, first: jax.Array = first) -> Any:
            k = c * meta.P_F + lane
            _store(log2phy_ref, first + k, -1, k < span, interpret)
            return 0

        _loop(0, -(-span // meta.P_F), pad_chunk, 0)

    expert = expert_of(q)
    w = _weights(weight_ref, row + expert, q_valid)

    # ---- Step 2: replicate within the node (argmax of w * 1/c, first index).
    count, x_pick, x_rank = _replicate(w, recip_ref, meta=meta)

    # ---- Step 3: pack the node's replicas onto its GPUs (LPT, arrival order in a GPU).
    # Replica loads w * fl(1/final count), as int32 bits: originals (items q),
    # extras (items EN + x) through their expert's weight and final count.
    bits_o = jnp.where(q_valid, _bits(w * plgpu.load(recip_ref.at[count], mask=q_valid, other=0.0)), -1)
    x_logical = expert_of(x_pick)
    x_count = 1 + jnp.sum(((x_pick[None, :] == x_pick[:, None]) & x_valid[None, :]).astype(I32), axis=1, dtype=I32)
    x_w = _weights(weight_ref, row + x_logical, x_valid)
    bits_x = jnp.where(x_valid, _bits(x_w * plgpu.load(recip_ref.at[x_count], mask=x_valid, other=0.0)), -1)
    if K == 1:
        pos_o, pos_x = q, EN + x  # one slot per GPU: item i on GPU i
    else:
        pos_o, pos_x = _pack(bits_o, bits_x, scratch_ref, barrier, meta=meta)
        pos_o = jnp.where(q_valid, pos_o, 0)

    # ---- Outputs: this node's slots and experts (every index written once, after the padding).
    slot_o, slot_x = node * S + pos_o, node * S + pos_x
    _store(phy2log_ref, layer * R + slot_o, expert, q_valid, interpret)
    _store(logcnt_ref, row + expert, count, q_valid, interpret)
    _store(phy2log_ref, layer * R + slot_x, x_logical, x_valid, interpret)
    barrier()  # the padding stores above, from other threads, land first
    _store(log2phy_ref, (row + expert) * MAXCNT, slot_o, q_valid, interpret)  # replica 0: the original
    _store(log2phy_ref, (row + x_logical) * MAXCNT + x_rank, slot_x, x_valid, interpret)


def _visit_steps(bits_o: jax.Array, bits_x: jax.Array, scratch_ref: Any, barrier: Any, *, meta: Meta, base: Any):
    """Visit step of every item: stable descending order of the loads, ``(step_o, step_x)`` (``R / N`` on padding).

    Items as in :func:`_pack`; equal loads in item order (extras after the
    originals). Ranking tiles too big for the registers are read in row
    chunks from ``scratch_ref[base + 2 * R / N ...]``, where the items are
    stored in item order first.
    """
    E, R, NODES = meta.E, meta.R, meta.NODES
    interpret, budget = meta.interpret, meta.budget
    EN, S = E // NODES, R // NODES
    X = S - EN
    q, x = _iota(meta.P_EN), _iota(meta.P_X)
    q_valid, x_valid = q < EN, x < X
    # Items in item order, for the ranking tiles read in row chunks.
    _store(scratch_ref, base + 2 * S + q, bits_o, q_valid, interpret)
    _store(scratch_ref, base + 2 * S + EN + x, bits_x, x_valid, interpret)
    barrier()

    def load(first: jax.Array, size: int, offset: int = 0, length: int = EN) -> jax.Array:
        k = first + _iota(size)
        return plgpu.load(scratch_ref.at[base + 2 * S + offset + k], mask=k < length, other=-1)

    # Visit step of every item: stable descending order (extras after
    # originals on ties: higher item index).
    step_o = _ranks(bits_o, bits_o, "index", budget, load)
    step_x = jnp.zeros((meta.P_X,), I32)
    if X > 0:
        load_x = functools.partial(load, offset=EN, length=X)
        step_o = step_o + _ranks(bits_o, bits_x, "none", budget, load_x)
        step_x = _ranks(bits_x, bits_o, "all", budget, load) + _ranks(bits_x, bits_x, "index", budget, load_x)
    return jnp.where(q_valid, step_o, S), jnp.where(x_valid, step_x, S)  # padding lanes: no step


def _pack(
    bits_o: jax.Array,
    bits_x: jax.Array,
    scratch_ref: Any,
    barrier: Any,
    *,
    meta: Meta,
    base: Any = None,
    steps: tuple[jax.Array, jax.Array] | None = None,
) -> Any:
    """LPT packing of one node's items onto its GPUs: node-local slots ``(pos_o, pos_x)``.

    Items are the originals (bits ``bits_o``, item ``q``) and the extras
    (``bits_x``, item ``EN + x``), as int32 bits of their loads (``-1`` on
    padding lanes). ``base``: where this program's ``3 * R / N`` entries of
    ``scratch_ref`` start (default: program ``(layer, node)``'s). ``steps``:
    :func:`_visit_steps`' result where the caller has it already.
    """
    E, R, NODES, GPUS = meta.E, meta.R, meta.NODES, meta.GPUS
    interpret, budget = meta.interpret, meta.budget
    EN, S, M, K = E // NODES, R // NODES, GPUS // NODES, R // GPUS
    X = S - EN
    q, x, m = _iota(meta.P_EN), _iota(meta.P_X), _iota(meta.P_M)
    q_valid, x_valid = q < EN, x < X
    if base is None:
        base = (pl.program_id(0) * NODES + pl.program_id(1)) * 3 * S  # this program's scratch
    if steps is None:
        steps = _visit_steps(bits_o, bits_x, scratch_ref, barrier, meta=meta, base=base)
    step_o, step_x = steps

    arg = meta.select == "arg"
    slot_mask = (1 << meta.K_BITS) - 1

    def visit(t: jax.Array, item: jax.Array, state: Any) -> tuple[Any, jax.Array]:
        """One LPT step: the item's load bits in, the GPU state and the step's record (slot or GPU) out."""
        if arg:
            gpu_key, gpu_count = state
            chosen = lax.argmin(gpu_key, 0, I32)  # lightest open GPU, first index
            at = m == chosen
            gpu_count = jnp.where(at, gpu_count + 1, gpu_count)
            # A product reaches this sum through integers: no FMA contraction.
            new_key = _bits(_float(gpu_key) + _float(item))
            gpu_key = jnp.where(at, jnp.where(gpu_count == K, _INT_MAX, new_key), gpu_key)
            return (gpu_key, gpu_count), chosen
        gpu_key, gpu_packed = state
        best_packed, best = _lightest(gpu_key, gpu_packed)  # lightest open GPU, lowest index
        rank = best_packed & slot_mask
        chosen = gpu_packed == best_packed
        new_key = _bits(_float(best) + _float(item))
        gpu_key = jnp.where(chosen, jnp.where(rank == K - 1, _INT_MAX, new_key), gpu_key)
        gpu_packed = jnp.where(chosen, gpu_packed + 1, gpu_packed)
        return (gpu_key, gpu_packed), (best_packed >> meta.K_BITS) * K + rank

    open_key = jnp.where(m < M, 0, _INT_MAX)  # bits of 0.0; full and padding GPUs: INT_MAX
    state = (open_key, jnp.zeros((meta.P_M,), I32)) if arg else (open_key, m << meta.K_BITS)
    # Items in visiting order, so that a step reads its item with one scalar
    # load (a block ahead) and writes its record with one scalar store.
    _store(scratch_ref, base + step_o, bits_o, q_valid, interpret)
    _store(scratch_ref, base + step_x, bits_x, x_valid, interpret)
    barrier()
    first = np.int32(0)
    if meta.fill_first:
        # While the items so far all weigh more than zero, item t goes to
        # the lowest empty GPU, t: the first min(M, #positive) steps are known.
        positive = jnp.sum((bits_o > 0).astype(I32)) + jnp.sum((bits_x > 0).astype(I32))
        first = jnp.minimum(positive, M)
        filled = m < first
        item_bits = plgpu.load(scratch_ref.at[base + m], mask=filled, other=0)
        state = (jnp.where(filled, item_bits, state[0]), state[1] + filled.astype(I32))
        _store(scratch_ref, base + S + m, m if arg else m * K, filled, interpret)
    unroll = max(1, min(meta.unroll, S))

    def items(at: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(plgpu.load(scratch_ref.at[base + jnp.minimum(at + u, S - 1)]) for u in range(unroll))

    def block(i: jax.Array, carry: Any) -> Any:
        state, now = carry
        t0 = start + i * unroll
        ahead = items(t0 + unroll)
        for u in range(unroll):
            state, record = visit(t0 + u, now[u], state)
            _store(scratch_ref, base + S + t0 + u, record, None, interpret)
        return state, ahead

    # The steps that do not fill a block go first (their items and the
    # first block's are read together), guarded when their number is dynamic.
    rest = (S - first) % unroll
    start = first + rest
    head, ahead = items(first), items(start)
    for u in range(unroll - 1 if meta.fill_first else rest):
        new, record = visit(first + u, head[u], state)
        if meta.fill_first:  # a dynamic number of steps: keep the new state where the step is one of them
            done = u < rest
            new = jax.tree.map(lambda a, b, done=done: jnp.where(done, a, b), new, state)
        state = new
        _store(scratch_ref, base + S + first + u, record, done if meta.fill_first else None, interpret)
    # int32 bounds: under jax_enable_x64 a traced ``first`` is int64, and fori_loop needs equal types.
    steps = ((S - start) // unroll).astype(np.int32) if hasattr(start, "astype") else np.int32((S - start) // unroll)
    state, _ = lax.fori_loop(np.int32(0), steps, block, (state, ahead))
    barrier()
    rec_o = plgpu.load(scratch_ref.at[base + S + step_o], mask=q_valid, other=0)
    rec_x = plgpu.load(scratch_ref.at[base + S + step_x], mask=x_valid, other=0)
    if not arg:
        return rec_o, rec_x
    # Records are GPUs: an item's rank in its GPU is how many items went there before it.

    def earlier(gj, sj, gi, si):
        return (gj == gi) & (sj < si)

    rank_o = _count_pairs((rec_o, step_o), (rec_o, step_o), earlier, budget)
    rank_x = _count_pairs((rec_o, step_o), (rec_x, step_x), earlier, budget)
    if X > 0:
        rank_o = rank_o + _count_pairs((rec_x, step_x), (rec_o, step_o), earlier, budget)
        rank_x = rank_x + _count_pairs((rec_x, step_x), (rec_x, step_x), earlier, budget)
    return rec_o * K + rank_o, rec_x * K + rank_x


def reciprocal_table(max_count: int) -> np.ndarray:
    """float32 ``[max_count + 2]``, entry ``k`` = ``1/k`` correctly rounded (numpy divides exactly)."""
    table = np.zeros(max_count + 2, dtype=np.float32)
    table[1:] = np.float32(1) / np.arange(1, max_count + 2, dtype=np.float32)
    return table


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("interpret", "options"))
def placement(
    weight: jax.Array,
    config: tuple[int, int, int, int],
    hierarchical: bool,
    *,
    interpret: bool = False,
    options: tuple[tuple[str, Any], ...] = (),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy placement of ``weight [L, E]`` (any real dtype, compared as float32) in one launch.

    ``config = (num_replicas, num_groups, num_nodes, num_gpus)``, validated by
    the caller. Returns ``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]``
    (``-1`` padded), ``logcnt [L, E]``, all JAX's default integer. Lowers on
    CUDA only, unless ``interpret`` (Pallas' interpreter, any platform).
    ``options``: ``(name, value)`` pairs of :func:`kernel_meta` keywords (tuning).
    Under ``vmap`` the batch is folded into the layers: one launch.
    """
    num_replicas, num_groups, num_nodes, num_gpus = config
    if not hierarchical:
        num_groups, num_nodes = 1, 1

    @jax.custom_batching.custom_vmap
    def run(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        meta = kernel_meta(
            w.shape[1], num_replicas, num_groups, num_nodes, num_gpus, interpret=interpret, **dict(options)
        )
        return _launch(w, meta)

    @run.def_vmap
    def _fold(axis_size: int, in_batched: list[bool], w: jax.Array) -> Any:
        del in_batched  # one input, batched (or this rule would not run)
        if fits(axis_size * w.shape[1], w.shape[2], num_replicas):
            out = run(w.reshape((-1, w.shape[-1])))  # [B, L, E] -> [B * L, E]: one launch
            out = tuple(a.reshape((axis_size, -1, *a.shape[1:])) for a in out)
        else:
            out = lax.map(run, w)  # one launch per batch entry keeps the indices in int32
        return out, (True, True, True)

    return run(weight)


def _launch(weight: jax.Array, meta: Meta) -> tuple[jax.Array, jax.Array, jax.Array]:
    num_layers, num_experts = weight.shape
    index = jnp.arange(1).dtype  # JAX's default integer
    out_shape = (
        jax.ShapeDtypeStruct((num_layers * meta.R,), index),
        jax.ShapeDtypeStruct((num_layers * num_experts * meta.MAXCNT,), index),
        jax.ShapeDtypeStruct((num_layers * num_experts,), index),
        jax.ShapeDtypeStruct((num_layers * meta.R * 3,), I32),  # scratch: 3 * R / N per program
    )
    phy2log, log2phy, logcnt, _ = pl.pallas_call(
        functools.partial(_greedy_kernel, meta=meta),
        out_shape=out_shape,
        grid=(num_layers, meta.NODES),
        compiler_params=plgpu.CompilerParams(num_warps=meta.num_warps, num_stages=1),
        interpret=meta.interpret,
        name="eplb_greedy",
    )(weight.astype(F32).reshape(-1), jnp.asarray(reciprocal_table(meta.MAXCNT)))
    return (
        phy2log.reshape(num_layers, meta.R),
        log2phy.reshape(num_layers, num_experts, meta.MAXCNT),
        logcnt.reshape(num_layers, num_experts),
    )
