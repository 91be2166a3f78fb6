"""eplb.algorithms.polish: swaps that give moves back within a limit.

- the numba twin (eplb.kernels.polish_numba) equals the array-API function bit for bit on random rows
  (1..4 nodes, 1..4 GPUs per node, 1..5 slots per GPU, one expert, tied and all-zero loads, limits below and
  above the heaviest GPU, max_iters 1, 2 and unbounded) and on the DeepSeek-V3 loads end to end;
- the rule against a plain-Python search (float32 scalars, every pair): the first step's swap, and no allowed
  swap left at the end;
- the promises against plain-Python float64 oracles: replica counts and each node's experts unchanged, moves
  (tests/oracle.py) fall by at least one per swap and never rise, every GPU within the limit up to float32
  rounding;
- through stabilize: never more moves than without the polish, the heaviest GPU within the same bound.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import eplb
import eplb.algorithms.stability as stability
from eplb.algorithms.polish import polish

from . import cases, oracle

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def degenerate_cases() -> list[tuple]:
    """One expert on every slot, one slot per GPU, all-zero loads, and one GPU per node."""
    cases = []
    one = np.zeros((1, 8), np.int64)
    cases.append((one, np.full((1, 1), 8), one, np.ones((1, 1), np.float32), np.full((1, 1), 4, np.float32), 4, 2, 8))
    cur = np.array([[0, 1, 2, 3, 4, 5]], np.int64)
    old = np.array([[1, 0, 3, 2, 5, 4]], np.int64)
    w = np.array([[3, 3, 2, 2, 1, 1]], np.float32)
    cases.append((cur, np.ones((1, 6), np.int64), old, w, np.full((1, 1), 3, np.float32), 6, 1, 6))
    cases.append((cur, np.ones((1, 6), np.int64), old, np.zeros_like(w), np.zeros((1, 1), np.float32), 6, 3, 6))
    cases.append((cur, np.ones((1, 6), np.int64), old, w, np.full((1, 1), 3, np.float32), 3, 3, 6))  # no pair
    return cases


CASES = [cases.polish_case(np.random.default_rng(seed)) for seed in range(150)] + degenerate_cases()


def gpu_loads32(weight: np.ndarray, row: list[int], counts: list[int], num_gpus: int) -> list[np.float32]:
    """Plain Python, float32 scalars: slot loads ``w * fl(1/c)`` summed left to right per GPU."""
    per_gpu = len(row) // num_gpus
    loads = []
    for g in range(num_gpus):
        total = None
        for t in range(g * per_gpu, (g + 1) * per_gpu):
            y = np.float32(weight[row[t]]) * oracle.recip(int(counts[row[t]]))
            total = y if total is None else np.float32(total + y)
        loads.append(total)
    return loads


def allowed_swaps(row: list[int], old: list[int], weight, counts, limit, num_gpus: int, num_nodes: int) -> list:
    """Every allowed swap of a row as ``(change, max changed load, i, j)``, by plain Python over all pairs."""
    slots = len(row)
    per_gpu, per_node = slots // num_gpus, slots // num_nodes
    now = [Counter(row[g * per_gpu : (g + 1) * per_gpu]) for g in range(num_gpus)]
    was = [Counter(old[g * per_gpu : (g + 1) * per_gpu]) for g in range(num_gpus)]
    loads = gpu_loads32(weight, row, counts, num_gpus)
    load_of = [np.float32(weight[e]) * oracle.recip(int(counts[e])) for e in row]
    out = []
    for i in range(slots):
        for j in range(i + 1, slots):
            gi, gj, xi, xj = i // per_gpu, j // per_gpu, row[i], row[j]
            if gi == gj or i // per_node != j // per_node or xi == xj or now[gj][xi] or now[gi][xj]:
                continue
            change = (was[gj][xi] == 0) + (was[gi][xj] == 0)
            change -= (now[gi][xi] > was[gi][xi]) + (now[gj][xj] > was[gj][xj])
            new_i = np.float32(np.float32(loads[gi] - load_of[i]) + load_of[j])
            new_j = np.float32(np.float32(loads[gj] - load_of[j]) + load_of[i])
            if change < 0 and new_i <= limit and new_j <= limit:
                out.append((int(change), float(max(new_i, new_j)), i, j))
    return out


@needs_numba
@pytest.mark.parametrize("case", range(len(CASES)))
def test_numba_equals_the_reference(case):
    from eplb.kernels import polish_numba

    args = CASES[case]
    expected = polish(*args, xp=np)
    np.testing.assert_array_equal(polish_numba.polish(*args), expected)


@pytest.mark.parametrize("case", range(0, len(CASES), 3))
def test_first_step_is_the_plain_python_best_swap(case):
    cur, counts, old, weight, limit, gpus, nodes, _ = CASES[case]
    stepped = polish(cur, counts, old, weight, limit, gpus, nodes, 1, xp=np)
    for b in range(cur.shape[0]):
        swaps = allowed_swaps(cur[b].tolist(), old[b].tolist(), weight[b], counts[b], limit[b, 0], gpus, nodes)
        expected = cur[b].copy()
        if swaps:
            _, _, i, j = min(swaps)  # lowest change, then lowest max changed load, then first (i, j)
            expected[i], expected[j] = expected[j], expected[i]
        np.testing.assert_array_equal(stepped[b], expected)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_promises_against_plain_python(case):
    cur, counts, old, weight, limit, gpus, nodes, max_iters = CASES[case]
    out = polish(cur, counts, old, weight, limit, gpus, nodes, max_iters, xp=np)
    per_node = cur.shape[1] // nodes
    moves_before, moves_after = oracle.moves(old, cur, gpus), oracle.moves(old, out, gpus)
    for b in range(cur.shape[0]):
        row, new = cur[b].tolist(), out[b].tolist()
        # Swaps only, inside nodes: each node keeps its experts, so every replica count and group's node stays.
        for n in range(nodes):
            assert Counter(new[n * per_node : (n + 1) * per_node]) == Counter(row[n * per_node : (n + 1) * per_node])
        swaps = sum(a != c for a, c in zip(row, new, strict=True)) // 2
        assert moves_after[b] <= moves_before[b] - swaps, "each swap gives back at least one pair"
        # Every GPU within the limit, or at most its own load before (a GPU the polish did not touch), float64.
        w64 = weight[b].astype(np.float64)
        per_gpu = len(row) // gpus
        for g in range(gpus):
            before = sum(w64[e] / counts[b][e] for e in row[g * per_gpu : (g + 1) * per_gpu] if counts[b][e])
            after = sum(w64[e] / counts[b][e] for e in new[g * per_gpu : (g + 1) * per_gpu] if counts[b][e])
            assert after <= max(float(limit[b, 0]), before) * (1 + 1e-5) + 1e-30
        if max_iters == cur.shape[1]:  # ran to the end: a swap per step at most R steps, so none is left
            assert not allowed_swaps(new, old[b].tolist(), weight[b], counts[b], limit[b, 0], gpus, nodes)


def _deepseek(layers: int = 12) -> tuple[np.ndarray, np.ndarray]:
    folder = DATA / "deepseek-v3-sglang"
    if not folder.is_dir():
        pytest.skip(f"no DeepSeek-V3 loads at {folder}")
    names = sorted(p for p in folder.iterdir() if p.suffix == ".json")
    pair = []
    for name in (names[0], names[3]):
        counts = np.asarray(json.loads(name.read_text())["logical_count"], np.int64)
        pair.append(counts[counts.sum(axis=1) > 0][:layers])
    return pair[0], pair[1]


def _without_polish(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = stability.stabilize

    def stabilize(*args, **kwargs):
        kwargs["polish_fn"] = lambda phy2log, *rest, xp: phy2log
        return plain(*args, **kwargs)

    monkeypatch.setattr(stability, "stabilize", stabilize)


@pytest.mark.parametrize("config", [(288, 8, 4, 32), (288, 8, 3, 144)])
@pytest.mark.parametrize("knobs", [{"balance_tolerance": 0.005}, {"balance_tolerance": 0.05}, {"max_moves": 8}])
def test_stabilize_never_moves_more_and_keeps_the_bound(config, knobs, monkeypatch):
    """On real loads: fewer or equal moves than the search alone, the heaviest GPU (float64) within the same
    bound, max(limit, the search's own heaviest GPU); groups stay on nodes (checked by the API's validation
    of the result through a second keep-in-place call with max_moves, which refuses placements that split
    groups)."""
    old_load, new_load = _deepseek()
    previous = eplb.rebalance_experts(old_load, *config).phy2log
    fresh = eplb.rebalance_experts(new_load, *config).phy2log
    polished = eplb.rebalance_experts(new_load, *config, previous=previous, **knobs).phy2log
    with monkeypatch.context() as patch:
        _without_polish(patch)
        searched = eplb.rebalance_experts(new_load, *config, previous=previous, **knobs).phy2log
    gpus = config[3]
    assert (oracle.moves(previous, polished, gpus) <= oracle.moves(previous, searched, gpus)).all()
    factor = 1 + knobs.get("balance_tolerance", 0.0)
    bound = np.maximum(
        oracle.gpu_loads64(new_load, fresh, gpus).max(axis=1) * factor,
        oracle.gpu_loads64(new_load, searched, gpus).max(axis=1),
    )
    assert (oracle.gpu_loads64(new_load, polished, gpus).max(axis=1) <= bound * (1 + 1e-6)).all()
    eplb.rebalance_experts(new_load, *config, previous=polished, max_moves=0)  # a placement of this config


@needs_numba
@pytest.mark.parametrize("config", [(288, 8, 4, 32), (288, 8, 3, 144)])
def test_numba_path_equals_the_array_api_path_on_real_loads(config):
    from eplb.backends import _numpy

    old_load, new_load = _deepseek(layers=6)
    previous = eplb.rebalance_experts(old_load, *config).phy2log
    hierarchical = config[2] == 4
    results = [
        _numpy.rebalance_stable(
            new_load, previous, *config, impl=impl, hierarchical=hierarchical, tolerance=0.005, policy="greedy"
        )
        for impl in ("numba", "xp")
    ]
    for got, expected in zip(*results, strict=True):
        np.testing.assert_array_equal(got, expected)
