"""The polish of the failure re-plan: ``active_gpus`` with ``previous=`` gives moves back
(:func:`eplb.algorithms.elastic.polish_live`).

Each placement with the polish is checked against the same call without it
(``polish_fn`` that returns its input) by plain-Python and float64 oracles
(``tests/oracle.py``): the same replica counts, failed GPUs still empty, no
layer with more moved experts, groups still on their nodes, and the heaviest
live GPU within the limit (the fresh elastic placement's times
``fl32(1 + t)``) or within the unpolished placement's where that is higher.
The numba polish (the numpy adapter's hook) against the array-API one on
the same calls; both on real DeepSeek-V3 loads, where it must give moves
back. The rows a caller keeps (``polish_live(rows=)``, ``stabilize_elastic(rows=)``): the others are left
alone, the kept ones as without ``rows``, and both rules on the device equal the rule told from the host.
Cross-backend identity of the whole call (torch, JAX, CUDA) is in
``tests/test_elastic.py`` and the elastic GPU tests, which run it too.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb.algorithms.elastic import place_elastic, place_elastic_stable, polish_live, stabilize_elastic
from eplb.backends import _numba, _numpy

from . import cases, oracle


def _no_polish(phy2log, *args, xp):
    return phy2log


def _place(w, previous, sizes, mask, tolerance, hierarchical, **hooks):
    """``(phy2log, log2phy, logcnt)`` as int64 numpy arrays (the array-API layer, ``hooks`` plugged in)."""
    out = place_elastic_stable(
        np.asarray(w, np.float32), np.asarray(previous), *sizes, xp=np, active_gpus=np.asarray(mask, bool),
        hierarchical=hierarchical, tolerance=tolerance, **hooks,
    )  # fmt: skip
    return tuple(np.asarray(a, np.int64) for a in out)


def _groups_on_nodes(phy2log, num_log, num_groups, num_nodes):
    """``[L]`` bool: every group's live slots on one node (plain Python)."""
    per_node, group_size = phy2log.shape[1] // num_nodes, num_log // num_groups
    out = []
    for row in phy2log.tolist():
        nodes_of = {}
        for slot, e in enumerate(row):
            if e >= 0:
                nodes_of.setdefault(e // group_size, set()).add(slot // per_node)
        out.append(all(len(v) == 1 for v in nodes_of.values()))
    return np.array(out)


def _check(w, previous, sizes, mask, tolerance, hierarchical):
    """The polished call against the unpolished one (see the module docstring); returns both moves ``[L]``."""
    num_replicas, num_groups, num_nodes, num_gpus = sizes
    after = _place(w, previous, sizes, mask, tolerance, hierarchical)
    before = _place(w, previous, sizes, mask, tolerance, hierarchical, polish_fn=_no_polish)
    np.testing.assert_array_equal(after[2], before[2])  # replica counts never change
    live_slot = np.repeat(np.asarray(mask, bool), num_replicas // num_gpus)
    assert ((after[0] == -1) == ((before[0] == -1) | ~live_slot[None, :])).all(), "empty slots moved"
    for row, counts in zip(after[0], after[2], strict=True):
        np.testing.assert_array_equal(np.bincount(row[row >= 0], minlength=w.shape[1]), counts)
        assert (counts >= 1).all() or not (row >= 0).any()
    moves_after, moves_before = oracle.moves(previous, after[0], num_gpus), oracle.moves(previous, before[0], num_gpus)
    assert (moves_after <= moves_before).all(), (moves_after, moves_before)
    fresh_phy = np.asarray(
        place_elastic(np.asarray(w, np.float32), *sizes, active_gpus=np.asarray(mask), hierarchical=hierarchical,
                      xp=np)[0]
    )  # fmt: skip
    factor = float(np.float32(1 + np.float32(tolerance or 0.0)))
    limit = oracle.gpu_loads64(w, fresh_phy, num_gpus).max(axis=1) * factor
    ceiling = np.maximum(limit, oracle.gpu_loads64(w, before[0], num_gpus).max(axis=1))
    peak = oracle.gpu_loads64(w, after[0], num_gpus).max(axis=1)
    assert (peak <= ceiling * oracle.load_slack(num_replicas, num_gpus)).all(), (peak, ceiling)
    # Groups stay on nodes under the within-nodes rule; a layer where some node has fewer live slots than the
    # experts of its groups falls back to the global rule (docs/algorithm.md), whose polish may swap across nodes
    # even where the unpolished placement happened to keep the groups together (all-zero loads, say).
    node_slots = np.asarray(mask, bool).reshape(num_nodes, -1).sum(axis=1) * (num_replicas // num_gpus)
    if hierarchical and num_nodes > 1 and (node_slots >= w.shape[1] // num_nodes).all():
        kept = _groups_on_nodes(before[0], w.shape[1], num_groups, num_nodes)
        assert (_groups_on_nodes(after[0], w.shape[1], num_groups, num_nodes) >= kept).all()
    return moves_after, moves_before


@st.composite
def failure_calls(draw, hierarchical_only: bool = False):
    """Random re-plans after failures: 1..8 GPUs, 1..4 nodes, 1 to 3 slots beyond the fewest a GPU (one slot
    per GPU possible), one expert possible, all-zero / tied / integer / lognormal loads, a previous placement
    healthy or with GPUs already down, global or hierarchical (groups that fit their nodes; only that, 2..4
    nodes, with ``hierarchical_only``), any tolerance."""
    num_nodes = draw(st.integers(2 if hierarchical_only else 1, 4))
    gpus_per_node = draw(st.integers(1, 3))
    num_gpus = num_nodes * gpus_per_node
    w, r, mask, rng = cases.draw_failure(draw, num_gpus, num_nodes if hierarchical_only else 1)
    (layers, num_experts), per_gpu = w.shape, r // num_gpus
    hierarchical = (hierarchical_only or draw(st.booleans())) and num_nodes > 1 and num_experts % num_nodes == 0
    groups = num_nodes if hierarchical else 1
    sizes = (r, groups, num_nodes if hierarchical else 1, num_gpus)
    old_w = rng.lognormal(0, 1, (layers, num_experts)).astype(np.float32)
    old_mask = np.where(rng.random(num_gpus) < 0.5, mask, True)
    if old_mask.sum() * per_gpu < num_experts:
        old_mask[:] = True
    previous = np.asarray(
        eplb.rebalance_experts(old_w, *sizes, hierarchical=hierarchical, active_gpus=old_mask).phy2log
    )
    tolerance = draw(st.sampled_from([None, 0.0, 0.05, 0.3]))
    return w, previous, sizes, mask, tolerance, hierarchical


@settings(max_examples=60, deadline=None)
@given(failure_calls())
def test_polish_keeps_its_promises(call):
    _check(*call)


@pytest.mark.skipif(not _numba.available(), reason="needs numba")
@settings(max_examples=30, deadline=None)
@given(failure_calls())
def test_numba_polish_equals_the_array_api(call):
    """The numpy adapter's compiled polish (and its other kernels) against the array-API layer throughout."""
    w, previous, sizes, mask, tolerance, hierarchical = call
    expected = _place(w, previous, sizes, mask, tolerance, hierarchical)
    got = _place(w, previous, sizes, mask, tolerance, hierarchical, **_numpy._elastic_hooks())
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("case", cases.ELASTIC_GPU_CASES, ids=cases.ELASTIC_GPU_IDS)
def test_polish_gives_moves_back_on_real_loads(case):
    """DeepSeek-V3 loads, GPUs down (the elastic GPU tests' cases): within its promises, and fewer moved experts
    than without the polish on the global layouts (on the hierarchical ones it may find none to give back);
    the numba polish equals the array-API one there."""
    w, previous, mask = cases.deepseek_elastic(*case)
    (sizes, hierarchical), _ = case
    w = w[:12]
    previous = previous[:12]
    moves_after, moves_before = _check(w, previous, sizes, mask, 0.05, hierarchical)
    if not hierarchical:
        assert moves_after.sum() < moves_before.sum()
    if _numba.available():
        expected = _place(w, previous, sizes, mask, 0.05, hierarchical)
        got = _place(w, previous, sizes, mask, 0.05, hierarchical, **_numpy._elastic_hooks())
        for x, y in zip(expected, got, strict=True):
            np.testing.assert_array_equal(x, y)


@settings(max_examples=40, deadline=None)
@given(failure_calls(), st.integers(0, 2**32 - 1))
def test_rows_left_out_return_unchanged(call, seed):
    """``polish_live(rows=)``: a row left out returns its input exactly; a row kept returns what the call without
    ``rows`` returns (array API and the numba polish)."""
    w, previous, sizes, mask, _, hierarchical = call
    _, _, num_nodes, num_gpus = sizes
    w = np.asarray(w, np.float32)
    active = np.asarray(mask, bool)[None, :]
    placed, _, counts = place_elastic(w, *sizes, active_gpus=active[0], hierarchical=hierarchical, xp=np)
    placed, counts = np.asarray(placed), np.asarray(counts)
    limit = oracle.gpu_loads64(w, placed, num_gpus).max(axis=1, keepdims=True).astype(np.float32)
    rows = np.random.default_rng(seed).random((w.shape[0], 1)) < 0.5
    hooks = [{}] + ([{"polish_fn": _numpy._repair_hooks()["polish_fn"]}] if _numba.available() else [])
    for hook in hooks:
        args = (w, placed, counts, previous, active, limit, num_gpus, num_nodes)
        every = np.asarray(polish_live(*args, xp=np, **hook))
        some = np.asarray(polish_live(*args, xp=np, rows=rows, **hook))
        np.testing.assert_array_equal(some, np.where(rows, every, placed))


@settings(max_examples=40, deadline=None)
@given(failure_calls(hierarchical_only=True))
def test_both_rules_on_the_device_equal_the_host_decision(call):
    """With ``node_fallback=None`` (a mask on the device) both rules run and each layer takes one, the other's
    polish skipped; the placement equals the call told the rule from the host (plain Python: some node with
    fewer live slots than the experts of its groups)."""
    w, previous, sizes, mask, tolerance, hierarchical = call
    assert hierarchical
    num_replicas, _, num_nodes, num_gpus = sizes
    per_gpu, gpus_per_node = num_replicas // num_gpus, num_gpus // num_nodes
    live = [sum(bool(m) for m in mask[n * gpus_per_node : (n + 1) * gpus_per_node]) * per_gpu for n in range(num_nodes)]
    fallback = any(slots < w.shape[1] // num_nodes for slots in live)
    decided = _place(w, previous, sizes, mask, tolerance, True, node_fallback=fallback)
    on_device = _place(w, previous, sizes, mask, tolerance, True, node_fallback=None)
    for x, y in zip(decided, on_device, strict=True):
        np.testing.assert_array_equal(x, y)


@settings(max_examples=30, deadline=None)
@given(failure_calls(), st.integers(0, 2**32 - 1))
def test_stabilize_rows_kept_as_without_them(call, seed):
    """``stabilize_elastic(rows=)``: the rows kept equal the call without ``rows`` (placement, counts, moves,
    within); every row's counts are its placement's (plain Python)."""
    w, previous, sizes, mask, tolerance, hierarchical = call
    _, num_groups, num_nodes, num_gpus = sizes
    w = np.asarray(w, np.float32)
    active = np.asarray(mask, bool)[None, :]
    fresh, _, counts = place_elastic(w, *sizes, active_gpus=active[0], hierarchical=hierarchical, xp=np)
    rows = np.random.default_rng(seed).random((w.shape[0], 1)) < 0.5
    args = (w, np.asarray(fresh), np.asarray(counts), previous, active, num_gpus)
    nodes = {"num_nodes": num_nodes, "num_groups": num_groups} if hierarchical else {}
    compiled = {k: v for k, v in _numpy._repair_hooks().items() if k != "polish_fn"} if _numba.available() else None
    for hooks in ({}, compiled) if compiled else ({},):
        every = stabilize_elastic(*args, tolerance=tolerance, xp=np, **nodes, **hooks)
        some = stabilize_elastic(*args, tolerance=tolerance, rows=rows, xp=np, **nodes, **hooks)
        for x, y in zip(every, some, strict=True):
            x, y = np.asarray(x), np.asarray(y)
            keep = rows if x.ndim == 2 else rows[:, 0]
            np.testing.assert_array_equal(np.where(keep, y, x), x)
        for row, cnt in zip(np.asarray(some[0]).tolist(), np.asarray(some[1]).tolist(), strict=True):
            assert [sum(1 for e in row if e == x) for x in range(w.shape[1])] == cnt
