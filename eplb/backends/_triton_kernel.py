"""The fused Triton kernel of the greedy policy, shared by the torch and JAX launchers.

One program places one (layer, node): it recomputes the layer's group split
(a handful of groups), replicates the node's experts and packs the node's
replicas onto its GPUs, all in registers, then writes its slots of
``phy2log``, ``log2phy`` (its rows padded with ``-1`` first) and ``logcnt``
(integer outputs of any width: stores cast to the buffer's type).

It follows ``docs/algorithm.md`` step for step, with the same float32
arithmetic as the array-API path, so placements are bit-identical:

- sums are accumulated left to right, one add at a time;
- replica loads are ``w * table[c]`` with a correctly rounded reciprocal
  table made by the launcher, never a division;
- stable descending order comes from sorting unique 64-bit keys
  ``(float bits << 32) | (2**32 - 1 - index)``: for non-negative floats the
  bit pattern orders like the value, and the index part puts equal values in
  increasing index order;
- ``argmin``/``argmax`` take the first index on ties;
- launchers compile it with ``enable_fp_fusion=False`` so that no
  multiply-add is contracted into an FMA (which rounds once, not twice).

Loads must be finite and non-negative, as validated by the public API.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["ensure_cache_dir", "greedy_kernel", "launch_config"]


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
def greedy_kernel(
    weight_ptr,
    recip_ptr,
    phy2log_ptr,
    log2phy_ptr,
    logcnt_ptr,
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
):
    layer = tl.program_id(0)
    node = tl.program_id(1)
    GS: tl.constexpr = E // GROUPS  # experts per group
    GPN: tl.constexpr = GROUPS // NODES  # groups per node
    EN: tl.constexpr = E // NODES  # experts per node
    S: tl.constexpr = R // NODES  # slots per node
    M: tl.constexpr = GPUS // NODES  # GPUs per node
    K: tl.constexpr = R // GPUS  # slots per GPU
    row = weight_ptr + layer * E

    # ---- Step 1: which groups this node holds, in arrival order.
    q = tl.arange(0, P_EN)  # node-local expert index
    q_valid = q < EN
    if GPN == 1:
        expert = node * EN + q  # one group per node: group g on node g
    else:
        g = tl.arange(0, P_G)
        g_valid = g < GROUPS
        group_load = tl.zeros([P_G], tl.float32)
        for k in tl.static_range(GS):  # left to right inside each group
            group_load = group_load + tl.load(row + g * GS + k, mask=g_valid, other=0.0)
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
            node_load = tl.where(n_id == chosen, node_load + load, node_load)
            node_count = tl.where(n_id == chosen, node_count + 1, node_count)
        # expert at local position q: group of rank q // GS on this node, member q % GS
        mine = (node_of_group[None, :] == node) & (rank_of_group[None, :] == (q // GS)[:, None]) & g_valid[None, :]
        group_of_q = tl.sum(tl.where(mine, g[None, :], 0), axis=1)
        expert = group_of_q * GS + q % GS
    w = tl.load(row + expert, mask=q_valid, other=0.0)

    # Pad this node's rows of log2phy with -1 here (saves a fill launch); the
    # barrier orders these stores before the real entries written at the end.
    j = tl.arange(0, P_C)
    pad = log2phy_ptr + (layer * E + expert)[:, None] * MAXCNT + j[None, :]
    tl.store(pad, tl.full([P_EN, P_C], -1, tl.int64), mask=q_valid[:, None] & (j < MAXCNT)[None, :])
    tl.debug_barrier()

    # ---- Step 2: replicate within the node (argmax of w * 1/c, first index).
    s = tl.arange(0, P_S)  # node-local slot
    count = tl.where(q_valid, 1, 0)
    score = tl.where(q_valid, w, -1.0)
    slot_expert = tl.where(s < EN, s, 0)
    slot_rank = tl.zeros([P_S], tl.int32)
    for t in range(S - EN):
        e = tl.argmax(score, axis=0, tie_break_left=True)
        c = _pick(count, q, e)
        new_score = _pick(w, q, e) * tl.load(recip_ptr + c + 1)
        score = tl.where(q == e, new_score, score)
        count = tl.where(q == e, c + 1, count)
        slot_expert = tl.where(s == EN + t, e, slot_expert)
        slot_rank = tl.where(s == EN + t, c, slot_rank)

    # ---- Step 3: pack the node's replicas onto its GPUs (LPT, arrival order in a GPU).
    s_valid = s < S
    same = (slot_expert[:, None] == q[None, :]) & q_valid[None, :]
    slot_w = tl.sum(tl.where(same, w[None, :], 0.0), axis=1)
    slot_c = tl.sum(tl.where(same, count[None, :], 0), axis=1)
    item_load = slot_w * tl.load(recip_ptr + slot_c, mask=s_valid, other=0.0)
    if K == 1:
        position = s  # one slot per GPU: item i on GPU i
    else:
        keys = tl.sort(_desc_order_keys(item_load, s, s_valid), descending=True)
        m = tl.arange(0, P_M)
        gpu_load = tl.zeros([P_M], tl.float32)
        gpu_count = tl.zeros([P_M], tl.int32)
        position = tl.zeros([P_S], tl.int32)
        for t in range(S):
            # One reduction fetches both: the key holds the load's bits and the item.
            key = _pick(keys, s, t)
            item = (4294967295 - (key & 4294967295)).to(tl.int32)
            load = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            open_load = tl.where((gpu_count < K) & (m < M), gpu_load, float("inf"))
            chosen = tl.argmin(open_load, axis=0, tie_break_left=True)
            rank = _pick(gpu_count, m, chosen)
            position = tl.where(s == item, chosen * K + rank, position)
            gpu_load = tl.where(m == chosen, gpu_load + load, gpu_load)
            gpu_count = tl.where(m == chosen, gpu_count + 1, gpu_count)

    # ---- Outputs: this node's slots and experts.
    slot = node * S + position
    logical = tl.sum(tl.where(same, expert[None, :], 0), axis=1)
    tl.store(phy2log_ptr + layer * R + slot, logical, mask=s_valid)
    tl.store(log2phy_ptr + (layer * E + logical) * MAXCNT + slot_rank, slot, mask=s_valid)
    tl.store(logcnt_ptr + layer * E + expert, count, mask=q_valid)


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def launch_config(
    num_layers: int, num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[tuple[int, int], dict[str, int]]:
    """``(grid, constexprs and launch options)`` for :func:`greedy_kernel` (global policy: groups = nodes = 1)."""
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
        "P_C": _pow2(max_count),
        "num_warps": 1 if slots_per_node <= 128 else 4,
    }
    return (num_layers, num_nodes), meta
