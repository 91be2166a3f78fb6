"""Transfer plans: applying a plan turns the old placement into the new one, with minimal copies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb


def apply(plan: eplb.TransferPlan, old: np.ndarray) -> np.ndarray:
    """Carry out ``plan`` on "weights" that are the expert ids themselves, double-buffered like the executors."""
    weights = old.reshape(plan.num_layers, plan.num_gpus, plan.slots_per_gpu)
    new = weights.copy()
    for stage in (0, 1):
        source = weights if stage == 0 else new
        for i in np.flatnonzero(plan.stage == stage):
            row = plan.row(i)
            new[row["layer"], row["dst_gpu"], row["dst_slot"]] = source[row["layer"], row["src_gpu"], row["src_slot"]]
    return new.reshape(old.shape)


def random_placement(rng: np.random.Generator, layers: int, experts: int, slots: int) -> np.ndarray:
    """Every expert at least once, the rest random, shuffled."""
    rows = [
        rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)]))
        for _ in range(layers)
    ]
    return np.stack(rows)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    experts=st.integers(1, 12),
    extra=st.integers(0, 12),
    gpus_nodes=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 2)]),
)
def test_plan_turns_old_into_new(seed, experts, extra, gpus_nodes):
    """For random placements, executing the plan yields exactly the new placement, with one copy per changed slot."""
    gpus, nodes = gpus_nodes
    rng = np.random.default_rng(seed)
    slots = -(-(experts + extra) // gpus) * gpus
    old = random_placement(rng, 3, experts, slots)
    new = random_placement(rng, 3, experts, slots)
    new[0] = old[0]  # an unchanged layer
    plan = eplb.plan_transfers(old, new, gpus, nodes, expert_bytes=7)
    np.testing.assert_array_equal(apply(plan, old), new)
    np.testing.assert_array_equal(np.bincount(plan.layer, minlength=3), (old != new).sum(axis=1))
    assert plan.moved[0] == 0
    assert (plan.moved <= eplb.moved_experts(old, new, gpus)).all()
    np.testing.assert_array_equal(plan.bytes_moved, plan.moved * 7)
    np.testing.assert_array_equal(plan.sends.sum(axis=1), plan.moved)
    np.testing.assert_array_equal(plan.receives.sum(axis=1), plan.moved)
    # A remote copy is needed exactly when the destination GPU held no copy of the expert.
    per_gpu = slots // gpus
    for i in np.flatnonzero(plan.remote):
        row = plan.row(i)
        held = old[row["layer"]].reshape(gpus, per_gpu)[row["dst_gpu"]]
        assert row["expert"] not in held
        assert old[row["layer"]].reshape(gpus, per_gpu)[row["src_gpu"], row["src_slot"]] == row["expert"]
        # Same node if any GPU there holds the expert.
        node = row["dst_gpu"] // (gpus // nodes)
        same_node = [
            g
            for g in range(gpus)
            if g // (gpus // nodes) == node and row["expert"] in old[row["layer"]].reshape(gpus, per_gpu)[g]
        ]
        if same_node:
            assert row["src_gpu"] in same_node


def test_identical_placements_need_nothing():
    old = random_placement(np.random.default_rng(0), 4, 16, 24)
    plan = eplb.plan_transfers(old, old, 4, 2)
    assert len(plan) == 0 and plan.moved.tolist() == [0, 0, 0, 0]
    assert eplb.moved_experts(old, old, 4).tolist() == [0, 0, 0, 0]


def test_reordering_within_a_gpu_is_local():
    """Slots swapped inside a GPU: local copies only, nothing crosses GPUs."""
    old = np.array([[0, 1, 2, 3, 4, 5]])
    new = np.array([[1, 0, 2, 5, 3, 4]])
    plan = eplb.plan_transfers(old, new, 2)
    assert plan.moved.tolist() == [0] and plan.local.tolist() == [5]
    assert eplb.moved_experts(old, new, 2).tolist() == [0]
    np.testing.assert_array_equal(apply(plan, old), new)


def test_second_copy_comes_from_the_first():
    """A GPU that gets two copies of an expert it lacked receives one and copies it locally (stage 1)."""
    old = np.array([[5, 1, 2, 0, 3, 4]])
    new = np.array([[5, 1, 2, 0, 5, 5]])  # GPU 1 (slots 3-5) gets expert 5 twice
    plan = eplb.plan_transfers(old, new, 2)
    assert plan.moved.tolist() == [1] and plan.local.tolist() == [1]
    assert plan.stage.tolist() == [0, 1]
    assert plan.copies(0) == [(0, 0, 1, 1), (1, 1, 1, 2)]
    assert eplb.moved_experts(old, new, 2).tolist() == [2]
    np.testing.assert_array_equal(apply(plan, old), new)


def test_sends_spread_over_holders():
    """An expert held by every GPU of the node is fetched from different holders, evenly."""
    # GPUs 0-3 (node 0) all hold expert 0; GPUs 4-7 (node 1) need it.
    old = np.array([[0, 1, 0, 2, 0, 3, 0, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    new = np.array([[0, 1, 0, 2, 0, 3, 0, 4, 0, 6, 0, 8, 0, 10, 0, 12]])
    plan = eplb.plan_transfers(old, new, 8, 2)
    assert plan.moved.tolist() == [4]
    assert sorted(plan.src_gpu.tolist()) == [0, 1, 2, 3]
    assert plan.cross_node.tolist() == [4]


def test_same_node_source_preferred():
    """Expert 7 is on GPU 1 (node 0) and GPU 2 (node 1); GPU 3 (node 1) takes it from GPU 2."""
    old = np.array([[0, 1, 7, 2, 7, 3, 4, 5]])
    new = np.array([[0, 1, 7, 2, 7, 3, 7, 5]])
    plan = eplb.plan_transfers(old, new, 4, 2)
    assert plan.copies(0) == [(2, 0, 3, 0)]
    assert plan.cross_node.tolist() == [0]


def test_plan_from_rebalances():
    """A plan between two real placements moves what moved_experts counts (no duplicate copies here)."""
    rng = np.random.default_rng(3)
    weights = rng.lognormal(0, 1.5, (2, 6, 256)).astype(np.float32)
    old = eplb.rebalance_experts(weights[0], 288, 8, 4, 32).phy2log
    new = eplb.rebalance_experts(weights[1], 288, 8, 4, 32, previous=old, balance_tolerance=0.01).phy2log
    plan = eplb.plan_transfers(old, new, 32, 4, expert_bytes=3 * 7168 * 2048 * 2)
    np.testing.assert_array_equal(apply(plan, old), new)
    assert plan.moved.sum() <= eplb.moved_experts(old, new, 32).sum()


@pytest.mark.parametrize(
    ("old", "new", "args", "error", "match"),
    [
        ([[0, 1]], [[0, 1, 2, 3]], (2,), ValueError, "same shape"),
        ([[0, 1, 2]], [[0, 1, 2]], (2,), ValueError, "multiple of num_gpus=2"),
        ([[0, 1, 2, 3]], [[0, 1, 2, 3]], (4, 3), ValueError, "multiple of num_nodes=3"),
        ([[0, 1, 2, 3]], [[0, 1, 2, 9]], (2,), ValueError, "needs expert 9 in layer 0"),
        ([[0.0, 1.0]], [[0, 1]], (2,), TypeError, "old_phy2log must hold integer"),
        ([[0, -1]], [[0, 1]], (2,), ValueError, "ids >= 0"),
        ([0, 1], [0, 1], (2,), ValueError, "2-D"),
    ],
)
def test_plan_validation(old, new, args, error, match):
    with pytest.raises(error, match=match):
        eplb.plan_transfers(old, new, *args)


def test_transfer_error_names_the_copy():
    plan = eplb.plan_transfers([[0, 1, 2, 3]], [[0, 2, 1, 3]], 2)
    err = eplb.TransferError("peer closed", plan=plan, transfer=1, rank=1)
    assert (err.layer, err.expert, err.src_gpu, err.dst_gpu, err.rank) == (0, 1, 0, 1, 1)
    assert str(err) == (
        "transfer 1 (layer 0: expert 1 from GPU 0 slot 1 to GPU 1 slot 0) failed on rank 1: "
        "peer closed; old weights kept"
    )
    assert "rank 3: not ready" in str(eplb.TransferError("not ready", rank=3))


def test_docs_code_runs(monkeypatch, tmp_path):
    """The ``python`` blocks of docs/migration.md run as written (``py`` blocks need a cluster and are shown only)."""
    import re
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    text = (Path(__file__).resolve().parents[1] / "docs" / "migration.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert blocks
    for index, block in enumerate(blocks):
        exec(compile(block, f"migration.md[{index}]", "exec"), {"__name__": f"docs_{index}"})
