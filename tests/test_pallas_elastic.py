"""The Pallas kernels on JAX GPUs' active_gpus= + previous= path equal the array API bit for bit.

Failed GPUs' slots hold -1 there: eplb.kernels.repair_pallas's sticky_pack (initial_load, reserve) and repair
(-1 slots), and eplb.kernels.relabel_pallas.relabel_pinned, against eplb.algorithms.repair.sticky_pack /
repair and eplb.algorithms.elastic.relabel_pinned:

- under Pallas' interpreter on the CPU: random rows of a few fixed shapes (every row its own failed GPUs,
  limits, budgets; one compile a shape), and degenerate ones (one expert, one slot per GPU or pack, every GPU
  but one failed, every GPU failed, all-zero loads); and place_elastic_stable end to end on JAX arrays with the
  kernels plugged in (global with a GPU back from a failure, hierarchical with the mask traced, so both rules
  run) against numpy;
- the CUDA branch lowers to the kernels, the CPU branch to none;
- on a JAX GPU: each kernel on the arguments place_elastic_stable passes it for the DeepSeek-V3 loads, and
  rebalance_experts(previous=, active_gpus=) on JAX GPU arrays (which runs them), inside jit too, equal to
  numpy.
"""

from __future__ import annotations

import functools
import importlib.util
import re

import numpy as np
import pytest

pytest.importorskip("jax")
if importlib.util.find_spec("jax.experimental.pallas.triton") is None:
    pytest.skip("this JAX has no Pallas Triton lowering", allow_module_level=True)

import jax
import jax.numpy as jnp

import eplb
from eplb.algorithms.elastic import _live_gpu_loads, place_elastic_stable, relabel_pinned
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.relabel import align_slots, count_moves, replica_counts
from eplb.algorithms.repair import repair, sticky_pack
from eplb.backends import _jax
from eplb.kernels import polish_pallas, relabel_pallas, repair_pallas

from . import cases
from .conftest import needs_gpu
from .test_kernels_repair import _loads as _weights  # float32 loads with ties, zeros, one hot

_interp = functools.partial


def _dead(rng: np.random.Generator, rows: int, gpus: int) -> np.ndarray:
    """[rows, G] failed GPUs: a few per row, and rows with every GPU but one failed, or every GPU failed."""
    dead = rng.random((rows, gpus)) < 0.3
    dead[0] = True
    dead[0, rng.integers(gpus)] = False
    dead[1] = True
    dead[2] = False
    return dead


def _sticky_rows(rng: np.random.Generator, packs: int, capacity: int, experts: int, rows: int = 8) -> tuple:
    """Items of the live slots plus -1 items (load -1) on the failed packs' slots, old with -1 there and
    elsewhere; limits from 0 to unbounded (MAX_LOAD); rows 0-2 as :func:`_dead` says."""
    n = packs * capacity
    dead = _dead(rng, rows, packs)
    dead_slot = np.repeat(dead, capacity, axis=1)
    base = np.where(dead_slot, -1, rng.integers(0, experts, (rows, n)))
    base = np.stack([row[rng.permutation(n)] for row in base])
    old = np.where(rng.random((rows, 1)) < 0.5, base[:, rng.permutation(n)], rng.integers(0, experts, (rows, n)))
    old = np.where(dead_slot | (rng.random((rows, n)) < 0.1), -1, old)
    weight = _weights(rng, rows, experts)
    weight[3] = 0.0
    item_load = np.where(base >= 0, np.take_along_axis(weight, np.maximum(base, 0), axis=1), -1).astype(np.float32)
    total = np.maximum(item_load, 0).sum(axis=1, keepdims=True, dtype=np.float32)
    factor = np.array([0.0, 0.5, 1.0, 1.3, 2.0], np.float32)[rng.integers(0, 5, (rows, 1))]
    limit = (total * factor / np.float32(packs)).astype(np.float32)
    limit[-1] = MAX_LOAD
    initial = np.where(dead, np.inf, 0.0).astype(np.float32)
    return base, old, item_load, limit, packs, initial


