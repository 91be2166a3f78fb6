"""``survivable`` packing (issue 19): the spread rule against the plain-Python oracle, on numpy, torch and JAX."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb.algorithms.hierarchy import rebalance_hierarchical
from eplb.algorithms.survivable import rebalance_survivable, surviving_load_share

from . import oracle

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _random_case(rng: np.random.Generator, layers: int, experts: int, nodes: int, per_node: int, per_gpu: int):
    gpus = nodes * per_node
    slots = gpus * per_gpu
    experts = min(experts, slots)
    weight = rng.lognormal(0.0, 1.5, (layers, experts)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.2] = rng.choice([0.0, 1.0])  # zeros and ties
    if layers > 1:
        weight[-1] = 0.0  # an all-zero layer
    return weight, slots, nodes, gpus


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    layers=st.integers(1, 3),
    experts=st.integers(1, 12),
    nodes=st.integers(1, 4),
    per_node=st.integers(1, 3),
    per_gpu=st.integers(1, 4),
)
def test_numpy_equals_the_oracle(seed, layers, experts, nodes, per_node, per_gpu):
    weight, slots, nodes, gpus = _random_case(np.random.default_rng(seed), layers, experts, nodes, per_node, per_gpu)
    phy2log, phyrank, logcnt = rebalance_survivable(weight, slots, nodes, gpus, xp=np)
    for layer in range(layers):
        assert phy2log[layer].tolist() == oracle.survivable_layer(weight[layer].tolist(), slots, nodes, gpus)
    # the greedy replication: the same replica counts as the global greedy policy
    _, _, greedy_count = rebalance_hierarchical(weight, slots, 1, 1, gpus, xp=np)
    np.testing.assert_array_equal(logcnt, greedy_count)
    for layer in range(layers):  # replica numbers 0 .. count-1 of each expert
        for e in range(weight.shape[1]):
            assert sorted(phyrank[layer][phy2log[layer] == e].tolist()) == list(range(int(logcnt[layer, e])))
    share = surviving_load_share(weight, phy2log, nodes, xp=np)
    for layer in range(layers):
        want = oracle.surviving_share(weight[layer].astype(np.float64).tolist(), phy2log[layer].tolist(), nodes)
        np.testing.assert_allclose(share[layer], want, rtol=1e-5)


def test_every_backend_places_the_same():
    weight, slots, nodes, gpus = _random_case(np.random.default_rng(7), 3, 20, 3, 2, 4)
    want = rebalance_survivable(weight, slots, nodes, gpus, xp=np)
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as torch_xp

    got = rebalance_survivable(torch.as_tensor(weight), slots, nodes, gpus, xp=torch_xp)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    placed = jax.jit(lambda w: rebalance_survivable(w, slots, nodes, gpus, xp=jnp))(jnp.asarray(weight))
    for a, b in zip(placed, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_real_loads_survive_a_node_failure_better_at_the_same_balance():
    files = sorted((DATA / "deepseek-v3-sglang").glob("*.json"))[:1]
    if not files:
        pytest.skip("no DeepSeek-V3 loads in ../shared/data")
    weight = np.asarray(json.loads(files[0].read_text())["logical_count"], dtype=np.float32)[3:13]
    slots, nodes, gpus = 288, 4, 32
    greedy, _, _ = rebalance_hierarchical(weight, slots, 1, 1, gpus, xp=np)
    spread, _, _ = rebalance_survivable(weight, slots, nodes, gpus, xp=np)
    worst = [surviving_load_share(weight, p, nodes, xp=np).min(axis=1) for p in (greedy, spread)]
    assert (worst[1] >= worst[0] - 1e-6).all() and worst[1].mean() > worst[0].mean() + 0.01

    def peak(phy2log):
        cnt = np.stack([np.bincount(row, minlength=weight.shape[1]) for row in phy2log])
        per_slot = np.take_along_axis(weight.astype(np.float64) / np.maximum(cnt, 1), phy2log, axis=1)
        return per_slot.reshape(len(weight), gpus, -1).sum(axis=2).max(axis=1)

    assert (peak(spread) <= peak(greedy) * 1.01).all()  # the spread costs under 1% of the heaviest GPU here


def test_public_api_policy_survivable():
    weight, slots, nodes, gpus = _random_case(np.random.default_rng(3), 3, 20, 4, 2, 3)
    want = rebalance_survivable(weight, slots, nodes, gpus, xp=np)
    got = eplb.rebalance_experts(weight, slots, 4, nodes, gpus, policy="survivable")  # groups ignored
    np.testing.assert_array_equal(got.phy2log, want[0])
    np.testing.assert_array_equal(got.logcnt, want[2])
    for layer in range(len(weight)):  # log2phy points at the expert's slots, -1 padded
        for e in range(weight.shape[1]):
            slots_of = got.log2phy[layer, e][got.log2phy[layer, e] >= 0]
            assert sorted(slots_of.tolist()) == np.flatnonzero(got.phy2log[layer] == e).tolist()
    share = eplb.metrics.surviving_load(weight, got.phy2log, nodes)
    for layer in range(len(weight)):
        row = got.phy2log[layer].tolist()
        want_share = oracle.surviving_share(weight[layer].astype(np.float64).tolist(), row, nodes)
        np.testing.assert_allclose(share[layer], want_share, rtol=1e-5)
    with pytest.raises(ValueError, match="survivable' cannot be combined with previous="):
        eplb.rebalance_experts(weight, slots, 4, nodes, gpus, policy="survivable", previous=got.phy2log)
    with pytest.raises(ValueError, match="num_gpus=6 must be a multiple of num_nodes=4"):
        eplb.rebalance_experts(weight[:, :6], 12, 1, 4, 6, policy="survivable")
    with pytest.raises(ValueError, match="num_nodes=5"):
        eplb.metrics.surviving_load(weight, got.phy2log, 5)
