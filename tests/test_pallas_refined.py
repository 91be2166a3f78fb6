"""The refined policy's Pallas candidate kernel (JAX on CUDA): same placement as the numpy reference.

On the CPU it runs under Pallas' interpreter, on the loads where every part
of the policy acts (other group splits, capped replication, swaps stopped
early and cut by ``num_iters``, ties, ``-0.0``); on a JAX GPU it is what
``policy="refined"`` runs by default, compared at the benchmark shapes and on
real loads.
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb

from . import cases
from .conftest import needs_gpu
from .test_triton_refined import CUDA_CONFIGS, _experts, hot, interpreter_cases, refined_xp, zipf

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
refined_pallas = pytest.importorskip("eplb.kernels.refined_pallas")
_jax = pytest.importorskip("eplb.backends._jax")

GPU = needs_gpu("jax")


def _assert_same(got, want) -> None:
    for name, a, b in zip(("phy2log", "log2phy", "logcnt"), got, want, strict=True):
        a = np.asarray(a)
        assert a.dtype == jnp.arange(1).dtype, name  # JAX's default integer, as the XLA path
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=name)


@pytest.mark.parametrize("index", range(len(interpreter_cases())))
def test_interpreter_equals_numpy(index):
    config, weight, num_iters = interpreter_cases()[index]
    hierarchical = config[1] % config[2] == 0
    got = refined_pallas.placement(jnp.asarray(weight), config, hierarchical, interpret=True, num_iters=num_iters)
    _assert_same(got, refined_xp(weight, config, num_iters))


def test_interpreter_global_policy_and_vmap():
    """The global policy (one node of 8 GPUs), and a vmap batch folded into the layers."""
    config = (40, 4, 2, 8)
    weight = np.concatenate([hot(np.random.default_rng(3), 2, 16), zipf(np.random.default_rng(4), 2, 16)])
    got = jax.vmap(lambda w: refined_pallas.placement(w, config, False, interpret=True))(
        jnp.asarray(weight.reshape(2, 2, 16))
    )
    for b in range(2):
        want = eplb.rebalance_experts(weight[2 * b : 2 * b + 2], *config, hierarchical=False, policy="refined")
        _assert_same(tuple(a[b] for a in got), want)


@pytest.mark.parametrize(
    ("config", "hierarchical", "kernels"),
    [((288, 8, 4, 32), True, 2), ((288, 8, 3, 144), False, 1), ((768, 32, 32, 256), True, 1)],
    ids=["deepseek", "global", "94x512"],
)
def test_lowers_for_cuda(config, hierarchical, kernels):
    """Every primitive has a Pallas Triton lowering (checked without a GPU): the candidate kernel, plus the
    greedy kernel where the split may differ from greedy's; the CPU lowering of the default holds none."""
    from .test_pallas import _kernel_calls, _lower

    options = (("hierarchical", hierarchical), ("policy", "refined"), ("spill", 0))

    def default(w):
        return _jax._placement(w, config, options, "pallas")

    shape = (58, _experts(config))
    assert _kernel_calls(_lower(default, shape, platform="cuda")) == kernels
    assert _kernel_calls(_lower(default, shape, platform="cpu")) == 0


def test_fits_bounds_the_kernel():
    assert refined_pallas.fits(58, 256, 288, 4, 32)
    assert refined_pallas.fits(94, 512, 768, 32, 256)
    assert not refined_pallas.fits(1, 4096, 8192, 1, 1)  # too many slots per node
    assert not refined_pallas.fits(1, 256, 4096, 1, 64)  # 64 slots per GPU: too many swap candidates


# ---- On a JAX GPU: the default for policy="refined".


def _on_gpu(weight: np.ndarray):
    return jax.device_put(jnp.asarray(weight), jax.devices("gpu")[0])


@GPU
@pytest.mark.parametrize("config", CUDA_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_gpu_default_equals_numpy(config):
    rng = np.random.default_rng(11)
    experts = _experts(config)
    weight = np.concatenate([hot(rng, 4, experts), zipf(rng, 4, experts), cases.lognormal_f32(rng, 4, experts)])
    w = _on_gpu(weight)
    for hierarchical in (True, False) if config[1] % config[2] == 0 else (False,):
        want = eplb.rebalance_experts(weight, *config, hierarchical=hierarchical, policy="refined")
        default = eplb.rebalance_experts(w, *config, hierarchical=hierarchical, policy="refined")
        inside_jit = jax.jit(
            lambda x, h=hierarchical: eplb.rebalance_experts(x, *config, hierarchical=h, policy="refined")
        )(w)
        xla = _jax.rebalance(w, *config, hierarchical=hierarchical, policy="refined", impl="xla")
        for got in (default, inside_jit, xla):
            assert {d.platform for d in got[0].devices()} == {"gpu"}
            _assert_same(got, want)


@GPU
def test_gpu_interpreter_cases_and_vmap():
    for config, weight, num_iters in interpreter_cases():
        hierarchical = config[1] % config[2] == 0
        got = refined_pallas.placement(_on_gpu(weight), config, hierarchical, num_iters=num_iters)
        _assert_same(got, refined_xp(weight, config, num_iters))
    config = (288, 8, 4, 32)
    weight = hot(np.random.default_rng(2), 6, 256)
    got = jax.jit(jax.vmap(lambda x: eplb.rebalance_experts(x, *config, policy="refined")))(
        _on_gpu(weight.reshape(3, 2, 256))
    )
    for b in range(3):
        _assert_same(
            tuple(a[b] for a in got), eplb.rebalance_experts(weight[2 * b : 2 * b + 2], *config, policy="refined")
        )


@GPU
def test_gpu_real_deepseek_loads():
    weight = cases.deepseek_v3()
    if weight is None:
        pytest.skip("../shared/data not present")
    w = _on_gpu(weight.astype(np.int32))
    for config in [(288, 8, 4, 32), (288, 8, 3, 144)]:
        want = eplb.rebalance_experts(weight, *config, policy="refined")
        _assert_same(eplb.rebalance_experts(w, *config, policy="refined"), want)


@needs_gpu("jax", count=2)
def test_gpu_kernels_on_the_second_device():
    """Both Pallas kernels run where the array lives, not on the default device."""
    gpus = jax.devices("gpu")
    config = (288, 8, 4, 32)
    weight = hot(np.random.default_rng(9), 4, 256)
    w = jax.device_put(jnp.asarray(weight), gpus[1])
    for policy in ("greedy", "refined"):
        got = eplb.rebalance_experts(w, *config, policy=policy)
        assert all(a.devices() == {gpus[1]} for a in got)
        _assert_same(got, eplb.rebalance_experts(weight, *config, policy=policy))
