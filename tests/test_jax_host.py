"""JAX on the CPU through the numba kernel (a host callback): same placements, inside jit and vmap."""

from __future__ import annotations

import numpy as np
import pytest

import eplb

from . import cases

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
_jax_host = pytest.importorskip("eplb.backends._jax_host")

needs_numba = pytest.mark.skipif(not _jax_host.applies({"hierarchical": True}), reason="numba not installed")
CONFIGS = [(288, 8, 4, 32), (288, 8, 3, 144), (24, 4, 2, 4), (16, 4, 2, 16)]


def _loads(config: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(sum(config))
    experts = 256 if config[0] == 288 else 16
    rows = [cases.ties(rng, experts), cases.random_int(rng, 4, experts), cases.lognormal_f32(rng, 4, experts)]
    return np.concatenate(rows).astype(np.float32)


def _same(want, got) -> None:
    for a, b in zip(want, got, strict=True):
        assert isinstance(b, jax.Array) and b.dtype == jnp.arange(1).dtype
        np.testing.assert_array_equal(a, np.asarray(b))


@needs_numba
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_host_path_equals_numpy_eager_and_in_jit(config):
    from eplb.backends import _jax

    weight = _loads(config)
    want = eplb.rebalance_experts(weight, *config)
    hier = config[1] % config[2] == 0
    _same(want, eplb.rebalance_experts(jnp.asarray(weight), *config))
    _same(want, _jax.rebalance(jnp.asarray(weight), *config, hierarchical=hier, policy="greedy", impl="host"))
    _same(want, jax.jit(lambda w: tuple(eplb.rebalance_experts(w, *config)))(jnp.asarray(weight)))


@needs_numba
def test_host_path_under_nested_vmap_is_one_batch():
    config = (24, 4, 2, 4)
    weight = _loads(config)
    batch = np.stack([np.stack([weight, weight[::-1]]), np.stack([weight * 3, weight[:, ::-1]])])  # [2, 2, L, E]
    got = jax.vmap(jax.vmap(lambda w: tuple(eplb.rebalance_experts(w, *config))))(jnp.asarray(batch))
    for i in range(2):
        for j in range(2):
            want = eplb.rebalance_experts(np.ascontiguousarray(batch[i, j]), *config)
            _same(want, [g[i, j] for g in got])


def test_xla_path_is_still_forced_by_impl():
    """impl="xla" skips the callback (no pure_callback in its jaxpr)."""
    from eplb.backends import _jax

    weight = jnp.asarray(_loads((24, 4, 2, 4)))
    jaxpr = jax.make_jaxpr(lambda w: _jax.rebalance(w, 24, 4, 2, 4, hierarchical=True, policy="greedy", impl="xla"))
    assert "pure_callback" not in str(jaxpr(weight))
    if _jax_host.applies({"hierarchical": True}):
        default = jax.make_jaxpr(lambda w: eplb.rebalance_experts(w, 24, 4, 2, 4))
        assert "pure_callback" in str(default(weight))


@needs_numba
def test_large_outputs_stay_on_xla(monkeypatch):
    """Past MAX_LOG2PHY entries the callback's output copies cost more than XLA's loop: XLA runs."""
    monkeypatch.setattr(_jax_host, "MAX_LOG2PHY", 2 * 16 * 5 - 1)  # just below [2, 16] -> 20 slots
    weight = jnp.asarray(_loads((20, 4, 4, 4))[:2])
    jaxpr = jax.make_jaxpr(lambda w: eplb.rebalance_experts(w, 20, 4, 4, 4))(weight)
    assert "pure_callback" not in str(jaxpr)
    _same(eplb.rebalance_experts(np.asarray(weight), 20, 4, 4, 4), eplb.rebalance_experts(weight, 20, 4, 4, 4))
