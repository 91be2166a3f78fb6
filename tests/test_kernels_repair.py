"""The compiled sticky repacking and local search (eplb.kernels.repair_numba) equal the array-API ones bit for bit.

eplb.algorithms.repair.sticky_pack and eplb.algorithms.repair.repair: on random inputs (hierarchical and
global, 1..4 nodes, 1..4 GPUs per node, 1..5 slots per GPU, one expert, tied and all-zero loads, invalid rows,
budgets 0/1/large, limits below and above the start's peak, short max_iters), on the arguments stabilize
passes them for real DeepSeek-V3 loads, and through the numpy adapter (impl="numba" against impl="xp").
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import eplb
from eplb.algorithms.relabel import align_slots, count_moves, replica_counts
from eplb.algorithms.repair import gpu_loads, repair, sticky_pack
from eplb.algorithms.stability import place_stable

from . import cases

pytest.importorskip("numba")
from eplb.kernels import _threads, repair_numba

ROOT = Path(__file__).resolve().parents[1]


def _loads(rng: np.random.Generator, rows: int, experts: int) -> np.ndarray:
    """float32 [rows, E]: lognormal, small integers (ties), all equal, all zero, one hot expert."""
    kinds = rng.integers(0, 5, rows)
    out = np.empty((rows, experts), np.float32)
    for r, kind in enumerate(kinds):
        if kind == 0:
            out[r] = rng.lognormal(0.0, 1.5, experts) * 1000
        elif kind == 1:
            out[r] = rng.integers(0, 4, experts)
        elif kind == 2:
            out[r] = 7.0
        elif kind == 3:
            out[r] = 0.0
        else:
            out[r] = np.where(np.arange(experts) == rng.integers(experts), 1e4, rng.integers(1, 3, experts))
    return out


def _placement(rng: np.random.Generator, rows: int, slots: int, experts: int, cover: bool) -> np.ndarray:
    """[rows, R] expert ids; with ``cover`` every expert has a slot."""
    out = rng.integers(0, experts, (rows, slots))
    if cover:
        for r in range(rows):
            out[r, rng.permutation(slots)[:experts]] = np.arange(experts)
    return out


def _shape(rng: np.random.Generator) -> tuple[int, int, int, int, int]:
    """(nodes, GPUs, slots, experts, group_size); nodes 1 with group_size E is the global policy."""
    nodes, per_node, per_gpu = (int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 6)))
    gpus = nodes * per_node
    slots = gpus * per_gpu
    experts = int(rng.integers(1, slots + 1)) if rng.random() < 0.8 else slots
    if rng.random() < 0.3:
        nodes = 1  # global policy
    if nodes == 1 and rng.random() < 0.5:
        return nodes, gpus, slots, experts, experts
    divisors = [d for d in range(1, experts + 1) if experts % d == 0]
    return nodes, gpus, slots, experts, experts // divisors[int(rng.integers(len(divisors)))]


def _repair_args(rng: np.random.Generator, trial: int) -> tuple:
    """Starts: the old placement, a few slots of it rewritten (a sticky start), or unrelated; budgets around the
    start's moves (from one below to unbounded); limits from 0 to above the start's peak."""
    rows = 6
    nodes, gpus, slots, experts, group_size = _shape(rng)
    old = _placement(rng, rows, slots, experts, cover=trial % 5 != 0)
    start = old.copy()
    start[1] = old[1, rng.permutation(slots)]  # the same experts, shuffled
    for r in (2, 3):
        changed = rng.random(slots) < 0.3
        start[r, changed] = rng.integers(0, experts, int(changed.sum()))
    start[4:] = _placement(rng, 2, slots, experts, cover=rng.random() < 0.8)
    weight = _loads(rng, rows, experts)
    cnt = replica_counts(start, experts, xp=np)
    peak = np.max(gpu_loads(weight, start, cnt, gpus, xp=np), axis=-1, keepdims=True)
    factor = np.array([0.0, 0.5, 0.9, 0.99, 1.0, 1.2], np.float32)[rng.integers(0, 6, (rows, 1))]
    limit = peak * factor
    moves = count_moves(start, old, gpus, xp=np)[:, None]
    budget = moves + np.array([-1, 0, 1, 2, 5, 10**6])[rng.integers(0, 6, (rows, 1))]
    valid = rng.random((rows, 1)) < 0.9
    max_iters = min(slots, max(64, 4 * gpus)) if trial % 4 else int(rng.integers(1, 4))
    return start, cnt, old, weight, limit, budget, valid, gpus, nodes, group_size, max_iters


def _assert_same(got: tuple, want: tuple) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_repair_equals_the_array_api_search():
    rng = np.random.default_rng(0)
    for trial in range(1000):
        *args, max_iters = _repair_args(rng, trial)
        want = repair(*args, max_iters=max_iters, xp=np)
        _assert_same(repair_numba.repair(*args, max_iters), want)


def _count_rows(monkeypatch, kernel_name: str, *, min_rows: int) -> list:
    """Patch the compiled ``repair_numba.<kernel_name>`` to record each call's row count (the list returned), and
    ``MIN_ROWS_PER_THREAD`` to ``min_rows``, so small batches split over threads."""
    calls = []
    kernel = getattr(repair_numba, kernel_name)

    def counted(*args):
        calls.append(len(args[0]))
        return kernel(*args)

    monkeypatch.setattr(repair_numba, kernel_name, counted)
    monkeypatch.setattr(repair_numba, "MIN_ROWS_PER_THREAD", min_rows)
    return calls


def test_repair_rows_split_over_threads_equal_the_array_api_search(monkeypatch):
    """A batch split over threads (rows dealt round-robin, results put back in place) gives the array-API
    search's result row by row, whatever the number of threads and rows (uneven splits included)."""
    calls = _count_rows(monkeypatch, "_repair", min_rows=4)
    rng = np.random.default_rng(5)
    for trial, threads in enumerate((2, 3, 5, 2, 3, 4, 7, 2)):
        monkeypatch.setattr(_threads, "THREADS", threads)
        start, cnt, old, weight, limit, budget, valid, *sizes, max_iters = _repair_args(rng, trial)
        copies = int(rng.integers(3, 6))  # 18-30 rows: the six rows again, each with other limits and budgets
        start, cnt, old, weight, budget, valid = (
            np.tile(a, (copies, 1)) for a in (start, cnt, old, weight, budget, valid)
        )
        limit = (np.tile(limit, (copies, 1)) * rng.uniform(0.8, 1.2, (6 * copies, 1))).astype(np.float32)
        budget = budget + rng.integers(-1, 3, budget.shape)
        args = (start, cnt, old, weight, limit, budget, valid, *sizes)
        calls.clear()
        got = repair_numba.repair(*args, max_iters)
        parts = min(threads, len(start) // 4)
        assert sorted(calls) == sorted(len(range(k, len(start), parts)) for k in range(parts))  # it did split
        _assert_same(got, repair(*args, max_iters=max_iters, xp=np))


FORKED_CHILD = """
import multiprocessing, sys
import numpy as np
sys.path.insert(0, {root!r})
from eplb.algorithms.repair import repair
from eplb.kernels import _threads, repair_numba
from tests.test_kernels_repair import _assert_same, _repair_args

repair_numba.MIN_ROWS_PER_THREAD, _threads.THREADS = 2, 2
args = _repair_args(np.random.default_rng(7), 1)
*inputs, max_iters = args
want = repair(*inputs, max_iters=max_iters, xp=np)
_assert_same(repair_numba.repair(*args), want)  # the parent's threads now exist
assert 2 in _threads._POOLS
with multiprocessing.get_context("fork").Pool(1) as pool:
    got = pool.apply_async(repair_numba.repair, args).get(timeout=60)  # hangs, then times out, if broken
_assert_same(got, want)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_repair_threads_work_in_a_forked_child():
    """A process forked after the threads exist (a serving stack's workers) gets threads of its own: the
    parent's do not exist there, and reusing their pool would hang. In a fresh interpreter (no JAX threads
    around the fork)."""
    script = FORKED_CHILD.format(root=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_repair_on_one_expert_and_one_slot_per_gpu():
    rng = np.random.default_rng(1)
    for nodes, gpus, per_gpu, experts in ((1, 1, 1, 1), (1, 4, 1, 1), (2, 4, 3, 1), (2, 8, 1, 8), (4, 8, 1, 5)):
        slots = gpus * per_gpu
        start = _placement(rng, 4, slots, experts, cover=True)
        old = _placement(rng, 4, slots, experts, cover=True)
        weight = _loads(rng, 4, experts)
        cnt = replica_counts(start, experts, xp=np)
        limit = np.zeros((4, 1), np.float32)
        for budget in (0, 1, 100):
            args = (start, cnt, old, weight, limit, np.full((4, 1), budget), np.ones((4, 1), bool))
            args = (*args, gpus, nodes, experts if nodes == 1 else 1)
            _assert_same(repair_numba.repair(*args, 64), repair(*args, max_iters=64, xp=np))


def test_sticky_pack_equals_the_array_api_repacking():
    rng = np.random.default_rng(2)
    for trial in range(300):
        packs, capacity = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        n = packs * capacity
        experts = int(rng.integers(1, n + 1))
        base = _placement(rng, 5, n, experts, cover=False)
        old = base[:, rng.permutation(n)] if trial % 3 == 0 else _placement(rng, 5, n, experts, cover=False)
        loads = _loads(rng, 5, experts)
        item_load = np.take_along_axis(loads, base, axis=1)
        total = item_load.sum(axis=1, keepdims=True, dtype=np.float32)
        factor = np.array([0.0, 0.2, 0.5, 1.0, 2.0, np.inf], np.float32)[rng.integers(0, 6, (5, 1))]
        # +inf: a fresh peak near float32's largest times 1 + tolerance; every home has room "within" it
        limit = np.where(np.isinf(factor), np.float32(np.inf), total * factor / packs).astype(np.float32)
        want = sticky_pack(base, old, item_load, limit, packs, xp=np)
        got = repair_numba.sticky_pack(base, old, item_load, limit, packs)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        for row, packed in zip(base.tolist(), want.tolist(), strict=True):  # a repacking: the same items
            assert sorted(row) == sorted(packed), trial


def test_sticky_pack_rows_split_over_threads_equal_the_array_api_repacking(monkeypatch):
    """Rows dealt to threads (uneven splits, with and without initial loads and the reserve rule) come back in
    place: the array-API repacking row by row."""
    calls = _count_rows(monkeypatch, "_sticky_pack", min_rows=2)
    rng = np.random.default_rng(12)
    for trial, threads in enumerate((2, 3, 4, 2, 5, 3)):
        monkeypatch.setattr(_threads, "THREADS", threads)
        packs, capacity = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        n, rows = packs * capacity, int(rng.integers(4, 12))
        experts = int(rng.integers(1, n + 1))
        base = _placement(rng, rows, n, experts, cover=False)
        old = _placement(rng, rows, n, experts, cover=False)
        item_load = np.take_along_axis(_loads(rng, rows, experts), base, axis=1)
        limit = (item_load.sum(axis=1, keepdims=True, dtype=np.float32) * np.float32(0.6 / packs)).astype(np.float32)
        extra = {}
        if trial % 2:
            extra = {"initial_load": rng.uniform(0, 1, (rows, packs)).astype(np.float32), "reserve": trial % 4 == 1}
        calls.clear()
        got = repair_numba.sticky_pack(base, old, item_load, limit, packs, **extra)
        parts = min(threads, rows // 2)
        assert sorted(calls) == sorted(len(range(k, rows, parts)) for k in range(parts))  # it did split
        np.testing.assert_array_equal(got, sticky_pack(base, old, item_load, limit, packs, xp=np, **extra))


def _moves_oracle(new: np.ndarray, old: np.ndarray, num_gpus: int) -> list:
    """Per row, plain Python: the (expert, GPU) pairs of new beyond old's, counted as multisets per GPU."""
    per_gpu = new.shape[1] // num_gpus
    moves = []
    for row_new, row_old in zip(new.tolist(), old.tolist(), strict=True):
        total = 0
        for g in range(num_gpus):
            now, was = (
                Counter(row_new[g * per_gpu : (g + 1) * per_gpu]),
                Counter(row_old[g * per_gpu : (g + 1) * per_gpu]),
            )
            total += sum(max(0, c - was[e]) for e, c in now.items())
        moves.append(total)
    return moves


def test_align_slots_and_replica_counts_equal_the_array_api_ones():
    rng = np.random.default_rng(6)
    for trial in range(200):
        gpus, per_gpu = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        slots = gpus * per_gpu
        experts = int(rng.integers(1, slots + 1))
        new = _placement(rng, 4, slots, experts, cover=False)
        old = new[:, rng.permutation(slots)] if trial % 3 == 0 else _placement(rng, 4, slots, experts, cover=False)
        got = repair_numba.align_slots(new, old, gpus)
        assert got.dtype == new.dtype
        np.testing.assert_array_equal(got, align_slots(new, old, gpus, xp=np))
        got = repair_numba.replica_counts(new, experts)
        assert got.dtype == new.dtype
        np.testing.assert_array_equal(got, replica_counts(new, experts, xp=np))
        if trial % 4 == 1:  # an empty GPU in old (a failed one): -1 ids are compared, never indexed
            old = old.copy()
            old[:, :per_gpu] = -1
        got = repair_numba.count_moves(new, old, gpus)
        assert got.dtype == new.dtype
        np.testing.assert_array_equal(got, _moves_oracle(new, old, gpus))
        np.testing.assert_array_equal(got, count_moves(new, old, gpus, xp=np))
    with pytest.raises(ValueError, match="expert ids"):  # below -1: no slot meaning, refused (ids index counters)
        repair_numba.count_moves(np.full((1, 4), -2), np.zeros((1, 4), np.int64), 2)


def _captured(weight: np.ndarray, previous: np.ndarray, config: tuple, **knobs) -> list:
    """(function, args, kwargs, result) of each step of the array-API stabilize that a kernel replaces."""
    calls = []

    def record(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls.append((fn, args, kwargs, out))
            return out

        return run

    hierarchical = config[1] % config[2] == 0
    place_stable(
        weight.astype(np.float32),
        previous,
        *config,
        hierarchical=hierarchical,
        xp=np,
        sticky_pack_fn=record(sticky_pack),
        repair_fn=record(repair),
        align_slots_fn=record(align_slots),
        replica_counts_fn=record(replica_counts),
        **knobs,
    )
    return calls


def _check_captured(calls: list) -> None:
    # (the second alignment: the polished placement's slots, eplb.algorithms.polish)
    assert [c[0] for c in calls] == [sticky_pack, align_slots, replica_counts, repair, align_slots]
    kernels = {
        sticky_pack: repair_numba.sticky_pack,
        align_slots: repair_numba.align_slots,
        replica_counts: repair_numba.replica_counts,
    }
    for fn, args, kwargs, want in calls:
        if fn is repair:
            _assert_same(repair_numba.repair(*args, kwargs["max_iters"]), want)
        else:
            _assert_same((kernels[fn](*args),), (want,))


@pytest.mark.parametrize("config", [(288, 8, 4, 32), (288, 8, 3, 144)], ids=["hier", "global"])
@pytest.mark.parametrize("knobs", [{"tolerance": 0.005}, {"tolerance": 0.0, "max_moves": 16}, {"max_moves": 4}])
def test_equal_on_deepseek_v3(config, knobs):
    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {cases.DATA}"
    previous = eplb.rebalance_experts(old_w, *config).phy2log
    _check_captured(_captured(new_w, previous, config, **knobs))


def test_equal_in_stabilize_on_small_configs():
    """Real stabilize arguments (sticky starts, old placements, budgets, limits) on small configs, ties included."""
    rng = np.random.default_rng(3)
    for config in ((24, 4, 2, 4), (32, 4, 4, 8), (48, 8, 4, 8), (48, 8, 3, 12), (16, 4, 2, 16), (20, 4, 4, 4)):
        for old_w, new_w in (
            (cases.lognormal_f32(rng, 4, 16), cases.lognormal_f32(rng, 4, 16)),
            (cases.ties(rng, 16), cases.ties(rng, 16)[::-1].copy()),
        ):
            previous = eplb.rebalance_experts(old_w, *config).phy2log
            for knobs in (
                {"tolerance": 0.0},
                {"tolerance": 0.05},
                {"max_moves": 1},
                {"tolerance": 0.01, "max_moves": 3},
            ):
                _check_captured(_captured(new_w, previous, config, **knobs))


@pytest.mark.parametrize("config", [(288, 8, 4, 32), (288, 8, 3, 144)], ids=["hier", "global"])
def test_numpy_adapter_on_deepseek_v3(config):
    """The whole previous= call at the DeepSeek-V3 shapes, kernels against the array-API layer."""
    from eplb.backends import _numpy

    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {cases.DATA}"
    previous = eplb.rebalance_experts(old_w, *config).phy2log
    args = (new_w, previous, *config)
    knobs = {"hierarchical": config[1] % config[2] == 0, "tolerance": 0.005, "max_moves": 16}
    kernel = _numpy.rebalance_stable(*args, impl="numba", **knobs)
    reference = _numpy.rebalance_stable(*args, impl="xp", **knobs)
    for a, b in zip(kernel, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def test_warm_up_runs_every_kernel():
    repair_numba.warm_up()
    for kernel in (repair_numba._sticky_pack, repair_numba._repair, repair_numba._align_all):
        assert kernel.signatures


def test_ids_out_of_range_are_refused():
    """The kernels index with expert ids unchecked: ids outside [0, E) raise instead of reading out of bounds."""
    start = np.zeros((1, 4), np.int64)
    start[0, 1] = 2
    args = (start, np.array([[3, 1]]), start, np.ones((1, 2), np.float32), np.zeros((1, 1), np.float32))
    with pytest.raises(ValueError, match="expert ids"):
        repair_numba.repair(*args, np.ones((1, 1), np.int64), np.ones((1, 1), bool), 2, 1, 2, 4)
    with pytest.raises(ValueError, match="expert ids"):
        repair_numba.sticky_pack(-start, start, np.ones((1, 4), np.float32), np.ones((1, 1), np.float32), 2)


def _drifting(rng: np.random.Generator, layers: int, experts: int, windows: int) -> list:
    base = rng.lognormal(0.0, 1.0, (layers, experts))
    out = []
    for t in range(windows):
        base = base * np.exp(rng.normal(0.0, 0.05, base.shape))
        if t % 2 == 1:
            base[np.arange(layers)[:, None], rng.integers(0, experts, (layers, 2))] *= 2.5
        out.append(np.round(base * 1000).astype(np.int64))
    return out


@pytest.mark.parametrize("config", [(48, 8, 4, 8), (48, 8, 3, 12), (64, 8, 2, 16), (40, 4, 1, 5)])
def test_numpy_adapter_kernels_equal_the_array_api_path(config):
    """_numpy.rebalance_stable(impl="numba") is impl="xp" with tolerance and max_moves, window after window."""
    from eplb.backends import _numpy

    rng = np.random.default_rng(4)
    hierarchical = config[1] % config[2] == 0
    windows = _drifting(rng, 6, 32, 4)
    previous = eplb.rebalance_experts(windows[0], *config).phy2log
    for weight in windows[1:]:
        for knobs in (
            {"tolerance": 0.0},
            {"tolerance": 0.005},
            {"tolerance": 0.05},
            {"max_moves": 0},
            {"max_moves": 2},
            {"max_moves": 8},
            {"tolerance": 0.01, "max_moves": 4},
        ):
            args = (weight, previous, *config)
            kernel = _numpy.rebalance_stable(*args, hierarchical=hierarchical, impl="numba", **knobs)
            reference = _numpy.rebalance_stable(*args, hierarchical=hierarchical, impl="xp", **knobs)
            for a, b in zip(kernel, reference, strict=True):
                np.testing.assert_array_equal(a, b)
        previous = kernel[0]


def test_float32_only_and_no_fused_multiply_add(tmp_path):
    """The compiled kernels round every float32 product and sum on its own (no FMA: no fast-math) and never
    widen to float64 (a Python float constant would); compiled afresh (inspection is off for cached code)."""
    code = """
import numpy as np
from eplb.kernels import repair_numba as k
rng = np.random.default_rng(0)
start = rng.integers(0, 6, (2, 12))
start[:, :6] = np.arange(6)
weight = rng.random((2, 6)).astype(np.float32)
cnt = k.replica_counts(start, 6)
args = (start, cnt, start[:, ::-1].copy(), weight, np.zeros((2, 1), np.float32), np.full((2, 1), 5))
k.repair(*args, np.ones((2, 1), bool), 4, 2, 3, 8)
k.sticky_pack(start, start[:, ::-1].copy(), weight[:, start[0]], np.ones((2, 1), np.float32), 3)
for kernel in (k._repair, k._sticky_pack):
    for signature in kernel.signatures:
        asm = kernel.inspect_asm(signature).lower()
        assert "addss" in asm and "mulss" in asm or kernel is k._sticky_pack, "float32 arithmetic expected"
        for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub", "cvtss2sd", "cvtsd2ss", "addsd", "mulsd"):
            assert op not in asm, (kernel, op)
print("checked")
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-3000:]


def test_a_peak_near_float32_max_keeps_packs_within_their_slots():
    """A layer whose one expert holds float32's largest load: the fresh peak times 1 + tolerance overflows to an
    infinite limit. The array-API repacking then let items stay in full home packs (an index error, or garbage
    slots); now it equals the kernel, and the placement is valid (found by a fuzzer)."""
    from eplb.backends import _numpy

    top = np.finfo(np.float32).max
    weight = np.zeros((3, 9), np.float32)
    weight[:, 7] = top
    previous = np.array([[0, 4, 1, 8, 7, 6, 2, 6, 8], [7, 1, 8, 3, 7, 6, 2, 2, 0], [4, 7, 6, 6, 2, 3, 7, 0, 0]])
    for options in ({"policy": "refined", "tolerance": 0.2}, {"tolerance": 1.0}, {"max_moves": 2}):
        results = [
            _numpy.rebalance_stable(weight, previous, 9, 9, 1, 3, impl=impl, hierarchical=True, **options)
            for impl in ("xp", "numba")
        ]
        for a, b in zip(*results, strict=True):
            np.testing.assert_array_equal(a, b)
        phy2log, _, logcnt = results[0]
        for row, counts in zip(phy2log.tolist(), logcnt.tolist(), strict=True):
            assert sorted(row) == list(range(9)) and counts == [1] * 9, options  # 9 slots, 9 experts: one each
