"""``eplb.metrics.lower_bound_lp``: the linear relaxation's bound at two slots per GPU.

Its promise: no placement's slowest GPU time is below it (with or without
capacities, idle GPUs included), and never below ``lower_bound`` (less
``2**-20`` of it: that one is float32). The oracle is
``tests.oracle.best_time64``, a plain-Python enumeration of every placement of
tiny layers (every replica count, every way to fill each live GPU).
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb
from tests import oracle

pytest.importorskip("scipy")


def _tiny_cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    yield [5], [1.0]  # one expert, one GPU: two halves
    yield [7, 0, 3], [1.0, 0.0, 0.6]  # an idle GPU, a zero-load expert
    yield [4, 4, 4, 4], [1.0, 1.0]  # every slot one expert, ties
    for _ in range(count):
        gpus = int(rng.integers(1, 4))
        capacity = rng.choice([1.0, 0.6, 2.0, 0.0], gpus, p=[0.4, 0.3, 0.2, 0.1]).tolist()
        if not any(capacity):
            capacity[0] = 1.0
        live = sum(c > 0 for c in capacity)
        experts = int(rng.integers(1, 2 * live + 1))
        loads = rng.integers(0, 40, experts)
        if rng.random() < 0.3:
            loads = rng.integers(0, 3, experts) * 10  # ties and zeros
        yield loads.tolist(), capacity


@pytest.mark.parametrize("seed", [0, 1])
def test_no_placement_beats_the_bound(seed):
    """Against every placement of tiny layers (exact optimum by enumeration), and at least ``lower_bound``."""
    tight = 0
    for loads, capacity in _tiny_cases(seed, 30):
        weight = np.asarray([loads], np.float64)
        gpus = len(capacity)
        bound = eplb.metrics.lower_bound_lp(weight, 2 * gpus, gpus, gpu_capacity=np.asarray(capacity))
        best = oracle.best_time64(loads, 2 * gpus, gpus, np.asarray(capacity))
        assert bound.shape == (1,) and bound.dtype == np.float64
        assert bound[0] <= float(best) * (1 + 1e-9), (loads, capacity, bound, best)
        plain = eplb.metrics.lower_bound(weight.astype(np.float32), 2 * gpus, 1, 1, gpus, gpu_capacity=capacity)
        assert bound[0] >= float(plain[0]) * (1 - 2.0**-20)
        tight += bool(bound[0] >= float(best) * (1 - 1e-3))
    assert tight >= 20  # near exact on most tiny layers (a bisection to 1e-4), not just a valid number


def test_equal_speeds_and_all_zero_layers():
    """Without capacities (every GPU 1.0), per layer, an all-zero layer's bound is 0."""
    weight = np.asarray([[6, 1, 1, 2], [0, 0, 0, 0], [9, 9, 0, 3]], np.float64)
    bound = eplb.metrics.lower_bound_lp(weight, 6, 3)
    assert bound[1] == 0.0
    for layer in (0, 2):
        assert bound[layer] <= oracle.best_time64(weight[layer], 6, 3, np.ones(3)) * (1 + 1e-9)
    # The optimum of layer 0 is 3.5 (enumeration); the total over three GPUs, lower_bound's value, is 10 / 3.
    assert bound[0] >= 3.5 * (1 - 1e-3) > float(eplb.metrics.lower_bound(weight[:1].astype(np.float32), 6, 1, 1, 3)[0])


def test_real_layer_between_the_pair_bound_and_the_placement():
    """A DeepSeek-V3-shaped layer (256 experts, 288 slots on 144 GPUs, half at 0.6): at least the library's
    bound and at most our placement's slowest time."""
    rng = np.random.default_rng(3)
    weight = rng.lognormal(0.0, 1.2, (1, 256)) * 1000
    capacity = np.where(np.arange(144) % 2 == 1, 0.6, 1.0)
    bound = eplb.metrics.lower_bound_lp(weight, 288, 144, gpu_capacity=capacity, tolerance=1e-3)
    pair = eplb.metrics.lower_bound(weight.astype(np.float32), 288, 1, 1, 144, gpu_capacity=capacity)
    placement = eplb.rebalance_experts(weight.astype(np.float32), 288, 1, 1, 144, gpu_capacity=capacity)
    slowest = eplb.metrics.gpu_times(weight.astype(np.float32), placement.phy2log, 144, capacity).max()
    assert float(pair[0]) <= bound[0] <= float(slowest) * (1 + 1e-6)


def test_torch_and_jax_inputs_give_the_numpy_values():
    weight = np.asarray([[5, 3, 8, 1, 0, 2]], np.float32)
    capacity = np.asarray([1.0, 0.6, 2.0, 1.0], np.float32)
    expected = eplb.metrics.lower_bound_lp(weight, 8, 4, gpu_capacity=capacity)
    torch = pytest.importorskip("torch")
    got = eplb.metrics.lower_bound_lp(torch.as_tensor(weight), 8, 4, gpu_capacity=torch.as_tensor(capacity))
    assert isinstance(got, np.ndarray) and np.array_equal(got, expected)
    jnp = pytest.importorskip("jax.numpy")
    got = eplb.metrics.lower_bound_lp(jnp.asarray(weight), 8, 4, gpu_capacity=jnp.asarray(capacity))
    assert np.array_equal(got, expected)


@pytest.mark.parametrize(
    ("args", "options", "error", "match"),
    [
        ((np.ones((1, 4)), 6, 2), {}, ValueError, "two slots per GPU"),
        ((np.ones(4), 4, 2), {}, ValueError, "2-D"),
        ((np.ones((1, 0)), 4, 2), {}, ValueError, "2-D"),
        ((-np.ones((1, 4)), 4, 2), {}, ValueError, "finite loads >= 0"),
        ((np.full((1, 4), np.nan), 4, 2), {}, ValueError, "finite loads >= 0"),
        ((np.ones((1, 4), bool), 4, 2), {}, TypeError, "real numbers"),
        ((np.ones((1, 4)), 4, 2), {"tolerance": 0.0}, ValueError, "tolerance"),
        ((np.ones((1, 4)), 4, 2), {"gpu_capacity": np.array([1.0, 0.0])}, ValueError, "fewer than the 4 experts"),
    ],
)
def test_bad_input(args, options, error, match):
    with pytest.raises(error, match=match):
        eplb.metrics.lower_bound_lp(*args, **options)


def test_without_scipy_a_clear_import_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # as if SciPy were not installed
    with pytest.raises(ImportError, match=r"needs SciPy \(pip install scipy, or eplb\[lp\]\)"):
        eplb.metrics.lower_bound_lp(np.ones((1, 4)), 4, 2)


def test_a_program_the_solver_cannot_settle_proves_nothing(monkeypatch):
    """Status 4 (numerical trouble) from every method: no proof, so the bound is ``lower_bound``'s, not more."""
    import scipy.optimize

    class Unsettled:
        status = 4

    calls = []
    monkeypatch.setattr(scipy.optimize, "linprog", lambda *a, **k: calls.append(k["method"]) or Unsettled())
    weight = np.asarray([[6, 1, 1, 2]], np.float64)
    bound = eplb.metrics.lower_bound_lp(weight, 6, 3)
    plain = eplb.metrics.lower_bound(weight.astype(np.float32), 6, 1, 1, 3)
    assert bound[0] == float(plain[0]) * (1 - 2.0**-20) and calls[:2] == ["highs-ds", "highs-ipm"]
