"""The greedy policy as one Pallas kernel (Triton backend), for JAX arrays on NVIDIA GPUs.

A port of :mod:`eplb.backends._triton_kernel` to ``jax.experimental.pallas``,
which ships with JAX (no ``jax-triton``). One program places one (layer,
node): it recomputes the layer's group split, replicates the node's experts
and packs the node's replicas onto its GPUs, all in registers, then writes
its slots of ``phy2log``, its experts' rows of ``log2phy`` (``-1`` past the
replica count) and ``logcnt``. Same steps, same float32 arithmetic as the
array-API path (``docs/algorithm.md``), so placements are bit-identical:

- sums are accumulated left to right, one add at a time;
- replica loads are ``w * table[c]`` with a correctly rounded reciprocal
  table made on the host with numpy, never a division;
- stable descending order by counting: item ``i`` goes to position
  ``#{j : v_j > v_i} + #{j < i : v_j == v_i}`` (JAX without x64 has no 64-bit
  sort keys, and Pallas Triton no sort);
- ``argmin``/``argmax`` take the first index on ties (Pallas lowers them with
  that tie rule);
- no multiply feeds an add, so FMA contraction (which Pallas offers no switch
  for) cannot change a rounding: the only products are replica loads, which
  are compared, or handed to the packing sum through their integer bits.

Where the Triton kernel keeps one array of the node's ``R/N`` replicas, this
one keeps two: the originals (replica 0 of each of the node's experts, item
``q``) and the extra replicas (item ``E/N + t``, made at replication step
``t``). Every tile is then at most ``[E/N, E/N]`` instead of ``[R/N, E/N]``
and nothing is padded to the next power of two of ``R/N``.

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

__all__ = ["Meta", "fits", "kernel_meta", "placement"]

I32 = jnp.int32
F32 = jnp.float32


class Meta(NamedTuple):
    """Static sizes of one launch (global policy: ``groups = nodes = 1``).

    ``P_*`` are the register tile sizes (powers of two, as Triton requires):
    groups, nodes, experts per node, extra replicas per node, GPUs per node
    and ``log2phy`` columns per padding chunk. ``budget`` bounds a pairwise
    tile (``[P_EN, P_EN]`` is compared in column chunks beyond it).
    """

    E: int
    R: int
    GROUPS: int
    NODES: int
    GPUS: int
    MAXCNT: int
    P_G: int
    P_N: int
    P_EN: int
    P_X: int
    P_M: int
    P_C: int
    budget: int
    num_warps: int


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
) -> Meta:
    """Sizes for :func:`placement`; ``num_warps``/``budget`` override the defaults (for tuning)."""
    max_count = num_replicas - num_experts + 1
    experts_per_node = num_experts // num_nodes
    extras = (num_replicas - num_experts) // num_nodes
    if num_warps is None:
        # The loops are chains of small reductions: one warp has no cross-warp
        # barriers; bigger nodes need more registers for their tiles.
        num_warps = 1 if experts_per_node <= 64 else 4
    if budget is None:
        budget = 128 * 32 * num_warps  # elements of a pairwise tile: 128 registers a thread
    p_en = _pow2(experts_per_node)
    return Meta(
        E=num_experts,
        R=num_replicas,
        GROUPS=num_groups,
        NODES=num_nodes,
        GPUS=num_gpus,
        MAXCNT=max_count,
        P_G=_pow2(num_groups),
        P_N=_pow2(num_nodes),
        P_EN=p_en,
        P_X=_pow2(extras),
        P_M=_pow2(num_gpus // num_nodes),
        P_C=min(_pow2(max_count), _pow2(budget // p_en)),
        budget=budget,
        num_warps=num_warps,
    )


def fits(num_layers: int, num_experts: int, num_replicas: int) -> bool:
    """Whether every flat index of the outputs fits the kernel's int32 arithmetic.

    The largest is a padding lane of ``log2phy``: below ``L * E * 2 * (R - E + 1)``.
    """
    return num_layers * max(num_replicas, num_experts * 2 * (num_replicas - num_experts + 1)) < 2**31


# ---- Helpers on 1-D register tensors.


def _iota(n: int) -> jax.Array:
    return lax.iota(I32, n)


def _loop(lower: int, upper: int, body: Any, init: Any) -> Any:
    """``lax.fori_loop`` with an int32 counter (also when the user enables x64)."""
    return lax.fori_loop(np.int32(lower), np.int32(upper), body, init)


def _pick(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``values[i]`` for the one ``i`` where ``mask`` holds (integers: exact, one non-zero term)."""
    return jnp.sum(jnp.where(mask, values, jnp.zeros_like(values)), axis=-1, dtype=values.dtype)


