"""The Pallas relabelling (eplb.kernels.relabel_pallas) equals eplb.algorithms.relabel.relabel bit for bit.

- Pallas' interpreter on the CPU (``interpret=True``) against the array-API function on numpy and
  :func:`eplb.kernels.relabel_numba.relabel`, on a few shapes of tests/test_kernels_relabel.py's random,
  permuted, one-expert, one-slot-per-GPU and tied placements (hierarchical and global, every layer of a shape
  in one launch) and on real-shaped ones (288 slots on 32 GPUs in 4 nodes, and on 144 GPUs), also under
  ``jax_enable_x64`` (int64 inputs, int32 loop bounds);
- the kernel lowers to one Triton call for CUDA, and ``previous=`` without knobs lowers to the two Pallas
  kernels (placement, relabelling) on CUDA and to none on the CPU;
- on a JAX GPU, ``rebalance_experts(..., previous=)`` (which runs it) against numpy on the real DeepSeek-V3
  loads at both shapes, and the kernel itself.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("jax.experimental.pallas.triton")

import jax
import jax.numpy as jnp

import eplb
from eplb.algorithms.relabel import relabel
from eplb.backends import _jax
from eplb.kernels import relabel_numba, relabel_pallas

from . import cases
from .conftest import needs_gpu

# (slots, GPUs, nodes) of the random cases run under the interpreter (each a compile): hierarchical and global,
# one slot per GPU or several; 24 cases of 3 layers, 4 of them permuted, 7 one-expert.
SHAPES = [(27, 9, 3), (12, 4, 1), (8, 8, 2)]


def _random_cases() -> list[tuple[np.ndarray, np.ndarray, int, int, int]]:
    """tests/test_kernels_relabel.py's random cases of SHAPES, the layers of each shape batched."""
    from .test_kernels_relabel import _random_cases as random_cases

    groups = defaultdict(list)
    for new, old, gpus, nodes, experts in random_cases(np.random.default_rng(0)):
        if (new.shape[1], gpus, nodes) in SHAPES:
            groups[new.shape[1], gpus, nodes].append((new, old, experts))
    out = []
    for (_, gpus, nodes), items in sorted(groups.items()):
        experts = max(e for _, _, e in items)
        out.append((np.concatenate([n for n, _, _ in items]), np.concatenate([o for _, o, _ in items]), gpus, nodes))
        out[-1] += (experts,)
    return out


def _interpreted(new: np.ndarray, old: np.ndarray, gpus: int, nodes: int) -> np.ndarray:
    return np.asarray(relabel_pallas.relabel(jnp.asarray(new), jnp.asarray(old), gpus, nodes, interpret=True))


def test_fits():
    assert relabel_pallas.fits(61, 288, 32, 4) and relabel_pallas.fits(61, 288, 144, 1)
    assert not relabel_pallas.fits(61, 4096, 2048, 1) and not relabel_pallas.fits(61, 10, 4, 1)
    assert not relabel_pallas.fits(61, 32, 8, 3)


def test_interpreter_equals_the_array_api_relabelling():
    got_shapes, one_expert = set(), 0
    for new, old, gpus, nodes, experts in _random_cases():
        want = relabel(new, old, gpus, nodes, xp=np)
        np.testing.assert_array_equal(relabel_numba.relabel(new, old, gpus, nodes, experts), want)
        np.testing.assert_array_equal(_interpreted(new, old, gpus, nodes), want)
        got_shapes.add((new.shape[1], gpus, nodes))
        one_expert += int((new == 0).all(axis=1).sum())
    assert got_shapes == set(SHAPES) and one_expert > 0


def _real_cases() -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """Placements of two DeepSeek-V3 load files: hierarchical 288/32/4 and global 288/144 (two layers each)."""
    old_w, new_w = cases.deepseek_v3()[8:10], cases.deepseek_v3("prefill_in2048.json")[8:10]
    out = []
    for config, kw, nodes in (((288, 8, 4, 32), {}, 4), ((288, 8, 3, 144), {"hierarchical": False}, 1)):
        old = eplb.rebalance_experts(old_w, *config, **kw).phy2log
        new = eplb.rebalance_experts(new_w, *config, **kw).phy2log
        out.append((new, old, config[3], nodes))
    return out


def test_interpreter_on_real_shapes_and_under_x64():
    assert cases.deepseek_v3() is not None, f"real loads expected at {cases.DATA}"
    (hier, hier_old, _, _), (flat, flat_old, _, _) = _real_cases()
    # hierarchical against another file's placement and itself in reverse layer order (one launch); global
    # against another file's placement; then random hierarchical and global cases under x64
    for a, b, gpus, nodes in (
        (np.concatenate([hier, hier]), np.concatenate([hier_old, hier[::-1]]), 32, 4),
        (flat, flat_old, 144, 1),
    ):
        want = relabel(a, b, gpus, nodes, xp=np)
        np.testing.assert_array_equal(relabel_numba.relabel(a, b, gpus, nodes, 256), want)
        np.testing.assert_array_equal(_interpreted(a, b, gpus, nodes), want)
    with jax.enable_x64(True):  # int64 ids; the kernel's loop bounds and indices stay int32
        for new, old, gpus, nodes, _ in _random_cases()[:2]:
            got = relabel_pallas.relabel(jnp.asarray(new), jnp.asarray(old), gpus, nodes, interpret=True)
            assert got.dtype == jnp.int64
            np.testing.assert_array_equal(np.asarray(got), relabel(new, old, gpus, nodes, xp=np))


