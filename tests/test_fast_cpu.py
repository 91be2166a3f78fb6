"""The compiled greedy kernel (numba) against the numpy reference path, bit for bit.

``eplb.backends._numpy.rebalance`` runs the kernel by default when numba is
installed (``impl=None``); ``impl="xp"`` runs the array-API algorithm layer,
the reference. Every test compares the two on the same float32 loads: the
golden example, the cross-backend cases (ties, zeros, integers near 2**31,
float32, the real DeepSeek-V3 loads), drawn configs and loads, and the
kernel's own switches (bucket or merge sort, lockstep batches, threads).
Skips without numba.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import eplb
from eplb.backends import _numba, _numpy

from . import cases
from .test_oracle import GOLDEN_PHY2LOG, GOLDEN_WEIGHT
from .test_properties import Config, configs, loads

pytest.importorskip("numba")

DEEPSEEK = Config(256, 288, 8, 4, 32)
DEEPSEEK_GLOBAL = Config(256, 288, 8, 3, 144)
SMALL = [Config(16, *args) for args in [(24, 4, 2, 4), (20, 4, 4, 4), (32, 3, 2, 8), (16, 4, 2, 16)]]


def _hierarchical(config: Config, hierarchical: bool | None = None) -> bool:
    return config.hierarchical if hierarchical is None else hierarchical


def reference(weight: np.ndarray, config: Config, hierarchical: bool | None = None) -> tuple[np.ndarray, ...]:
    """The numpy array-API path (the reference)."""
    h = _hierarchical(config, hierarchical)
    return _numpy.rebalance(weight, *config.args, hierarchical=h, policy="greedy", spill=0, impl="xp")


def assert_identical(weight: np.ndarray, config: Config, hierarchical: bool | None = None, **kernel) -> None:
    """The kernel (with ``kernel`` switches) returns the reference's arrays exactly, as int64."""
    h = _hierarchical(config, hierarchical)
    weight32 = np.ascontiguousarray(weight, dtype=np.float32)
    expected = reference(weight, config, h)
    if kernel:
        *got, ok = _numba.greedy(weight32, *config.args, hierarchical=h, **kernel)
        assert ok.all()
    else:
        got = _numpy.rebalance(weight, *config.args, hierarchical=h, policy="greedy", spill=0, impl="numba")
    for name, g, e in zip(("phy2log", "log2phy", "logcnt"), got, expected, strict=True):
        assert isinstance(g, np.ndarray) and g.dtype == np.int64, (name, type(g), g.dtype)
        if not np.array_equal(g, e):
            rows = np.flatnonzero((g != e).reshape(len(g), -1).any(axis=1))
            pytest.fail(f"{name} differs from the reference in layers {rows.tolist()} ({config}, {kernel})")


# ---------------------------------------------------------------- fixed cases


