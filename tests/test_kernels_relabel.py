"""The compiled relabelling (eplb.kernels.relabel_numba) equals eplb.algorithms.relabel.relabel bit for bit.

Also its assignment solver against the array-API one (which tests/test_stability.py proves optimal by
brute force), and the slot-order log2phy against build_log2phy(occurrence(...)).
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb
from eplb.algorithms.assignment import max_assignment
from eplb.algorithms.hierarchy import build_log2phy
from eplb.algorithms.relabel import occurrence, relabel

from . import cases

pytest.importorskip("numba")
from eplb.kernels import _threads, relabel_numba


def _random_cases(rng: np.random.Generator):
    """(new, old, num_gpus, num_nodes, E): random, permuted, one-expert, one-slot-per-GPU and tied placements."""
    for trial in range(240):
        nodes, per_node, per_gpu = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 5))
        gpus = nodes * per_node
        slots = gpus * per_gpu
        experts = int(rng.integers(1, slots + 1))
        new = rng.integers(0, experts, (3, slots))
        old = rng.integers(0, experts, (3, slots))
        if trial % 4 == 0:
            old = new[:, rng.permutation(slots)]  # the same GPU contents, shuffled
        if trial % 7 == 0:
            new[:] = 0  # every slot one expert
        yield new, old, gpus, nodes, experts


def test_equals_the_array_api_relabelling():
    for new, old, gpus, nodes, experts in _random_cases(np.random.default_rng(0)):
        want = relabel(new, old, gpus, nodes, xp=np)
        np.testing.assert_array_equal(relabel_numba.relabel(new, old, gpus, nodes, experts), want)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The batch sizes of the compiled relabelling's calls (one per thread's share), appended as they run."""
    calls = []
    kernel = relabel_numba._relabel

    def counted(new, *args):
        calls.append(len(new))
        return kernel(new, *args)

    monkeypatch.setattr(relabel_numba, "_relabel", counted)
    return calls