def _repair_rows(rng: np.random.Generator, nodes: int, gpus: int, per_gpu: int, experts: int, rows: int = 12) -> tuple:
    """Starts with failed GPUs (-1 on all their slots; old -1 there and on a few live slots), live slots
    partly rewritten, every expert held where room allows; limits 0 .. above the start's peak; budgets around
    the start's moves; one invalid row."""
    slots = gpus * per_gpu
    dead_slot = np.repeat(_dead(rng, rows, gpus), per_gpu, axis=1)
    old, start = cases.starts_with_failed_gpus(rng, dead_slot, experts, cover=1.0)
    weight = _weights(rng, rows, experts)
    weight[3] = 0.0
    cnt = replica_counts(start, experts, xp=np)
    peak = np.max(_live_gpu_loads(weight, start, cnt, gpus, xp=np), axis=-1, keepdims=True)
    limit = (peak * np.array([0.0, 0.5, 0.9, 1.0, 1.2], np.float32)[rng.integers(0, 5, (rows, 1))]).astype(np.float32)
    limit[5:8] = 0.0  # a search wherever a move helps
    budget = count_moves(start, old, gpus, xp=np)[:, None] + np.array([0, 1, 5, 10**6])[rng.integers(0, 4, (rows, 1))]
    budget[5:8] = 10**6
    valid = np.ones((rows, 1), bool)
    valid[4] = False
    group_size = experts if nodes == 1 else experts // (2 * nodes)
    return start, cnt, old, weight, limit, budget, valid, gpus, nodes, group_size, min(slots, max(64, 4 * gpus))


def _relabel_rows(rng: np.random.Generator, gpus: int, nodes: int, per_gpu: int, experts: int, rows: int = 8) -> tuple:
    """-1 exactly on new's failed GPUs, old's -1 anywhere, old a permutation of new in half the rows."""
    slots = gpus * per_gpu
    dead = _dead(rng, rows, gpus)
    new = np.where(np.repeat(dead, per_gpu, axis=1), -1, rng.integers(0, experts, (rows, slots)))
    old = np.where(rng.random((rows, 1)) < 0.5, new[:, rng.permutation(slots)], rng.integers(0, experts, new.shape))
    old = np.where(rng.random((rows, slots)) < 0.2, -1, old)
    return new, old, ~dead, gpus, nodes


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the reference's products near MAX_LOAD
def test_kernels_under_the_interpreter_equal_the_array_api():
    rng = np.random.default_rng(8)
    sticky_cases = [_sticky_rows(rng, 6, 4, 10), _sticky_rows(rng, 4, 1, 3), _sticky_rows(rng, 1, 3, 1)]
    for base, old, item_load, limit, packs, initial in sticky_cases:
        for reserve in (False, True):
            want = sticky_pack(base, old, item_load, limit, packs, initial_load=initial, reserve=reserve, xp=np)
            got = repair_pallas.sticky_pack(
                base, old, item_load, limit, packs, initial_load=initial, reserve=reserve, interpret=True
            )
            np.testing.assert_array_equal(np.asarray(got), want)
    searched = 0
    for nodes, gpus, per_gpu, experts in ((2, 6, 3, 8), (1, 5, 2, 6), (1, 4, 1, 1)):
        args = _repair_rows(rng, nodes, gpus, per_gpu, experts)
        want = repair(*args[:-1], max_iters=args[-1], xp=np)
        got = repair_pallas.repair(*args, interpret=True)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), w)
        start = args[0]
        searched += int(np.sum(np.any(want[0] != start, axis=1) & np.any(start < 0, axis=1)))
    assert searched >= 3  # the cases exercise the search on rows with failed GPUs
    for gpus, nodes, per_gpu, experts in ((6, 2, 3, 10), (5, 1, 2, 4), (3, 1, 1, 1)):
        new, old, live, gpus, nodes = _relabel_rows(rng, gpus, nodes, per_gpu, experts)
        want = relabel_pinned(new, old, live, gpus, num_nodes=nodes, xp=np)
        got = relabel_pallas.relabel_pinned(new, old, live, gpus, num_nodes=nodes, interpret=True)
        np.testing.assert_array_equal(np.asarray(got), want)


