"""The Pallas knobs kernels (eplb.kernels.repair_pallas) equal eplb.kernels.repair_numba and the array-API
functions bit for bit.

- Pallas' interpreter on the CPU (``interpret=True``) on tests/test_kernels_repair_triton.py's random small
  inputs (hierarchical and global, one expert per group, one slot per GPU, tied and all-zero loads, invalid
  rows, budgets around the start's moves, limits below and above the peak, short ``max_iters``): repair and
  sticky_pack against the numba kernels and the array-API functions, also under ``jax_enable_x64``;
- ``previous=`` with ``tolerance`` / ``max_moves`` through the CUDA branch's computation with the kernels
  interpreted, against numpy's placement; on CUDA it lowers to the four Pallas kernels (placement,
  relabelling, sticky repacking, local search);
- on a JAX GPU: the kernels on the arguments ``stabilize`` passes them for the DeepSeek-V3 loads (288 slots on
  32 GPUs in 4 nodes, and on 144 GPUs) against numba, and ``rebalance_experts(..., previous=,
  balance_tolerance= / max_moves=)`` on JAX GPU arrays against numpy, also inside ``jit``.
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
from eplb.algorithms.relabel import align_slots, replica_counts
from eplb.algorithms.repair import repair, sticky_pack
from eplb.backends import _jax
from eplb.kernels import polish_pallas, relabel_pallas, repair_pallas

from . import cases
from .conftest import needs_gpu

needs_numba = importlib.util.find_spec("numba") is not None


def test_fits():
    assert repair_pallas.fits(288, 256, 32, 4, 61) and repair_pallas.fits(288, 256, 144, 1, 61)
    assert repair_pallas.fits(4, 1, 4, 2)
    assert not repair_pallas.fits(8192, 256, 64, 1) and not repair_pallas.fits(10, 4, 4, 1)
    assert not repair_pallas.fits(12, 4, 4, 3) and not repair_pallas.fits(288, 256, 32, 4, 10**6)


def _repair_cases() -> list[tuple]:
    """A subset of test_kernels_repair_triton's repair cases (each shape one interpreter compile): six random
    ones (two with a short max_iters) and four with one expert or one slot per GPU."""
    from .test_kernels_repair_triton import _repair_cases as every

    out = every(np.random.default_rng(5))
    return out[:6] + out[21:25]


def _check_repair(args: tuple) -> tuple:
    start, cnt, old, weight, limit, budget, valid, gpus, nodes, group_size, max_iters = args
    want = repair(start, cnt, old, weight, limit, budget, valid, gpus, nodes, group_size, max_iters=max_iters, xp=np)
    got = repair_pallas.repair(
        *(jnp.asarray(a) for a in (start, cnt, old, weight, limit, budget, valid)),
        gpus,
        nodes,
        group_size,
        max_iters,
        interpret=True,
    )
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), w)
    if needs_numba:
        from eplb.kernels import repair_numba

        numba = repair_numba.repair(start, cnt, old, weight, limit, budget, valid, gpus, nodes, group_size, max_iters)
        for g, n in zip(got, numba, strict=True):
            np.testing.assert_array_equal(np.asarray(g), n)
    return got


def test_repair_under_the_interpreter_equals_numba_and_the_array_api():
    seen = {"global": 0, "hier": 0, "short": 0, "invalid": 0, "one_slot": 0, "one_expert": 0, "changed": 0}
    for args in _repair_cases():
        start, _, _, weight, _, _, valid, gpus, nodes, _, max_iters = args
        got = _check_repair(args)
        seen["global" if nodes == 1 else "hier"] += 1
        seen["short"] += max_iters < 4
        seen["invalid"] += int((~valid).sum())
        seen["one_slot"] += start.shape[1] == gpus
        seen["one_expert"] += weight.shape[1] == 1
        seen["changed"] += int((np.asarray(got[0]) != start).any(axis=1).sum())
    assert all(v > 0 for v in seen.values()), seen


def test_repair_under_x64():
    """int64 inputs (JAX with x64): the outputs keep the dtypes, the kernel works in int32."""
    with jax.enable_x64(True):
        args = _repair_cases()[1]
        got = _check_repair(args)
        assert [g.dtype for g in got] == [jnp.int64] * 3


def test_sticky_pack_align_counts_under_the_interpreter():
    from .test_kernels_repair_triton import _pack_cases

    for base, old, item_load, limit, packs, experts in _pack_cases(np.random.default_rng(5)):
        want = sticky_pack(base, old, item_load, limit, packs, xp=np)
        got = repair_pallas.sticky_pack(jnp.asarray(base), jnp.asarray(old), item_load, limit, packs, interpret=True)
        np.testing.assert_array_equal(np.asarray(got), want)
        if needs_numba:
            from eplb.kernels import repair_numba

            np.testing.assert_array_equal(np.asarray(got), repair_numba.sticky_pack(base, old, item_load, limit, packs))
        b, o = jnp.asarray(base), jnp.asarray(old)
        np.testing.assert_array_equal(
            np.asarray(repair_pallas.align_slots(b, o, packs)), align_slots(base, old, packs, xp=np)
        )
        np.testing.assert_array_equal(
            np.asarray(repair_pallas.replica_counts(b, experts)), replica_counts(base, experts, xp=np)
        )


def _interpreted(monkeypatch) -> None:
    """The CUDA branch's kernels run by Pallas' interpreter (on the CPU)."""
    monkeypatch.setattr(relabel_pallas, "relabel", functools.partial(relabel_pallas.relabel, interpret=True))
    for name in ("repair", "sticky_pack"):
        monkeypatch.setattr(repair_pallas, name, functools.partial(getattr(repair_pallas, name), interpret=True))
    monkeypatch.setattr(polish_pallas, "polish", functools.partial(polish_pallas.polish, interpret=True))


def test_stable_pallas_path_with_knobs_under_the_interpreter(monkeypatch):
    """The CUDA branch's computation with the knobs (fresh placement, Pallas relabelling, Pallas repacking and
    local search, XLA rest; the knobs traced), run on the CPU with the kernels interpreted: numpy's placement."""
    _interpreted(monkeypatch)
    rng = np.random.default_rng(3)
    weight = cases.random_int(rng, 3, 16)
    previous = eplb.rebalance_experts(cases.random_int(rng, 3, 16), 24, 4, 2, 8).phy2log
    ties = cases.ties(rng, 16)[:3].astype(np.float32)
    for w_np, hierarchical, knobs in (
        (weight, True, {"balance_tolerance": 0.05, "max_moves": 3}),
        (weight, False, {"balance_tolerance": 0.0}),
        (ties, True, {"max_moves": 1}),
    ):
        want = eplb.rebalance_experts(w_np, 24, 4, 2, 8, previous=previous, hierarchical=hierarchical, **knobs)
        options = (("hierarchical", hierarchical), ("policy", "greedy"), ("spill", 0))
        tol, moves = knobs.get("balance_tolerance"), knobs.get("max_moves")
        k = (
            None if tol is None else jnp.asarray(tol, dtype=jnp.float32),
            None if moves is None else jnp.asarray(moves, dtype=jnp.int32),
        )
        got = jax.jit(lambda w, p, k, o=options: _jax._rebalance_stable_pallas(w, p, (24, 4, 2, 8), o, k))(
            jnp.asarray(w_np.astype(np.float32)), jnp.asarray(previous), k
        )
        for g, x in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), x)


