"""The fused Triton kernel of the greedy policy: same placement as the array-API path.

On a GPU the kernel is what torch CUDA inputs use by default, so the
cross-backend suite covers it; here it is also compared with torch ops on
the same device, and run under Triton's CPU interpreter where Triton is
installed (a subprocess, since the interpreter is chosen at import).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import eplb

from . import cases
from .conftest import Backend, needs_gpu, run_under_triton_interpreter

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(288, 8, 4, 32), (288, 8, 3, 144), (768, 32, 32, 256), (24, 4, 2, 4), (16, 4, 2, 16), (20, 4, 4, 4)]


def _experts(config: tuple[int, ...]) -> int:
    return {288: 256, 768: 512}.get(config[0], 16)


def _workload(config: tuple[int, ...]) -> np.ndarray:
    """Ties, integers near 2**31 per layer and float32 loads, as float32 rows."""
    rng = np.random.default_rng(sum(config))
    experts = _experts(config)
    rows = [cases.ties(rng, experts), cases.random_int(rng, 6, experts), cases.lognormal_f32(rng, 6, experts)]
    return np.concatenate(rows).astype(np.float32)


@needs_gpu("torch")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_kernel_equals_torch_ops_on_cuda(config):
    import torch

    from eplb.backends import _torch

    weight = _workload(config)
    hier = config[1] % config[2] == 0
    w = torch.as_tensor(weight, device="cuda")
    kernel = _torch.rebalance(w, *config, hierarchical=hier, impl="triton")
    ops = _torch.rebalance(w, *config, hierarchical=hier, impl="torch")
    for a, b in zip(kernel, ops, strict=True):
        assert a.device.type == "cuda" and a.dtype == torch.int64
        assert torch.equal(a, b)


@needs_gpu("torch")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_direct_launch_matches_first_launch_on_any_stream():
    """Calls after the first skip Triton's generic launch path; same results, on the caller's stream."""
    import torch

    from eplb.backends import _triton

    config = (288, 8, 4, 32)
    weight = torch.as_tensor(_workload(config), device="cuda")
    first = _triton.rebalance_greedy_cuda(weight, *config, True)
    key = (weight.device, *weight.shape, *config)
    assert _triton._LAUNCHES[key].kernel is not None or not _triton._DIRECT_LAUNCH
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        later = [_triton.rebalance_greedy_cuda(weight * 1, *config, True) for _ in range(3)]
    side.synchronize()
    for again in later:
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@needs_gpu("torch", count=2)
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernel_on_a_gpu_that_is_not_current():
    import torch

    config = (288, 8, 4, 32)
    weight = _workload(config)
    want = [torch.as_tensor(a) for a in eplb.rebalance_experts(weight, *config)]
    for index in (1, 0, 1):
        got = eplb.rebalance_experts(torch.as_tensor(weight, device=f"cuda:{index}"), *config)
        for a, b in zip(want, got, strict=True):
            assert b.device == torch.device("cuda", index)
            assert torch.equal(a, b.cpu())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_interpreter_skips_its_repeat_patching_and_still_restores():
    """The interpreter subprocesses skip Triton's repatching of ``triton.language`` at each helper call
    (tests/triton_interpreter.py; without it the interpreter tests take about 3x as long and CI runs past its
    time budget): a Triton whose internals moved fails here rather than by a slow CI. A launch still leaves the
    language as it found it, and the kernel still equals the reference."""
    script = """
        import numpy as np, torch
        import triton.language as tl
        import eplb
        from eplb.backends._triton import rebalance_greedy_cuda
        from tests import triton_interpreter
        before = {name: getattr(tl, name) for name in ("where", "load", "sum")}
        weight = np.array([[5, 1, 0, 3, 2, 2, 7, 1]], dtype=np.float32)
        got = rebalance_greedy_cuda(torch.tensor(weight), 12, 4, 2, 4, True)
        want = eplb.rebalance_experts(weight, 12, 4, 2, 4)
        assert all(np.array_equal(g.numpy(), w) for g, w in zip(got, want, strict=True))
        assert all(getattr(tl, name) is fn for name, fn in before.items())
        print("installed", triton_interpreter.INSTALLED)
        """
    run = run_under_triton_interpreter(script, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "installed True" in run.stdout, run.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernel_under_triton_interpreter():
    """Small configs through Triton's CPU interpreter, compared with the numpy path.

    The first four configs with their own policy run in tests/test_cross_backend.py's interpreter test (the same
    kinds of rows), so here they run with the global policy only; the last two with both. Each config takes three
    of the five kinds of loads, in turn (the CUDA test runs every kind)."""
    script = """
        import numpy as np, torch, eplb
        from eplb.backends._triton import rebalance_greedy_cuda
        from tests import cases
        rng = np.random.default_rng(0)
        signed_zeros = np.array([[-0.0, 0.0] * 8, [0.0, -0.0, 3.0, -0.0] * 4])  # -0.0 must tie with +0.0
        configs = [(24, 4, 2, 4), (20, 4, 4, 4), (32, 3, 2, 8), (16, 4, 2, 16), (40, 4, 2, 8), (48, 4, 4, 8)]
        for k, config in enumerate(configs):
            loads = (cases.ties(rng, 16), cases.random_int(rng, 4, 16), cases.lognormal_f32(rng, 4, 16), signed_zeros,
                     cases.tiny_loads(rng, 16))
            # three of the five load kinds per config, in turn (CI time): each kind runs on 3-4 configs
            for weight in [loads[i] for i in range(len(loads)) if (i + k) % len(loads) < 3]:
                weight = weight.astype(np.float32)
                for hier in {config[1] % config[2] == 0, False} if k >= 4 else {False}:
                    want = eplb.rebalance_experts(weight, *config, hierarchical=hier)
                    got = rebalance_greedy_cuda(torch.tensor(weight), *config, hier)
                    for a, b in zip(want, got):
                        assert np.array_equal(a, b.numpy()), (config, hier)
        print("interpreter ok")
        """
    out = run_under_triton_interpreter(script, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "interpreter ok" in out.stdout


def _jax_kernel_ready() -> bool:
    if not Backend.JAX_GPU.available():
        return False
    from eplb.backends import _jax

    return _jax.kernel_available()


@needs_gpu("jax")
@pytest.mark.skipif(not _jax_kernel_ready(), reason="needs triton and jax-triton")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_jax_kernel_equals_xla_on_gpu(config):
    import jax

    from eplb.backends import _jax

    weight = _workload(config)
    hier = config[1] % config[2] == 0
    w = jax.device_put(weight, jax.devices("gpu")[0])
    kernel = _jax.rebalance(w, *config, hierarchical=hier, impl="triton")
    inside_jit = jax.jit(lambda x: _jax.rebalance(x, *config, hierarchical=hier, impl="triton"))(w)
    xla = _jax.rebalance(w, *config, hierarchical=hier, impl="xla")
    for a, b, c in zip(kernel, inside_jit, xla, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("config", [(256, 288, 8, 4, 32), (256, 288, 1, 1, 144), (512, 768, 32, 32, 256)])
def test_greedy_kernel_compiles_for_sm90(config):
    """The kernel compiles to a cubin for H100/H200 without a GPU (the interpreter accepts more than the compiler)."""
    import triton

    from eplb.kernels.greedy_triton import greedy_kernel, launch_config

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    experts, replicas, groups, nodes, gpus = config
    _, meta = launch_config(58, experts, replicas, groups, nodes, gpus)
    num_warps = meta.pop("num_warps")
    pointers = {"weight_ptr": "*fp32", "recip_ptr": "*fp32", "phy2log_ptr": "*i64", "log2phy_ptr": "*i64"}
    pointers |= {"logcnt_ptr": "*i64", "scratch_ptr": "*i32"}
    try:
        source = ASTSource(greedy_kernel, {**pointers, **dict.fromkeys(meta, "constexpr")}, constexprs=meta)
    except TypeError:
        pytest.skip("this Triton's ahead-of-time compile API differs")
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]