def _interpreted_kernels(monkeypatch) -> None:
    """The CUDA branch's kernels run by Pallas' interpreter (on the CPU)."""
    monkeypatch.setattr(relabel_pallas, "relabel_pinned", _interp(relabel_pallas.relabel_pinned, interpret=True))
    for name in ("repair", "sticky_pack"):
        monkeypatch.setattr(repair_pallas, name, _interp(getattr(repair_pallas, name), interpret=True))
    monkeypatch.setattr(polish_pallas, "polish", _interp(polish_pallas.polish, interpret=True))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_cuda_branch_under_the_interpreter_equals_numpy(monkeypatch):
    """:func:`eplb.backends._jax._masked_stable_pallas` (what CUDA runs: all layers at once, the kernels
    plugged in, the polish included, mask and tolerance traced) with the kernels interpreted: numpy's
    placement. Hierarchical with the mask traced, so both rules run (within nodes, and the global fallback);
    GPU 1 is back from a failure (its slots empty in ``previous``), GPU 6 down."""
    _interpreted_kernels(monkeypatch)
    rng = np.random.default_rng(24)
    w_old, w_new = (cases.lognormal_f32(rng, 3, 16) for _ in range(2))
    sizes, tolerance = (32, 4, 2, 8), 0.0
    was = np.isin(np.arange(8), [1], invert=True)
    previous = np.asarray(eplb.rebalance_experts(w_old, *sizes, active_gpus=was).phy2log)
    mask = np.isin(np.arange(8), [6], invert=True)
    want = place_elastic_stable(w_new, previous, *sizes, active_gpus=mask, hierarchical=True, tolerance=0.0, xp=np)
    options = (("hierarchical", True), ("policy", "greedy"), ("spill", 0))
    assert set(_jax._pallas_kernels(w_new.shape, sizes, dict(options))) == {
        "relabel_pinned_fn", "sticky_pack_fn", "repair_fn", "align_slots_fn", "polish_fn"
    }  # fmt: skip
    got = jax.jit(lambda w, p, m, t: _jax._masked_stable_pallas(w, p, m, t, sizes, options, "active_gpus"))(
        jnp.asarray(w_new), jnp.asarray(previous.astype(np.int32)), jnp.asarray(mask), jnp.float32(tolerance)
    )
    for g, x in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), x)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_capacity_cuda_branch_under_the_interpreter_equals_numpy(monkeypatch):
    """:func:`eplb.backends._jax._masked_stable_pallas` (``gpu_capacity=`` with ``previous=`` on CUDA: the
    relabelling on capacity classes and the sticky repackings as Pallas kernels, the rest XLA, all layers at
    once; capacities and tolerance traced) with the kernels interpreted: numpy's placement. Half the GPUs at
    0.6, one idle; hierarchical, so both rules run."""
    _interpreted_kernels(monkeypatch)
    rng = np.random.default_rng(5)
    w_old, w_new = (cases.lognormal_f32(rng, 3, 16) for _ in range(2))
    sizes = (32, 4, 2, 8)
    previous = np.asarray(eplb.rebalance_experts(w_old, *sizes).phy2log)
    capacity = np.array([1, 0.6, 1, 0.6, 1, 0, 1, 0.6], np.float32)
    want = eplb.rebalance_experts(w_new, *sizes, previous=previous, gpu_capacity=capacity, balance_tolerance=0.05)
    options = (("hierarchical", True), ("policy", "greedy"), ("spill", 0))
    got = jax.jit(lambda w, p, c, t: _jax._masked_stable_pallas(w, p, c, t, sizes, options, "gpu_capacity"))(
        jnp.asarray(w_new), jnp.asarray(previous.astype(np.int32)), jnp.asarray(capacity), jnp.float32(0.05)
    )
    for g, x in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), x)


@pytest.mark.parametrize("masked", ["active_gpus", "gpu_capacity"])
def test_previous_lowers_to_the_pallas_kernels_on_cuda(masked):
    """impl "pallas": on CUDA the relabelling's and the sticky repackings' kernels (also the fresh placements'
    packing), with ``active_gpus`` the local search's too; on the CPU none (the host callback there)."""
    sizes = (288, 8, 4, 32)
    options = (("hierarchical", True), ("policy", "greedy"), ("spill", 0))

    def call(w, p, m, t):
        return _jax._rebalance_masked_stable(w, p, m, t, sizes, options, "pallas", masked)

    args = (
        jax.ShapeDtypeStruct((58, 256), jnp.float32),
        jax.ShapeDtypeStruct((58, 288), jnp.int32),
        jax.ShapeDtypeStruct((32,), jnp.bool_ if masked == "active_gpus" else jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    try:
        hlo = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as err:
        if "Triton compilation handler" in str(err):
            pytest.skip("this jaxlib compiles Triton at lowering and has no CUDA plugin")
        raise
    expected = {"sticky_pack", "relabel"} | ({"repair"} if masked == "active_gpus" else set())
    assert set(re.findall(r"eplb_(sticky_pack|repair|relabel)\b", hlo)) == expected
    # one custom call per distinct launch (jit dedupes equal ones): several sticky packings (both rules' fresh
    # placements and repackings), the relabelling, with active_gpus the searches of both rules
    assert hlo.count("__gpu$xla.gpu.triton") + hlo.count("triton_kernel_call") >= 3
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    cpu_args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu) for a in args]
    hlo = jax.jit(call).trace(*cpu_args).lower().as_text()
    assert hlo.count("__gpu$xla.gpu.triton") + hlo.count("triton_kernel_call") == 0


