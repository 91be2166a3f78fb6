"""The packing loops of placement by time (eplb.kernels.speed_triton) equal the array-API functions bit for bit.

Oracles: eplb.algorithms.speed.lpt_pack_speed, pair_pack_speed and refine_by_swaps_speed (themselves checked
against plain Python in tests/test_capacity.py). Cases: random speeds (reciprocals made by inverse_capacity),
idle packs holding the phantoms (-1 loads), every pack but one idle, tied loads and tied speeds, all-zero rows,
one item a pack, budgets that every pair, some pairs or no pair meets, swap rounds cut short (1, 2) or run to the
end; then the placement by time (place_capacity) on torch tensors with these kernels, the replication kernel and
the elastic kernels of its blind placement plugged in, against numpy's rebalance_experts(gpu_capacity=), on
tests/test_capacity.py's shapes and capacities (global and hierarchical, two slots per GPU, idle GPUs, a node
short of slots, all speeds equal). Under
Triton's CPU interpreter (a subprocess: the interpreter is chosen at import) and on CUDA.
"""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import needs_gpu, run_kernel_check

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# (rows, packs, items a pack)
SHAPES = [(6, 4, 2), (5, 8, 3), (4, 1, 2), (4, 6, 1), (3, 16, 2), (2, 5, 9)]

CHECK = """
import numpy as np, torch
from eplb.algorithms import speed
from eplb.kernels import speed_triton as st

def inputs(rows, packs, per, rng):
    n = packs * per
    capacity = rng.choice([1.0, 0.6, 0.5, 0.3, 0.75], (rows, packs)).astype(np.float32)
    capacity[0] = 1.0  # tied speeds
    live = rng.random((rows, packs)) < 0.8
    live[:, 0] = True
    live[1 % rows, 1:] = False  # every pack but one idle
    inverse = speed.inverse_capacity(np.where(live, capacity, 0).astype(np.float32), xp=np)
    load = (rng.lognormal(0, 1.5, (rows, n)) * rng.choice([1, 1e-3], (rows, n))).astype(np.float32)
    load[2 % rows] = np.float32(1.0)  # ties everywhere
    load[3 % rows] = 0.0
    live_items = live.sum(axis=1) * per
    ids = np.arange(n)
    load = np.where(ids < live_items[:, None], load, np.float32(-1.0))  # phantoms after the live items
    return load, live, inverse

def as_torch(x, device):
    return torch.as_tensor(x, device=device)

def check(device):
    for shape_id, (rows, packs, per) in enumerate(SHAPES):
        rng = np.random.default_rng(shape_id)
        load, live, inverse = inputs(rows, packs, per, rng)
        n = packs * per
        # LPT on time over the live items (the steps past them are unspecified: compared on live items only).
        live_items = live.sum(axis=1) * per
        weight = np.where(load >= 0, load, np.float32(0)).astype(np.float32)
        want = speed.lpt_pack_speed(weight, live, inverse, per, xp=np)
        got = st.lpt_pack_speed(as_torch(weight, device), as_torch(live, device), as_torch(inverse, device), per)
        np.testing.assert_array_equal(got[0].cpu().numpy(), want[0])
        for g, w in zip(got[1:], want[1:]):
            step = np.arange(n) < live_items[:, None]
            np.testing.assert_array_equal(np.where(step, g.cpu().numpy(), 0), np.where(step, w, 0))
        # Swaps and exchanges out of the slowest pack, from the LPT's placement and from a shuffled one.
        slot_order = np.argsort(~np.repeat(live, per, axis=1), axis=1, kind="stable")
        lpt = np.empty((rows, n), np.int64)
        step = np.arange(n) < live_items[:, None]
        slot = np.where(step, want[1] * per + want[2], slot_order)
        np.put_along_axis(lpt, slot, want[0], axis=1)
        shuffled = np.stack([np.concatenate([rng.permutation(k), np.arange(k, n)]) for k in live_items])
        shuffled = np.take_along_axis(shuffled, np.argsort(slot_order, axis=1), axis=1)  # live items, live slots
        # The heaviest items on the slowest packs: whole exchanges beat every swap there.
        speed_order = np.argsort(np.where(live, -inverse, np.inf), axis=1, kind="stable")  # slowest live first
        slots_slow_first = (speed_order[:, :, None] * per + np.arange(per)).reshape(rows, n)
        heavy_first = np.argsort(-load, axis=1, kind="stable")  # live items (>= 0) before the phantoms
        adverse = np.empty((rows, n), np.int64)
        np.put_along_axis(adverse, slots_slow_first, heavy_first, axis=1)
        exchanged = 0
        for start in (lpt, shuffled, adverse):
            for iters in (1, 2, 200):
                want_s = speed.refine_by_swaps_speed(load, start, inverse, live, iters, xp=np)
                got_s = st.refine_by_swaps_speed(
                    as_torch(load, device), as_torch(start, device), as_torch(inverse, device),
                    as_torch(live, device), iters,
                )
                np.testing.assert_array_equal(got_s.cpu().numpy(), want_s, err_msg=str((shape_id, iters)))
                if iters == 1 and per > 1:  # one round: an exchange moves every slot of two packs
                    moved = (want_s != start).reshape(rows, packs, per).all(axis=2).sum(axis=1)
                    exchanged += int(np.sum(moved >= 2))
        if per > 1 and packs > 1:  # a slow pack full of heavy items beside fast light ones: an exchange wins
            slow = np.ones((1, packs), np.float32); slow[0, 0] = 0.25
            heavy = np.ones((1, n), np.float32); heavy[0, :per] = 10.0
            args = (heavy, np.arange(n)[None], speed.inverse_capacity(slow, xp=np), np.ones((1, packs), bool), 1)
            want_s = speed.refine_by_swaps_speed(*args, xp=np)
            got_s = st.refine_by_swaps_speed(*(as_torch(a, device) for a in args[:4]), 1)
            np.testing.assert_array_equal(got_s.cpu().numpy(), want_s)
            exchanged += int(np.all(want_s[0, :per] >= per))
        assert per == 1 or packs == 1 or exchanged > 0, "no exchange exercised"
        if per != 2:
            continue
        # Pairs under a time budget: generous, middling, impossible.
        times = np.max(speed.pack_times(np.take_along_axis(load, lpt, axis=1), inverse, live, xp=np), axis=1)
        for scale in (np.float32(4.0), np.float32(1.0), np.float32(0.25), np.float32(0.0)):
            budget = (times * scale).astype(np.float32)[:, None]
            want_p = speed.pair_pack_speed(load, live, inverse, budget, xp=np)
            got_p = st.pair_pack_speed(
                as_torch(load, device), as_torch(live, device), as_torch(inverse, device), as_torch(budget, device)
            )
            np.testing.assert_array_equal(got_p.cpu().numpy(), want_p, err_msg=str((shape_id, scale)))
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
        for hierarchical in (True, False) if nodes > 1 else (False,):
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
    run_kernel_check(CHECK, SHAPES, "cpu")


@needs_gpu("torch")
def test_cuda_equals_the_array_api():
    run_kernel_check(CHECK, SHAPES, "cuda")


@needs_triton
def test_interpreter_placement_by_time_equals_numpy():
    run_kernel_check(END_TO_END, CAPACITY_CASES, "cpu")


@needs_gpu("torch")
def test_cuda_placement_by_time_equals_numpy():
    run_kernel_check(END_TO_END, CAPACITY_CASES, "cuda")