def _triton_calls(fn, *args, platform: str) -> int:
    try:
        hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    except RuntimeError as err:
        if "Triton compilation handler" in str(err):
            pytest.skip("this jaxlib compiles Triton at lowering and has no CUDA plugin")
        raise
    return hlo.count("__gpu$xla.gpu.triton") + hlo.count("triton_kernel_call")


def test_knobs_lower_to_the_pallas_kernels_on_cuda():
    """``previous=`` with the knobs, impl "pallas": on CUDA the placement's (twice: the fresh one and the near
    split's per-node one), the relabelling's, the repacking's and the local search's kernels; on the CPU
    none."""
    sizes = (288, 8, 4, 32)
    options = (("hierarchical", True), ("policy", "greedy"), ("spill", 0))
    knobs = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))

    def call(w, p, k):
        return _jax._rebalance_stable(w, p, k, sizes, options, "pallas")

    args = (jax.ShapeDtypeStruct((58, 256), jnp.float32), jax.ShapeDtypeStruct((58, 288), jnp.int32))
    assert _triton_calls(call, *args, knobs, platform="cuda") == 6  # with the polish
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    cpu_args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu) for a in args]
    hlo = jax.jit(call).trace(*cpu_args, knobs).lower().as_text()
    assert hlo.count("__gpu$xla.gpu.triton") + hlo.count("triton_kernel_call") == 0


