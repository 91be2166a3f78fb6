"""The Pallas polish kernel (eplb.kernels.polish_pallas) equals eplb.algorithms.polish.polish and
eplb.kernels.polish_numba bit for bit.

- Pallas' interpreter on the CPU (``interpret=True``) on random small inputs (1..4 nodes, 1..4 GPUs per node,
  1..5 slots per GPU, one expert, one slot per GPU, tied and all-zero loads, old placements near and far,
  limits below and above the heaviest GPU, ``max_iters`` 1, 2 and ``num_phy``) against the array-API function
  (numpy) and the numba twin, also under ``jax_enable_x64``;
- the kernel, and ``previous=`` with a tolerance through the CUDA branch's computation, lower to Triton calls
  on CUDA (the polish one more than before it was hooked in);
- on a JAX GPU: the kernel on the arguments ``stabilize`` passes it for the DeepSeek-V3 loads (288 slots on 32
  GPUs in 4 nodes, and on 144 GPUs) against numba and the array-API result, and ``rebalance_experts(...,
  previous=, balance_tolerance=0.005)`` on JAX GPU arrays against numpy, also inside ``jit``.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas.triton")

import jax
import jax.numpy as jnp

import eplb
from eplb.algorithms.polish import polish
from eplb.algorithms.relabel import replica_counts
from eplb.algorithms.repair import heaviest_gpu
from eplb.backends import _jax
from eplb.kernels import polish_pallas

from . import cases
from .conftest import needs_gpu

needs_numba = importlib.util.find_spec("numba") is not None


def test_fits():
    assert polish_pallas.fits(288, 256, 32, 4, 61) and polish_pallas.fits(288, 256, 144, 1, 61)
    assert polish_pallas.fits(4, 1, 4, 2)
    assert not polish_pallas.fits(8192, 256, 64, 1) and not polish_pallas.fits(10, 4, 4, 1)
    assert not polish_pallas.fits(12, 4, 4, 3) and not polish_pallas.fits(288, 256, 32, 4, 10**7)


# ---- Pallas' interpreter on the CPU.

# (nodes, GPUs per node, slots per GPU, experts) forced first: one expert, one slot per GPU, global, the largest.
FORCED = [(2, 2, 3, 1), (2, 3, 1, 4), (1, 4, 5, 9), (4, 4, 5, 37)]
LIMIT_FACTORS = np.array([0.9, 1.0, 1.05, 1.5], np.float32)  # of each row's heaviest GPU


def _placement(rng: np.random.Generator, batch: int, num_phy: int, num_log: int) -> np.ndarray:
    """``[batch, num_phy]`` int64: every expert once, the other slots random, shuffled."""
    rows = []
    for _ in range(batch):
        row = np.concatenate([np.arange(num_log), rng.integers(0, num_log, num_phy - num_log)])
        rng.shuffle(row)
        rows.append(row)
    return np.array(rows, np.int64)


def _near(rng: np.random.Generator, cur: np.ndarray, num_log: int) -> np.ndarray:
    """``cur`` with a random number of slots given random experts (an old placement close to it)."""
    old = cur.copy()
    for b in range(cur.shape[0]):
        k = int(rng.integers(0, cur.shape[1]))
        old[b, rng.permutation(cur.shape[1])[:k]] = rng.integers(0, num_log, k)
    return old


def _loads(rng: np.random.Generator, kind: int, batch: int, num_log: int) -> np.ndarray:
    """float32 ``[batch, num_log]``: random (kinds 0, 1), small integers (ties, kind 2) or all zero (kind 3)."""
    if kind == 2:
        return rng.integers(0, 5, (batch, num_log)).astype(np.float32)
    if kind == 3:
        return np.zeros((batch, num_log), np.float32)
    return (rng.random((batch, num_log)) * 100).astype(np.float32)


def _cases(rng: np.random.Generator, count: int = 24) -> list[tuple]:
    """``(phy2log, counts, old, weight, limit, num_gpus, num_nodes, max_iters)``: each case one shape (one
    interpreter compile), 1..4 rows with their own limits."""
    shapes = list(FORCED)
    while len(shapes) < count:
        nodes, per_node, per_gpu = (int(rng.integers(1, n)) for n in (5, 5, 6))
        shapes.append((nodes, per_node, per_gpu, int(rng.integers(1, nodes * per_node * per_gpu + 1))))
    out = []
    for k, (nodes, per_node, per_gpu, num_log) in enumerate(shapes):
        num_gpus = nodes * per_node
        num_phy, batch = num_gpus * per_gpu, int(rng.integers(1, 5))
        cur = _placement(rng, batch, num_phy, num_log)
        old = _near(rng, cur, num_log) if k % 2 else _placement(rng, batch, num_phy, num_log)
        weight = _loads(rng, k % 4, batch, num_log)
        counts = replica_counts(cur, num_log, xp=np)
        peak = heaviest_gpu(weight, cur, counts, num_gpus, xp=np)
        limit = (peak * rng.choice(LIMIT_FACTORS, (batch, 1))).astype(np.float32)
        max_iters = (1, 2, num_phy)[k % 3]
        out.append((cur, counts, old, weight, limit, num_gpus, nodes, max_iters))
    return out


def _check(args: tuple, dtype: type = np.int32) -> jax.Array:
    """The interpreted kernel on ``args`` (integers as ``dtype``) equals the array-API function and numba."""
    cur, counts, old, weight, limit, num_gpus, nodes, max_iters = args
    want = polish(cur, counts, old, weight, limit, num_gpus, nodes, max_iters, xp=np)
    ints = [jnp.asarray(a.astype(dtype)) for a in (cur, counts, old)]
    got = polish_pallas.polish(
        *ints, jnp.asarray(weight), jnp.asarray(limit), num_gpus, nodes, max_iters, interpret=True
    )
    assert got.shape == want.shape and got.dtype == ints[0].dtype
    np.testing.assert_array_equal(np.asarray(got), want)
    if needs_numba:
        from eplb.kernels import polish_numba

        np.testing.assert_array_equal(np.asarray(got), polish_numba.polish(*args))
    return got


def test_polish_under_the_interpreter_equals_the_reference_and_numba():
    seen = dict.fromkeys(("global", "hier", "one_expert", "one_slot", "zero", "short", "long", "below", "above"), 0)
    seen |= {"changed": 0, "several_swaps": 0}
    # 12 shapes (one interpreter compile each, about 2 s on CI's CPU): every kind counted below shows up on them
    # (24 did not add one).
    for args in _cases(np.random.default_rng(7), count=12):
        cur, _, _, weight, limit, num_gpus, nodes, max_iters = args
        got = np.asarray(_check(args))
        seen["global" if nodes == 1 else "hier"] += 1
        seen["one_expert"] += weight.shape[1] == 1
        seen["one_slot"] += cur.shape[1] == num_gpus
        seen["zero"] += int((weight == 0).all(axis=1).sum())
        seen["short" if max_iters < 3 else "long"] += 1
        peak = heaviest_gpu(weight, cur, replica_counts(cur, weight.shape[1], xp=np), num_gpus, xp=np)
        seen["below"] += int((limit < peak).sum())
        seen["above"] += int((limit > peak).sum())
        differ = (got != cur).sum(axis=1)
        seen["changed"] += int((differ > 0).sum())
        seen["several_swaps"] += int((differ > 2).sum())
    assert all(v > 0 for v in seen.values()), seen


def test_polish_under_x64():
    """int64 inputs (JAX with x64): the result keeps the dtype, the kernel works in int32."""
    with jax.enable_x64(True):
        got = _check(_cases(np.random.default_rng(7))[5], np.int64)
        assert got.dtype == jnp.int64


def _triton_calls(fn, *args, platform: str = "cuda") -> int:
    try:
        hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    except RuntimeError as err:
        if "Triton compilation handler" in str(err):
            pytest.skip("this jaxlib compiles Triton at lowering and has no CUDA plugin")
        raise
    return hlo.count("__gpu$xla.gpu.triton") + hlo.count("triton_kernel_call")


def test_polish_lowers_to_one_triton_kernel_on_cuda():
    """The kernel at the DeepSeek-V3 sizes (hierarchical and global) lowers to one Triton call for CUDA."""
    for num_gpus, nodes in ((32, 4), (144, 1)):
        args = [jax.ShapeDtypeStruct((58, n), d) for n, d in ((288, jnp.int32), (256, jnp.int32), (288, jnp.int32))]
        args += [jax.ShapeDtypeStruct((58, 256), jnp.float32), jax.ShapeDtypeStruct((58, 1), jnp.float32)]

        def call(*a, g=num_gpus, n=nodes):
            return polish_pallas.polish(*a, g, n, 288)

        assert _triton_calls(call, *args) == 1


def test_previous_with_tolerance_lowers_the_polish_kernel_on_cuda():
    """``previous=`` with a tolerance, impl "pallas": on CUDA the repair test's five Triton calls and the
    polish's (hierarchical; global: four and the polish's)."""
    sizes = (288, 8, 4, 32)
    knobs = (jax.ShapeDtypeStruct((), jnp.float32), None)
    args = (jax.ShapeDtypeStruct((58, 256), jnp.float32), jax.ShapeDtypeStruct((58, 288), jnp.int32))
    for hierarchical, want in ((True, 6), (False, 5)):
        options = (("hierarchical", hierarchical), ("policy", "greedy"), ("spill", 0))

        def call(w, p, k, o=options):
            return _jax._rebalance_stable(w, p, k, sizes, o, "pallas")

        assert _triton_calls(call, *args, knobs) == want


def test_stable_pallas_path_with_polish_under_the_interpreter(monkeypatch):
    """The CUDA branch's computation with a tolerance (the Pallas kernels, the polish's among them, run by
    Pallas' interpreter on the CPU; the tolerance traced) calls the polish kernel and places as numpy."""
    from eplb.kernels import relabel_pallas, repair_pallas

    monkeypatch.setattr(relabel_pallas, "relabel", functools.partial(relabel_pallas.relabel, interpret=True))
    for name in ("repair", "sticky_pack"):
        monkeypatch.setattr(repair_pallas, name, functools.partial(getattr(repair_pallas, name), interpret=True))
    kernel, swapped = polish_pallas.polish, []

    def interpreted(phy2log, *args, **kwargs):
        out = kernel(phy2log, *args, **kwargs, interpret=True)
        swapped.append(jnp.any(out != phy2log))  # traced: read after the call
        return out

    monkeypatch.setattr(polish_pallas, "polish", interpreted)
    rng = np.random.default_rng(1)  # a seed whose polish swaps in both rules
    weight = cases.random_int(rng, 3, 16).astype(np.float32)
    previous = eplb.rebalance_experts(cases.random_int(rng, 3, 16), 24, 4, 2, 8).phy2log
    for hierarchical, tolerance in ((True, 0.05), (False, 0.0)):
        want = eplb.rebalance_experts(
            weight, 24, 4, 2, 8, previous=previous, hierarchical=hierarchical, balance_tolerance=tolerance
        )
        options = (("hierarchical", hierarchical), ("policy", "greedy"), ("spill", 0))
        knobs = (jnp.asarray(tolerance, dtype=jnp.float32), None)
        swapped.clear()

        def call(w, p, k, o=options):
            out = _jax._rebalance_stable_pallas(w, p, (24, 4, 2, 8), o, k)
            return out, swapped[0]

        got, polished = jax.jit(call)(jnp.asarray(weight), jnp.asarray(previous), knobs)
        assert len(swapped) == 1 and bool(polished), "the polish kernel should run and swap something"
        for g, x in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), x)