def _triton_calls(fn, *args: jax.ShapeDtypeStruct, platform: str) -> int:
    try:
        hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    except RuntimeError as err:
        if "Triton compilation handler" in str(err):
            pytest.skip("this jaxlib compiles Triton at lowering and has no CUDA plugin")
        raise
    return hlo.count("__gpu$xla.gpu.triton") + hlo.count("triton_kernel_call")


@pytest.mark.parametrize("sizes", [(32, 4), (144, 1)], ids=["hier", "global"])
def test_lowers_to_one_triton_call_on_cuda(sizes):
    kept = jax.ShapeDtypeStruct((61, sizes[0], sizes[0]), jnp.int32)
    assert _triton_calls(lambda k: relabel_pallas.assignment(k, *sizes), kept, platform="cuda") == 1


@pytest.mark.parametrize("config", [(288, 8, 4, 32, True), (288, 8, 3, 144, False)], ids=["hier", "global"])
def test_previous_lowers_to_the_pallas_kernels_on_cuda(config):
    """``previous=`` without knobs, impl "pallas": the placement's and the relabelling's kernels on CUDA; on the
    CPU none (the host callback or XLA)."""
    *sizes, hierarchical = config
    options = (("hierarchical", hierarchical), ("policy", "greedy"), ("spill", 0))

    def call(w, p):
        return _jax._rebalance_stable(w, p, (None, None), tuple(sizes), options, "pallas")

    args = (jax.ShapeDtypeStruct((58, 256), jnp.float32), jax.ShapeDtypeStruct((58, 288), jnp.int32))
    assert _triton_calls(call, *args, platform="cuda") == 2
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    cpu_args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu) for a in args]
    hlo = jax.jit(call).trace(*cpu_args).lower().as_text()
    assert hlo.count("__gpu$xla.gpu.triton") + hlo.count("triton_kernel_call") == 0


def test_stable_pallas_path_under_the_interpreter(monkeypatch):
    """The CUDA branch's computation (fresh placement, Pallas relabelling, XLA rest), run on the CPU with the
    relabelling interpreted: the placement of numpy's ``previous=``."""
    monkeypatch.setattr(relabel_pallas, "relabel", functools.partial(relabel_pallas.relabel, interpret=True))
    rng = np.random.default_rng(3)
    weight = cases.random_int(rng, 3, 16)
    previous = eplb.rebalance_experts(cases.random_int(rng, 3, 16), 24, 4, 2, 8).phy2log
    for hierarchical in (True, False):
        want = eplb.rebalance_experts(weight, 24, 4, 2, 8, previous=previous, hierarchical=hierarchical)
        options = (("hierarchical", hierarchical), ("policy", "greedy"), ("spill", 0))
        got = jax.jit(lambda w, p, o=options: _jax._rebalance_stable_pallas(w, p, (24, 4, 2, 8), o))(
            jnp.asarray(weight.astype(np.int32)), jnp.asarray(previous)
        )
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), w)


# ---- On a JAX GPU.

GPU = needs_gpu("jax")
DEEPSEEK = [((288, 8, 4, 32), {}, 4), ((288, 8, 3, 144), {"hierarchical": False}, 1)]


@GPU
@pytest.mark.parametrize("config", DEEPSEEK, ids=["hier", "global"])
def test_gpu_kernel_equals_numpy(config):
    (sizes, kw, nodes), gpus = config, config[0][3]
    assert cases.deepseek_v3() is not None, f"real loads expected at {cases.DATA}"
    old = eplb.rebalance_experts(cases.deepseek_v3(), *sizes, **kw).phy2log
    new = eplb.rebalance_experts(cases.deepseek_v3("prefill_in2048.json"), *sizes, **kw).phy2log
    device = jax.devices("gpu")[0]
    for a, b in ((new, old), (old, old), (new, new[::-1].copy())):
        got = relabel_pallas.relabel(jax.device_put(a.astype(np.int32), device), jax.device_put(b, device), gpus, nodes)
        np.testing.assert_array_equal(np.asarray(got), relabel(a, b, gpus, nodes, xp=np))


@GPU
@pytest.mark.parametrize("config", DEEPSEEK, ids=["hier", "global"])
def test_gpu_previous_equals_numpy(config):
    """``rebalance_experts(..., previous=)`` on JAX GPU arrays runs the Pallas kernels and places as numpy, also
    inside ``jit``; the XLA path agrees."""
    sizes, kw, _ = config
    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    previous = eplb.rebalance_experts(old_w, *sizes, **kw).phy2log
    want = eplb.rebalance_experts(new_w, *sizes, previous=previous, **kw)
    device = jax.devices("gpu")[0]
    w, p = jax.device_put(new_w.astype(np.int32), device), jax.device_put(previous.astype(np.int32), device)
    default = eplb.rebalance_experts(w, *sizes, previous=p, **kw)
    inside_jit = jax.jit(lambda x, y: tuple(eplb.rebalance_experts(x, *sizes, previous=y, **kw)))(w, p)
    xla = _jax.rebalance_stable(w, p, *sizes, impl="xla", hierarchical=bool(kw.get("hierarchical", True)))
    for got in (default, inside_jit, xla):
        for g, x in zip(got, want, strict=True):
            assert {d.platform for d in g.devices()} == {"gpu"}
            np.testing.assert_array_equal(np.asarray(g), x)
    options = (("hierarchical", bool(kw.get("hierarchical", True))), ("policy", "greedy"), ("spill", 0))
    hlo = jax.jit(lambda x, y: _jax._rebalance_stable(x, y, (None, None), sizes, options, "pallas")).lower(w, p)
    text = hlo.as_text()
    assert text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call") == 2
