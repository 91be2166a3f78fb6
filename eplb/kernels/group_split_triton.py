"""Equals :func:`eplb.algorithms.elastic.sticky_group_split` with ``active=None, max_swaps=1``, one launch (Triton).

The near split of ``previous=`` with knobs
(:func:`eplb.algorithms.stability.near_split`) on torch CUDA: the array-API
function is about 65 small tensor operations (its group loads, the node of
each group, one round of swaps over every pair, the sort), a millisecond of
host launches; here one program per layer does them all.

Bit for bit the array-API function, because every float step is the same
IEEE operation in the same order:

- a group's load is summed in pairs, ``(x0 + x1) + (x2 + x3)``, level by
  level (:func:`eplb.algorithms.packing.sum_in_pairs`); a sum over an axis of
  two is one addition;
- a node's load adds its groups' loads left to right in group order (a
  group elsewhere adds ``0.0``);
- a swap's node loads are ``(node - out) + in``, compared after a ``max``
  with ``current * IMPROVEMENT`` (a product compared, never added, so no
  fused multiply-add can change it);
- ties: the first pair ``(g1, g2)``, ``g1 < g2``, in row-major order.

Elements are picked out of a vector by a masked sum of one term (exact).
Proved by ``tests/test_group_split_triton.py`` (Triton's CPU interpreter
and CUDA against the array-API function: valid and invalid previous
placements, ties, zero loads, every config of :func:`fits`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb import _xp
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.refine import IMPROVEMENT
from eplb.kernels.greedy_triton import ensure_cache_dir

__all__ = ["fits", "group_split", "live_fits", "near_group_split", "sticky_group_split"]

MAX_GROUPS = 64  # groups, and experts per group
MAX_SLOTS = 8192


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fits(num_log: int, num_phy: int, num_groups: int, num_nodes: int) -> bool:
    """Whether the kernel takes these sizes: groups and experts per group powers of two up to 64 (so the pairwise
    sums are reshapes), groups a multiple of the nodes, at most 8192 slots a layer."""
    if num_groups <= 0 or num_log % num_groups or num_groups % num_nodes or num_phy % num_nodes:
        return False
    size = num_log // num_groups
    return (
        _is_pow2(num_groups)
        and _is_pow2(size)
        and num_groups <= MAX_GROUPS
        and size <= MAX_GROUPS
        and 0 < num_phy <= MAX_SLOTS
    )


@triton.jit
def _pairs(x, G: tl.constexpr, W: tl.constexpr):
    """``[G, W] -> [G, W // 2]``: ``x[:, 2k] + x[:, 2k + 1]``."""
    return tl.sum(tl.reshape(x, (G, W // 2, 2)), axis=2)


@triton.jit
def _node_slots(active_ptr, table_ptr, layer, active_stride, n, R: tl.constexpr, N: tl.constexpr,
                GPUS: tl.constexpr, GPUSP: tl.constexpr):  # fmt: skip
    """Each node's live slots ``[NP]`` and their fl32 reciprocals, looked up in the correctly rounded table (no
    division here; a node without live slots: 0, the table's entry 0)."""
    gpu = tl.arange(0, GPUSP)
    live = tl.load(active_ptr + layer * active_stride + gpu, mask=gpu < GPUS, other=0).to(tl.int32)
    on_node = (gpu[None, :] // (GPUS // N)) == n[:, None]  # [NP, GPUSP]
    slots = tl.sum(tl.where(on_node, live[None, :], 0), axis=1) * (R // GPUS)  # [NP]
    return slots, tl.load(table_ptr + slots, mask=n < N, other=0.0)


@triton.jit
def _split_kernel(
    weight_ptr,
    prev_ptr,
    out_ptr,
    valid_ptr,
    active_ptr,
    table_ptr,
    active_stride,
    E: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    G: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    GS: tl.constexpr,
    IMPROVE: tl.constexpr,
    ELASTIC: tl.constexpr,
    GPUS: tl.constexpr,
    GPUSP: tl.constexpr,
    SWAPS: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G)
    # Group loads, in pairs level by level (the same additions as sum_in_pairs).
    x = tl.load(weight_ptr + layer * E + g[:, None] * GS + tl.arange(0, GS)[None, :])  # [G, GS]
    if GS >= 2:
        x = _pairs(x, G, GS)
    if GS >= 4:
        x = _pairs(x, G, GS // 2)
    if GS >= 8:
        x = _pairs(x, G, GS // 4)
    if GS >= 16:
        x = _pairs(x, G, GS // 8)
    if GS >= 32:
        x = _pairs(x, G, GS // 16)
    if GS >= 64:
        x = _pairs(x, G, GS // 32)
    loads = tl.reshape(x, (G,))

    # The node of each group in previous: its slots' lowest and highest node must agree, G / N groups a node.
    r = tl.arange(0, RP)
    prev = tl.load(prev_ptr + layer * R + r, mask=r < R, other=-1)
    group_of_slot = tl.where(prev >= 0, prev // GS, -1)
    node_of_slot = (r // (R // N)).to(tl.int32)
    match = group_of_slot[:, None] == g[None, :]  # [RP, G]
    low = tl.min(tl.where(match, node_of_slot[:, None], N), axis=0)  # [G]
    high = tl.max(tl.where(match, node_of_slot[:, None], -1), axis=0)
    n = tl.arange(0, NP)
    count = tl.sum((low[:, None] == n[None, :]).to(tl.int32), axis=0)  # [NP]
    good_nodes = tl.sum(((count == G // N) | (n >= N)).to(tl.int32), axis=0) == NP
    valid = (tl.sum((low == high).to(tl.int32), axis=0) == G) & good_nodes
    assign = tl.where(valid, low, 0)  # [G]

    tl.store(valid_ptr + layer, valid)
    real = n < N
    if ELASTIC:
        inverse = _node_slots(active_ptr, table_ptr, layer, active_stride, n, R, N, GPUS, GPUSP)[1]

    for _ in range(SWAPS):
        # Node loads, left to right over the groups in group order.
        node_load = tl.zeros((NP,), dtype=tl.float32)
        for k in tl.static_range(G):
            load_k = tl.sum(tl.where(g == k, loads, 0.0), axis=0)
            node_k = tl.sum(tl.where(g == k, assign, 0), axis=0)
            term = tl.where(n == node_k, load_k, 0.0)
            if k == 0:  # noqa: SIM108 (a static if; left to right: the first group's term starts the sum)
                node_load = term
            else:
                node_load = node_load + term
        if ELASTIC:  # noqa: SIM108 (a static if)
            scaled = node_load * inverse
        else:
            scaled = node_load
        current = tl.max(tl.where(real, scaled, -float("inf")), axis=0)

        # Every pair (g1, g2) at once: [G, G].
        at_node = assign[:, None] == n[None, :]  # [G, NP]
        load_of_node = tl.sum(tl.where(at_node, node_load[None, :], 0.0), axis=1)  # [G]: the load of g's node
        x1, x2 = loads[:, None], loads[None, :]
        new_a = (load_of_node[:, None] - x1) + x2
        new_b = (load_of_node[None, :] - x2) + x1
        if ELASTIC:  # the sums first, then the product: no fused multiply-add
            inverse_of = tl.sum(tl.where(at_node, inverse[None, :], 0.0), axis=1)  # [G]
            new_a = new_a * inverse_of[:, None]
            new_b = new_b * inverse_of[None, :]
        a, b = assign[:, None], assign[None, :]
        n3 = n[None, None, :]
        others_mask = real[None, None, :] & (n3 != a[:, :, None]) & (n3 != b[:, :, None])  # [G, G, NP]
        others = tl.max(tl.where(others_mask, scaled[None, None, :], -float("inf")), axis=2)
        after = tl.maximum(others, tl.maximum(new_a, new_b))
        ok = (g[:, None] < g[None, :]) & (a != b) & (after < current * IMPROVE)
        # The first (c1, c2), row-major, of the least score, on the [G, G] tile itself: not an argmin of the tile
        # reshaped to 1-D, whose elements Triton may reorder on a GPU when the reshape feeds a reduction.
        score = tl.where(ok, after, float("inf"))
        least = tl.min(tl.min(score, axis=1), axis=0)
        choice = tl.min(tl.min(tl.where(score == least, g[:, None] * G + g[None, :], G * G), axis=1), axis=0)
        accept = tl.max(tl.max(ok.to(tl.int32), axis=1), axis=0) > 0
        c1, c2 = choice // G, choice % G
        node1 = tl.sum(tl.where(g == c1, assign, 0), axis=0)
        node2 = tl.sum(tl.where(g == c2, assign, 0), axis=0)
        swapped = tl.where(g == c1, node2, tl.where(g == c2, node1, assign))
        assign = tl.where(accept, swapped, assign)

    # Groups node by node, in group order: group g goes to the rank of its key among all keys (unique).
    key = assign * G + g
    rank = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
    tl.store(out_ptr + layer * G + rank, g.to(tl.int64))


def near_group_split(
    weight: torch.Tensor, previous: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int
) -> torch.Tensor:
    """``mgroup2group [L, groups]`` int64: :func:`~eplb.algorithms.elastic.sticky_group_split` of
    ``weight [L, E]`` (float32) and ``previous [L, R]`` with ``active=None, max_swaps=1`` (see :func:`fits`)."""
    return _launch(weight, previous, None, num_phy, num_groups, num_nodes, 1, 1)[0]


def sticky_group_split(
    weight: torch.Tensor,
    previous: torch.Tensor,
    active: torch.Tensor | None,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    max_swaps: int | None = None,
    xp: object = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`eplb.algorithms.elastic.sticky_group_split`, one launch: ``mgroup2group [L, groups]`` int64 and
    ``[L, 1]`` bool (``previous``'s split is a start). ``active [G]``, ``[1, G]`` or ``[L, G]`` bool or
    ``None`` (every GPU live); ``num_gpus`` a multiple of ``num_nodes`` (see :func:`fits`)."""
    swaps = num_groups if max_swaps is None else max_swaps
    split, valid = _launch(weight, previous, active, num_phy, num_groups, num_nodes, num_gpus, swaps)
    return split, valid[:, None]


def _launch(
    weight: torch.Tensor,
    previous: torch.Tensor,
    active: torch.Tensor | None,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    swaps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    ensure_cache_dir()
    num_layers, num_log = weight.shape
    weight = weight.to(torch.float32).contiguous()
    previous = previous.to(torch.int64).contiguous()
    out = torch.empty((num_layers, num_groups), dtype=torch.int64, device=weight.device)
    valid = torch.empty((num_layers,), dtype=torch.bool, device=weight.device)
    elastic = active is not None
    if elastic:
        if num_gpus % num_nodes or num_phy % num_gpus:
            raise ValueError(f"num_gpus ({num_gpus}) must divide num_phy and be a multiple of num_nodes")
        active = active.reshape(-1, num_gpus).to(torch.bool).contiguous()
        stride = 0 if active.shape[0] == 1 else num_gpus
        table = _xp.reciprocal_table(num_phy, xp=_xp.array_namespace(weight), device=weight.device)
    else:
        active, table, stride = weight, weight, 0  # not read
    if num_layers and swaps > 0:
        _split_kernel[(num_layers,)](
            weight,
            previous,
            out,
            valid,
            active,
            table,
            stride,
            E=num_log,
            R=num_phy,
            RP=_pow2(num_phy),
            G=num_groups,
            N=num_nodes,
            NP=_pow2(num_nodes),
            GS=num_log // num_groups,
            IMPROVE=IMPROVEMENT,
            ELASTIC=elastic,
            GPUS=num_gpus,
            GPUSP=_pow2(num_gpus),
            SWAPS=swaps,
        )
    return out, valid


# ------------------------------------------------------------------ the fresh split: groups to nodes by LPT


def live_fits(num_log: int, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int) -> bool:
    """Whether :func:`group_split` takes these sizes: up to 64 groups and 64 nodes, groups a multiple of the
    nodes, GPUs a multiple of the nodes dividing the slots, at most 8192 slots and 1024 experts a group."""
    if min(num_groups, num_nodes, num_gpus, num_phy) <= 0:
        return False
    if num_log % num_groups or num_groups % num_nodes or num_gpus % num_nodes or num_phy % num_gpus:
        return False
    return num_groups <= MAX_GROUPS and num_phy <= MAX_SLOTS and num_log // num_groups <= 1024


@triton.jit
def _lpt_split_kernel(
    weight_ptr,
    active_ptr,
    table_ptr,
    out_ptr,
    active_stride,
    E: tl.constexpr,
    R: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    GS: tl.constexpr,
    GPUS: tl.constexpr,
    GPUSP: tl.constexpr,
    BY_CAPACITY: tl.constexpr,
    MOST: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GP)
    real_g = g < G
    # Group loads, left to right (sum_left_to_right over each group's experts).
    loads = tl.load(weight_ptr + layer * E + g * GS, mask=real_g, other=0.0)
    for k in range(1, GS):
        loads = loads + tl.load(weight_ptr + layer * E + g * GS + k, mask=real_g, other=0.0)
    # The stable descending sort, by counting: group i visits at #{j: l_j > l_i} + #{j < i: l_j == l_i}.
    li, lj = loads[:, None], loads[None, :]
    ahead = ((lj > li) | ((lj == li) & (g[None, :] < g[:, None]))) & real_g[None, :]
    position = tl.sum(ahead.to(tl.int32), axis=1)  # [GP]
    position = tl.where(real_g, position, GP)
    n = tl.arange(0, NP)
    real_n = n < N
    PER_NODE: tl.constexpr = G // N

    # greedy_group_split: LPT on the group loads (one group a node: zero loads, so group g on node g).
    open_load = tl.where(real_n, 0.0, float("inf"))
    count = tl.zeros((NP,), dtype=tl.int32)
    for t in range(G):
        if G == N:
            item = t
            w = 0.0
        else:
            item = tl.sum(tl.where(position == t, g, 0), axis=0)
            w = tl.sum(tl.where(position == t, loads, 0.0), axis=0)
        node = tl.argmin(open_load, axis=0, tie_break_left=True)
        chosen = n == node
        rank = tl.sum(tl.where(chosen, count, 0), axis=0)
        count = count + chosen.to(tl.int32)
        open_load = tl.where(chosen, tl.minimum(open_load + w, MOST), open_load)
        open_load = tl.where(count == PER_NODE, float("inf"), open_load)
        tl.store(out_ptr + layer * G + node * PER_NODE + rank, item.to(tl.int64))

    if BY_CAPACITY:
        # live_group_split: the same visiting order, each group to the open node whose load after it, times
        # fl32(1 / its live slots), is smallest; selected where the nodes' live slots differ.
        slots, inverse = _node_slots(active_ptr, table_ptr, layer, active_stride, n, R, N, GPUS, GPUSP)
        first = tl.sum(tl.where(n == 0, slots, 0), axis=0)
        alike = tl.sum(((slots == first) | (n >= N)).to(tl.int32), axis=0) == NP
        if not alike:
            node_load = tl.zeros((NP,), dtype=tl.float32)
            count = tl.zeros((NP,), dtype=tl.int32)
            for t in range(G):
                item = tl.sum(tl.where(position == t, g, 0), axis=0)
                w = tl.sum(tl.where(position == t, loads, 0.0), axis=0)
                after = tl.minimum(node_load + w, MOST)
                key = tl.where(slots > 0, after * inverse, MOST)
                key = tl.where((count < PER_NODE) & real_n, key, float("inf"))
                node = tl.argmin(key, axis=0, tie_break_left=True)
                chosen = n == node
                rank = tl.sum(tl.where(chosen, count, 0), axis=0)
                count = count + chosen.to(tl.int32)
                node_load = tl.where(chosen, after, node_load)
                tl.store(out_ptr + layer * G + node * PER_NODE + rank, item.to(tl.int64))


def group_split(
    weight: torch.Tensor,
    active: torch.Tensor,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    by_capacity: bool = True,
    xp: object = None,
) -> torch.Tensor:
    """``mgroup2group [L, groups]`` int64, one launch: :func:`eplb.algorithms.elastic.live_group_split`
    (``by_capacity``) or :func:`eplb.algorithms.hierarchy.greedy_group_split` of ``weight [L, E]`` (float32)
    with ``active [G]``, ``[1, G]`` or ``[L, G]`` bool (see :func:`live_fits`).

    Bit for bit: the group loads are added left to right, the visiting order
    is the stable descending sort (by counting, exact), a node's running load
    is ``min(load + group, float32 max)`` and the capacity key one product of
    it and the table's reciprocal, compared, never added to."""
    ensure_cache_dir()
    num_layers, num_log = weight.shape
    weight = weight.to(torch.float32).contiguous()
    active = active.reshape(-1, num_gpus).to(torch.bool).contiguous()
    table = _xp.reciprocal_table(num_phy, xp=_xp.array_namespace(weight), device=weight.device)
    out = torch.empty((num_layers, num_groups), dtype=torch.int64, device=weight.device)
    if num_layers:
        _lpt_split_kernel[(num_layers,)](
            weight,
            active,
            table,
            out,
            0 if active.shape[0] == 1 else num_gpus,
            E=num_log,
            R=num_phy,
            G=num_groups,
            GP=_pow2(num_groups),
            N=num_nodes,
            NP=_pow2(num_nodes),
            GS=num_log // num_groups,
            GPUS=num_gpus,
            GPUSP=_pow2(num_gpus),
            BY_CAPACITY=by_capacity,
            MOST=MAX_LOAD,
        )
    return out
