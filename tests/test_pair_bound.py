"""The pair bound (two slots per GPU; ``eplb.algorithms.pair_bound``): never above the best placement (exhaustive
search), equal to its float64 oracle on every backend, and above the other bounds where pairs decide."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import eplb
from eplb.algorithms.bounds import capacity_bound, node_set_bound
from eplb.algorithms.pair_bound import pair_bound
from eplb.algorithms.speed import capacity_live, clean_capacity

from . import oracle
from .conftest import needs_gpu

jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")


def _others(w: np.ndarray, num_gpus: int, caps) -> np.ndarray:
    """The other bounds' value ``B`` (global policy), the pair bound's start."""
    w32 = np.asarray(w, np.float32)
    if caps is None:
        return np.asarray(node_set_bound(w32, 2 * num_gpus, num_gpus, xp=eplb._xp.array_namespace(w32)))
    c = clean_capacity(np.asarray(caps, np.float32)[None], xp=eplb._xp.array_namespace(w32))
    c = np.where(capacity_live(c, xp=eplb._xp.array_namespace(c)), c, 0).astype(np.float32)
    return np.asarray(capacity_bound(w32, c, 2 * num_gpus, num_gpus, xp=eplb._xp.array_namespace(w32)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 6),  # experts
    st.integers(1, 4),  # GPUs, two slots each
    st.one_of(st.none(), st.lists(st.sampled_from([0.0, 0.25, 0.6, 1.0, 2.0]), min_size=4, max_size=4)),
    st.lists(st.integers(0, 30), min_size=6, max_size=6),
    st.booleans(),
)
def test_never_above_the_best_placement(num_experts, num_gpus, speeds, loads, tied):
    """Exhaustive optimum (every replica count, every pairing) against ``metrics.lower_bound`` at ``R = 2G``:
    equal speeds and capacities (idle GPUs too), one expert, zero loads, ties."""
    caps = None if speeds is None else np.array(speeds[:num_gpus])
    live = np.ones(num_gpus, bool) if caps is None else np.array(oracle.capacity_live(caps)) if caps.max() > 0 else None
    assume(live is not None and 2 * live.sum() >= num_experts)
    w = np.array([[7.0] * num_experts if tied else loads[:num_experts]])
    bound = float(np.asarray(eplb.metrics.lower_bound(w, 2 * num_gpus, 1, 1, num_gpus, gpu_capacity=caps))[0])
    best = oracle.best_time64(w[0], 2 * num_gpus, num_gpus, np.ones(num_gpus) if caps is None else caps)
    assert bound <= best * (1 + 1e-6) + 1e-30


def test_a_seeded_sweep_is_valid_and_often_tighter():
    """300 random small layouts (idle and unequal GPUs, zero loads, ties): never above the exhaustive optimum,
    and strictly above the other bounds on some of them (on 1,353 such cases in a scratch run: 186)."""
    rng = np.random.default_rng(0)
    tighter = 0
    for i in range(300):
        num_gpus = int(rng.integers(1, 5))
        num_experts = int(rng.integers(1, 2 * num_gpus + 1))
        caps = None if i % 2 else rng.choice([0.0, 0.25, 0.6, 1.0, 2.0], size=num_gpus)
        if caps is not None and (caps.max() == 0 or 2 * sum(oracle.capacity_live(caps)) < num_experts):
            continue
        w = rng.integers(0, 30, size=(1, num_experts)).astype(float)
        bound = float(np.asarray(eplb.metrics.lower_bound(w, 2 * num_gpus, 1, 1, num_gpus, gpu_capacity=caps))[0])
        best = oracle.best_time64(w[0], 2 * num_gpus, num_gpus, np.ones(num_gpus) if caps is None else caps)
        assert bound <= best * (1 + 1e-6) + 1e-30, (w, caps, bound, best)
        tighter += bound > float(_others(w, num_gpus, caps)[0]) * (1 + 1e-6)
    assert tighter >= 10


def test_above_the_other_bounds_where_pairs_decide():
    """Loads 10, 9, 8, 1, 1, 1 on 3 GPUs of two slots: every expert keeps one replica, so some GPU holds 10 and
    a partner of at least 1 (the best placement: 11). The other bounds give 10 (the largest replica)."""
    w = np.array([[10.0, 9.0, 8.0, 1.0, 1.0, 1.0]])
    assert float(_others(w, 3, None)[0]) == pytest.approx(10.0)
    assert oracle.best_time64(w[0], 6, 3, np.ones(3)) == pytest.approx(11.0)
    bound = float(np.asarray(eplb.metrics.lower_bound(w, 6, 1, 1, 3))[0])
    assert 10.5 < bound <= 11.0
    # with capacities: the same loads on a GPU twice as fast and two slow ones
    caps = np.array([2.0, 1.0, 1.0])
    best = oracle.best_time64(w[0], 6, 3, caps)
    bound = float(np.asarray(eplb.metrics.lower_bound(w, 6, 1, 1, 3, gpu_capacity=caps))[0])
    assert float(_others(w, 3, caps)[0]) < bound <= best * (1 + 1e-6)


def _case(seed: int):
    rng = np.random.default_rng(seed)
    num_gpus = int(rng.integers(3, 10))
    num_experts = int(rng.integers(num_gpus, 2 * num_gpus + 1))
    w = rng.lognormal(0, 1.2, size=(3, num_experts)).astype(np.float32) * 100
    w[1, rng.integers(num_experts)] = 0.0
    w[2] = np.round(w[2] / 50) * 50  # ties
    caps = None
    if seed % 3:
        caps = rng.choice([0.0, 0.25, 0.6, 1.0, 2.0], size=num_gpus)
        caps[: (num_experts + 1) // 2] = np.maximum(caps[: (num_experts + 1) // 2], 0.6)  # enough live slots
    return w, num_gpus, caps


@pytest.mark.parametrize("seed", range(6))
def test_every_backend_equals_the_oracle(seed):
    """numpy, torch and JAX (each forced through its own arrays) give the float64 oracle's bound, which tries
    every replica count (the kernel only the starts of each expert's levels), within the bisection's bracket."""
    w, num_gpus, caps = _case(seed)
    start = _others(w, num_gpus, caps)
    want = oracle.pair_bound64(w, start, num_gpus, caps)
    assert (want >= start).all()
    c = None if caps is None else clean_capacity(np.asarray(caps, np.float32)[None], xp=eplb._xp.array_namespace(w))
    frameworks = [("numpy", np.asarray), ("torch", torch.as_tensor)] + [("jax", jnp.asarray)] * (seed % 2 == 0)
    for name, conv in frameworks:  # JAX on half the seeds (eager JAX compiles every op's shape: CI time)
        xp = eplb._xp.array_namespace(conv(w))
        got = pair_bound(conv(w), conv(start), num_gpus, None if c is None else conv(np.asarray(c)), xp=xp)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, err_msg=name)
    # the front door: metrics.lower_bound at R = 2G takes it (torch and JAX arrays alike)
    got = eplb.metrics.lower_bound(torch.as_tensor(w), 2 * num_gpus, 1, 1, num_gpus, gpu_capacity=caps)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)


def test_degenerate_layers():
    """An all-zero layer bounds at 0; no layers give an empty bound; one expert on one GPU: its load."""
    w = np.zeros((2, 4), np.float32)
    w[1] = [5, 0, 0, 3]
    got = np.asarray(eplb.metrics.lower_bound(w, 4, 1, 1, 2))
    assert got[0] == 0 and 0 < got[1] <= oracle.best_time64(w[1], 4, 2, np.ones(2)) * (1 + 1e-6)
    assert np.asarray(eplb.metrics.lower_bound(np.zeros((0, 4), np.float32), 4, 1, 1, 2)).shape == (0,)
    one = np.asarray(eplb.metrics.lower_bound(np.array([[6.0]]), 2, 1, 1, 1, gpu_capacity=[0.5]))
    assert one[0] == pytest.approx(oracle.best_time64(np.array([6.0]), 2, 1, [0.5]))


@needs_gpu("torch")
def test_torch_cuda_equals_the_oracle():
    """On a CUDA device (torch divides exactly there): the oracle's bound, speeds on the device, no host copy."""
    for seed in range(6):
        w, num_gpus, caps = _case(seed)
        want = oracle.pair_bound64(w, _others(w, num_gpus, caps), num_gpus, caps)
        speeds = None if caps is None else torch.as_tensor(caps, device="cuda")
        got = eplb.metrics.lower_bound(torch.as_tensor(w, device="cuda"), 2 * num_gpus, 1, 1, num_gpus,
                                       gpu_capacity=speeds)  # fmt: skip
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-4)


@needs_gpu("jax")
def test_jax_gpu_stays_below_the_best_and_near_the_oracle():
    """On a JAX GPU (XLA divides approximately): the bound of the seeded sweep's small layouts never exceeds
    the exhaustive optimum, and the oracle's bound within two bisection steps on the mid-size cases."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        num_gpus = int(rng.integers(1, 4))
        num_experts = int(rng.integers(1, 2 * num_gpus + 1))
        w = rng.integers(0, 30, size=(1, num_experts)).astype(np.float32)
        bound = float(np.asarray(eplb.metrics.lower_bound(jnp.asarray(w), 2 * num_gpus, 1, 1, num_gpus))[0])
        assert bound <= oracle.best_time64(w[0], 2 * num_gpus, num_gpus, np.ones(num_gpus)) * (1 + 1e-6)
    for seed in range(6):
        w, num_gpus, caps = _case(seed)
        want = oracle.pair_bound64(w, _others(w, num_gpus, caps), num_gpus, caps)
        got = eplb.metrics.lower_bound(jnp.asarray(w), 2 * num_gpus, 1, 1, num_gpus,
                                       gpu_capacity=None if caps is None else jnp.asarray(caps))  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
