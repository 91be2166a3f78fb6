"""Equals :func:`eplb.algorithms.policies.place` (greedy policy, no ``spill``) bit for bit: one fused Triton kernel.

Proved by ``tests/test_triton.py`` (torch ops on CUDA, Triton's CPU interpreter, an sm_90 compile) and the
cross-backend suite (``torch:cuda``; the Triton interpreter test). Shared by the torch and JAX launchers.

One program places one (layer, node): it recomputes the layer's group split
(a handful of groups), replicates the node's experts and packs the node's
replicas onto its GPUs, then writes its slots of ``phy2log``, ``log2phy``
(its rows padded with ``-1`` first) and ``logcnt`` (integer outputs of any
width: stores cast to the buffer's type; loads read them back as int32).

The work is a few hundred dependent steps per program, so a step's latency
is what counts: each replication step is one max over packed int64 keys
(score bits, expert, count) plus one gather, each packing step two scalar
loads of its item from a per-program ``scratch`` buffer (int32, ``2 * P_S``
per program, filled after the sort) and one min over packed GPU keys (load
bits, GPU, items so far). Per-slot data comes back by gathers from memory
rather than [slots, experts] masks, so registers stay flat as sizes grow.

It follows ``docs/algorithm.md`` step for step, with the same float32
arithmetic as the array-API path, so placements are bit-identical:

- sums are accumulated left to right, one add at a time;
- replica loads are ``w * table[c]`` with a correctly rounded reciprocal
  table made by the launcher, never a division;
- stable descending order comes from sorting unique 64-bit keys
  ``(float bits << 32) | (2**32 - 1 - index)``: for non-negative floats the
  bit pattern orders like the value, and the index part puts equal values in
  increasing index order;
- ``argmin``/``argmax`` take the first index on ties (packed keys put the
  index in the bits below the value so that a plain max/min does the same);
- loads below ``2**-64`` are read as ``+0.0`` as on every backend
  (:mod:`eplb.algorithms.loads`), ``-0.0`` too (its bit pattern would sort
  below ``+0.0``);
- launchers compile it with ``enable_fp_fusion=False`` so that no
  multiply-add is contracted into an FMA (which rounds once, not twice).

Loads must be finite and non-negative, as validated by the public API.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from eplb.algorithms.loads import MAX_LOAD, TINY_LOAD

_TINY_LOAD = tl.constexpr(TINY_LOAD)
_MAX_LOAD = tl.constexpr(MAX_LOAD)

__all__ = ["MAX_SLOTS_PER_NODE", "ensure_cache_dir", "greedy_kernel", "kernel_fits", "launch_config", "scratch_size"]

# Packed keys hold an expert, a GPU or a count in 16 bits; register tensors of
# a node's slots stay reasonable up to this size (the torch ops path runs beyond).
MAX_SLOTS_PER_NODE = 8192


def ensure_cache_dir() -> None:
    """Put back Triton's kernel cache folder if something emptied it.

    jax-triton 0.3.1 with Triton 3.6 leaves ``triton.knobs.cache.dir`` empty
    after compiling, and every later Triton compile in the process (ours from
    torch included) then fails with "Could not create or locate cache dir".
    """
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and not knobs.cache.dir:
        knobs.cache.dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".triton", "cache"
        )


@triton.jit
def _pick(values, index, position):
    """``values[position]`` of a 1-D register tensor (exact: one non-zero term)."""
    return tl.sum(tl.where(index == position, values, tl.zeros_like(values)), axis=0)


@triton.jit
def _desc_order_keys(values, index, valid):
    """Sort keys for a stable descending order of non-negative float32 ``values``."""
    bits = values.to(tl.int32, bitcast=True).to(tl.int64)
    key = (bits << 32) | (4294967295 - index.to(tl.int64))
    return tl.where(valid, key, tl.full(key.shape, -1, tl.int64))


@triton.jit
def _load_nonneg(pointer, mask):
    """A float32 load as every backend reads it (:func:`eplb.algorithms.loads.clean_loads`): kept iff
    ``TINY_LOAD <= value <= MAX_LOAD``, else ``+0.0`` (``-0.0``, NaN, negatives, inf; ``-0.0``'s bit pattern
    would also order below ``+0.0`` in a sort key)."""
    value = tl.load(pointer, mask=mask, other=0.0)
    return tl.where((value >= _TINY_LOAD) & (value <= _MAX_LOAD), value, 0.0)


@triton.jit
def _expert_of(local, group_at_rank, g, GS: tl.constexpr):
    """Global expert of node-local experts ``local``: member ``local % GS`` of the group at rank ``local // GS``."""
    at_rank = (g[None, :] == (local // GS)[:, None]).to(tl.int32)
    return tl.sum(at_rank * group_at_rank[None, :], axis=1) * GS + local % GS


@triton.jit
def _rep_key(score, expert, count):
    """``score bits << 32 | (65535 - expert) << 16 | count``: a max takes the highest score, then the lowest expert."""
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    return (bits << 32) | ((65535 - expert).to(tl.int64) << 16) | count.to(tl.int64)


@triton.jit
def _gpu_key(load, gpu, count):
    """``load bits << 32 | gpu << 16 | count``: a min takes the lightest GPU, then the lowest index."""
    return (load.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (gpu.to(tl.int64) << 16) | count.to(tl.int64)


@triton.jit
def _greedy_groups(
    row,
    node,
    E: tl.constexpr,
    GROUPS: tl.constexpr,
    NODES: tl.constexpr,
    P_G: tl.constexpr,
    P_N: tl.constexpr,
    P_GPN: tl.constexpr,
):
    """``[P_GPN]`` int32: the groups of ``node`` under the greedy split, in arrival order.

    LPT of the group loads (left-to-right sums) onto the nodes, as
    ``greedy_group_split``; with one group per node, group ``g`` on node ``g``.
    """
    GS: tl.constexpr = E // GROUPS
    GPN: tl.constexpr = GROUPS // NODES
    r = tl.arange(0, P_GPN)
    if GPN == 1:
        groups = tl.where(r == 0, node, 0)
    else:
        g = tl.arange(0, P_G)
        g_valid = g < GROUPS
        group_load = _load_nonneg(row + g * GS, g_valid)
        for k in tl.static_range(1, GS):  # left to right inside each group
            group_load = group_load + _load_nonneg(row + g * GS + k, g_valid)
        keys = tl.sort(_desc_order_keys(group_load, g, g_valid), descending=True)
        group_by_step = (4294967295 - (keys & 4294967295)).to(tl.int32)
        n_id = tl.arange(0, P_N)
        node_load = tl.zeros([P_N], tl.float32)
        node_count = tl.zeros([P_N], tl.int32)
        node_of_group = tl.zeros([P_G], tl.int32)
        rank_of_group = tl.zeros([P_G], tl.int32)
        for t in range(GROUPS):
            grp = _pick(group_by_step, g, t)
            load = _pick(group_load, g, grp)
            open_load = tl.where((node_count < GPN) & (n_id < NODES), node_load, float("inf"))
            chosen = tl.argmin(open_load, axis=0, tie_break_left=True)
            rank = _pick(node_count, n_id, chosen)
            node_of_group = tl.where(g == grp, chosen, node_of_group)
            rank_of_group = tl.where(g == grp, rank, rank_of_group)
            # Saturating, as lpt_pack: an overflowed node must stay below the +inf of a full one.
            node_load = tl.where(n_id == chosen, tl.minimum(node_load + load, _MAX_LOAD), node_load)
            node_count = tl.where(n_id == chosen, node_count + 1, node_count)
        mine = (node_of_group[None, :] == node) & (rank_of_group[None, :] == r[:, None]) & g_valid[None, :]
        groups = tl.sum(tl.where(mine, g[None, :], 0), axis=1)
    return groups


@triton.jit
def greedy_kernel(
    weight_ptr,
    recip_ptr,
    phy2log_ptr,
    log2phy_ptr,
    logcnt_ptr,
    scratch_ptr,
    E: tl.constexpr,
    R: tl.constexpr,
    GROUPS: tl.constexpr,
    NODES: tl.constexpr,
    GPUS: tl.constexpr,
    MAXCNT: tl.constexpr,
    P_G: tl.constexpr,
    P_N: tl.constexpr,
    P_EN: tl.constexpr,
    P_S: tl.constexpr,
    P_M: tl.constexpr,
    P_C: tl.constexpr,
    P_PAD_ROWS: tl.constexpr,
):
    layer = tl.program_id(0)
    node = tl.program_id(1)
    GS: tl.constexpr = E // GROUPS  # experts per group
    EN: tl.constexpr = E // NODES  # experts per node
    S: tl.constexpr = R // NODES  # slots per node
    M: tl.constexpr = GPUS // NODES  # GPUs per node
    K: tl.constexpr = R // GPUS  # slots per GPU
    row = weight_ptr + layer * E

    # ---- Step 1: which groups this node holds, in arrival order.
    q = tl.arange(0, P_EN)  # node-local expert index
    q_valid = q < EN
    g = tl.arange(0, P_G)  # group, and rank of a group on this node
    group_at_rank = _greedy_groups(row, node, E, GROUPS, NODES, P_G, P_N, P_G)
    expert = _expert_of(q, group_at_rank, g, GS)
    w = _load_nonneg(row + expert, q_valid)

    # Pad this node's rows of log2phy with -1 here (saves a fill launch), in
    # tiles of P_PAD_ROWS rows x P_C columns: along a row for coalesced stores,
    # at most 1024 entries a tile to keep registers flat. The barrier orders
    # these stores before the real entries written at the end.
    pad_row = tl.arange(0, P_PAD_ROWS)
    pad_col = tl.arange(0, P_C)
    for first_row in range(0, EN, P_PAD_ROWS):
        local = first_row + pad_row
        pad = log2phy_ptr + (layer * E + _expert_of(local, group_at_rank, g, GS))[:, None] * MAXCNT
        for first_col in range(0, MAXCNT, P_C):
            col = first_col + pad_col
            mask = (local < EN)[:, None] & (col < MAXCNT)[None, :]
            tl.store(pad + col[None, :], tl.full([P_PAD_ROWS, P_C], -1, tl.int64), mask=mask)
    tl.debug_barrier()

    # ---- Step 2: replicate within the node (argmax of w * 1/c, first index).
    # One max over packed keys (score bits | 65535 - expert | count) gives the
    # expert and its count at once: higher score first, then lower index.
    s = tl.arange(0, P_S)  # node-local slot
    score_key = tl.where(q_valid, _rep_key(w, q, tl.full([P_EN], 1, tl.int32)), -1)
    slot_expert = tl.where(s < EN, s, 0)
    slot_rank = tl.zeros([P_S], tl.int32)
    for t in range(S - EN):
        best = tl.max(score_key, axis=0)
        e = (65535 - ((best >> 16) & 65535)).to(tl.int32)
        c = (best & 65535).to(tl.int32)
        new_score = _pick(w, q, e) * tl.load(recip_ptr + c + 1)
        score_key = tl.where(q == e, _rep_key(new_score, e, c + 1), score_key)
        slot_expert = tl.where(s == EN + t, e, slot_expert)
        slot_rank = tl.where(s == EN + t, c, slot_rank)
    count = tl.where(q_valid, (score_key & 65535).to(tl.int32), 0)

    # ---- Step 3: pack the node's replicas onto its GPUs (LPT, arrival order in a GPU).
    # Each slot's expert, load and count come back by gathers from memory
    # (logcnt is final here), not by [slots, experts] masks in registers.
    s_valid = s < S
    logical = _expert_of(slot_expert, group_at_rank, g, GS)
    tl.store(logcnt_ptr + layer * E + expert, count, mask=q_valid)
    tl.debug_barrier()
    slot_c = tl.load(logcnt_ptr + layer * E + logical, mask=s_valid, other=0).to(tl.int32)
    item_load = _load_nonneg(row + logical, s_valid) * tl.load(recip_ptr + slot_c, mask=s_valid, other=0.0)
    if K == 1:
        position = s  # one slot per GPU: item i on GPU i
    else:
        # Items in stable descending order, parked in this program's scratch
        # rows (load bits, item) so each step reads its item with two scalar
        # loads instead of a reduction over all slots.
        keys = tl.sort(_desc_order_keys(item_load, s, s_valid), descending=True)
        scratch = scratch_ptr + ((layer * NODES + node) * P_S + s) * 2
        tl.store(scratch, (keys >> 32).to(tl.int32), mask=s_valid)
        tl.store(scratch + 1, (4294967295 - (keys & 4294967295)).to(tl.int32), mask=s_valid)
        tl.debug_barrier()
        # One min over packed GPU keys (load bits | GPU | items so far) gives the
        # lightest open GPU (lower index on ties) and the item's rank in it.
        m = tl.arange(0, P_M)
        closed = tl.full([P_M], 9223372036854775807, tl.int64)
        gpu_key = tl.where(m < M, m.to(tl.int64) << 16, closed)
        position = tl.zeros([P_S], tl.int32)
        first = scratch_ptr + (layer * NODES + node) * P_S * 2
        for t in range(S):
            load = tl.load(first + 2 * t).to(tl.float32, bitcast=True)
            item = tl.load(first + 2 * t + 1)
            best = tl.min(gpu_key, axis=0)
            chosen = ((best >> 16) & 65535).to(tl.int32)
            rank = (best & 65535).to(tl.int32)
            position = tl.where(s == item, chosen * K + rank, position)
            gpu_load = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True) + load
            new_key = _gpu_key(gpu_load, chosen, rank + 1)
            new_key = tl.where(rank + 1 < K, new_key, 9223372036854775807)
            gpu_key = tl.where(m == chosen, new_key, gpu_key)

    # ---- Outputs: this node's slots and experts.
    slot = node * S + position
    tl.store(phy2log_ptr + layer * R + slot, logical, mask=s_valid)
    tl.store(log2phy_ptr + (layer * E + logical) * MAXCNT + slot_rank, slot, mask=s_valid)


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def kernel_fits(num_experts: int, num_replicas: int, num_nodes: int) -> bool:
    """Whether :func:`greedy_kernel` takes these sizes (global policy: ``num_nodes = 1``)."""
    return num_replicas // num_nodes <= MAX_SLOTS_PER_NODE and num_replicas - num_experts + 1 < 65536


def scratch_size(num_layers: int, num_nodes: int, meta: dict[str, int]) -> int:
    """int32 elements of the kernel's ``scratch`` buffer (two per padded slot per program)."""
    return num_layers * num_nodes * meta["P_S"] * 2


def launch_config(
    num_layers: int,
    num_experts: int,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    num_warps: int = 1,
) -> tuple[tuple[int, int], dict[str, int]]:
    """``(grid, constexprs and launch options)`` for :func:`greedy_kernel` (global policy: groups = nodes = 1).

    One warp by default: the steps are latency-bound, and a one-warp
    reduction needs no shared memory or barrier.
    """
    if not kernel_fits(num_experts, num_replicas, num_nodes):
        raise ValueError(
            f"the fused kernel takes at most {MAX_SLOTS_PER_NODE} slots per node and 65535 replicas per expert"
        )
    max_count = num_replicas - num_experts + 1
    slots_per_node = num_replicas // num_nodes
    meta = {
        "E": num_experts,
        "R": num_replicas,
        "GROUPS": num_groups,
        "NODES": num_nodes,
        "GPUS": num_gpus,
        "MAXCNT": max_count,
        "P_G": _pow2(num_groups),
        "P_N": _pow2(num_nodes),
        "P_EN": _pow2(num_experts // num_nodes),
        "P_S": _pow2(slots_per_node),
        "P_M": _pow2(num_gpus // num_nodes),
        "P_C": min(_pow2(max_count), 1024),  # log2phy padding tile: columns ...
        "P_PAD_ROWS": max(1, 1024 // _pow2(max_count)),  # ... and rows
        "num_warps": num_warps,
    }
    return (num_layers, num_nodes), meta
