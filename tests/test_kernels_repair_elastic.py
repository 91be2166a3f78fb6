"""The compiled kernels of eplb.kernels.repair_numba on the active_gpus + previous= path equal the array API.

Failed GPUs' slots hold -1: eplb.algorithms.repair.sticky_pack with initial_load (+inf for a failed GPU) and
reserve, eplb.algorithms.repair.repair on placements with -1 slots, eplb.algorithms.relabel.align_slots and
eplb.algorithms.elastic.relabel_pinned, on random inputs (degenerate ones included), on the arguments
place_elastic_stable passes them for real DeepSeek-V3 loads, and end to end: rebalance_experts(previous=,
active_gpus=, balance_tolerance=) on numpy with the kernels (impl=None, numba) against impl="xp"; and the fresh
active_gpus= placement on numpy, whose replicas the numba sticky packing packs, against the array-API LPT loop.
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb
from eplb.algorithms import elastic
from eplb.algorithms.elastic import _live_gpu_loads, relabel_pinned
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.relabel import align_slots, count_moves, replica_counts
from eplb.algorithms.repair import repair, sticky_pack

from . import cases
from .test_kernels_repair import _loads as _weights  # float32 loads with ties, zeros, one hot

pytest.importorskip("numba")
from eplb.backends import _numba, _numpy
from eplb.kernels import repair_numba


def _same(got: tuple, want: tuple) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def _dead(rng: np.random.Generator, rows: int, gpus: int) -> np.ndarray:
    """[rows, G] bool failed GPUs: none, a few, or every GPU but one."""
    dead = rng.random((rows, gpus)) < rng.choice([0.0, 0.2, 0.5])
    for r in range(rows):
        if rng.random() < 0.15:
            dead[r] = True
            dead[r, rng.integers(gpus)] = False
    return dead


# ---------------------------------------------------------------- sticky_pack


def _sticky_args(rng: np.random.Generator, trial: int) -> tuple:
    """Items of the live slots plus ``-1`` items (load -1) as many as the failed packs' slots (sometimes more or
    fewer), old with -1 on failed packs and elsewhere; limits from 0 to unbounded (MAX_LOAD)."""
    rows = 5
    packs, capacity = int(rng.integers(1, 7)), int(rng.integers(1, 6))
    n = packs * capacity
    experts = int(rng.integers(1, n + 1))
    dead = _dead(rng, rows, packs)
    dead_slot = np.repeat(dead, capacity, axis=1)
    empty = dead_slot.copy()
    if trial % 7 == 0:  # a few more or fewer empty items than failed slots
        empty = empty ^ (rng.random((rows, n)) < 0.15)
    base = np.where(empty, -1, rng.integers(0, experts, (rows, n)))
    base = np.stack([row[rng.permutation(n)] for row in base])
    old = base[:, rng.permutation(n)] if trial % 3 == 0 else rng.integers(0, experts, (rows, n))
    old = np.where(dead_slot | (rng.random((rows, n)) < 0.1), -1, old)
    weight = _weights(rng, rows, experts)
    item_load = np.where(base >= 0, np.take_along_axis(weight, np.maximum(base, 0), axis=1), np.float32(-1))
    item_load = item_load.astype(np.float32)
    initial = np.where(dead, np.inf, 0.0).astype(np.float32)
    if trial % 11 == 0:
        initial[0] = np.inf  # every pack failed in one row
    total = np.maximum(item_load, 0).sum(axis=1, keepdims=True, dtype=np.float32)
    factor = np.array([0.0, 0.2, 0.5, 1.0, 1.3, 2.0], np.float32)[rng.integers(0, 6, (rows, 1))]
    limit = (total * factor / np.float32(packs)).astype(np.float32)
    limit[rng.random((rows, 1)) < 0.15] = MAX_LOAD
    return base, old, item_load, limit, packs, initial


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the reference's products near MAX_LOAD
def test_sticky_pack_with_failed_packs_equals_the_array_api():
    rng = np.random.default_rng(10)
    for trial in range(400):
        base, old, item_load, limit, packs, initial = _sticky_args(rng, trial)
        for reserve in (False, True):
            want = sticky_pack(base, old, item_load, limit, packs, initial_load=initial, reserve=reserve, xp=np)
            got = repair_numba.sticky_pack(base, old, item_load, limit, packs, initial_load=initial, reserve=reserve)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}, reserve={reserve}")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_sticky_pack_degenerate_cases():
    """One expert, one slot per pack, all-zero and tied loads, every pack but one failed, initial loads [1, m]."""
    rng = np.random.default_rng(11)
    for packs, capacity, experts in ((1, 1, 1), (4, 1, 1), (4, 1, 3), (3, 4, 1), (5, 3, 7), (8, 2, 16)):
        n = packs * capacity
        for live in ([0], list(range(packs)), [packs - 1], sorted(rng.permutation(packs)[: max(1, packs // 2)])):
            alive = np.isin(np.arange(packs), live)
            dead_slot = np.repeat(~alive, capacity)
            base = np.where(dead_slot, -1, rng.integers(0, experts, (4, n)))
            old = np.where(dead_slot, -1, np.roll(base, 1, axis=1))
            old[:, :: max(1, n // 2)] = -1
            for loads in (np.zeros((4, experts)), np.full((4, experts), 3.0), rng.integers(0, 3, (4, experts))):
                loads = loads.astype(np.float32)
                item_load = np.where(base >= 0, np.take_along_axis(loads, np.maximum(base, 0), 1), np.float32(-1))
                item_load = item_load.astype(np.float32)
                initial = np.where(alive, 0.0, np.inf).astype(np.float32)[None, :]  # broadcast over rows
                for limit in (0.0, 3.0, MAX_LOAD):
                    lim = np.full((4, 1), limit, np.float32)
                    for reserve in (False, True):
                        args = (base, old, item_load, lim, packs)
                        want = sticky_pack(*args, initial_load=initial, reserve=reserve, xp=np)
                        got = repair_numba.sticky_pack(*args, initial_load=initial, reserve=reserve)
                        np.testing.assert_array_equal(got, want)


def test_sticky_pack_reserve_without_failed_packs():
    """reserve=True and a zero initial_load on healthy inputs (no -1): the array API's rule, bit for bit."""
    rng = np.random.default_rng(12)
    for _ in range(200):
        packs, capacity = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        n = packs * capacity
        experts = int(rng.integers(1, n + 1))
        base = rng.integers(0, experts, (4, n))
        old = base[:, rng.permutation(n)]
        item_load = np.take_along_axis(_weights(rng, 4, experts), base, axis=1)
        total = item_load.sum(axis=1, keepdims=True, dtype=np.float32)
        limit = (total * np.float32(rng.choice([0.0, 0.5, 1.0, 1.5])) / np.float32(packs)).astype(np.float32)
        initial = np.zeros((4, packs), np.float32)
        for kwargs in ({"reserve": True}, {"initial_load": initial}, {"initial_load": initial, "reserve": True}):
            want = sticky_pack(base, old, item_load, limit, packs, **kwargs, xp=np)
            np.testing.assert_array_equal(repair_numba.sticky_pack(base, old, item_load, limit, packs, **kwargs), want)


