"""The packing loops of placement by time (eplb.kernels.speed_triton) equal the array-API functions bit for bit.

Oracles: eplb.algorithms.speed.lpt_pack_speed, pair_pack_speed and refine_by_swaps_speed (themselves checked
against plain Python in tests/test_capacity.py), on tests/speed_cases.py's cases; then the placement by time
(place_capacity) on torch tensors with these kernels, the replication kernel and the elastic kernels of its
blind placement plugged in, against numpy's rebalance_experts(gpu_capacity=), on tests/test_capacity.py's shapes
and capacities (global and hierarchical, two slots per GPU, idle GPUs, a node short of slots); and keep-in-place
(place_capacity_stable, previous= with a tolerance) with the same kernels, the relabelling kernel on capacity
classes and the slot alignment. Under Triton's CPU interpreter (a subprocess: the interpreter is chosen at
import) and on CUDA.
"""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import needs_gpu, run_kernel_check

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

CHECK = """
import torch
from tests.speed_cases import check_kernels
from eplb.kernels import speed_triton

def check(device):
    check_kernels(speed_triton, lambda x: torch.as_tensor(x, device=device), lambda t: t.cpu().numpy())
"""


END_TO_END = """
import numpy as np, torch
import array_api_compat.torch as xpt
import eplb
from eplb.algorithms.capacity import place_capacity
from eplb.kernels import group_split_triton, repair_triton, replication_triton, speed_triton as st

def check(device):
    for k, (experts, slots, groups, nodes, gpus, caps) in enumerate(SHAPES):
        rng = np.random.default_rng(k)
        w = rng.lognormal(3, 1.2, (4, experts)).astype(np.float32)
        w[1] = 0  # an all-zero layer
        w[2] = 7  # all equal
        caps = np.asarray(caps, np.float32)
        # Hierarchical shapes under the hierarchical policy; the first also globally (CI time).
        for hierarchical in ((True, False) if k == 0 else (True,)) if nodes > 1 else (False,):
            want = eplb.rebalance_experts(w, slots, groups, nodes, gpus, hierarchical=hierarchical, gpu_capacity=caps)
            kernels = {
                "lpt_pack_fn": st.lpt_pack_speed, "pair_pack_fn": st.pair_pack_speed,
                "swaps_fn": st.refine_by_swaps_speed, "replicate_fn": replication_triton.replicate_experts,
                "sticky_pack_fn": repair_triton.sticky_pack,
            }
            if hierarchical:
                kernels["split_fn"] = group_split_triton.group_split
            got = place_capacity(
                torch.as_tensor(w, device=device), slots, groups, nodes, gpus,
                gpu_capacity=torch.as_tensor(caps, device=device), hierarchical=hierarchical, xp=xpt, **kernels,
            )
            for g, e in zip(got, want):
                np.testing.assert_array_equal(g.cpu().numpy(), np.asarray(e), err_msg=str((k, hierarchical)))
"""