def test_rows_split_over_threads_equal_the_array_api_relabelling(monkeypatch, kernel_calls):
    """Layers dealt round-robin to threads (uneven splits included) give the array-API relabelling, row by row."""
    calls = kernel_calls
    monkeypatch.setattr(relabel_numba, "MIN_ROWS_PER_THREAD", 2)
    monkeypatch.setattr(relabel_numba, "MIN_GPUS_PER_NODE_FOR_THREADS", 1)  # split even these small ones
    rng = np.random.default_rng(3)
    for case, (new, old, gpus, nodes, experts) in enumerate(_random_cases(rng)):
        if case >= 24:
            break
        threads = (2, 3, 5)[case % 3]
        monkeypatch.setattr(_threads, "THREADS", threads)
        copies = int(rng.integers(2, 5))
        new = np.concatenate([new] + [new[:, rng.permutation(new.shape[1])] for _ in range(copies - 1)])
        old = np.tile(old, (copies, 1))
        calls.clear()
        got = relabel_numba.relabel(new, old, gpus, nodes, experts)
        parts = min(threads, len(new) // 2)
        assert sorted(calls) == sorted(len(range(k, len(new), parts)) for k in range(parts))
        np.testing.assert_array_equal(got, relabel(new, old, gpus, nodes, xp=np))


def test_only_large_assignments_split(monkeypatch, kernel_calls):
    """Layers of small assignments (4 nodes of 8 GPUs) stay on one thread; 144 GPUs in one node split over
    the threads; both equal the array-API relabelling."""
    calls = kernel_calls
    monkeypatch.setattr(_threads, "THREADS", 2)
    rng = np.random.default_rng(4)
    for slots, gpus, nodes, split in ((64, 32, 4, False), (288, 144, 1, True), (64, 32, 32, True)):
        new = np.stack([rng.permutation(slots) % 48 for _ in range(40)])
        old = np.stack([rng.permutation(slots) % 48 for _ in range(40)])
        calls.clear()
        got = relabel_numba.relabel(new, old, gpus, nodes, 48)
        assert sorted(calls) == ([20, 20] if split else [40]), (gpus, nodes)
        np.testing.assert_array_equal(got, relabel(new, old, gpus, nodes, xp=np))


CONFIGS = [(288, 8, 4, 32), (288, 8, 3, 144), (16, 4, 2, 16)]


@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global", "1-slot"])
def test_equals_on_real_and_tied_placements(config):
    weight = cases.deepseek_v3()
    assert weight is not None, f"real loads expected at {cases.DATA}"
    if config[0] == 16:
        weight = cases.ties(np.random.default_rng(2), 16)
    nodes = config[2] if config[1] % config[2] == 0 else 1
    old = eplb.rebalance_experts(weight, *config).phy2log
    drifted = (weight * np.random.default_rng(1).lognormal(0, 0.3, weight.shape)).astype(np.int64)
    new = eplb.rebalance_experts(drifted, *config).phy2log
    for a, b in ((new, old), (old, old), (new, new[::-1].copy())):
        want = relabel(a, b, config[3], nodes, xp=np)
        np.testing.assert_array_equal(relabel_numba.relabel(a, b, config[3], nodes, weight.shape[1]), want)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_assignment_solver_equals_the_array_api_one(n):
    """Same permutation as max_assignment (ties and zeros included), so the same optimum and the same tie rule."""
    rng = np.random.default_rng(n)
    profit = rng.integers(0, 4, (60, n, n))
    profit[:10] = 0
    profit[10:20] = rng.integers(0, 2, (10, n, n))
    want = max_assignment(profit, xp=np)
    work = np.empty(9 * (n + 1), np.int64)
    for b in range(len(profit)):
        got = np.empty(n, np.int64)
        relabel_numba._max_assignment(np.ascontiguousarray(profit[b], dtype=np.int64), got, work)
        np.testing.assert_array_equal(got, want[b])


def test_log2phy_in_slot_order():
    rng = np.random.default_rng(3)
    phy2log = np.concatenate([rng.integers(0, 5, (4, 12)), np.zeros((1, 12), np.int64)])
    phy2log[:4, :5] = np.arange(5)  # every expert present
    phy2log[4, :5] = np.arange(5)
    want = build_log2phy(phy2log, occurrence(phy2log, xp=np), 5, xp=np)
    np.testing.assert_array_equal(relabel_numba.log2phy_in_slot_order(phy2log, 5), want)


def test_log2phy_in_slot_order_skips_empty_slots():
    """-1 slots (a failed GPU's) appear in no expert's list: the failure re-plan's log2phy, checked against a
    plain-Python listing of each expert's slots in slot order."""
    rng = np.random.default_rng(4)
    for trial in range(30):
        experts, per_gpu, gpus = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(2, 6))
        slots = per_gpu * gpus
        if slots < experts + per_gpu:
            continue
        phy2log = rng.integers(0, experts, (3, slots))
        phy2log[:, :experts] = np.arange(experts)
        down = int(rng.integers(experts // per_gpu + 1, gpus)) if experts // per_gpu + 1 < gpus else gpus - 1
        phy2log[:, down * per_gpu : (down + 1) * per_gpu] = -1
        got = relabel_numba.log2phy_in_slot_order(phy2log, experts)
        assert got.shape == (3, experts, slots - experts + 1)
        for b, row in enumerate(phy2log.tolist()):
            for e in range(experts):
                where = [t for t, x in enumerate(row) if x == e]
                assert got[b, e].tolist() == where + [-1] * (got.shape[2] - len(where)), trial


def test_previous_on_numpy_uses_the_kernel_and_equals_the_array_api_path():
    """The numpy adapter's default (kernel) and forced array-API paths agree, knobs included."""
    from eplb.backends import _numpy

    rng = np.random.default_rng(4)
    old_w, new_w = cases.lognormal_f32(rng, 6, 32), cases.lognormal_f32(rng, 6, 32)
    for config in ((48, 8, 4, 8), (48, 8, 3, 12)):
        hierarchical = config[1] % config[2] == 0
        previous = eplb.rebalance_experts(old_w, *config).phy2log
        for knobs in ({}, {"tolerance": 0.01}, {"max_moves": 3}):
            args = (new_w, previous, *config)
            kernel = _numpy.rebalance_stable(*args, hierarchical=hierarchical, impl="numba", **knobs)
            reference = _numpy.rebalance_stable(*args, hierarchical=hierarchical, impl="xp", **knobs)
            for a, b in zip(kernel, reference, strict=True):
                np.testing.assert_array_equal(a, b)


def test_unchecked_out_of_range_ids_never_reach_the_kernels():
    """With check_values=False the ids are not validated up front; the numpy adapter still refuses ids outside
    [0, E) before the unchecked compiled kernels see them (they would index out of bounds)."""
    weight = cases.lognormal_f32(np.random.default_rng(5), 2, 16)
    previous = eplb.rebalance_experts(weight, 24, 4, 2, 4).phy2log.copy()
    previous[0, 3] = 16
    for knobs in ({}, {"balance_tolerance": 0.01}):
        with pytest.raises(ValueError, match=r"previous must hold expert ids in \[0, 16\)"):
            eplb.rebalance_experts(weight, 24, 4, 2, 4, previous=previous, check_values=False, **knobs)
