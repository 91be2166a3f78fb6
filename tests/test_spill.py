"""The spill policy: a bounded number of replicas per node away from their group's home."""

from __future__ import annotations

import numpy as np
import pytest

import eplb
from eplb import metrics

from . import cases
from .conftest import CPU_BACKENDS, backend_params, make_runner

CONFIG = (288, 8, 4, 32)


def _loads() -> np.ndarray:
    rng = np.random.default_rng(11)
    return np.concatenate([cases.lognormal_f32(rng, 6, 256, sigma=1.2), cases.ties(rng, 256).astype(np.float32)])


def _foreign_per_node(phy2log: np.ndarray, home_of_group: np.ndarray) -> np.ndarray:
    """[L, N]: slots of each node holding an expert whose group's home is elsewhere."""
    node_of_slot = np.arange(phy2log.shape[1]) // (phy2log.shape[1] // 4)
    group = phy2log // 32
    home = np.take_along_axis(home_of_group, group, axis=1)
    foreign = home != node_of_slot
    return np.stack([np.bincount(node_of_slot[f], minlength=4) for f in foreign])


@pytest.mark.parametrize("policy", ["greedy", "refined"])
@pytest.mark.parametrize("spill", [1, 3, 8])
def test_spill_is_valid_and_bounded(spill, policy):
    weight = _loads()
    placement = eplb.rebalance_experts(weight, *CONFIG, spill=spill, policy=policy)
    np.testing.assert_array_equal(metrics.replica_counts(placement.phy2log, 256), placement.logcnt)
    assert (placement.logcnt >= 1).all()
    for layer, row in enumerate(placement.log2phy):
        for expert, slots in enumerate(row):
            held = slots[: placement.logcnt[layer, expert]]
            assert sorted(np.flatnonzero(placement.phy2log[layer] == expert)) == sorted(held)
    # home node of a group: where its experts' first replicas (rank 0) live
    first = placement.log2phy[:, ::32, 0] // (288 // 4)  # [L, groups]
    foreign = _foreign_per_node(placement.phy2log, first)
    assert (foreign <= spill).all(), foreign
    # every group keeps all of its experts' first replicas on one node
    node_of_first = placement.log2phy[:, :, 0] // 72
    assert (node_of_first.reshape(-1, 8, 32) == node_of_first.reshape(-1, 8, 32)[:, :, :1]).all()


def test_spill_trades_locality_for_balance():
    """On the real DeepSeek-V3 loads, more spill: less locality, more balance (a property of those
    loads, not of every load, so it needs ../shared/data)."""
    weight = cases.deepseek_v3()
    if weight is None:
        pytest.skip("../shared/data not present")
    rows = []
    for spill in (0, 2, 8):
        phy2log = eplb.rebalance_experts(weight, *CONFIG, spill=spill).phy2log
        share = float(np.mean(metrics.locality(weight, phy2log, 8, 4).home_share))
        balance = float(np.mean(metrics.balancedness(weight, phy2log, 32)))
        rows.append((spill, share, balance))
    (_, share0, bal0), (_, share2, bal2), (_, share8, bal8) = rows
    assert share0 == pytest.approx(1.0)
    assert share0 > share2 > share8
    assert bal0 < bal2 < bal8


def test_locality_of_global_policy_is_lower():
    weight = _loads()
    hier = eplb.rebalance_experts(weight, *CONFIG).phy2log
    glob = eplb.rebalance_experts(weight, *CONFIG, hierarchical=False).phy2log
    np.testing.assert_allclose(metrics.locality(weight, hier, 8, 4).nodes_per_group, 1.0)
    assert np.mean(metrics.locality(weight, glob, 8, 4).nodes_per_group) > 1.5


@pytest.mark.parametrize("backend", backend_params([b for b in CPU_BACKENDS if b.supports(spill=4)]))
def test_spill_identical_on_every_backend(backend):
    weight = _loads()
    want = eplb.rebalance_experts(weight, *CONFIG, spill=4, policy="refined")
    got = make_runner(backend).rebalance_np(weight, *CONFIG, spill=4, policy="refined")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"spill": -1}, ValueError, "spill=-1"),
        ({"spill": 9}, ValueError, "spill=9 must be <="),
        ({"spill": 1.5}, TypeError, "spill must be an int"),
        ({"spill": 2, "hierarchical": False}, ValueError, "hierarchical"),
    ],
)
def test_bad_spill(kwargs, error, match):
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(np.ones((1, 256)), *CONFIG, **kwargs)
