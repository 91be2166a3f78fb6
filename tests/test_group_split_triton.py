"""The near split's group swap kernel (eplb.kernels.group_split_triton) equals the array-API function.

The oracle is :func:`eplb.algorithms.elastic.sticky_group_split` with ``active=None, max_swaps=1`` (itself
checked against plain Python in ``tests/test_elastic.py`` and ``tests/test_near_split.py``). Cases: previous
placements of the same and of other loads, an invalid previous (a group across two nodes), tied and all-zero
layers, loads whose pairwise and left-to-right sums round apart; every shape kind :func:`fits` takes (one
group per node, one expert per group, the DeepSeek-V3 shape). Under Triton's CPU interpreter (a subprocess:
the interpreter is chosen at import) and on CUDA.
"""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import needs_gpu, run_kernel_check

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# (num_log, num_phy, num_groups, num_nodes, num_gpus)
SHAPES = [
    (16, 24, 4, 2, 4),
    (32, 48, 8, 4, 8),
    (16, 16, 8, 2, 4),
    (8, 12, 8, 4, 4),
    (4, 8, 2, 2, 2),
    (256, 288, 8, 4, 32),
]

CHECK = """
import numpy as np, torch
import eplb
from eplb.algorithms.elastic import sticky_group_split
from eplb.kernels import group_split_triton

def cases(num_log, num_phy, groups, nodes, gpus, seed):
    rng = np.random.default_rng(seed)
    w = (rng.lognormal(0, 2.0, (6, num_log)) * rng.choice([1, 1e-3, 1e3], (6, num_log))).astype(np.float32)
    w[1] = np.float32(1.0)  # ties everywhere
    w[2] = 0.0  # an all-zero layer
    w[3] = np.float32(2.0) ** rng.integers(-24, 24, num_log)  # pairwise and left-to-right sums round apart
    other = rng.lognormal(0, 1.0, (6, num_log)).astype(np.float32)
    prev = np.asarray(eplb.rebalance_experts(other, num_phy, groups, nodes, gpus).phy2log)
    same = np.asarray(eplb.rebalance_experts(w, num_phy, groups, nodes, gpus).phy2log)
    bad = prev.copy()
    bad[:, 0] = bad[:, num_phy // nodes]  # a group on two nodes: no start
    return w, (prev, same, bad)

def check(device):
    for shape_id, (num_log, num_phy, groups, nodes, gpus) in enumerate(SHAPES):
        assert group_split_triton.fits(num_log, num_phy, groups, nodes), (num_log, num_phy, groups, nodes)
        w, previous = cases(num_log, num_phy, groups, nodes, gpus, shape_id)
        for prev in previous:
            want, _ = sticky_group_split(w, prev, None, num_phy, groups, nodes, gpus, max_swaps=1, xp=np)
            got = group_split_triton.near_group_split(
                torch.as_tensor(w, device=device), torch.as_tensor(prev, device=device), num_phy, groups, nodes
            )
            assert got.dtype == torch.int64
            np.testing.assert_array_equal(got.cpu().numpy(), want)
"""


def test_fits():
    pytest.importorskip("triton")
    from eplb.kernels import group_split_triton

    assert group_split_triton.fits(256, 288, 8, 4)
    assert not group_split_triton.fits(24, 36, 3, 3)  # 3 groups: not a power of two
    assert not group_split_triton.fits(48, 64, 4, 2)  # 12 experts a group
    assert not group_split_triton.fits(16, 24, 4, 3)  # groups not a multiple of the nodes


@needs_triton
def test_interpreter_equals_the_array_api_split():
    run_kernel_check(CHECK, SHAPES, "cpu")


@needs_gpu("torch")
def test_cuda_equals_the_array_api_split():
    run_kernel_check(CHECK, SHAPES, "cuda")
