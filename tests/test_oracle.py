"""The greedy policy against the plain-Python oracle, and the published golden example."""

from __future__ import annotations

import numpy as np
import pytest

import eplb

from . import oracle

GOLDEN_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
GOLDEN_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]

# (experts, replicas, groups, nodes, gpus): hierarchical, one group per node,
# global fallback (groups % nodes != 0), one slot per GPU, no redundancy.
CONFIGS = [
    (12, 16, 4, 2, 8),
    (16, 24, 4, 2, 4),
    (32, 48, 8, 4, 8),
    (16, 20, 4, 4, 4),
    (24, 36, 6, 4, 12),
    (20, 30, 3, 2, 6),
    (8, 16, 2, 1, 16),
    (10, 10, 2, 2, 10),
]


def test_golden_example(runner):
    phy2log, log2phy, logcnt = runner.rebalance_np(np.array(GOLDEN_WEIGHT), 16, 4, 2, 8)
    np.testing.assert_array_equal(phy2log, GOLDEN_PHY2LOG)
    np.testing.assert_array_equal(logcnt, [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
    assert log2phy.shape == (2, 12, 5)


def test_golden_example_as_list():
    phy2log, _, _ = eplb.rebalance_experts(GOLDEN_WEIGHT, 16, 4, 2, 8)
    assert isinstance(phy2log, np.ndarray)
    assert phy2log.tolist() == GOLDEN_PHY2LOG


def _tie_free_loads(rng: np.random.Generator, num_layers: int, num_experts: int) -> np.ndarray:
    """Distinct integer loads, well spread, so no ordering hinges on a tie."""
    return np.stack([rng.permutation(num_experts) * 977 + rng.integers(1, 900, num_experts) for _ in range(num_layers)])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_matches_oracle_on_random_loads(config):
    num_experts, replicas, groups, nodes, gpus = config
    rng = np.random.default_rng(sum(config))
    for kind in range(3):  # 3 x 40 layers = 120 random cases per config
        if kind == 0:
            weight = _tie_free_loads(rng, 40, num_experts)
        elif kind == 1:
            weight = rng.lognormal(3.0, 1.5, (40, num_experts)).astype(np.float32)
        else:
            weight = rng.integers(0, 2**20, (40, num_experts))
        expected = oracle.rebalance(weight, replicas, groups, nodes, gpus)
        got = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: "-".join(map(str, c)))
def test_every_backend_matches_oracle(runner, config):
    num_experts, replicas, groups, nodes, gpus = config
    rng = np.random.default_rng(7)
    weight = _tie_free_loads(rng, 16, num_experts)
    expected = oracle.rebalance(weight, replicas, groups, nodes, gpus)
    for e, g in zip(expected, runner.rebalance_np(weight, replicas, groups, nodes, gpus), strict=True):
        np.testing.assert_array_equal(g, e)
