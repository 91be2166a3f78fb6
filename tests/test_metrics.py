"""eplb.metrics against a plain float64 reimplementation, and the lower bounds against placements."""

from __future__ import annotations

import numpy as np
import pytest

import eplb
from eplb import metrics

from . import cases
from .conftest import CPU_BACKENDS, Backend, backend_params, make_runner

CONFIGS = [(288, 8, 4, 32), (320, 8, 8, 64), (288, 8, 3, 144), (32, 4, 2, 8)]


def _loads_f64(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """GPU loads the obvious way, in float64: replica = w / count."""
    w = weight.astype(np.float64)
    out = np.zeros((len(w), num_gpus))
    per_gpu = phy2log.shape[1] // num_gpus
    for layer, row in enumerate(phy2log):
        counts = np.bincount(row, minlength=w.shape[1])
        for slot, expert in enumerate(row):
            out[layer, slot // per_gpu] += w[layer, expert] / counts[expert]
    return out


def _experts(config: tuple[int, ...]) -> int:
    return 32 if config[0] == 32 else 256


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_gpu_loads_and_balancedness_match_float64(config):
    rng = np.random.default_rng(0)
    weight = cases.lognormal_f32(rng, 6, _experts(config))
    phy2log = eplb.rebalance_experts(weight, *config).phy2log
    want = _loads_f64(weight, phy2log, config[3])
    np.testing.assert_allclose(metrics.gpu_loads(weight, phy2log, config[3]), want, rtol=1e-5)
    np.testing.assert_allclose(metrics.balancedness(weight, phy2log, config[3]), want.mean(1) / want.max(1), rtol=1e-5)
    summary = metrics.summarize(weight, phy2log, config[3])
    assert summary.balancedness == pytest.approx(np.mean(want.mean(1) / want.max(1)), rel=1e-5)
    assert summary.balancedness_sum == pytest.approx(want.mean(1).sum() / want.max(1).sum(), rel=1e-5)
    assert summary.imbalance == pytest.approx(np.mean(want.max(1) / want.mean(1)), rel=1e-5)


def test_all_zero_layer_is_balanced():
    weight = np.zeros((2, 16))
    phy2log = eplb.rebalance_experts(weight, 24, 4, 2, 4).phy2log
    np.testing.assert_array_equal(metrics.balancedness(weight, phy2log, 4), [1.0, 1.0])


def test_replica_counts_match_logcnt():
    weight = cases.lognormal_f32(np.random.default_rng(1), 5, 256)
    placement = eplb.rebalance_experts(weight, 288, 8, 4, 32)
    np.testing.assert_array_equal(metrics.replica_counts(placement.phy2log, 256), placement.logcnt)


@pytest.mark.parametrize("policy", ["greedy", "refined"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_lower_bound_never_above_a_placement(config, policy):
    """A lower bound must hold for every placement the policy makes (float64 scoring, tiny slack)."""
    rng = np.random.default_rng(2)
    experts = _experts(config)
    weight = np.concatenate(
        [cases.lognormal_f32(rng, 6, experts, sigma=s) for s in (0.3, 1.0, 2.0)]
        + [cases.ties(rng, experts).astype(np.float32)]
    )
    bound = np.asarray(metrics.lower_bound(weight, *config))
    phy2log = eplb.rebalance_experts(weight, *config, policy=policy).phy2log
    peak = _loads_f64(weight, phy2log, config[3]).max(1)
    assert np.all(bound <= peak * (1 + 1e-5)), np.flatnonzero(bound > peak * (1 + 1e-5))


def test_lower_bound_is_tight_on_uniform_loads():
    """Equal loads, many slots per GPU: the bound is total / G and greedy reaches it."""
    weight = np.full((3, 64), 10.0, dtype=np.float32)
    bound = np.asarray(metrics.lower_bound(weight, 128, 4, 2, 16))
    np.testing.assert_allclose(bound, 64 * 10.0 / 16)


def test_pigeonhole_bound_on_two_slots_per_gpu():
    """256 equal experts, 288 slots on 144 GPUs: 224 experts keep one replica, so some GPU
    holds two whole experts (2000) although total / G is only 1778; greedy reaches 2000."""
    weight = np.full((1, 256), 1000.0, dtype=np.float32)
    bound = float(np.asarray(metrics.lower_bound(weight, 288, 8, 3, 144))[0])
    assert bound == pytest.approx(2000.0)
    phy2log = eplb.rebalance_experts(weight, 288, 8, 3, 144).phy2log
    assert _loads_f64(weight, phy2log, 144).max() == pytest.approx(2000.0)


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
def test_metrics_on_every_backend(backend):
    runner = make_runner(backend)
    weight = cases.lognormal_f32(np.random.default_rng(3), 4, 16)
    placement = runner.rebalance(runner.asarray(weight), 24, 4, 2, 4)
    got = np.asarray(metrics.gpu_loads(runner.asarray(weight), placement[0], 4))
    want = metrics.gpu_loads(weight, eplb.rebalance_experts(weight, 24, 4, 2, 4).phy2log, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("backend", backend_params([*CPU_BACKENDS, Backend.TORCH_CUDA, Backend.JAX_GPU]))
def test_replica_counts_count_every_slot_on_every_backend(backend):
    """metrics.replica_counts (a scatter-add per backend) against plain Python counts: empty (-1) slots, a row of
    them only, experts with no slot, one expert, int32 and int64 ids."""
    runner = make_runner(backend)
    rng = np.random.default_rng(4)
    rows = [
        rng.integers(0, 12, 24),
        np.where(rng.random(24) < 0.3, -1, rng.integers(0, 12, 24)),  # failed GPUs' slots
        np.full(24, -1),
        np.zeros(24, dtype=np.int64),  # one expert everywhere: the others have none
    ]
    phy2log = np.stack(rows)
    want = np.array([[list(row).count(e) for e in range(12)] for row in phy2log.tolist()])
    for dtype in (np.int64, np.int32):
        got = metrics.replica_counts(runner.asarray(phy2log.astype(dtype)), 12)
        host = np.asarray(got.cpu() if hasattr(got, "cpu") else got)
        np.testing.assert_array_equal(host, want)
        assert host.shape == (4, 12)
    one = metrics.replica_counts(runner.asarray(np.zeros((2, 3), dtype=np.int64)), 1)
    np.testing.assert_array_equal(np.asarray(one.cpu() if hasattr(one, "cpu") else one), [[3], [3]])