# ---------------------------------------------------------------- repair


def _repair_args(rng: np.random.Generator, trial: int) -> tuple:
    """Starts with failed GPUs (-1 on all their slots; old -1 there and on a few live slots), the old placement's
    live slots kept, rewritten or covering every expert; budgets around the start's moves; limits 0 .. above
    the start's peak; short max_iters."""
    rows = 6
    nodes, per_node, per_gpu = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 6))
    gpus = nodes * per_node
    slots = gpus * per_gpu
    experts = int(rng.integers(1, slots + 1))
    if rng.random() < 0.3:
        nodes = 1  # global policy
    if nodes == 1 and rng.random() < 0.5:
        group_size = experts
    else:
        divisors = [d for d in range(1, experts + 1) if experts % d == 0]
        group_size = experts // divisors[int(rng.integers(len(divisors)))]
    dead_slot = np.repeat(_dead(rng, rows, gpus), per_gpu, axis=1)
    old, start = cases.starts_with_failed_gpus(rng, dead_slot, experts, cover=0.6)
    weight = _weights(rng, rows, experts)
    cnt = replica_counts(start, experts, xp=np)
    peak = np.max(_live_gpu_loads(weight, start, cnt, gpus, xp=np), axis=-1, keepdims=True)
    limit = peak * np.array([0.0, 0.5, 0.9, 0.99, 1.0, 1.2], np.float32)[rng.integers(0, 6, (rows, 1))]
    moves = count_moves(start, old, gpus, xp=np)[:, None]
    budget = moves + np.array([-1, 0, 1, 2, 5, 10**6])[rng.integers(0, 6, (rows, 1))]
    valid = rng.random((rows, 1)) < 0.9
    max_iters = min(slots, max(64, 4 * gpus)) if trial % 4 else int(rng.integers(1, 4))
    return start, cnt, old, weight, limit.astype(np.float32), budget, valid, gpus, nodes, group_size, max_iters


