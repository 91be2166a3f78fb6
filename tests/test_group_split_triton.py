"""The group swap kernel (eplb.kernels.group_split_triton) equals the array-API function.

The oracle is :func:`eplb.algorithms.elastic.sticky_group_split` with ``active=None, max_swaps=1`` (itself
checked against plain Python in ``tests/test_elastic.py`` and ``tests/test_near_split.py``). Cases: previous
placements of the same and of other loads, an invalid previous (a group across two nodes), tied and all-zero
layers, loads whose pairwise and left-to-right sums round apart; every shape kind :func:`fits` takes (one
group per node, one expert per group, the DeepSeek-V3 shape). Under Triton's CPU interpreter (a subprocess:
the interpreter is chosen at import) and on CUDA.

The elastic form (``sticky_group_split`` with failed GPUs, every swap round) against the same function with
``active`` and ``max_swaps`` as given: one GPU, several GPUs and a whole node down, a mask per layer, every GPU
live, a node with no live GPU, previous placements with empty (``-1``) slots (themselves elastic placements).
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


CHECK_ELASTIC = """
import numpy as np, torch
import eplb
from eplb.algorithms import elastic
from eplb.kernels import group_split_triton

def masks(gpus, nodes, layers, rng):
    per_node = gpus // nodes
    out = [np.ones(gpus, bool)]
    one = np.ones(gpus, bool); one[rng.integers(gpus)] = False; out.append(one)
    node = np.ones(gpus, bool); node[per_node : 2 * per_node] = False; out.append(node)  # a node with no live GPU
    some = np.ones(gpus, bool); some[rng.choice(gpus, max(1, gpus // 4), replace=False)] = False; out.append(some)
    per_layer = np.ones((layers, gpus), bool)
    per_layer[np.arange(layers), rng.integers(gpus, size=layers)] = False
    out.append(per_layer)
    return out

def check(device):
    for shape_id, (num_log, num_phy, groups, nodes, gpus) in enumerate(SHAPES):
        rng = np.random.default_rng(100 + shape_id)
        w = (rng.lognormal(0, 2.0, (6, num_log)) * rng.choice([1, 1e-3, 1e3], (6, num_log))).astype(np.float32)
        w[1] = np.float32(1.0)  # ties everywhere
        w[2] = 0.0
        w[3] = np.float32(2.0) ** rng.integers(-24, 24, num_log)
        other = rng.lognormal(0, 1.0, (6, num_log)).astype(np.float32)
        prev = np.asarray(eplb.rebalance_experts(other, num_phy, groups, nodes, gpus).phy2log)
        down = np.ones(gpus, bool); down[gpus - 1] = False
        if down.sum() * (num_phy // gpus) >= num_log:  # a previous placement with empty slots
            holes = np.asarray(eplb.rebalance_experts(other, num_phy, groups, nodes, gpus, active_gpus=down).phy2log)
        else:
            holes = prev
        # On CUDA every mask with both previous placements (one with empty slots) and the cut-short search too;
        # under the interpreter (CI time: 8 runs, not 15) the cut-short search with one GPU down, and the previous
        # placement with empty slots with every GPU up (the GPU back) and with a quarter down.
        for k, active in enumerate(masks(gpus, nodes, 6, rng)):
            every = device == "cuda"
            runs = [(prev, None)] + [(prev, 2)] * (every or k == 1) + [(holes, None)] * (every or k in (0, 3))
            for p, max_swaps in runs:
                want = elastic.sticky_group_split(
                    w, p, active, num_phy, groups, nodes, gpus, max_swaps=max_swaps, xp=np
                )
                got = group_split_triton.sticky_group_split(
                    torch.as_tensor(w, device=device), torch.as_tensor(p, device=device),
                    torch.as_tensor(active, device=device), num_phy, groups, nodes, gpus, max_swaps=max_swaps,
                )
                assert got[0].dtype == torch.int64 and got[1].dtype == torch.bool and got[1].shape == (6, 1)
                np.testing.assert_array_equal(got[0].cpu().numpy(), want[0])
                np.testing.assert_array_equal(got[1].cpu().numpy(), want[1])
"""


# (num_log, num_phy, num_groups, num_nodes, num_gpus): the fresh split's shapes, powers of two or not
LIVE_SHAPES = [
    (16, 24, 4, 2, 4),
    (32, 48, 8, 4, 8),
    (8, 12, 8, 4, 4),  # one expert a group
    (12, 18, 3, 3, 6),  # one group a node, three nodes
    (24, 36, 6, 3, 6),
    (4, 8, 2, 2, 2),
    (256, 288, 8, 4, 32),
    (6, 8, 2, 1, 2),  # one node
]

CHECK_LIVE = """
import numpy as np, torch
from eplb.algorithms import elastic
from eplb.kernels import group_split_triton

def check(device):
    for shape_id, (num_log, num_phy, groups, nodes, gpus) in enumerate(SHAPES):
        assert group_split_triton.live_fits(num_log, num_phy, groups, nodes, gpus)
        rng = np.random.default_rng(200 + shape_id)
        w = (rng.lognormal(0, 2.0, (7, num_log)) * rng.choice([1, 1e-3, 1e3], (7, num_log))).astype(np.float32)
        w[1] = np.float32(1.0)  # ties everywhere
        w[2] = 0.0
        w[3] = np.float32(2.0) ** rng.integers(-24, 24, num_log)  # sums that round
        w[4] = np.float32(3.0e38)  # running loads that saturate at float32 max
        w[5, : num_log // 2] = w[5, num_log // 2 :]  # tied groups
        per_node = gpus // nodes
        masks = [np.ones(gpus, bool)]
        for dead in ([gpus - 1], [0, per_node % gpus], list(range(per_node))):  # one, two, a node (capacity 0)
            m = np.ones(gpus, bool); m[dead] = False; masks.append(m)
        per_layer = np.ones((7, gpus), bool)
        per_layer[np.arange(7), rng.integers(gpus, size=7)] = False
        masks.append(per_layer)
        for active in masks:
            for by_capacity in (True, False):
                want = elastic.group_split(w, active, num_phy, groups, nodes, gpus, by_capacity=by_capacity, xp=np)
                got = group_split_triton.group_split(
                    torch.as_tensor(w, device=device), torch.as_tensor(active, device=device), num_phy, groups,
                    nodes, gpus, by_capacity=by_capacity,
                )
                assert got.dtype == torch.int64
                np.testing.assert_array_equal(got.cpu().numpy(), want, err_msg=str((shape_id, by_capacity)))
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


@needs_triton
def test_interpreter_equals_the_array_api_elastic_split():
    run_kernel_check(CHECK_ELASTIC, SHAPES, "cpu")


@needs_gpu("torch")
def test_cuda_equals_the_array_api_elastic_split():
    run_kernel_check(CHECK_ELASTIC, SHAPES, "cuda")


@needs_triton
def test_interpreter_equals_the_array_api_fresh_split():
    run_kernel_check(CHECK_LIVE, LIVE_SHAPES, "cpu")


@needs_gpu("torch")
def test_cuda_equals_the_array_api_fresh_split():
    run_kernel_check(CHECK_LIVE, LIVE_SHAPES, "cuda")
