"""Every installed backend returns the same placement, bit for bit.

Backends: numpy (reference), torch CPU (default and forced torch ops),
torch CUDA, JAX CPU (eager and inside a user's jit), JAX GPU. GPU ones skip
without a GPU. All pairs are compared, not only against numpy.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from . import cases
from .conftest import ALL_BACKENDS, Backend, make_runner

# (replicas, groups, nodes, gpus) for E = 16 or 256 experts
SMALL = [(24, 4, 2, 4), (20, 4, 4, 4), (32, 3, 2, 8), (16, 4, 2, 16)]
DEEPSEEK = (288, 8, 4, 32)
DEEPSEEK_GLOBAL = (288, 8, 3, 144)


def _available() -> list[Backend]:
    return [b for b in ALL_BACKENDS if b.available()]


POLICIES = pytest.mark.parametrize("policy", ["greedy", "refined"])


def _all_agree(weight: np.ndarray, config: tuple[int, ...], policy: str) -> None:
    backends = _available()
    assert Backend.NUMPY in backends
    results = {b: make_runner(b).rebalance_np(weight, *config, policy=policy) for b in backends}
    for a, b in itertools.combinations(backends, 2):
        for name, x, y in zip(("phy2log", "log2phy", "logcnt"), results[a], results[b], strict=True):
            if not np.array_equal(x, y):
                rows = np.flatnonzero((x != y).reshape(len(x), -1).any(axis=1))
                pytest.fail(f"{name} differs between {a.value} and {b.value} in layers {rows.tolist()}")


@POLICIES
@pytest.mark.parametrize("config", SMALL, ids=lambda c: "-".join(map(str, c)))
def test_ties_and_zeros(config, policy):
    _all_agree(cases.ties(np.random.default_rng(1), 16), config, policy)


@POLICIES
@pytest.mark.parametrize("config", SMALL, ids=lambda c: "-".join(map(str, c)))
def test_signed_zeros_tie(config, policy):
    _all_agree(cases.signed_zeros(np.random.default_rng(4), 16), config, policy)


@POLICIES
@pytest.mark.parametrize("config", SMALL, ids=lambda c: "-".join(map(str, c)))
def test_tiny_loads_read_as_zero(config, policy):
    """Subnormals and loads below 2**-64 count as 0 on every backend (XLA flushes subnormals, numpy does not)."""
    weight = cases.tiny_loads(np.random.default_rng(5), 16)
    _all_agree(weight, config, policy)
    numpy = make_runner(Backend.NUMPY)
    flushed = np.where(weight < 2.0**-64, np.float32(0), weight)
    assert np.count_nonzero(flushed) < np.count_nonzero(weight)  # the case holds loads to flush
    for got, want in zip(
        numpy.rebalance_np(weight, *config, policy=policy),
        numpy.rebalance_np(flushed, *config, policy=policy),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


@POLICIES
@pytest.mark.parametrize("config", SMALL, ids=lambda c: "-".join(map(str, c)))
def test_random_integers_near_2_31(config, policy):
    _all_agree(cases.random_int(np.random.default_rng(2), 24, 16), config, policy)


@POLICIES
@pytest.mark.parametrize("config", SMALL, ids=lambda c: "-".join(map(str, c)))
def test_float32(config, policy):
    _all_agree(cases.lognormal_f32(np.random.default_rng(3), 24, 16), config, policy)


@POLICIES
@pytest.mark.parametrize("config", [DEEPSEEK, DEEPSEEK_GLOBAL], ids=["hierarchical", "global"])
def test_deepseek_shape_mixed(config, policy):
    rng = np.random.default_rng(4)
    weight = np.concatenate(
        [
            cases.random_int(rng, 8, 256).astype(np.float32),
            cases.lognormal_f32(rng, 8, 256),
            cases.ties(rng, 256).astype(np.float32),
        ]
    )
    _all_agree(weight, config, policy)


@POLICIES
@pytest.mark.parametrize("config", [DEEPSEEK, DEEPSEEK_GLOBAL], ids=["hierarchical", "global"])
def test_real_deepseek_loads(config, policy):
    weight = cases.deepseek_v3()
    if weight is None:
        pytest.skip("../shared/data not present")
    assert weight.max() < 2**31
    _all_agree(weight, config, policy)