def test_repair_with_failed_gpus_equals_the_array_api_search():
    rng = np.random.default_rng(13)
    changed = 0
    for trial in range(500):
        *args, max_iters = _repair_args(rng, trial)
        want = repair(*args, max_iters=max_iters, xp=np)
        _same(repair_numba.repair(*args, max_iters), want)
        changed += int(np.sum(np.any(want[0] != args[0], axis=1) & np.any(args[0] < 0, axis=1)))
    assert changed > 300  # the search moves experts on many rows with failed GPUs


def test_repair_with_failed_gpus_degenerate_cases():
    """One expert, one slot per GPU, every GPU but one failed, every GPU failed, all-zero loads; budgets 0..."""
    rng = np.random.default_rng(14)
    for nodes, gpus, per_gpu, experts in ((1, 2, 1, 1), (1, 4, 1, 2), (2, 4, 3, 1), (2, 8, 1, 4), (1, 6, 2, 5)):
        slots = gpus * per_gpu
        for live in ([0], [gpus - 1], list(range(0, gpus, 2)), []):
            dead_slot = np.repeat(~np.isin(np.arange(gpus), live), per_gpu)
            live_slots = np.flatnonzero(~dead_slot)
            start = np.full((4, slots), -1)
            start[:, live_slots] = rng.integers(0, experts, (4, len(live_slots)))
            if len(live_slots) >= experts:
                start[:, live_slots[:experts]] = np.arange(experts)
            old = np.where(dead_slot, -1, rng.integers(-1, experts, (4, slots)))
            cnt = replica_counts(start, experts, xp=np)
            for weight in (_weights(rng, 4, experts), np.zeros((4, experts), np.float32)):
                for budget, limit in ((0, 0.0), (1, 0.0), (100, 0.0), (100, -1.0)):  # (a negative limit: never met)
                    args = (start, cnt, old, weight, np.full((4, 1), limit, np.float32), np.full((4, 1), budget))
                    args = (*args, np.ones((4, 1), bool), gpus, nodes, experts if nodes == 1 else 1)
                    _same(repair_numba.repair(*args, 64), repair(*args, max_iters=64, xp=np))


def test_repair_refuses_partly_empty_gpus():
    """-1 must fill a whole GPU of start (a failed GPU): the reference reads a GPU's first slot for its state."""
    start = np.array([[0, -1, 1, 0]])
    args = (start, np.array([[2, 1]]), start, np.ones((1, 2), np.float32), np.zeros((1, 1), np.float32))
    with pytest.raises(ValueError, match="whole GPUs"):
        repair_numba.repair(*args, np.ones((1, 1), np.int64), np.ones((1, 1), bool), 2, 1, 2, 4)
    with pytest.raises(ValueError, match="expert ids"):
        repair_numba.repair(start - 1, *args[1:], np.ones((1, 1), np.int64), np.ones((1, 1), bool), 2, 1, 2, 4)


