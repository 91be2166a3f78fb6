"""Equals :func:`eplb.algorithms.policies.place` (greedy policy, no ``spill``) bit for bit, compiled with numba.

Proved by ``tests/test_fast_cpu.py`` (against the array-API path on random,
tied, tiny and real loads and every config shape, with both sort variants
and lockstep batch sizes) and by the cross-backend suite (``numpy:numba``,
and the numpy, torch CPU and JAX CPU front doors that dispatch here).

The batched array-API code (:mod:`eplb.algorithms`) issues thousands of tiny
array operations per call; here the same policy runs as plain loops compiled
by numba, layer by layer and node by node, following ``docs/algorithm.md``
step for step with the same float32 arithmetic, so the placement is the
numpy reference's, bit for bit:

- loads are float32 (the caller converts them, as the reference does; -0
  becomes +0, equal in every comparison);
- group loads are summed left to right in float32 (not at all with one
  group per node, where they play no part);
- visit order is a stable descending sort (buckets of the float32 bit
  patterns, then insertion; a merge sort where that would be slow);
- LPT sends each item to the open pack with the smallest float32 running
  load, ties to the lowest pack index; replication hands each replica to the
  largest score ``w * fl(1/c)`` (reciprocal table), ties to the lowest index.
  Both choices are the minimum of unique int64 keys ``(bits << 32) | index``
  (``~bits`` for the largest score): non-negative float32 bit patterns order
  like the values, so the smallest key is the first extreme, as argmin and
  argmax choose. An 8-ary tournament tree keeps the minimum;
- one item per pack is the identity (the published shortcut); slots inside
  a GPU are in arrival order; ``log2phy`` is built from (expert, replica).

Every float operation is a float32 ``+`` or ``*`` of float32 operands (no
Python float constant enters the arithmetic, which numba would promote to
float64), and numba compiles without fast-math, so LLVM neither reassociates
nor contracts ``a * b + c`` into an FMA (a test checks the machine code).

The LPT steps of one packing form a chain of dependent loads and compares;
the packings of several (layer, node) rows run in lockstep so that the
processor overlaps their chains. Layers are independent, so splitting them
over threads (``parallel=True``) gives the same placement.

Loads are read as every backend reads them (:func:`eplb.algorithms.loads.clean_loads`:
below ``2**-64``, NaN, negative and infinite loads as 0). Layers whose
float32 sums overflow are reported back and recomputed by the reference path,
whose pack sums saturate (the public API rejects such loads unless their
values go unchecked).

Compiled on first use, then cached on disk (:mod:`eplb.kernels._numba_jit`):
a later process loads it instead of compiling for ~7 s. The parallel
variant compiles in memory (opt-in, rarely used). This module imports
numba; :mod:`eplb.backends._numba` imports it only where numba is available.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from eplb.algorithms.loads import MAX_LOAD, TINY_LOAD
from eplb.kernels._numba_jit import njit

__all__ = ["layers_parallel", "layers_serial", "rank_desc"]

_jit = njit()
# The per-item helpers are inlined at numba IR level: a call costs argument
# marshalling and array reference counting in the hottest loops.
_inline = njit(inline="always")

zero32 = np.float32(0)
tiny32 = np.float32(TINY_LOAD)
max32 = np.float32(MAX_LOAD)
inf32 = np.float32(np.inf)
no_key = np.int64(np.iinfo(np.int64).max)  # a full pack, or padding
low32 = np.int64(0xFFFFFFFF)
top31 = np.int64(0x7FFFFFFF)


@_jit
def rank_desc(x: Any, n: int, order: Any, head: Any, src: Any, dst: Any, merge_only: bool) -> None:
    """``order[:n]``: indices of ``x[:n]`` by decreasing value, ties by index (a stable sort).

    ``x`` holds float32 >= +0 (never -0), whose int32 bit patterns order
    like the values. First a bucket pass: the span of the positive
    patterns is cut into about ``2n`` equal buckets (the largest values
    first, zeros last), filled in index order, then one insertion pass
    sorts within buckets (an item never passes a bucket of larger keys,
    nor an equal key, so ties keep index order). Floats' patterns grow
    with the logarithm of the value, so buckets hold few items on real
    loads; if the insertion pass moves more than ``8n`` items, a merge
    sort of the unique int64 keys ``(~bits << 32) | i`` (ascending order
    = the stable descending one) does the job instead. Same result.
    """
    bits = x.view(np.int32)
    if not merge_only:
        hi = np.int32(0)
        lo = np.int32(0x7FFFFFFF)
        for i in range(n):
            b = bits[i]
            hi = max(hi, b)
            lo = min(lo, b if b > 0 else np.int32(0x7FFFFFFF))
        if hi == 0:  # all zero
            for i in range(n):
                order[i] = i
            return
        buckets = 2
        while buckets < 2 * n:
            buckets *= 2
        shift = 0
        while (hi - lo) >> shift >= buckets - 1:
            shift += 1
        for k in range(buckets):
            head[k] = 0
        for i in range(n):
            b = bits[i]
            head[(hi - b) >> shift if b > 0 else buckets - 1] += 1
        start = 0
        for k in range(buckets):
            size = head[k]
            head[k] = start
            start += size
        for i in range(n):
            b = bits[i]
            k = (hi - b) >> shift if b > 0 else buckets - 1
            order[head[k]] = i
            head[k] += 1
        budget = 8 * n
        for k in range(1, n):
            item = order[k]
            key = bits[item]
            j = k
            while j > 0 and bits[order[j - 1]] < key:
                order[j] = order[j - 1]
                j -= 1
            order[j] = item
            budget -= k - j
            if budget < 0:
                break
        if budget >= 0:
            return
    for i in range(n):
        src[i] = ((top31 - np.int64(bits[i])) << 32) | i
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                a = src[i]
                b = src[j]
                take_b = b < a
                dst[k] = b if take_b else a
                j += take_b
                i += 1 - take_b
                k += 1
            while i < mid:
                dst[k] = src[i]
                i += 1
                k += 1
            while j < hi:
                dst[k] = src[j]
                j += 1
                k += 1
        src, dst = dst, src
        width *= 2
    for i in range(n):
        order[i] = src[i] & low32


# Tournament tree of int64 keys, 8 children a node; the smallest key wins.
# Level 0 holds the m leaves padded to a multiple of 8 with no_key; level
# l + 1 holds the minimum of each block of 8 of level l, padded likewise;
# the last level has 8 entries and the root is their minimum. Keys are
# (value bits << 32) | index, unique, so the minimum is the smallest
# value, first index on ties: exactly argmin's (or, on ~bits, argmax's) choice.


@_inline
def min8(tree: Any, base: int) -> Any:
    a = min(tree[base], tree[base + 1])
    b = min(tree[base + 2], tree[base + 3])
    c = min(tree[base + 4], tree[base + 5])
    d = min(tree[base + 6], tree[base + 7])
    return min(min(a, b), min(c, d))


@_jit
def tree_levels(m: int, offsets: Any) -> int:
    """Levels of a tree over ``m`` leaves; ``offsets[l]``: start of level l, ``offsets[levels]``: its size."""
    size = (m + 7) // 8 * 8
    offsets[0] = 0
    levels = 1
    while size > 8:
        offsets[levels] = offsets[levels - 1] + size
        size = (size // 8 + 7) // 8 * 8
        levels += 1
    offsets[levels] = offsets[levels - 1] + size
    return levels


@_jit
def tree_build(tree: Any, base: int, m: int, levels: int, offsets: Any) -> None:
    """Pad leaves ``tree[base : base + m]`` and fill the levels above."""
    for k in range(m, offsets[1]):
        tree[base + k] = no_key
    for level in range(1, levels):
        blocks = (offsets[level] - offsets[level - 1]) // 8
        for b in range(offsets[level + 1] - offsets[level]):
            at = base + offsets[level] + b
            tree[at] = min8(tree, base + offsets[level - 1] + 8 * b) if b < blocks else no_key


@_inline
def tree_set(tree: Any, base: int, levels: int, offsets: Any, leaf: int, key: Any) -> None:
    tree[base + leaf] = key
    pos = leaf
    for level in range(1, levels):
        pos >>= 3
        tree[base + offsets[level] + pos] = min8(tree, base + offsets[level - 1] + 8 * pos)


@_jit
def lpt(
    x: Any,
    problems: int,
    n: int,
    m: int,
    slot2item: Any,
    good: Any,
    order: Any,
    load: Any,
    count: Any,
    tree: Any,
    offsets: Any,
    head: Any,
    src: Any,
    dst: Any,
    merge_only: bool,
) -> None:
    """LPT of ``problems`` rows ``x [problems * n]`` (float32 >= +0) into ``m`` packs of ``n // m`` each.

    ``slot2item[b * n + p * cap + r]``: the r-th arrival in pack p of row
    b. ``good[b]`` False where a running load overflowed to inf (the
    reference path defines that case). The rows are independent chains
    of dependent steps; running them in lockstep lets the processor
    overlap them.
    """
    cap = n // m
    if cap == 1:
        for k in range(problems * n):
            slot2item[k] = k % n
            good[k // n] = True
        return
    levels = tree_levels(m, offsets)
    size = offsets[levels]
    root = offsets[levels - 1]
    for b in range(problems):
        rank_desc(x[b * n : (b + 1) * n], n, order[b * n : (b + 1) * n], head, src, dst, merge_only)
        for p in range(m):
            load[b * m + p] = zero32
            count[b * m + p] = 0
            tree[b * size + p] = p  # load +0: bits 0
        tree_build(tree, b * size, m, levels, offsets)
    load_bits = load.view(np.int32)
    for t in range(n):
        for b in range(problems):
            key = min8(tree, b * size + root)  # open pack with the smallest load, first on ties
            p = key & low32
            at = b * m + p
            c = count[at]
            item = order[b * n + t]
            slot2item[b * n + p * cap + c] = item
            count[at] = c + 1
            load[at] = load[at] + x[b * n + item]
            tree_set(tree, b * size, levels, offsets, p, (np.int64(load_bits[at]) << 32) | p if c + 1 < cap else no_key)
    for b in range(problems):
        fine = True
        for p in range(m):
            fine &= load[b * m + p] < inf32
        good[b] = fine


@_jit
def replicate(
    mload: Any,
    num_log: int,
    num_phy: int,
    recip: Any,
    cnt: Any,
    phy2mlog: Any,
    phyrank: Any,
    phy_load: Any,
    score: Any,
    tree: Any,
    offsets: Any,
) -> None:
    """Greedy replication of ``mload [num_log]`` into ``num_phy`` slots, and each slot's replica load.

    Tree keys ``(~score bits << 32) | e``: the smallest is the largest
    score ``w * fl(1/c)``, lowest expert index on ties.
    """
    score_bits = score.view(np.int32)
    for j in range(num_log):
        cnt[j] = 1
        phy2mlog[j] = j
        phyrank[j] = 0
        score[j] = mload[j] * recip[1]
        tree[j] = ((top31 - np.int64(score_bits[j])) << 32) | j
    levels = tree_levels(num_log, offsets)
    tree_build(tree, 0, num_log, levels, offsets)
    root = offsets[levels - 1]
    for s in range(num_log, num_phy):
        e = min8(tree, root) & low32
        phy2mlog[s] = e
        phyrank[s] = cnt[e]
        cnt[e] += 1
        score[e] = mload[e] * recip[cnt[e]]
        tree_set(tree, 0, levels, offsets, e, ((top31 - np.int64(score_bits[e])) << 32) | e)
    for j in range(num_phy):
        e = phy2mlog[j]
        phy_load[j] = mload[e] * recip[cnt[e]]


def _layers(
    weight: Any,
    recip: Any,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    phy2log: Any,
    log2phy: Any,
    logcnt: Any,
    ok: Any,
    batch: int,
    merge_only: bool,
    num_chunks: int,
) -> None:
    """The greedy placement of every layer; ``ok[l]`` False where layer ``l`` needs the reference path.

    Layers go ``batch`` at a time, so that their ``batch * num_nodes``
    replica packings run in lockstep.
    """
    num_layers, num_log = weight.shape
    num_phy = phy2log.shape[1]
    width = log2phy.shape[2]
    group_size = num_log // num_groups
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    rows = batch * num_nodes  # (layer, node) problems per batch
    longest = max(num_groups, phy_per_node)
    widest = max(num_nodes, gpus_per_node, log_per_node)
    for chunk in numba.prange(num_chunks):
        # Scratch, once per chunk of layers.
        offsets = np.empty(32, np.int64)
        tree_size = tree_levels(widest, offsets)
        tree_size = offsets[tree_size] + 8
        w = np.empty(batch * num_log, np.float32)
        gload = np.empty(batch * num_groups, np.float32)
        mgroup2group = np.empty(batch * num_groups, np.int64)
        mlog2log = np.empty(batch * num_log, np.int64)
        mload = np.empty(log_per_node, np.float32)
        score = np.empty(log_per_node, np.float32)
        cnt = np.empty(rows * log_per_node, np.int64)
        phy2mlog = np.empty(rows * phy_per_node, np.int64)
        phyrank = np.empty(rows * phy_per_node, np.int64)
        phy_load = np.empty(rows * phy_per_node, np.float32)
        pphy2phy = np.empty(rows * phy_per_node, np.int64)
        order = np.empty(rows * longest, np.int64)
        load = np.empty(rows * widest, np.float32)
        count = np.empty(rows * widest, np.int64)
        tree = np.empty(rows * tree_size, np.int64)
        head = np.empty(4 * longest + 8, np.int64)
        src = np.empty(longest, np.int64)
        dst = np.empty(longest, np.int64)
        good = np.empty(rows, np.bool_)
        first = chunk * num_layers // num_chunks
        last = (chunk + 1) * num_layers // num_chunks
        for start in range(first, last, batch):
            size = min(batch, last - start)
            # Loads as every backend reads them (eplb.algorithms.loads.clean_loads: below
            # TINY_LOAD, -0, NaN, negative and inf made +0; bit patterns then order like the
            # values) and group sums.
            for lb in range(size):
                fine = True
                for e in range(num_log):
                    v = weight[start + lb, e]
                    w[lb * num_log + e] = v if (v >= tiny32) & (v <= max32) else zero32
                for g in range(num_groups):
                    # One group per node needs no loads: group g goes to node g.
                    at = lb * num_log + g * group_size
                    total = zero32
                    if num_groups > num_nodes:
                        total = w[at]
                        for k in range(1, group_size):
                            total = total + w[at + k]
                    gload[lb * num_groups + g] = total
                    fine &= total < inf32
                ok[start + lb] = fine
                if not fine:  # the reference path redoes this layer; run on zeros meanwhile
                    for e in range(num_log):
                        w[lb * num_log + e] = zero32
                    for g in range(num_groups):
                        gload[lb * num_groups + g] = zero32
            # Step 1: groups to nodes.
            lpt(
                gload,
                size,
                num_groups,
                num_nodes,
                mgroup2group,
                good,
                order,
                load,
                count,
                tree,
                offsets,
                head,
                src,
                dst,
                merge_only,
            )
            for lb in range(size):
                ok[start + lb] &= good[lb]
                for k in range(num_groups):
                    for i in range(group_size):
                        at = lb * num_log + k * group_size + i
                        mlog2log[at] = mgroup2group[lb * num_groups + k] * group_size + i
            # Step 2: replicate within each node.
            for r in range(size * num_nodes):
                lb, node = r // num_nodes, r % num_nodes
                for j in range(log_per_node):
                    mload[j] = w[lb * num_log + mlog2log[lb * num_log + node * log_per_node + j]]
                at, atp = r * log_per_node, r * phy_per_node
                replicate(
                    mload,
                    log_per_node,
                    phy_per_node,
                    recip,
                    cnt[at : at + log_per_node],
                    phy2mlog[atp : atp + phy_per_node],
                    phyrank[atp : atp + phy_per_node],
                    phy_load[atp : atp + phy_per_node],
                    score,
                    tree,
                    offsets,
                )
            # Step 3: each node's replicas onto its GPUs, all (layer, node) rows in lockstep.
            lpt(
                phy_load,
                size * num_nodes,
                phy_per_node,
                gpus_per_node,
                pphy2phy,
                good,
                order,
                load,
                count,
                tree,
                offsets,
                head,
                src,
                dst,
                merge_only,
            )
            for lb in range(size):
                layer = start + lb
                unused = log2phy[layer].reshape(num_log * width)
                for k in range(num_log * width):
                    unused[k] = -1
                for node in range(num_nodes):
                    r = lb * num_nodes + node
                    ok[layer] &= good[r]
                    for q in range(phy_per_node):
                        j = r * phy_per_node + pphy2phy[r * phy_per_node + q]
                        expert = mlog2log[lb * num_log + node * log_per_node + phy2mlog[j]]
                        slot = node * phy_per_node + q
                        phy2log[layer, slot] = expert
                        if width:  # width 0: the caller needs no log2phy (keep-in-place builds its own)
                            log2phy[layer, expert, phyrank[j]] = slot
                    for j in range(log_per_node):
                        logcnt[layer, mlog2log[lb * num_log + node * log_per_node + j]] = cnt[r * log_per_node + j]


layers_serial = _jit(_layers)
# parallel=True with an on-disk cache would share _layers' cache entry name; opt-in, so in memory.
layers_parallel = numba.njit(cache=False, nogil=True, parallel=True)(_layers)