def test_golden_example():
    phy2log, _, logcnt = _numpy.rebalance(np.array(GOLDEN_WEIGHT), 16, 4, 2, 8, hierarchical=True, impl="numba")
    np.testing.assert_array_equal(phy2log, GOLDEN_PHY2LOG)
    np.testing.assert_array_equal(logcnt, [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
    assert_identical(np.array(GOLDEN_WEIGHT), Config(12, 16, 4, 2, 8))


@pytest.mark.parametrize("config", SMALL, ids=str)
def test_ties_and_zeros(config):
    assert_identical(cases.ties(np.random.default_rng(1), 16), config)


@pytest.mark.parametrize("config", SMALL, ids=str)
def test_tiny_loads(config):
    assert_identical(cases.tiny_loads(np.random.default_rng(5), 16), config)


@pytest.mark.parametrize("config", SMALL, ids=str)
def test_random_integers_near_2_31(config):
    weight = cases.random_int(np.random.default_rng(2), 24, 16)
    assert weight.sum(axis=1).max() < 2**31
    assert_identical(weight, config)


@pytest.mark.parametrize("config", SMALL, ids=str)
def test_float32(config):
    assert_identical(cases.lognormal_f32(np.random.default_rng(3), 24, 16), config)


@pytest.mark.parametrize("config", [DEEPSEEK, DEEPSEEK_GLOBAL], ids=["hierarchical", "global"])
def test_deepseek_shape_mixed(config):
    rng = np.random.default_rng(4)
    weight = np.concatenate(
        [
            cases.random_int(rng, 8, 256).astype(np.float32),
            cases.lognormal_f32(rng, 8, 256),
            cases.ties(rng, 256).astype(np.float32),
            cases.lognormal_f32(rng, 8, 256, sigma=3.0),
            # Almost all loads in one bucket of the sort, in reverse order: the merge sort takes over.
            np.append(1000 + np.arange(255), 1e30)[None, :].astype(np.float32),
            np.append(1e6, 1000 + np.arange(255) / 64)[None, :].astype(np.float32),
        ]
    )
    assert_identical(weight, config)
    # Every switch of the kernel gives the same placement.
    assert_identical(weight, config, merge_only=True)
    assert_identical(weight, config, batch=1)
    assert_identical(weight, config, batch=len(weight))
    assert_identical(weight, config, parallel=True)


@pytest.mark.parametrize("config", [DEEPSEEK, DEEPSEEK_GLOBAL], ids=["hierarchical", "global"])
def test_real_deepseek_loads(config):
    weight = cases.deepseek_v3()
    if weight is None:
        pytest.skip("../shared/data not present")
    assert_identical(weight, config)


def test_hierarchical_forced_off_and_on():
    """``hierarchical=False`` on a hierarchical config, and True on one that would run it anyway."""
    weight = cases.lognormal_f32(np.random.default_rng(5), 6, 32)
    config = Config(32, 48, 8, 4, 8)
    assert_identical(weight, config, hierarchical=False)
    assert_identical(weight, config, hierarchical=True)


def test_input_dtypes():
    """int64, int32, float64 and float16 loads are rounded to float32 first, as the reference does."""
    rng = np.random.default_rng(6)
    base = cases.random_int(rng, 6, 16)
    config = SMALL[0]
    for weight in (base, base.astype(np.int32), base.astype(np.float64) + 0.25, (base % 60000).astype(np.float16)):
        assert_identical(weight, config)
    # Distinct integers that round to the same float32 are equal loads.
    assert_identical(2**25 + np.arange(32).reshape(2, 16) % 3, config)


# ---------------------------------------------------------------- drawn configs and loads


@st.composite
def wide_configs(draw) -> Config:
    """Edge shapes: one group per node, one slot per GPU, R == E, and many GPUs or experts (deep trees)."""
    kind = draw(st.sampled_from(["one_group_per_node", "one_slot_per_gpu", "no_redundancy", "many_gpus", "many"]))
    num_nodes = draw(st.integers(1, 4))
    if kind == "one_group_per_node":
        group_size = draw(st.integers(1, 8))
        num_gpus = num_nodes * draw(st.integers(1, 4))
        num_experts = num_nodes * group_size
        slots = -(-num_experts // num_gpus) + draw(st.integers(0, 2))
        return Config(num_experts, num_gpus * slots, num_nodes, num_nodes, num_gpus)
    num_groups = num_nodes * draw(st.integers(1, 3))
    num_experts = num_groups * draw(st.integers(1, 6))
    if kind == "one_slot_per_gpu":  # R == G: every GPU holds a single slot
        num_replicas = num_experts + num_nodes * draw(st.integers(0, 3))
        return Config(num_experts, num_replicas, num_groups, num_nodes, num_replicas)
    if kind == "no_redundancy":  # R == E
        num_gpus = num_nodes * draw(st.sampled_from([d for d in range(1, 9) if (num_experts // num_nodes) % d == 0]))
        return Config(num_experts, num_experts, num_groups, num_nodes, num_gpus)
    if kind == "many_gpus":  # a global policy over up to 160 GPUs: LPT trees of 3 levels
        num_gpus = 2 * draw(st.integers(5, 80))
        num_experts = draw(st.integers(1, 2 * num_gpus))
        slots = -(-num_experts // num_gpus) + draw(st.integers(0, 1))
        return Config(num_experts, num_gpus * slots, 1, 2, num_gpus)
    # many experts per node: replication trees of 2-3 levels
    num_experts = num_groups * draw(st.integers(8, 40))
    num_gpus = num_nodes * draw(st.integers(1, 12))
    slots = -(-num_experts // num_gpus) + draw(st.integers(0, 3))
    return Config(num_experts, num_gpus * slots, num_groups, num_nodes, num_gpus)


@st.composite
def tie_loads(draw, num_layers: int, num_experts: int) -> np.ndarray:
    """Few distinct values (0, k, 2k, 3k, 6k), so sorts, argmins and argmaxes keep hitting ties."""
    unit = draw(st.sampled_from([1, 5, 7, 2**20 + 1, 2**24 - 1]))
    return draw(hnp.arrays(np.int64, (num_layers, num_experts), elements=st.sampled_from([0, 1, 2, 3, 6]))) * unit


@st.composite
def float32_loads(draw, num_layers: int, num_experts: int) -> np.ndarray:
    """Any non-negative float32, subnormals and -0.0 included, with per-layer sums below float32 max."""
    top = float(np.float32(np.finfo(np.float32).max / max(num_experts, 1) / 2))
    elements = st.floats(0, top, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
    weight = draw(hnp.arrays(np.float32, (num_layers, num_experts), elements=elements))
    if draw(st.booleans()):
        weight[:, ::3] = -0.0
    return weight


def _any_loads(draw, config: Config) -> np.ndarray:
    num_layers = draw(st.integers(1, 5))
    strategy = draw(st.sampled_from([loads, tie_loads, float32_loads]))
    return draw(strategy(num_layers, config.num_experts))


@settings(max_examples=300, deadline=None)
@given(config=configs, data=st.data())
def test_drawn_configs_match_reference(config, data):
    """The property tests' configs (hierarchical and global) with integer, tie-heavy and float32 loads."""
    assert_identical(_any_loads(data.draw, config), config)


@settings(max_examples=200, deadline=None)
@given(config=wide_configs(), hierarchical=st.booleans(), data=st.data())
def test_edge_configs_match_reference(config, hierarchical, data):
    """One group per node, one slot per GPU, R == E, many GPUs or experts; both policies."""
    weight = _any_loads(data.draw, config)
    assert_identical(weight, config, hierarchical=hierarchical and config.hierarchical)


@settings(max_examples=60, deadline=None)
@given(config=configs, data=st.data())
def test_drawn_merge_sort_and_batches(config, data):
    """The merge sort (forced for every row) and lockstep batches give the default's placement."""
    weight = _any_loads(data.draw, config)
    batch = data.draw(st.integers(1, 4))
    assert_identical(weight, config, merge_only=True, batch=batch)


# ---------------------------------------------------------------- the sort


def _sort_rows(rng: np.random.Generator) -> list[np.ndarray]:
    """Rows for the stable descending sort, -0 made +0 as the kernel does: easy, tied, and adversarial ones."""
    ascending = 1000 + np.arange(287, dtype=np.float32)
    rows = [
        np.zeros(5, np.float32),
        np.array([3.0], np.float32),
        rng.lognormal(0, 1.5, 72).astype(np.float32),
        rng.integers(0, 4, 72).astype(np.float32),  # ties and zeros
        np.append(ascending, np.float32(1e30)),  # one bucket holds almost all, in reverse: merge sort takes over
        np.append(ascending, np.float32(0)),
        np.concatenate([ascending, ascending[::-1], [0, 1e-45, 3e-45, 3.4e38]]).astype(np.float32),  # subnormals
        np.repeat(rng.lognormal(0, 1, 30), 7).astype(np.float32),
        rng.permutation(np.arange(300, dtype=np.float32) * 1e-3 + 7),
    ]
    return rows + [np.abs(rng.standard_cauchy(n)).astype(np.float32) for n in (2, 9, 64, 288, 600)]


def test_rank_desc_is_the_stable_descending_sort():
    rank_desc = _numba._kernels().rank_desc
    for x in _sort_rows(np.random.default_rng(11)):
        n = len(x)
        expected = np.argsort(-x, kind="stable")
        for merge_only in (False, True):
            order = np.full(n, -1, np.int64)
            head, src, dst = np.empty(4 * n + 8, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
            rank_desc(x, n, order, head, src, dst, merge_only)
            np.testing.assert_array_equal(order, expected, err_msg=f"n={n} merge_only={merge_only}")


# ---------------------------------------------------------------- declined layers


def test_bad_loads_read_as_zero_and_overflow_declined():
    """NaN, inf and negative loads read as 0 in the kernel too (eplb.algorithms.loads.clean_loads); layers whose
    float32 sums overflow are declined and the reference (whose pack sums saturate) redoes them.

    (The public API rejects such loads unless their values go unchecked: check_values=False here.) Every
    layer then equals the array-API reference of the same loads, and the NaN/inf/negative layers equal the
    placement of the loads with those entries zeroed.
    """
    rng = np.random.default_rng(7)
    config = Config(16, 24, 4, 2, 4)
    weight = cases.lognormal_f32(rng, 8, 16)
    weight[1, 3] = np.nan
    weight[3, 0] = -1.0
    weight[5, 7] = np.inf
    weight[6] = np.float32(3e38)  # group sums overflow float32
    *_, ok = _numba.greedy(weight, *config.args, hierarchical=True)
    assert ok.tolist() == [True, True, True, True, True, True, False, True]
    with np.errstate(invalid="ignore", over="ignore"):
        got = eplb.rebalance_experts(weight, *config.args, check_values=False)
        want = _numpy.rebalance(weight, *config.args, hierarchical=True, impl="xp")
    zeroed = np.where(np.isfinite(weight) & (weight > 0), weight, np.float32(0))
    for g, e, z in zip(got, want, reference(zeroed[[1, 3, 5]], config), strict=True):
        np.testing.assert_array_equal(g, e)
        np.testing.assert_array_equal(g[[1, 3, 5]], z)


def test_no_sums_no_overflow():
    """Loads whose total overflows float32 where the policy adds nothing up (one group per node, one slot per GPU)."""
    weight = np.full((2, 16), np.float32(3e38))
    weight[1, ::2] = np.float32(1e38)
    for config, hierarchical in [(Config(16, 16, 1, 2, 16), False), (Config(16, 16, 4, 4, 16), True)]:
        *_, ok = _numba.greedy(weight, *config.args, hierarchical=hierarchical)
        assert ok.all()
        assert_identical(weight, config, hierarchical=hierarchical)


# ---------------------------------------------------------------- dispatch


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Records the weight shape of every call into the compiled kernel (loaded first: dispatch waits for none)."""
    _numba.warm_up()
    calls: list[tuple[int, ...]] = []
    original = _numba.rebalance

    def recording(weight, *args, **kwargs):
        calls.append(weight.shape)
        return original(weight, *args, **kwargs)

    monkeypatch.setattr(_numba, "rebalance", recording)
    return calls


def test_numpy_and_torch_cpu_dispatch_to_the_kernel(kernel_calls):
    weight = cases.lognormal_f32(np.random.default_rng(8), 3, 16)
    expected = reference(weight, SMALL[0])
    for name, got in [
        ("numpy", eplb.rebalance_experts(weight, *SMALL[0].args)),
        ("list", eplb.rebalance_experts(weight.tolist(), *SMALL[0].args)),
    ]:
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e, err_msg=name)
    assert kernel_calls == [(3, 16), (3, 16)]
    torch = pytest.importorskip("torch")
    got = eplb.rebalance_experts(torch.as_tensor(weight), *SMALL[0].args)
    assert kernel_calls == [(3, 16)] * 3
    for g, e in zip(got, expected, strict=True):
        assert isinstance(g, torch.Tensor) and g.dtype == torch.int64
        np.testing.assert_array_equal(g.numpy(), e)


@pytest.mark.parametrize("options", [{"policy": "refined"}, {"spill": 1}], ids=["refined", "spill"])
def test_other_options_use_the_reference_path(kernel_calls, options):
    weight = cases.lognormal_f32(np.random.default_rng(9), 3, 16)
    eplb.rebalance_experts(weight, *SMALL[0].args, **options)
    assert kernel_calls == []
    with pytest.raises(ValueError, match="plain greedy"):
        _numpy.rebalance(weight, *SMALL[0].args, hierarchical=True, impl="numba", **options)


def test_without_numba_the_reference_path_runs(kernel_calls, monkeypatch):
    monkeypatch.setattr(_numba, "available", lambda: False)
    weight = cases.lognormal_f32(np.random.default_rng(10), 3, 16)
    got = eplb.rebalance_experts(weight, *SMALL[0].args)
    assert kernel_calls == []
    for g, e in zip(got, reference(weight, SMALL[0]), strict=True):
        np.testing.assert_array_equal(g, e)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        _numpy.rebalance(np.ones((1, 4)), 4, 1, 1, 1, hierarchical=False, impl="fast")


def test_concurrent_calls():
    """The kernel releases the GIL and allocates its scratch per call: threads may call it at once.

    Half the calls ask for the parallel kernel; one thread at a time gets it
    (numba's default threading layer aborts on concurrent parallel launches),
    the others run the serial one.
    """
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(12)
    weights = [cases.lognormal_f32(rng, 16, 256) for _ in range(8)]
    config = DEEPSEEK
    expected = [reference(w, config) for w in weights]

    def run(i: int) -> tuple[np.ndarray, ...]:
        *placement, ok = _numba.greedy(weights[i % 8], *config.args, hierarchical=True, parallel=i % 2 == 0)
        assert ok.all()
        return placement

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(32)))
    for i, got in enumerate(results):
        for g, e in zip(got, expected[i % 8], strict=True):
            np.testing.assert_array_equal(g, e)


def _run_python(code: str, env: dict[str, str] | None = None) -> str:
    environ = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True, env=environ
    )
    return result.stdout


def test_numba_imported_lazily_and_optional():
    """``import eplb`` leaves numba unimported; with numba blocked, numpy calls still work."""
    out = _run_python(
        """
        import sys
        import eplb
        print("numba" in sys.modules)
        """
    )
    assert out.strip() == "False"
    out = _run_python(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("numba", "llvmlite"):
                    raise ImportError(f"blocked {name}")
                return None

        sys.meta_path.insert(0, Block())
        import eplb
        w = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]]
        print(eplb.rebalance_experts(w, 16, 4, 2, 8).phy2log.tolist())
        """
    )
    assert out.strip() == str(GOLDEN_PHY2LOG[:1])


def test_no_fused_multiply_add():
    """The compiled kernel has no FMA: float32 products and sums are rounded one at a time, as numpy does."""
    import numba

    from eplb.kernels import greedy_numba

    _numba.greedy(np.ones((1, 4), np.float32), 4, 1, 1, 1, hierarchical=False)
    # The served kernel may come from numba's disk cache, whose machine code cannot be inspected: compile the
    # same function, with the same options, in memory.
    fresh = numba.njit(cache=False, nogil=True)(greedy_numba._layers)
    for signature in _numba._kernels().serial.signatures:
        fresh.compile(signature)
        asm = fresh.inspect_asm(signature).lower()
        assert "mulss" in asm or "vmulss" in asm  # the float32 products are there, one at a time
        assert "vfmadd" not in asm and "vfmsub" not in asm and "vfnmadd" not in asm


# ---------------------------------------------------------------- time to the first placement


def test_ready_waits_at_most_its_wait(monkeypatch):
    """``ready(wait)``: True as soon as the kernels are loaded within ``wait``; False after ``wait`` otherwise;
    ``ready()`` never waits."""
    import threading

    loaded = threading.Event()
    monkeypatch.setattr(_numba, "_READY", loaded)
    started = []

    def slow_loader():  # the kernels become ready 0.05 s after the first ask
        if not started:
            started.append(threading.Timer(0.05, loaded.set))
            started[0].start()
        return started[0]

    monkeypatch.setattr(_numba, "_start_warm_up", slow_loader)
    assert _numba.ready() is False  # no wait: the loader started, not done
    assert _numba.ready(wait=5.0) is True  # returns once loaded (0.05 s), not after 5 s
    never = threading.Event()
    monkeypatch.setattr(_numba, "_READY", never)
    assert _numba.ready(wait=0.01) is False


def test_ready_does_not_wait_for_a_load_that_failed(monkeypatch):
    """A warm-up that raised never sets ready: later calls must not wait for it (every previous= call would be
    ``STABLE_WAIT`` late)."""
    waits = []

    class Unset:
        def is_set(self):
            return False

        def wait(self, timeout):
            waits.append(timeout)
            return False

    monkeypatch.setattr(_numba, "_READY", Unset())
    monkeypatch.setattr(_numba, "_start_warm_up", lambda: None)
    monkeypatch.setattr(_numba, "_WARM_UP_ERROR", [RuntimeError("numba failed")])
    assert _numba.ready(wait=5.0) is False
    assert waits == []


def test_first_calls_with_a_cold_then_a_warm_cache(tmp_path):
    """Two fresh processes sharing one numba cache folder, at first empty.

    Cold cache: the first call answers from the array-API path (no 7 s compile) while the kernels compile in the
    background, and the first ``previous=`` call does not wait for that compile either (array-API path). Warm
    cache (the folder the first process wrote): the first ``previous=`` call waits for the kernels to load (well
    under ``STABLE_WAIT``) and runs them, where the array-API path would take a second. Every call gives the
    placement of the warmed-up kernels. The cold process compiles nothing itself (child processes do, so that
    numba's compile does not hold this process's GIL), and neither does the warm one (it loads): no cache miss.
    (One test: each cold start compiles every kernel, about 30 s.)"""
    code = """
        import time
        import numpy as np
        import eplb
        from eplb.backends import _numba
        from eplb.kernels import repair_numba
        calls = []
        real = repair_numba.repair
        repair_numba.repair = lambda *a, **k: calls.append(1) or real(*a, **k)
        cold_before = _numba.cold_cache()
        rng = np.random.default_rng(0)
        fresh = rng.lognormal(0, 1.5, (58, 256)).astype(np.float32)
        w = rng.lognormal(0, 1.5, (8, 64)).astype(np.float32)
        previous = np.tile(np.concatenate([np.arange(64), np.arange(16)]), (8, 1))
        start = time.perf_counter()
        first_fresh = eplb.rebalance_experts(fresh, 288, 8, 4, 32)
        seconds = time.perf_counter() - start
        was_ready = _numba.ready()
        first = eplb.rebalance_experts(w, 80, 8, 4, 16, previous=previous, balance_tolerance=0.005)
        used_kernels = bool(calls)
        _numba.warm_up()
        again_fresh = eplb.rebalance_experts(fresh, 288, 8, 4, 32)
        again = eplb.rebalance_experts(w, 80, 8, 4, 16, previous=previous, balance_tolerance=0.005)
        same = all(np.array_equal(a, b) for a, b in zip(first + first_fresh, again + again_fresh))
        from eplb.kernels import _numba_jit
        compiled_here = sum(len(d.stats.cache_misses) for d in _numba_jit.DISPATCHERS.values())
        print(cold_before, was_ready, _numba.ready(), seconds < 5, used_kernels, same, compiled_here,
              _numba.cold_cache())
        """
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    cold = _run_python(code, env=env)  # compiles: the first calls run the array-API path
    assert cold.split() == ["True", "False", "True", "True", "False", "True", "0", "False"]
    warm = _run_python(code, env=env)  # the cache the first process wrote: the previous= call waits and runs them
    assert warm.split()[:1] + warm.split()[2:] == ["False", "True", "True", "True", "True", "0", "False"]


def test_kernels_cached_or_warned(monkeypatch):
    """Where numba cannot cache (no writable folder), the kernel compiles in memory with one RuntimeWarning."""
    import numba

    from eplb.kernels import _numba_jit

    real = numba.njit

    def refusing(*args, **options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **options)

    monkeypatch.setattr(_numba_jit.numba, "njit", refusing)
    monkeypatch.setattr(_numba_jit, "_WARNED", False)
    with pytest.warns(RuntimeWarning, match="cannot be cached on disk"):
        add = _numba_jit.njit()(lambda a, b: a + b)
    assert add(2, 3) == 5
    assert _numba_jit.CACHED[f"{__name__}.test_kernels_cached_or_warned.<locals>.<lambda>"] is False


# ---------------------------------------------------------------- log2phy=False (previous='s fresh placement)


@pytest.mark.parametrize("config", [*SMALL, DEEPSEEK, DEEPSEEK_GLOBAL, Config(1, 4, 1, 1, 4), Config(16, 16, 4, 2, 16)])
def test_without_log2phy_the_placement_is_the_same(config):
    """``log2phy=False`` (what ``previous=`` asks of the fresh placement): ``phy2log`` and ``logcnt`` equal the
    array-API reference's, and the second array is ``[L, E, 0]``; layers the kernel declines (float32 sums that
    overflow) and all-zero layers included."""
    rng = np.random.default_rng(11)
    weight = cases.lognormal_f32(rng, 6, config.num_experts)
    weight[2] = 0.0
    weight[4] = np.float32(3e38)  # sums overflow float32: declined where the policy adds loads up
    *_, ok = _numba.greedy(weight, *config.args, hierarchical=config.hierarchical)
    if config in (DEEPSEEK, DEEPSEEK_GLOBAL):
        assert not ok[4]  # the reference path's branch runs
    with np.errstate(over="ignore", invalid="ignore"):
        want = reference(weight, config)
        got = _numba.rebalance(weight, *config.args, hierarchical=config.hierarchical,
                               policy="greedy", spill=0, log2phy=False)  # fmt: skip
    assert got[1].shape == (6, config.num_experts, 0)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[2], want[2])


def test_previous_does_not_build_the_fresh_log2phy(monkeypatch):
    """``previous=`` on numpy asks the kernel for no ``log2phy`` (it builds its own, in slot order), and its
    result's ``log2phy`` is still the full one: each expert's slots in slot order, -1 padded (plain Python)."""
    _numba.warm_up()  # the kernels loaded (else the call takes the array-API path while they load)
    asked = []
    original = _numba.greedy

    def spy(*args, **kwargs):
        asked.append(kwargs.get("log2phy", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(_numba, "greedy", spy)
    rng = np.random.default_rng(12)
    config = DEEPSEEK
    old, new = (cases.lognormal_f32(rng, 4, 256) for _ in range(2))
    previous = eplb.rebalance_experts(old, *config.args).phy2log
    asked.clear()
    phy2log, log2phy, logcnt = eplb.rebalance_experts(new, *config.args, previous=previous)
    assert asked == [False]
    phy2log, log2phy, logcnt = np.asarray(phy2log), np.asarray(log2phy), np.asarray(logcnt)
    for layer in range(4):
        for expert in range(256):
            slots = [s for s in range(288) if phy2log[layer, s] == expert]
            assert log2phy[layer, expert].tolist() == slots + [-1] * (33 - len(slots))
            assert logcnt[layer, expert] == len(slots)


def test_kernel_families_split_the_warm_up():
    """``load_kernel_families`` (the test suite's two-process cache warm-up) takes any subset of the families
    and refuses an unknown name, so a typo cannot leave kernels cold."""
    _numba.load_kernel_families(("relabel", "pairs"))  # (loaded already: fast)
    with pytest.raises(ValueError, match="families must be among"):
        _numba.load_kernel_families(("greedy", "repairs"))
    with pytest.raises(ValueError, match="families must be among"):
        _numba.compile_in_subprocesses((("relabel",), ("pair",)))
    assert sorted(f for group in _numba.COMPILE_GROUPS for f in group) == sorted(_numba.KERNEL_FAMILIES)


@pytest.mark.parametrize(("setting", "cold", "children"), [("1", True, 1), ("0", True, 0), ("1", False, 0)])
def test_a_cold_cache_compiles_in_child_processes(monkeypatch, setting, cold, children):
    """The background load starts the child compile only where the cache is cold and ``EPLB_NUMBA_SUBPROCESS``
    is not 0, then loads in-process either way (a child that fails leaves this process's compile to do it)."""
    started = []
    monkeypatch.setenv("EPLB_NUMBA_SUBPROCESS", setting)
    monkeypatch.setattr(_numba, "cold_cache", lambda: cold)
    monkeypatch.setattr(_numba, "compile_in_subprocesses", lambda: started.append(1) or False)
    monkeypatch.setattr(_numba, "_WARM_UP_ERROR", [])
    _numba._load_kernels()
    assert len(started) == children and _numba._WARM_UP_ERROR == [] and _numba.ready()


def test_child_processes_compile_into_the_cache_this_process_reads(monkeypatch):
    """One child (a small family) exits cleanly with this process's sys.path; a Python that cannot start
    (no ``sys.executable``) gives False, not an error."""
    assert _numba.compile_in_subprocesses((("group_split",),), timeout=120)
    assert not _numba.cold_cache()  # (the suite's cache is warm: the controller compiled it)
    monkeypatch.setattr(_numba.sys, "executable", "")
    assert _numba.compile_in_subprocesses((("group_split",),)) is False