# ---------------------------------------------------------------- relabel_pinned, align_slots


def test_relabel_pinned_and_align_slots_with_empty_slots():
    rng = np.random.default_rng(15)
    for trial in range(300):
        nodes, per_node, per_gpu = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 5))
        gpus = nodes * per_node
        slots = gpus * per_gpu
        experts = int(rng.integers(1, slots + 1))
        dead = _dead(rng, 4, gpus)
        dead_slot = np.repeat(dead, per_gpu, axis=1)
        new = np.where(dead_slot, -1, rng.integers(0, experts, (4, slots)))
        old = new[:, rng.permutation(slots)] if trial % 3 == 0 else rng.integers(0, experts, (4, slots))
        old = np.where(rng.random((4, slots)) < 0.2, -1, old)
        live = ~dead if trial % 2 else ~dead[:1]  # [B, G] or one mask for every row
        want = relabel_pinned(new, old, live, gpus, num_nodes=nodes, xp=np)
        got = repair_numba.relabel_pinned(new, old, live, gpus, nodes)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(repair_numba.align_slots(new, old, gpus), align_slots(new, old, gpus, xp=np))


# ---------------------------------------------------------------- the arguments place_elastic_stable passes


def _captured(weight, previous, config, hierarchical, mask, tolerance) -> list:
    calls = []

    def record(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls.append((fn, args, kwargs, out))
            return out

        return run

    elastic.place_elastic_stable(
        np.asarray(weight, np.float32),
        previous,
        *config,
        active_gpus=mask,
        hierarchical=hierarchical,
        tolerance=tolerance,
        xp=np,
        sticky_pack_fn=record(sticky_pack),
        repair_fn=record(repair),
        align_slots_fn=record(align_slots),
        relabel_pinned_fn=record(relabel_pinned),
    )
    return calls


def _check_captured(calls: list) -> None:
    assert {c[0] for c in calls} == {sticky_pack, repair, align_slots, relabel_pinned}
    for fn, args, kwargs, want in calls:
        kwargs = {k: v for k, v in kwargs.items() if k != "xp"}
        if fn is repair:
            _same(repair_numba.repair(*args, kwargs["max_iters"]), want)
        elif fn is sticky_pack:
            _same((repair_numba.sticky_pack(*args, **kwargs),), (want,))
        elif fn is relabel_pinned:
            _same((repair_numba.relabel_pinned(*args, kwargs.get("num_nodes", 1)),), (want,))
        else:
            _same((repair_numba.align_slots(*args),), (want,))


@pytest.mark.parametrize(
    ("config", "hierarchical", "dead", "tolerance"),
    [((288, 8, 4, 32), False, [5, 13, 21], 0.0), ((320, 8, 4, 32), True, [5], 0.05)],
    ids=["global-3-down", "hier-320-1-down"],
)
def test_kernels_on_the_arguments_of_deepseek_v3(config, hierarchical, dead, tolerance):
    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {cases.DATA}"
    previous = eplb.rebalance_experts(old_w, *config, hierarchical=hierarchical).phy2log
    mask = np.ones(config[3], bool)
    mask[dead] = False
    _check_captured(_captured(new_w, previous, config, hierarchical, mask, tolerance))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def kernels_ready():
    _numba.warm_up()
    assert _numba.ready()


def _both(weight, previous, config, hierarchical, mask, tolerance, monkeypatch) -> tuple:
    """rebalance_experts on numpy (impl=None: the kernels, checked to run) and the numpy adapter with impl="xp"."""
    used = []
    hooks = _numpy._elastic_hooks
    monkeypatch.setattr(_numpy, "_elastic_hooks", lambda: used.append(1) or hooks())
    got = eplb.rebalance_experts(
        weight, *config, hierarchical=hierarchical, previous=previous, active_gpus=mask, balance_tolerance=tolerance
    )
    assert used, "impl=None should run the numba kernels"
    want = _numpy.rebalance_stable(
        np.asarray(weight, np.float32),
        np.asarray(previous),
        *config,
        impl="xp",
        hierarchical=hierarchical,
        tolerance=tolerance,
        max_moves=None,
        policy="greedy",
        spill=0,
        active_gpus=mask,
        **({"node_fallback": elastic.node_fallback_needed(mask, weight.shape[1], config[0], config[2], config[3])}
           if hierarchical else {}),
    )  # fmt: skip
    return got, want


@pytest.mark.parametrize(
    "config",
    [(32, 4, 2, 8), (48, 8, 4, 8), (24, 4, 2, 4), (20, 4, 2, 20), (36, 4, 2, 12)],
    ids=["32-2x4", "48-4x2", "24-2x2", "one-slot-per-gpu", "36-2x6"],
)
def test_rebalance_experts_kernels_equal_the_array_api(config, kernels_ready, monkeypatch):
    rng = np.random.default_rng(16)
    experts = 16
    gpus = config[3]
    for trial in range(4):
        hierarchical = trial % 2 == 1
        weight = np.round(rng.lognormal(0.0, 1.0, (5, experts)) * 1000).astype(np.int64)
        weight[1] = 0  # all zero
        weight[2] = 7  # tied
        per_gpu = config[0] // gpus
        mask = np.ones(gpus, bool)
        dead = rng.permutation(gpus)[: int(rng.integers(1, max(2, gpus - (experts - 1) // per_gpu)))]
        mask[dead] = False
        if mask.sum() * per_gpu < experts:
            mask[dead[0]] = True
        old_mask = np.ones(gpus, bool) if trial < 2 else np.roll(mask, 1) | (rng.random(gpus) < 0.5)
        if old_mask.sum() * per_gpu < experts:
            old_mask[:] = True
        old_w = rng.permutation(weight.T).T.copy()
        previous = np.asarray(eplb.rebalance_experts(old_w, *config, hierarchical=False, active_gpus=old_mask).phy2log)
        for tolerance in (None, 0.0, 0.05):
            got, want = _both(weight, previous, config, hierarchical, mask, tolerance, monkeypatch)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize(
    ("config", "hierarchical", "dead"),
    [((288, 8, 18, 144), False, list(range(8, 16))), ((288, 8, 4, 32), True, [5])],
    ids=["global-144-node-down", "hier-fallback-1-down"],
)
def test_rebalance_experts_kernels_on_deepseek_v3(config, hierarchical, dead, kernels_ready, monkeypatch):
    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {cases.DATA}"
    previous = eplb.rebalance_experts(old_w, *config, hierarchical=hierarchical).phy2log
    mask = np.ones(config[3], bool)
    mask[dead] = False
    got, want = _both(new_w, previous, config, hierarchical, mask, 0.0, monkeypatch)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_torch_cpu_runs_the_kernels(kernels_ready, monkeypatch):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    weight = np.round(rng.lognormal(0.0, 1.0, (4, 16)) * 100).astype(np.int64)
    previous = np.asarray(eplb.rebalance_experts(weight[::-1].copy(), 32, 4, 2, 8).phy2log)
    mask = np.ones(8, bool)
    mask[[2, 5]] = False
    _, want = _both(weight, previous, (32, 4, 2, 8), False, mask, 0.0, monkeypatch)
    used = []
    hooks = _numpy._elastic_hooks
    monkeypatch.setattr(_numpy, "_elastic_hooks", lambda: used.append(1) or hooks())
    on_torch = eplb.rebalance_experts(
        torch.as_tensor(weight), 32, 4, 2, 8, hierarchical=False, previous=torch.as_tensor(previous),
        active_gpus=torch.as_tensor(mask), balance_tolerance=0.0,
    )  # fmt: skip
    assert used, "torch CPU goes through the numpy adapter and its kernels"
    for a, b in zip(on_torch, want, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.parametrize(
    ("config", "experts", "hierarchical", "dead"),
    [
        ((288, 8, 4, 32), 256, True, [5]),
        ((352, 8, 4, 32), 256, True, list(range(8, 16))),  # a node down: the global rule
        ((288, 8, 3, 144), 256, False, [5, 77]),
        ((48, 4, 2, 8), 16, False, [0, 1, 2, 3, 4]),  # 3 live GPUs: 18 slots for 16 experts
        ((20, 4, 2, 20), 16, True, [3]),  # one slot per GPU: the shortcut, no packing loop
        ((8, 1, 1, 4), 1, False, [1]),  # one expert, its replicas on 3 live GPUs
    ],
    ids=["hier-1-down", "hier-node-down", "global-144", "three-live", "one-slot-per-gpu", "one-expert"],
)
def test_fresh_placement_packs_with_the_kernel(config, experts, hierarchical, dead, kernels_ready, monkeypatch):
    """active_gpus= without previous= on numpy (impl=None) packs the replicas with the numba sticky packing where
    a GPU has several slots (a spy), and places as the array-API LPT loop (impl="xp") does."""
    weight = cases.deepseek_v3("prefill_in2048.json")
    assert weight is not None, f"real loads expected at {cases.DATA}"
    weight = weight[:6, :experts].copy()
    weight[1] = 0  # all zero
    mask = np.isin(np.arange(config[3]), dead, invert=True)
    calls = []
    sticky = repair_numba.sticky_pack
    monkeypatch.setattr(repair_numba, "sticky_pack", lambda *a, **k: calls.append(1) or sticky(*a, **k))
    got = eplb.rebalance_experts(weight, *config, hierarchical=hierarchical, active_gpus=mask)
    assert bool(calls) == (config[0] > config[3])
    want = _numpy.rebalance(weight.astype(np.float32), *config, impl="xp", hierarchical=hierarchical,
                            policy="greedy", spill=0, active_gpus=mask)  # fmt: skip
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_repair_counts_its_moves_exactly():
    """repair's third output (which stabilize_elastic ranks its searched candidates by) is the moves of its
    result: the plain-Python multiset count (tests/oracle.moves), with failed GPUs and on healthy rows."""
    from . import oracle
    from .test_kernels_repair import _repair_args as _healthy_args

    rng = np.random.default_rng(18)
    for make in (_repair_args, _healthy_args):
        for trial in range(150):
            *args, max_iters = make(rng, trial)
            placed, _, moved = repair(*args, max_iters=max_iters, xp=np)
            assert moved.shape == (placed.shape[0], 1)
            np.testing.assert_array_equal(moved[:, 0], oracle.moves(args[2], placed, args[7]))
    # Degenerate: one expert, one slot per GPU, every GPU but one failed, all-zero loads, a zero limit.
    for nodes, gpus, per_gpu, experts in ((1, 2, 1, 1), (2, 4, 3, 1), (2, 8, 1, 4), (1, 6, 2, 5)):
        slots = gpus * per_gpu
        for live in ([0], list(range(0, gpus, 2))):
            dead_slot = np.repeat(~np.isin(np.arange(gpus), live), per_gpu)
            start = np.where(dead_slot, -1, rng.integers(0, experts, (3, slots)))
            live_slots = np.flatnonzero(~dead_slot)
            if len(live_slots) >= experts:
                start[:, live_slots[:experts]] = np.arange(experts)
            old = np.where(dead_slot, -1, rng.integers(-1, experts, (3, slots)))
            cnt = replica_counts(start, experts, xp=np)
            for weight in (_weights(rng, 3, experts), np.zeros((3, experts), np.float32)):
                args = (start, cnt, old, weight, np.zeros((3, 1), np.float32), np.full((3, 1), 100))
                args = (*args, np.ones((3, 1), bool), gpus, nodes, experts if nodes == 1 else 1)
                placed, _, moved = repair(*args, max_iters=64, xp=np)
                np.testing.assert_array_equal(moved[:, 0], oracle.moves(old, placed, gpus))
