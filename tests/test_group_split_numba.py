"""The near split's group swap on the CPU (eplb.kernels.group_split_numba) equals the array-API function.

The oracle is :func:`eplb.algorithms.elastic.sticky_group_split` with ``active=None, max_swaps=1`` (itself
checked against plain Python in ``tests/test_elastic.py`` and ``tests/test_near_split.py``). Cases: previous
placements of other loads (swaps happen) and of the same loads, an invalid previous (a group across two
nodes), tied and all-zero layers, loads whose pairwise and left-to-right sums round apart; group sizes that are
not powers of two (odd levels of the pairwise sum), one group per node, one expert per group, the DeepSeek-V3
shape.
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb
from eplb.algorithms.elastic import sticky_group_split

pytest.importorskip("numba")

# (num_log, num_phy, num_groups, num_nodes, num_gpus)
SHAPES = [
    (16, 24, 4, 2, 4),
    (24, 36, 4, 2, 4),  # 6 experts a group: levels 6 -> 3 -> 2 -> 1
    (20, 30, 4, 2, 2),  # 5 a group
    (36, 48, 6, 3, 6),  # 6 groups on 3 nodes
    (8, 12, 8, 4, 4),  # one expert a group
    (4, 8, 2, 2, 2),  # one group a node
    (256, 288, 8, 4, 32),
]


@pytest.mark.parametrize("shape", SHAPES, ids=["-".join(map(str, s)) for s in SHAPES])
def test_equals_the_array_api_split(shape):
    from eplb.kernels import group_split_numba

    num_log, num_phy, groups, nodes, gpus = shape
    rng = np.random.default_rng(num_log + groups)
    w = (rng.lognormal(0, 2.0, (8, num_log)) * rng.choice([1, 1e-3, 1e3], (8, num_log))).astype(np.float32)
    w[1] = np.float32(1.0)
    w[2] = 0.0
    w[3] = np.float32(2.0) ** rng.integers(-24, 24, num_log)
    other = rng.lognormal(0, 1.0, (8, num_log)).astype(np.float32)
    prev = np.asarray(eplb.rebalance_experts(other, num_phy, groups, nodes, gpus).phy2log)
    same = np.asarray(eplb.rebalance_experts(w, num_phy, groups, nodes, gpus).phy2log)
    bad = prev.copy()
    bad[:, 0] = bad[:, num_phy // nodes]  # a group on two nodes: no start
    swapped = 0
    for previous in (prev, same, bad):
        want, _ = sticky_group_split(w, previous, None, num_phy, groups, nodes, gpus, max_swaps=1, xp=np)
        unswapped, _ = sticky_group_split(w, previous, None, num_phy, groups, nodes, gpus, max_swaps=0, xp=np)
        swapped += int((want != unswapped).any(axis=1).sum())
        got = group_split_numba.near_group_split(w, previous, num_phy, groups, nodes)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    assert swapped > 0 or groups == nodes  # the swap is exercised wherever a node holds several groups