def _bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, I32)


def _float(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits, F32)


def _pick_f32(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``values[i]`` of float32 ``values``, through its integer bits.

    Exact, sign of zero included, and the integer reduction stands between a
    product and any add it would feed (no FMA contraction possible).
    """
    return _float(_pick(_bits(values), mask))


def _count_before(v: jax.Array, index: jax.Array, w: jax.Array, w_index: jax.Array, budget: int) -> jax.Array:
    """For each ``i``: ``#{j : w_j > v_i} + #{j : w_j == v_i and w_index_j < index_i}``, int32 ``[len(v)]``.

    The items ``j`` that precede item ``i`` in the stable descending order
    (equal values in increasing item index). Float comparisons, so ``-0.0``
    equals ``0.0`` as in every other backend. Callers set ``w_j = -1`` for
    padding lanes (below every load). A ``[len(v), len(w)]`` tile, or column
    chunks of ``w`` (each fetched from registers by an exact pick) when that
    exceeds ``budget`` elements.
    """
    n, m = v.shape[0], w.shape[0]

    def count(w_part: jax.Array, w_index_part: jax.Array) -> jax.Array:
        wj, ij = w_part[None, :], w_index_part[None, :]
        vi, ii = v[:, None], index[:, None]
        before = (wj > vi) | ((wj == vi) & (ij < ii))
        return jnp.sum(before.astype(I32), axis=1, dtype=I32)

    if n * m <= budget:
        return count(w, w_index)
    chunk = max(1, budget // max(n, m))
    lanes = _iota(m)
    w_bits = _bits(w)

    def add_chunk(c: jax.Array, total: jax.Array) -> jax.Array:
        j = c * chunk + _iota(chunk)
        at = lanes[None, :] == j[:, None]  # [chunk, m]: one lane per row
        w_part = _float(jnp.sum(jnp.where(at, w_bits[None, :], 0), axis=1, dtype=I32))
        w_index_part = jnp.sum(jnp.where(at, w_index[None, :], 0), axis=1, dtype=I32)
        return total + count(w_part, w_index_part)

    return _loop(0, m // chunk, add_chunk, jnp.zeros((n,), I32))


def _load(ref: Any, index: jax.Array, mask: jax.Array, other: Any) -> jax.Array:
    return plgpu.load(ref.at[index], mask=mask, other=other)


def _store(ref: Any, index: jax.Array, values: jax.Array, mask: jax.Array) -> None:
    """Masked scatter into a flat output. Masked-off lanes get an index past the end.

    On the GPU they store nothing either way; Pallas' interpreter stores every
    lane (the old value where masked off), which would clobber a valid lane at
    the same index, but it drops out-of-bounds indices.
    """
    index = jnp.where(mask, index, ref.shape[0])
    plgpu.store(ref.at[index], values.astype(ref.dtype), mask=mask)


# ---- The kernel: one program per (layer, node).


def _greedy_kernel(weight_ref, recip_ref, phy2log_ref, log2phy_ref, logcnt_ref, *, meta: Meta) -> None:
    E, R, GROUPS, NODES, GPUS, MAXCNT = meta.E, meta.R, meta.GROUPS, meta.NODES, meta.GPUS, meta.MAXCNT
    layer = pl.program_id(0)
    node = pl.program_id(1)
    GS = E // GROUPS  # experts per group
    GPN = GROUPS // NODES  # groups per node
    EN = E // NODES  # experts per node
    S = R // NODES  # slots per node
    X = S - EN  # extra replicas per node
    M = GPUS // NODES  # GPUs per node
    K = R // GPUS  # slots per GPU
    row = layer * E  # flat offset of this layer's loads and logcnt row

    # ---- Step 1: which groups this node holds, in arrival order.
    q = _iota(meta.P_EN)  # node-local expert index (node-major order)
    q_valid = q < EN
    if GPN == 1:
        expert = node * EN + q  # one group per node: group g on node g
    else:
        g = _iota(meta.P_G)
        g_valid = g < GROUPS

        def add_member(k, load):  # left to right inside each group
            return load + _load(weight_ref, row + g * GS + k, g_valid, 0.0)

        group_load = _loop(1, GS, add_member, _load(weight_ref, row + g * GS, g_valid, 0.0))
        keyed = jnp.where(g_valid, group_load, -1.0)
        group_step = _count_before(keyed, g, keyed, g, meta.budget)  # visit step of each group
        n_id = _iota(meta.P_N)

        def place_group(t, carry):
            node_load, node_count, node_of_group, rank_of_group = carry
            now = group_step == t  # the group visited at step t
            load = _pick_f32(group_load, now)
            open_load = jnp.where((node_count < GPN) & (n_id < NODES), node_load, jnp.inf)
            chosen = lax.argmin(open_load, 0, I32)  # first minimum
            at_chosen = n_id == chosen
            rank = _pick(node_count, at_chosen)
            node_of_group = jnp.where(now, chosen, node_of_group)
            rank_of_group = jnp.where(now, rank, rank_of_group)
            node_load = jnp.where(at_chosen, node_load + load, node_load)
            node_count = jnp.where(at_chosen, node_count + 1, node_count)
            return node_load, node_count, node_of_group, rank_of_group

        init = (jnp.zeros((meta.P_N,), F32), jnp.zeros((meta.P_N,), I32), *(jnp.zeros((meta.P_G,), I32),) * 2)
        _, _, node_of_group, rank_of_group = _loop(0, GROUPS, place_group, init)
        # expert at local position q: group of rank q // GS on this node, member q % GS
        mine = (
            (node_of_group[None, :] == node)
            & (rank_of_group[None, :] == lax.div(q, np.int32(GS))[:, None])
            & g_valid[None, :]
        )
        group_of_q = jnp.sum(jnp.where(mine, g[None, :], 0), axis=1, dtype=I32)
        expert = group_of_q * GS + lax.rem(q, np.int32(GS))
    w = _load(weight_ref, row + expert, q_valid, 0.0)

    # ---- Step 2: replicate within the node (argmax of w * 1/c, first index).
    count = jnp.where(q_valid, 1, 0).astype(I32)
    x = _iota(meta.P_X)  # extra replica index: item EN + x, made at step x
    x_valid = x < X
    x_expert = jnp.zeros((meta.P_X,), I32)  # node-local expert of each extra replica
    x_rank = jnp.zeros((meta.P_X,), I32)  # its replica number
    if X > 0:

        def add_replica(t, carry):
            score, count, x_expert, x_rank = carry
            e = lax.argmax(score, 0, I32)  # first maximum
            chosen = q == e
            c = _pick(count, chosen)  # replicas so far
            recip = recip_ref[c + 1]
            score = jnp.where(chosen, w * recip, score)  # the product is compared, never added
            count = jnp.where(chosen, c + 1, count)
            x_expert = jnp.where(x == t, e, x_expert)
            x_rank = jnp.where(x == t, c, x_rank)
            return score, count, x_expert, x_rank

        score = jnp.where(q_valid, w, -1.0)  # w * fl(1/1); padding never wins
        _, count, x_expert, x_rank = _loop(0, X, add_replica, (score, count, x_expert, x_rank))

    # ---- Step 3: pack the node's replicas onto its GPUs (LPT, arrival order in a GPU).
    # Replica loads w * fl(1/final count): originals by expert, extras via their expert.
    load_o = w * _load(recip_ref, count, q_valid, 0.0)
    same = (x_expert[:, None] == q[None, :]) & q_valid[None, :] & x_valid[:, None]  # [P_X, P_EN]
    x_load = _float(jnp.sum(jnp.where(same, _bits(load_o)[None, :], 0), axis=1, dtype=I32))
    x_logical = jnp.sum(jnp.where(same, expert[None, :], 0), axis=1, dtype=I32)
    if K == 1:
        pos_o, pos_x = q, EN + x  # one slot per GPU: item i on GPU i
    else:
        # Visit step of every item: originals are items q, extras items EN + x.
        key_o = jnp.where(q_valid, load_o, -1.0)
        key_x = jnp.where(x_valid, x_load, -1.0)
        step_o = _count_before(key_o, q, key_o, q, meta.budget)
        step_x = jnp.zeros((meta.P_X,), I32)
        if X > 0:
            step_o = step_o + _count_before(key_o, q, key_x, EN + x, meta.budget)
            step_x = _count_before(key_x, EN + x, key_o, q, meta.budget) + _count_before(
                key_x, EN + x, key_x, EN + x, meta.budget
            )
        bits_o, bits_x = _bits(load_o), _bits(x_load)
        m = _iota(meta.P_M)

        def visit(t, carry):
            gpu_load, gpu_count, pos_o, pos_x = carry
            now_o, now_x = step_o == t, step_x == t  # the item visited at step t
            bits = _pick(bits_o, now_o)
            if X > 0:
                bits = bits + _pick(bits_x, now_x)  # one of the two is 0: exact
            load = _float(bits)  # a product, through integers: no FMA with the add below
            open_load = jnp.where((gpu_count < K) & (m < M), gpu_load, jnp.inf)
            chosen = lax.argmin(open_load, 0, I32)  # first minimum
            at_chosen = m == chosen
            slot = chosen * K + _pick(gpu_count, at_chosen)
            pos_o = jnp.where(now_o, slot, pos_o)
            pos_x = jnp.where(now_x, slot, pos_x)
            gpu_load = jnp.where(at_chosen, gpu_load + load, gpu_load)
            gpu_count = jnp.where(at_chosen, gpu_count + 1, gpu_count)
            return gpu_load, gpu_count, pos_o, pos_x

        init = (
            jnp.zeros((meta.P_M,), F32),
            jnp.zeros((meta.P_M,), I32),
            jnp.zeros((meta.P_EN,), I32),
            jnp.zeros((meta.P_X,), I32),
        )
        _, _, pos_o, pos_x = _loop(0, S, visit, init)

    # ---- Outputs: this node's slots and experts (every index written once).
    slot_o, slot_x = node * S + pos_o, node * S + pos_x
    _store(phy2log_ref, layer * R + slot_o, expert, q_valid)
    _store(logcnt_ref, row + expert, count, q_valid)
    _store(log2phy_ref, (row + expert) * MAXCNT, slot_o, q_valid)  # replica 0: the original
    if X > 0:
        _store(phy2log_ref, layer * R + slot_x, x_logical, x_valid)
        _store(log2phy_ref, (row + x_logical) * MAXCNT + x_rank, slot_x, x_valid)
    # -1 past each expert's count, in column chunks of P_C (disjoint from the entries above).
    lane = _iota(meta.P_C)
    base = (row + expert)[:, None] * MAXCNT
    pad = jnp.full((meta.P_EN, meta.P_C), -1, I32)

    def pad_chunk(c, _):
        k = c * meta.P_C + lane[None, :]
        _store(log2phy_ref, base + k, pad, q_valid[:, None] & (k >= count[:, None]) & (k < MAXCNT))
        return 0

    _loop(0, -(-MAXCNT // meta.P_C), pad_chunk, 0)


def reciprocal_table(max_count: int) -> np.ndarray:
    """float32 ``[max_count + 2]``, entry ``k`` = ``1/k`` correctly rounded (numpy divides exactly)."""
    table = np.zeros(max_count + 2, dtype=np.float32)
    table[1:] = np.float32(1) / np.arange(1, max_count + 2, dtype=np.float32)
    return table


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("interpret", "num_warps", "budget"))
def placement(
    weight: jax.Array,
    config: tuple[int, int, int, int],
    hierarchical: bool,
    *,
    interpret: bool = False,
    num_warps: int | None = None,
    budget: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy placement of ``weight [L, E]`` (any real dtype, compared as float32) in one launch.

    ``config = (num_replicas, num_groups, num_nodes, num_gpus)``, validated by
    the caller. Returns ``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]``
    (``-1`` padded), ``logcnt [L, E]``, all JAX's default integer. Lowers on
    CUDA only, unless ``interpret`` (Pallas' interpreter, any platform).
    Under ``vmap`` the batch is folded into the layers: one launch.
    """
    num_replicas, num_groups, num_nodes, num_gpus = config
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    options = {"interpret": interpret, "num_warps": num_warps, "budget": budget}

    @jax.custom_batching.custom_vmap
    def run(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return _launch(w, num_replicas, num_groups, num_nodes, num_gpus, **options)

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


def _launch(
    weight: jax.Array,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    interpret: bool,
    num_warps: int | None,
    budget: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    num_layers, num_experts = weight.shape
    meta = kernel_meta(num_experts, num_replicas, num_groups, num_nodes, num_gpus, num_warps=num_warps, budget=budget)
    index = jnp.arange(1).dtype  # JAX's default integer
    out_shape = (
        jax.ShapeDtypeStruct((num_layers * num_replicas,), index),
        jax.ShapeDtypeStruct((num_layers * num_experts * meta.MAXCNT,), index),
        jax.ShapeDtypeStruct((num_layers * num_experts,), index),
    )
    phy2log, log2phy, logcnt = pl.pallas_call(
        functools.partial(_greedy_kernel, meta=meta),
        out_shape=out_shape,
        grid=(num_layers, num_nodes),
        compiler_params=plgpu.CompilerParams(num_warps=meta.num_warps, num_stages=1),
        interpret=interpret,
        name="eplb_greedy",
    )(weight.astype(F32).reshape(-1), jnp.asarray(reciprocal_table(meta.MAXCNT)))
    return (
        phy2log.reshape(num_layers, num_replicas),
        log2phy.reshape(num_layers, num_experts, meta.MAXCNT),
        logcnt.reshape(num_layers, num_experts),
    )