# ---- The DeepSeek-V3 loads: stabilize's arguments.

CONFIGS = [((288, 8, 4, 32), {}), ((288, 8, 3, 144), {"hierarchical": False})]


@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
def test_polish_under_the_interpreter_on_deepseek_v3(config):
    """The interpreted kernel on the arguments stabilize passes it for the real loads
    (``balance_tolerance=0.005``): the array-API result and numba's."""
    new_w, previous = cases.polish_deepseek(config)
    args, want = cases.captured_polish(new_w, previous, config, tolerance=0.005)
    assert (want != args[0]).any(), "the polish should swap something on these loads"
    got = polish_pallas.polish(*(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args), interpret=True)
    np.testing.assert_array_equal(np.asarray(got), want)
    if needs_numba:
        from eplb.kernels import polish_numba

        np.testing.assert_array_equal(np.asarray(got), polish_numba.polish(*args))


# ---- On a JAX GPU.

GPU = needs_gpu("jax")


@GPU
@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
def test_gpu_kernel_equals_numba_on_deepseek_v3(config):
    """The kernel on a JAX GPU, on the arguments stabilize passes it for the real loads
    (``balance_tolerance=0.005``), against numba and the array-API result."""
    pytest.importorskip("numba")
    from eplb.kernels import polish_numba

    new_w, previous = cases.polish_deepseek(config)
    args, want = cases.captured_polish(new_w, previous, config, tolerance=0.005)
    assert (want != args[0]).any(), "the polish should swap something on these loads"
    device = jax.devices("gpu")[0]
    on_gpu = [jax.device_put(np.ascontiguousarray(a), device) if isinstance(a, np.ndarray) else a for a in args]
    got = polish_pallas.polish(*on_gpu)
    assert {d.platform for d in got.devices()} == {"gpu"}
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(got), polish_numba.polish(*args))


@GPU
@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
def test_gpu_previous_with_tolerance_equals_numpy(config):
    """``rebalance_experts(..., previous=, balance_tolerance=0.005)`` on JAX GPU arrays (the Pallas kernels,
    the polish's included) places as numpy, also inside ``jit``."""
    sizes, kw = config
    new_w, previous = cases.polish_deepseek(config)
    want = eplb.rebalance_experts(new_w, *sizes, previous=previous, **kw, balance_tolerance=0.005)
    device = jax.devices("gpu")[0]
    w, p = jax.device_put(new_w.astype(np.int32), device), jax.device_put(previous.astype(np.int32), device)
    default = eplb.rebalance_experts(w, *sizes, previous=p, **kw, balance_tolerance=0.005)
    inside_jit = jax.jit(
        lambda x, y: tuple(eplb.rebalance_experts(x, *sizes, previous=y, **kw, balance_tolerance=0.005))
    )(w, p)
    for got in (default, inside_jit):
        for g, x in zip(got, want, strict=True):
            assert {d.platform for d in g.devices()} == {"gpu"}
            np.testing.assert_array_equal(np.asarray(g), x)
