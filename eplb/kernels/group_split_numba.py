"""Equals :func:`eplb.algorithms.elastic.sticky_group_split` with ``active=None, max_swaps=1`` (numba).

The near split of ``previous=`` with knobs
(:func:`eplb.algorithms.stability.near_split`) for numpy, torch CPU and JAX
CPU inputs: the array-API function is about 65 small numpy operations (a
millisecond and more on a 2-core CPU); here one loop per layer.

Bit for bit the array-API function, with the same float32 operations in the
same order (the CUDA twin, :mod:`eplb.kernels.group_split_triton`, lists
them): group loads summed in pairs level by level, an odd element out
joining the next level last; node loads left to right over the groups in
group order; a swap's node loads ``(node - out) + in``; a swap kept if its
heaviest node is below ``current * IMPROVEMENT``; the lowest such, first
pair ``(g1, g2)``, ``g1 < g2``, on ties. No fastmath. Proved by
``tests/test_group_split_numba.py`` (against the array-API function on
valid and invalid previous placements, ties, zero loads, group sizes that
are not powers of two).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.algorithms.refine import IMPROVEMENT
from eplb.kernels._numba_jit import njit

__all__ = ["near_group_split", "warm_up"]

_IMPROVE = np.float32(IMPROVEMENT)


@njit()
def _split(weight: Any, previous: Any, num_phy: int, num_groups: int, num_nodes: int, out: Any) -> None:
    num_layers, num_log = weight.shape
    size, per_node = num_log // num_groups, num_phy // num_nodes
    loads = np.empty(num_groups, np.float32)
    level = np.empty(size, np.float32)
    low = np.empty(num_groups, np.int64)
    high = np.empty(num_groups, np.int64)
    assign = np.empty(num_groups, np.int64)
    count = np.empty(num_nodes, np.int64)
    node_load = np.empty(num_nodes, np.float32)
    key = np.empty(num_groups, np.int64)
    for layer in range(num_layers):
        for g in range(num_groups):  # in pairs: (x0 + x1) + (x2 + x3) ..., an odd one out joins the next level last
            for k in range(size):
                level[k] = weight[layer, g * size + k]
            m = size
            while m > 1:
                half = m // 2
                for k in range(half):
                    level[k] = level[2 * k] + level[2 * k + 1]
                if m % 2:
                    level[half] = level[m - 1]
                    m = half + 1
                else:
                    m = half
            loads[g] = level[0]
        # The node of each group: its slots' lowest and highest node agree, groups / N groups on each node.
        for g in range(num_groups):
            low[g] = num_nodes
            high[g] = -1
        for j in range(num_phy):
            e = previous[layer, j]
            if e >= 0:
                g = e // size
                node = j // per_node
                low[g] = min(low[g], node)
                high[g] = max(high[g], node)
        count[:] = 0
        valid = True
        for g in range(num_groups):
            if low[g] != high[g]:
                valid = False
            elif low[g] < num_nodes:
                count[low[g]] += 1
        for n in range(num_nodes):
            if count[n] != num_groups // num_nodes:
                valid = False
        for g in range(num_groups):
            assign[g] = low[g] if valid else 0
        # Node loads, left to right over the groups in group order (a group elsewhere adds 0).
        for n in range(num_nodes):
            total = loads[0] if assign[0] == n else np.float32(0.0)
            for g in range(1, num_groups):
                total = total + (loads[g] if assign[g] == n else np.float32(0.0))
            node_load[n] = total
        current = node_load[0]
        for n in range(1, num_nodes):
            current = max(current, node_load[n])
        bound = current * _IMPROVE
        best, best1, best2 = np.float32(np.inf), -1, -1
        for g1 in range(num_groups):
            for g2 in range(g1 + 1, num_groups):
                a, b = assign[g1], assign[g2]
                if a == b:
                    continue
                new_a = (node_load[a] - loads[g1]) + loads[g2]
                new_b = (node_load[b] - loads[g2]) + loads[g1]
                after = max(new_a, new_b)
                for n in range(num_nodes):
                    if n != a and n != b:
                        after = max(after, node_load[n])
                if after < bound and after < best:
                    best, best1, best2 = after, g1, g2
        if best1 >= 0:
            assign[best1], assign[best2] = assign[best2], assign[best1]
        # Groups node by node, in group order.
        for g in range(num_groups):
            key[g] = assign[g] * num_groups + g
        order = np.argsort(key)  # unique keys
        for k in range(num_groups):
            out[layer, k] = order[k]


def near_group_split(weight: Any, previous: Any, num_phy: int, num_groups: int, num_nodes: int) -> np.ndarray:
    """``mgroup2group [L, groups]`` int64: :func:`~eplb.algorithms.elastic.sticky_group_split` of ``weight
    [L, E]`` (float32) and ``previous [L, R]`` with ``active=None, max_swaps=1``."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    previous = np.ascontiguousarray(previous, dtype=np.int64)
    out = np.empty((weight.shape[0], num_groups), dtype=np.int64)
    _split(weight, previous, num_phy, num_groups, num_nodes, out)
    return out


def warm_up() -> None:
    """Run the kernel once on a tiny input, so that numba compiles (or loads from its cache) what eplb uses."""
    previous = np.arange(8, dtype=np.int64).reshape(1, 8) % 4
    near_group_split(np.ones((1, 4), np.float32), previous, 8, 2, 2)