# ---- On a JAX GPU.

GPU = needs_gpu("jax")
CONFIGS = [((288, 8, 4, 32), {}), ((288, 8, 3, 144), {"hierarchical": False})]


def _deepseek(config: tuple) -> tuple[np.ndarray, np.ndarray]:
    sizes, kw = config
    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {cases.DATA}"
    return new_w, eplb.rebalance_experts(old_w, *sizes, **kw).phy2log


@GPU
@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
@pytest.mark.parametrize("knobs", [{"tolerance": 0.005}, {"tolerance": 0.0, "max_moves": 16}], ids=["tol", "moves"])
def test_gpu_kernels_equal_numba_on_deepseek_v3(config, knobs):
    """repair and sticky_pack on a JAX GPU, on the arguments the array-API stabilize passes them for the real
    loads, against numba and the array-API results."""
    pytest.importorskip("numba")
    from eplb.kernels import repair_numba

    from .test_kernels_repair import _captured

    new_w, previous = _deepseek(config)
    calls = _captured(new_w, previous, config[0], **knobs)
    device = jax.devices("gpu")[0]

    def gpu(x):
        return jax.device_put(np.ascontiguousarray(x), device) if isinstance(x, np.ndarray) else x

    for fn, args, kwargs, want in calls:
        if fn is repair:
            got = repair_pallas.repair(*[gpu(a) for a in args], max_iters=kwargs["max_iters"])
            numba = repair_numba.repair(*args, kwargs["max_iters"])
            for g, w, n in zip(got, want, numba, strict=True):
                np.testing.assert_array_equal(np.asarray(g), w)
                np.testing.assert_array_equal(np.asarray(g), n)
        elif fn is sticky_pack:
            got = repair_pallas.sticky_pack(*[gpu(a) for a in args])
            np.testing.assert_array_equal(np.asarray(got), want)
            np.testing.assert_array_equal(np.asarray(got), repair_numba.sticky_pack(*args))
        else:
            kernel = {align_slots: repair_pallas.align_slots, replica_counts: repair_pallas.replica_counts}[fn]
            np.testing.assert_array_equal(np.asarray(kernel(*[gpu(a) for a in args])), want)


@GPU
@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
@pytest.mark.parametrize("knobs", [{"balance_tolerance": 0.005}, {"max_moves": 16}], ids=["tolerance", "max_moves"])
def test_gpu_previous_with_knobs_equals_numpy(config, knobs):
    """``rebalance_experts(..., previous=, knob)`` on JAX GPU arrays runs the Pallas kernels (four Triton calls;
    five where groups stay on nodes: the near split's per-node placement) and places as numpy, also inside
    ``jit``."""
    sizes, kw = config
    new_w, previous = _deepseek(config)
    want = eplb.rebalance_experts(new_w, *sizes, previous=previous, **kw, **knobs)
    device = jax.devices("gpu")[0]
    w, p = jax.device_put(new_w.astype(np.int32), device), jax.device_put(previous.astype(np.int32), device)
    default = eplb.rebalance_experts(w, *sizes, previous=p, **kw, **knobs)
    inside_jit = jax.jit(lambda x, y: tuple(eplb.rebalance_experts(x, *sizes, previous=y, **kw, **knobs)))(w, p)
    hierarchical = bool(kw.get("hierarchical", True))
    for got in (default, inside_jit):
        for g, x in zip(got, want, strict=True):
            assert {d.platform for d in g.devices()} == {"gpu"}
            np.testing.assert_array_equal(np.asarray(g), x)
    options = (("hierarchical", hierarchical), ("policy", "greedy"), ("spill", 0))
    k = (
        None if "balance_tolerance" not in knobs else jnp.float32(knobs["balance_tolerance"]),
        None if "max_moves" not in knobs else jnp.int32(knobs["max_moves"]),
    )
    lowered = jax.jit(lambda x, y, z: _jax._rebalance_stable(x, y, z, sizes, options, "pallas")).lower(w, p, k)
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call") == (6 if hierarchical else 5)