def test_impl_is_checked():
    w = jnp.ones((1, 16), jnp.float32)
    previous = jnp.asarray(np.arange(32) % 16)[None, :]
    with pytest.raises(ValueError, match="gpu_capacity with previous= takes impl='host', 'pallas', 'xla' or None"):
        _jax.rebalance_stable(w, previous, 32, 1, 1, 8, impl="triton", hierarchical=False, gpu_capacity=jnp.ones(8))


@pytest.mark.parametrize("masked", ["active_gpus", "gpu_capacity"])
def test_default_on_cuda_is_pallas(masked, monkeypatch):
    """``impl=None`` picks the Pallas branch for both masks where JAX has CUDA and Pallas' Triton lowering
    (measured on an H200 for both), the host's branch without them; ``impl="xla"`` forces XLA."""
    chosen = []
    monkeypatch.setattr(_jax, "_rebalance_masked_stable", lambda *args: chosen.append(args[-2]))
    w = jnp.ones((1, 16), jnp.float32)
    previous = jnp.asarray(np.arange(32) % 16)[None, :]
    vector = jnp.ones(8, jnp.bool_ if masked == "active_gpus" else jnp.float32)
    call = functools.partial(_jax.rebalance_stable, w, previous, 32, 1, 1, 8, hierarchical=False, **{masked: vector})
    call()  # (this CPU)
    monkeypatch.setattr(_jax, "_has_cuda", lambda: True)
    call()
    call(impl="xla")
    monkeypatch.setattr(_jax, "pallas_available", lambda: False)
    call()
    assert chosen == ["host", "pallas", "xla", "host"]


# ---- On a JAX GPU.

GPU = needs_gpu("jax")


@GPU
@pytest.mark.parametrize(("config", "dead"), cases.ELASTIC_GPU_CASES, ids=cases.ELASTIC_GPU_IDS)
def test_gpu_kernels_equal_the_array_api_on_deepseek_v3(config, dead):
    """Each kernel on a JAX GPU, on the arguments place_elastic_stable passes it for the real loads."""
    pytest.importorskip("numba")  # (the capture module's import)
    from .test_kernels_repair_elastic import _captured

    weight, previous, mask = cases.deepseek_elastic(config, dead)
    calls = _captured(weight, previous, config[0], config[1], mask, 0.05)
    device = jax.devices("gpu")[0]

    def gpu(x):
        return jax.device_put(np.ascontiguousarray(x), device) if isinstance(x, np.ndarray) else x

    kernel = {
        sticky_pack: repair_pallas.sticky_pack,
        align_slots: repair_pallas.align_slots,
        relabel_pinned: relabel_pallas.relabel_pinned,
    }
    for fn, args, kwargs, want in calls:
        kwargs = {k: gpu(v) for k, v in kwargs.items() if k != "xp"}
        got = (repair_pallas.repair if fn is repair else kernel[fn])(*[gpu(a) for a in args], **kwargs)
        for g, w in zip(got if fn is repair else (got,), want if fn is repair else (want,), strict=True):
            np.testing.assert_array_equal(np.asarray(g), w)