KEEP_IN_PLACE = """
import numpy as np, torch
import array_api_compat.torch as xpt
import eplb
from eplb.algorithms.capacity_stable import place_capacity_stable
from eplb.kernels import group_split_triton, relabel_triton, repair_triton, replication_triton, speed_triton as st

def check(device):
    for k, (experts, slots, groups, nodes, gpus, caps) in enumerate(SHAPES):
        rng = np.random.default_rng(k)
        before = rng.lognormal(3, 1.2, (3, experts)).astype(np.float32)
        w = (before * rng.lognormal(0, 0.3, before.shape)).astype(np.float32)
        w[1] = 0  # an all-zero layer
        caps = np.asarray(caps, np.float32)
        hierarchical = nodes > 1
        sizes = (slots, groups, nodes, gpus)
        prev = eplb.rebalance_experts(before, *sizes, hierarchical=hierarchical, gpu_capacity=np.roll(caps, 1)).phy2log
        want = eplb.rebalance_experts(
            w, *sizes, hierarchical=hierarchical, gpu_capacity=caps, previous=prev, balance_tolerance=0.01
        )
        # The kernels the torch adapter plugs in on CUDA: the relabelling takes integer capacity classes.
        kernels = {
            "lpt_pack_fn": st.lpt_pack_speed, "pair_pack_fn": st.pair_pack_speed,
            "swaps_fn": st.refine_by_swaps_speed, "replicate_fn": replication_triton.replicate_experts,
            "sticky_pack_fn": repair_triton.sticky_pack, "relabel_pinned_fn": relabel_triton.relabel_pinned,
            "align_slots_fn": repair_triton.align_slots,
        }
        if hierarchical:
            kernels["split_fn"] = group_split_triton.group_split
        got = place_capacity_stable(
            torch.as_tensor(w, device=device), torch.as_tensor(np.asarray(prev), device=device), *sizes,
            gpu_capacity=torch.as_tensor(caps, device=device), hierarchical=hierarchical, tolerance=0.01, xp=xpt,
            **kernels,
        )
        for g, e in zip(got, want):
            np.testing.assert_array_equal(g.cpu().numpy(), np.asarray(e), err_msg=str(k))
"""

# tests/test_capacity.py's shapes and capacities: (experts, slots, groups, nodes, gpus, capacities)
CAPACITY_CASES = [
    (16, 32, 4, 2, 8, [1, 1, 0.6, 0.6, 1, 1, 0.6, 0.6]),
    (16, 32, 4, 2, 8, [1, 1, 1, 1, 0.6, 0.6, 0.6, 0.6]),  # a slow node
    (16, 32, 4, 2, 8, [1, 0, 0.5, 1, 1, 1, 0.25, 2]),  # an idle GPU
    (16, 32, 4, 2, 8, [1, 0, 0, 0, 1, 1, 1, 1]),  # node 0 short of slots: the global rule
    (12, 24, 1, 1, 6, [0.6, 1, 1e-3, 1, 0, 0.6]),  # a very slow GPU and an idle one; exactly E live slots
    (12, 16, 1, 1, 8, [1, 0.6] * 4),  # two slots per GPU: the budget sets
    (16, 24, 4, 2, 12, [1] * 6 + [0.6] * 6),
    (16, 24, 4, 2, 12, [1, 0, 0, 0, 0, 0.6] + [1, 0.6] * 3),
]


@needs_triton
def test_interpreter_equals_the_array_api():
    run_kernel_check(CHECK, [], "cpu")


@needs_gpu("torch")
def test_cuda_equals_the_array_api():
    run_kernel_check(CHECK, [], "cuda")


@needs_triton
def test_interpreter_placement_by_time_equals_numpy():
    # CUDA runs all eight; the interpreter (CI time) three: an idle GPU and four speeds on 2 nodes, a very slow GPU
    # with exactly E live slots, and two slots per GPU (the budget sets). The others repeat a shape and rule of
    # these: two speeds, a slow node and a short node (2 nodes, as the first), two slots per GPU on 2 nodes.
    run_kernel_check(END_TO_END, [CAPACITY_CASES[i] for i in (2, 4, 5)], "cpu")


@needs_gpu("torch")
def test_cuda_placement_by_time_equals_numpy():
    run_kernel_check(END_TO_END, CAPACITY_CASES, "cuda")


# Keep-in-place (previous=) cases, capacities not all equal (equal ones take another rule on the host).
KEEP_CASES = [CAPACITY_CASES[0], CAPACITY_CASES[2]]


@needs_triton
def test_interpreter_keep_in_place_equals_numpy():
    # The case with an idle GPU and four speeds (CI time: each case takes 15-20 s under the interpreter); CUDA
    # runs seven.
    run_kernel_check(KEEP_IN_PLACE, KEEP_CASES[1:], "cpu")


@needs_gpu("torch")
def test_cuda_keep_in_place_equals_numpy():
    run_kernel_check(KEEP_IN_PLACE, CAPACITY_CASES[:3] + CAPACITY_CASES[4:], "cuda")