@GPU
@pytest.mark.parametrize(("config", "dead"), cases.ELASTIC_GPU_CASES, ids=cases.ELASTIC_GPU_IDS)
@pytest.mark.parametrize("tolerance", [None, 0.005])
def test_gpu_elastic_previous_equals_numpy(config, dead, tolerance):
    """``rebalance_experts(..., previous=, active_gpus=)`` on JAX GPU arrays (the mask on the device, so the
    hierarchical call runs both rules) places as numpy, also inside ``jit``; and each implementation forced
    (``impl="pallas"``, the default here, and ``impl="xla"``, the array API under ``vmap``)."""
    (sizes, hierarchical) = config
    weight, previous, mask = cases.deepseek_elastic(config, dead)
    kw = {"hierarchical": hierarchical, "balance_tolerance": tolerance}
    want = eplb.rebalance_experts(weight, *sizes, previous=previous, active_gpus=mask, **kw)
    device = jax.devices("gpu")[0]
    w, p, m = (jax.device_put(x, device) for x in (weight, previous.astype(np.int32), mask))
    default = eplb.rebalance_experts(w, *sizes, previous=p, active_gpus=m, **kw)
    inside_jit = jax.jit(lambda x, y, z: tuple(eplb.rebalance_experts(x, *sizes, previous=y, active_gpus=z, **kw)))(
        w, p, m
    )
    options = {"hierarchical": hierarchical, "policy": "greedy", "spill": 0, "tolerance": tolerance}
    forced = [
        _jax.rebalance_stable(w, p, *sizes, impl=impl, active_gpus=m, max_moves=None, **options)
        for impl in ("pallas", "xla")
    ]
    for got in (default, inside_jit, *forced):
        for g, x in zip(got, want, strict=True):
            assert {d.platform for d in g.devices()} == {"gpu"}
            np.testing.assert_array_equal(np.asarray(g), x)


@GPU
def test_gpu_elastic_previous_under_a_users_vmap():
    """A user's ``vmap`` over calls with their own loads and masks on a JAX GPU (the kernels batched by
    Pallas' rule: one more grid axis), each equal to its numpy call."""
    sizes = (288, 8, 4, 32)
    weight, previous, _ = cases.deepseek_elastic((sizes, True), [])
    weights = np.stack([weight, weight[:, ::-1].copy()])
    masks = np.ones((2, 32), bool)
    masks[0, 5] = False
    masks[1, [3, 20]] = False
    device = jax.devices("gpu")[0]

    def call(w, m):
        return tuple(eplb.rebalance_experts(w, *sizes, previous=p, active_gpus=m, balance_tolerance=0.005))

    p = jax.device_put(previous.astype(np.int32), device)
    got = jax.jit(jax.vmap(call))(jax.device_put(weights, device), jax.device_put(masks, device))
    for k in range(2):
        want = eplb.rebalance_experts(
            weights[k], *sizes, previous=previous, active_gpus=masks[k], balance_tolerance=0.005
        )
        for g, x in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g[k]), x)


@GPU
@pytest.mark.parametrize(
    ("sizes", "hierarchical"), [((288, 8, 4, 32), True), ((288, 8, 3, 144), False)], ids=["hier", "global144"]
)
def test_gpu_capacity_previous_pallas_equals_numpy(sizes, hierarchical):
    """``gpu_capacity=`` with ``previous=`` on JAX GPU arrays, the Pallas branch (the default there) forced and
    through the front door: numpy's placement, half the GPUs at 0.6 and one idle."""
    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {cases.DATA}"
    capacity = np.ones(sizes[3], np.float32)
    capacity[1::2] = 0.6
    capacity[6] = 0.0
    kw = {"hierarchical": hierarchical, "gpu_capacity": capacity}
    previous = np.asarray(eplb.rebalance_experts(old_w, *sizes, **kw).phy2log)
    want = eplb.rebalance_experts(new_w, *sizes, previous=previous, balance_tolerance=0.005, **kw)
    device = jax.devices("gpu")[0]
    w, p, c = (jax.device_put(x, device) for x in (new_w, previous.astype(np.int32), capacity))
    options = {"hierarchical": hierarchical, "policy": "greedy", "spill": 0, "max_moves": None, "tolerance": 0.005}
    forced = _jax.rebalance_stable(w, p, *sizes, impl="pallas", gpu_capacity=c, **options)
    front = eplb.rebalance_experts(w, *sizes, previous=p, balance_tolerance=0.005, **{**kw, "gpu_capacity": c})
    for got in (forced, front):
        for g, x in zip(got, want, strict=True):
            assert {d.platform for d in g.devices()} == {"gpu"}
            np.testing.assert_array_equal(np.asarray(g), x)
