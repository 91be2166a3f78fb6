"""LoadTracker: the same window sums on numpy, torch and JAX (eager, jit, scan), against a bincount reference."""

from __future__ import annotations

import numpy as np
import pytest

import eplb

L, E, K, T, W = 3, 8, 2, 16, 4


def _steps(num_steps: int, seed: int = 0) -> list[np.ndarray]:
    """Router outputs ``[L, T, K]`` per step, with some dropped (-1) and out-of-range ids."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_steps):
        ids = rng.integers(0, E, (L, T, K)).astype(np.int32)
        ids[rng.random((L, T, K)) < 0.1] = -1
        ids[0, 0, 0] = E  # out of range: dropped
        out.append(ids)
    return out


def _reference(steps: list[np.ndarray], window: int = W) -> np.ndarray:
    load = np.zeros((L, E), dtype=np.int64)
    for ids in steps[-window:]:
        for layer in range(L):
            valid = ids[layer][(ids[layer] >= 0) & (ids[layer] < E)]
            load[layer] += np.bincount(valid, minlength=E)
    return load


@pytest.mark.parametrize("num_steps", [0, 1, W - 1, W, 2 * W + 1])
def test_numpy_window_matches_reference(num_steps):
    """The load is the sum of the last W committed steps; older steps drop out."""
    steps = _steps(num_steps)
    tracker = eplb.LoadTracker(L, E, W)
    for ids in steps:
        for layer in range(L):
            tracker = tracker.record(ids[layer], layer=layer)
        tracker = tracker.step()
    np.testing.assert_array_equal(tracker.load(), _reference(steps))
    assert int(tracker.steps) == num_steps


def test_all_layers_at_once_and_counts_agree():
    """record([L, T, K]) == record per layer == record_counts of the bincounts."""
    steps = _steps(5)
    a, b, c = (eplb.LoadTracker(L, E, W) for _ in range(3))
    for ids in steps:
        a = a.record(ids).step()
        for layer in range(L):
            b = b.record(ids[layer].reshape(-1), layer=layer)
            valid = ids[layer][(ids[layer] >= 0) & (ids[layer] < E)]
            c = c.record_counts(np.bincount(valid, minlength=E), layer=layer)
        b, c = b.step(), c.step()
    for t in (a, b, c):
        np.testing.assert_array_equal(t.load(), _reference(steps))


def test_mask_drops_padding_tokens():
    """mask [T] (or [L, T] for all layers) excludes tokens; pending is not in the load until step()."""
    ids = _steps(1)[0]
    mask = np.arange(T) < T // 2
    one = eplb.LoadTracker(L, E, W).record(ids[1], layer=1, mask=mask)
    assert one.load().sum() == 0  # still pending
    one = one.step()
    ref = _reference([np.where(mask[None, :, None], ids, -1)])
    np.testing.assert_array_equal(one.load()[1], ref[1])
    every = eplb.LoadTracker(L, E, W).record(ids, mask=mask).step()
    np.testing.assert_array_equal(every.load(), ref)
    per_layer = eplb.LoadTracker(L, E, W).record(ids, mask=np.broadcast_to(mask, (L, T))).step()
    np.testing.assert_array_equal(per_layer.load(), ref)


def test_reset_and_repr():
    tracker = eplb.LoadTracker(L, E, W).record(_steps(1)[0]).step()
    assert "num_experts=8" in repr(tracker)
    tracker = tracker.reset()
    assert tracker.load().sum() == 0 and int(tracker.steps) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 0}, "num_layers=0"),
        ({"window": 2.5}, "window=2.5"),
        ({"backend": "cupy"}, "backend='cupy'"),
    ],
)
def test_bad_config(kwargs, match):
    args = {"num_layers": L, "num_experts": E, "window": W, **kwargs}
    with pytest.raises(ValueError, match=match):
        eplb.LoadTracker(**args)


def test_bad_inputs_name_the_argument():
    tracker = eplb.LoadTracker(L, E, W)
    with pytest.raises(TypeError, match="topk_ids must hold integer"):
        tracker.record(np.zeros((T, K)), layer=0)
    with pytest.raises(ValueError, match="layer=3"):
        tracker.record(np.zeros((T, K), dtype=int), layer=3)
    with pytest.raises(ValueError, match="with layer=None"):
        tracker.record(np.zeros((T, K), dtype=int))
    with pytest.raises(ValueError, match="mask has shape"):
        tracker.record(np.zeros((T, K), dtype=int), layer=0, mask=np.ones(T + 1, dtype=bool))
    with pytest.raises(ValueError, match="counts has shape"):
        tracker.record_counts(np.zeros(E + 1, dtype=int), layer=0)


def test_feeds_rebalance_experts():
    """load() goes straight into rebalance_experts."""
    tracker = eplb.LoadTracker(L, E, W)
    for ids in _steps(3):
        tracker = tracker.record(ids).step()
    placement = eplb.rebalance_experts(tracker.load(), 12, 4, 2, 4)
    assert placement.phy2log.shape == (L, 12)


# ---------------------------------------------------------------- torch


def test_torch_in_place_same_as_numpy():
    """torch: same load as numpy, buffers updated in place (fixed addresses), int64 load on the device."""
    torch = pytest.importorskip("torch")
    steps = _steps(2 * W + 1)
    tracker = eplb.LoadTracker(L, E, W, backend="torch")
    addresses = (tracker.counts.data_ptr(), tracker.pending.data_ptr(), tracker.steps.data_ptr())
    for ids in steps:
        same = tracker.record(torch.from_numpy(ids[0]).long(), layer=0)
        assert same is tracker
        tracker.record(torch.from_numpy(ids[1]), layer=torch.tensor(1))  # a device scalar works too
        tracker.record(torch.from_numpy(ids[2]), layer=2)
        tracker.step()
    assert (tracker.counts.data_ptr(), tracker.pending.data_ptr(), tracker.steps.data_ptr()) == addresses
    load = tracker.load()
    assert isinstance(load, torch.Tensor) and load.dtype == torch.int64
    np.testing.assert_array_equal(load.numpy(), _reference(steps))
    expected = eplb.rebalance_experts(_reference(steps), 12, 4, 2, 4).phy2log
    np.testing.assert_array_equal(eplb.rebalance_experts(load, 12, 4, 2, 4).phy2log.numpy(), expected)


def test_torch_all_layers_mask_and_counts():
    torch = pytest.importorskip("torch")
    steps = _steps(3)
    mask = torch.arange(T) % 3 != 0
    tracker = eplb.LoadTracker(L, E, W, backend="torch")
    counts = eplb.LoadTracker(L, E, W, backend="torch")
    for ids in steps:
        tracker.record(torch.from_numpy(ids), mask=mask).step()
        masked = np.where(mask.numpy()[None, :, None], ids, -1)
        counts.record_counts(torch.from_numpy(_reference([masked]))).step()
    masked_steps = [np.where(mask.numpy()[None, :, None], ids, -1) for ids in steps]
    np.testing.assert_array_equal(tracker.load().numpy(), _reference(masked_steps))
    np.testing.assert_array_equal(counts.load().numpy(), _reference(masked_steps))


@pytest.mark.gpu
def test_torch_cuda_no_sync_and_cuda_graph():
    """On CUDA, record/step/load never sync the host, and record+step replay correctly from a CUDA graph."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    steps = _steps(W + 2)
    tracker = eplb.LoadTracker(L, E, W, backend="torch", device="cuda")
    ids_buffer = torch.zeros((L, T, K), dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids_buffer.copy_(torch.from_numpy(steps[0]).pin_memory(), non_blocking=True)
        for layer in range(L):
            tracker.record(ids_buffer[layer], layer=layer)
        tracker.step()
        load = tracker.load()
        eplb.rebalance_experts(load, 12, 4, 2, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside capture
        tracker.record(ids_buffer).step()
    torch.cuda.current_stream().wait_stream(stream)
    tracker.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tracker.record(ids_buffer).step()
    tracker.reset()
    for ids in steps:
        ids_buffer.copy_(torch.from_numpy(ids))
        graph.replay()
    np.testing.assert_array_equal(tracker.load().cpu().numpy(), _reference(steps))
    assert int(tracker.steps) == len(steps)


# ---------------------------------------------------------------- JAX


@pytest.fixture(scope="module")
def jax():
    return pytest.importorskip("jax")


def test_jax_eager_jit_and_scan(jax):
    """JAX: eager, under jit, and as a lax.scan carry over steps and over (traced) layers: same load."""
    jnp = jax.numpy
    steps = _steps(2 * W + 1)
    stacked = jnp.asarray(np.stack(steps))  # [S, L, T, K]

    eager = eplb.LoadTracker(L, E, W, backend="jax")
    for ids in steps:
        eager = eager.record(jnp.asarray(ids)).step()

    @jax.jit
    def one_step(tracker, ids):
        def per_layer(t, layer):
            return t.record(ids[layer], layer=layer), None

        tracker, _ = jax.lax.scan(per_layer, tracker, jnp.arange(L))
        return tracker.step()

    jitted = eplb.LoadTracker(L, E, W, backend="jax")
    for ids in stacked:
        jitted = one_step(jitted, ids)

    @jax.jit
    def scanned(ids):
        def body(t, x):
            return t.record(x).step(), None

        tracker, _ = jax.lax.scan(body, eplb.LoadTracker(L, E, W, backend="jax"), ids)
        return tracker, tracker.load(), eplb.rebalance_experts(tracker.load(), 12, 4, 2, 4).phy2log

    tracker, load, phy2log = scanned(stacked)
    expected = _reference(steps)
    for t in (eager, jitted, tracker):
        assert isinstance(t, eplb.LoadTracker)
        assert t.load().dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(t.load()), expected)
    np.testing.assert_array_equal(np.asarray(load), expected)
    np.testing.assert_array_equal(np.asarray(phy2log), eplb.rebalance_experts(expected, 12, 4, 2, 4).phy2log)
    assert int(tracker.steps) == len(steps)


def test_jax_is_a_pure_pytree(jax):
    """A JAX tracker is a pytree of 3 leaves; methods return new trackers and leave the old one as it was."""
    tracker = eplb.LoadTracker(L, E, W, backend="jax")
    assert len(jax.tree_util.tree_leaves(tracker)) == 3
    ids = jax.numpy.asarray(_steps(1)[0])
    recorded = tracker.record(ids, mask=jax.numpy.ones(T, dtype=bool))
    assert recorded is not tracker and int(tracker.pending.sum()) == 0
    counted = tracker.record_counts(jax.numpy.asarray(_reference([np.asarray(ids)]))).step()
    np.testing.assert_array_equal(np.asarray(counted.load()), np.asarray(recorded.step().load()))
    doubled = jax.tree_util.tree_map(lambda a: a * 2, counted)
    assert int(doubled.steps) == 2
    assert int(counted.reset().load().sum()) == 0


# ---------------------------------------------------------------- input checks (issue 14)

BACKENDS = ["numpy", "torch", "jax"]
INT32_MAX = 2**31 - 1


def _framework(backend: str):
    """``asarray(values, dtype)``: a host-readable array of ``backend``; skips if the framework is missing.

    JAX arrays go on the CPU (where JAX defaults to a GPU they would not be
    readable without a sync, and the device rules would apply).
    """
    if backend == "torch":
        torch = pytest.importorskip("torch")
        return lambda x, dtype=None: torch.from_numpy(np.array(x, dtype=dtype))
    if backend == "jax":
        jax = pytest.importorskip("jax")
        cpu = jax.devices("cpu")[0]
        return lambda x, dtype=None: jax.device_put(np.array(x, dtype=dtype), cpu)
    return lambda x, dtype=None: np.array(x, dtype=dtype)


def _tracker(backend: str, num_layers: int, num_experts: int, window: int) -> eplb.LoadTracker:
    """A tracker on the CPU (host-readable inputs stay on its device)."""
    device = pytest.importorskip("jax").devices("cpu")[0] if backend == "jax" else None
    return eplb.LoadTracker(num_layers, num_experts, window, backend=backend, device=device)


def _host(a) -> np.ndarray:
    return np.asarray(a.cpu() if hasattr(a, "cpu") and not isinstance(a, np.ndarray) else a)


def _state(tracker) -> tuple[np.ndarray, ...]:
    return tuple(_host(a).copy() for a in (tracker.counts, tracker.pending, tracker.steps))


def _oracle_pending(records, num_layers: int, num_experts: int) -> list[list[int]]:
    """Plain-Python counts per (layer, expert) of ``(layer, ids)`` records.

    Ids outside [0, E) and layers outside [0, L) count nothing.
    """
    table = [[0] * num_experts for _ in range(num_layers)]
    for layer, ids in records:
        if not 0 <= layer < num_layers:
            continue
        for i in ids:
            if 0 <= i < num_experts:
                table[layer][i] += 1
    return table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", ["True", "np.True_", "numpy 0-d", "framework 0-d"])
def test_bool_layer_is_a_type_error(backend, make):
    """A bool is an int to Python: layer=True counted into layer 1."""
    asarray = _framework(backend)
    layer = {"True": True, "np.True_": np.True_, "numpy 0-d": np.array(True), "framework 0-d": asarray(True)}[make]
    tracker = _tracker(backend, L, E, W)
    with pytest.raises(TypeError, match="layer"):
        tracker.record(asarray([[1, 2]]), layer=layer)
    with pytest.raises(TypeError, match="layer"):
        tracker.record_counts(asarray(np.ones(E, dtype=np.int32)), layer=layer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", ["float", "np.float64", "numpy 0-d", "framework 0-d"])
def test_float_layer_is_a_type_error(backend, make):
    asarray = _framework(backend)
    layer = {"float": 1.0, "np.float64": np.float64(1), "numpy 0-d": np.array(1.0), "framework 0-d": asarray(1.0)}[make]
    tracker = _tracker(backend, L, E, W)
    with pytest.raises(TypeError, match="layer"):
        tracker.record(asarray([[1, 2]]), layer=layer)
    with pytest.raises(TypeError, match="layer"):
        tracker.record_counts(asarray(np.ones(E, dtype=np.int32)), layer=layer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (2,)])
@pytest.mark.parametrize("own", [False, True], ids=["numpy", "framework"])
def test_layer_must_be_0d(backend, shape, own):
    asarray = _framework(backend)
    layer = (asarray if own else np.array)(np.ones(shape, dtype=np.int32))
    tracker = _tracker(backend, L, E, W)
    with pytest.raises(ValueError, match=r"layer must be a scalar \(a 0-d array\), got shape"):
        tracker.record(asarray([[1, 2]]), layer=layer)
    with pytest.raises(ValueError, match="layer must be a scalar"):
        tracker.record_counts(asarray(np.ones(E, dtype=np.int32)), layer=layer)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [-1, -L, L, INT32_MAX])
@pytest.mark.parametrize("own", [False, True], ids=["numpy", "framework"])
def test_host_readable_layer_out_of_range_is_a_value_error(backend, value, own):
    """0-d arrays readable without a sync (numpy, CPU torch, JAX on the CPU) are range-checked like ints."""
    asarray = _framework(backend)
    layer = (asarray if own else np.array)(value, dtype=np.int32)
    tracker = _tracker(backend, L, E, W)
    with pytest.raises(ValueError, match=rf"layer={value} must be in \[0, {L}\)"):
        tracker.record(asarray([[0, 1]]), layer=layer)
    with pytest.raises(ValueError, match=rf"layer={value} must be in \[0, {L}\)"):
        tracker.record_counts(asarray(np.ones(E, dtype=np.int32)), layer=layer)


def test_foreign_framework_layer_is_a_type_error():
    """A torch tensor is no layer for a JAX tracker (and the reverse): the rule is numpy or the tracker's framework."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match="layer must be None, an int or a 0-d integer array"):
        eplb.LoadTracker(L, E, W, backend="jax").record(jnp.zeros((T, K), dtype=jnp.int32), layer=torch.tensor(1))
    with pytest.raises(TypeError, match="layer must be None, an int or a 0-d integer array"):
        eplb.LoadTracker(L, E, W, backend="torch").record(torch.zeros((T, K), dtype=torch.int32), layer=jnp.int32(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
@pytest.mark.parametrize("own", [False, True], ids=["numpy", "framework"])
def test_record_counts_needs_an_integer_dtype(backend, dtype, own):
    """1.7 was truncated to 1, and bools counted as 0/1."""
    asarray = _framework(backend)
    counts = (asarray if own else np.array)(np.full(E, 1.7).astype(dtype))
    tracker = _tracker(backend, L, E, W)
    with pytest.raises(TypeError, match="counts must have an integer dtype, got dtype"):
        tracker.record_counts(counts, layer=0)
    with pytest.raises(TypeError, match="counts must have an integer dtype"):
        tracker.record_counts(asarray(np.ones((L, E)).astype(dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, INT32_MAX + 1, 2**32 + 3, 2**62])
def test_record_counts_host_values_must_fit_int32_counters(backend, bad):
    """Negative counts were added, 2**32 + 3 became 3 (int64 -> int32)."""
    counts = np.zeros(E, dtype=np.int64)
    counts[E - 1] = bad
    tracker = _tracker(backend, L, E, W)
    _framework(backend)
    with pytest.raises(ValueError, match=r"counts must be in \[0, 2\*\*31 - 1\]"):
        tracker.record_counts(counts, layer=1)
    with pytest.raises(ValueError, match=r"counts must be in \[0, 2\*\*31 - 1\]"):
        tracker.record_counts(list(np.broadcast_to(counts, (L, E)).tolist()))


@pytest.mark.parametrize("dtype", ["int64", "uint64", "int32"])
def test_record_counts_torch_cpu_values_are_checked(dtype):
    torch = pytest.importorskip("torch")
    tracker = eplb.LoadTracker(L, E, W, backend="torch")
    bad = {"int64": 2**32 + 3, "uint64": 2**63 + 3, "int32": -1}[dtype]
    values = np.zeros(E, dtype=dtype)
    values[0] = bad
    counts = torch.from_numpy(values)
    with pytest.raises(ValueError, match=r"counts must be in \[0, 2\*\*31 - 1\] \(int32 counters\), got values in"):
        tracker.record_counts(counts, layer=0)


def test_record_counts_jax_cpu_values_are_checked(jax):
    asarray = _framework("jax")
    tracker = _tracker("jax", L, E, W)
    with pytest.raises(ValueError, match=r"counts must be in \[0, 2\*\*31 - 1\]"):
        tracker.record_counts(asarray(np.full(E, -3, dtype=np.int32)), layer=0)
    with jax.enable_x64(True):
        tracker = _tracker("jax", L, E, W)
        big = asarray(np.full(E, 2**32 + 3, dtype=np.int64))
        assert big.dtype == np.int64
        with pytest.raises(ValueError, match=r"counts must be in \[0, 2\*\*31 - 1\]"):
            tracker.record_counts(big, layer=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float32])
@pytest.mark.parametrize("own", [False, True], ids=["numpy", "framework"])
def test_mask_must_be_bool(backend, dtype, own):
    """A 0/1 integer mask is refused too: it is easily a list of token indices instead of a mask."""
    asarray = _framework(backend)
    mask = (asarray if own else np.array)((np.arange(T) % 2).astype(dtype))
    tracker = _tracker(backend, L, E, W)
    ids = asarray(np.zeros((T, K), dtype=np.int32))
    with pytest.raises(TypeError, match="mask must be a bool array"):
        tracker.record(ids, layer=0, mask=mask)
    with pytest.raises(TypeError, match="mask must be a bool array"):
        tracker.record(asarray(np.zeros((L, T, K), dtype=np.int32)), mask=mask)


# Each id dtype, with ids around its edges: only 0 .. E-1 count. E = 130 puts
# layer * (E + 1) + id beyond int8, and 2**32 + 3 / 2**31 + 3 must not wrap onto 3.
WIDE_E = 130


def _edge_ids(dtype) -> list[int]:
    info = np.iinfo(dtype)
    candidates = [0, 1, 3, WIDE_E - 1, WIDE_E, 127, -1, -(2**31), 2**31 + 3, 2**32 + 3, -(2**32) + 3, 2**63 - 1]
    return [int(info.min), int(info.max), *(v for v in candidates if info.min <= v <= info.max)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_are_compared_exactly(backend):
    """Ids of any integer dtype count only when in [0, E): nothing wraps into a valid id, nothing overflows.

    Before: int8 ids overflowed ``layer * (E + 1) + id`` (numpy OverflowError),
    torch refused int8/int16 index tensors and could not compare uint16/32/64,
    JAX read numpy int64 ``2**32 + 3`` as expert 3.
    """
    asarray = _framework(backend)
    for dtype in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"):
        values = _edge_ids(dtype)
        ids = np.array(values, dtype=dtype).reshape(-1, 1)
        inputs = {"numpy": ids}
        if backend == "torch" or (backend == "jax" and np.dtype(dtype).itemsize < 8):
            inputs[backend] = asarray(ids)  # JAX holds no 64-bit ints without x64
        for kind, x in inputs.items():
            tracker = _tracker(backend, 2, WIDE_E, 1)
            tracker = tracker.record(x, layer=1).step()
            expected = _oracle_pending([(1, values)], 2, WIDE_E)
            assert _host(tracker.load()).tolist() == expected, f"{kind} {dtype} ids {values}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("num_layers", "num_experts", "window"), [(1, 1, 1), (L, E, W)])
def test_failed_calls_leave_the_tracker_unchanged(backend, num_layers, num_experts, window):
    """Every check runs before the pending step changes; degenerate sizes included."""
    asarray = _framework(backend)
    tracker = _tracker(backend, num_layers, num_experts, window)
    ids = asarray(np.zeros((T, K), dtype=np.int32))
    tracker = tracker.record(ids, layer=0).step().record(ids, layer=num_layers - 1)
    before = _state(tracker)
    counts = np.ones(num_experts, dtype=np.int64)
    bad_calls = [
        lambda t: t.record(ids, layer=True),
        lambda t: t.record(ids, layer=asarray(True)),
        lambda t: t.record(ids, layer=np.array(-1)),
        lambda t: t.record(ids, layer=asarray(num_layers, dtype=np.int32)),
        lambda t: t.record(ids, layer=asarray(0.0)),
        lambda t: t.record(ids, layer=np.zeros(1, dtype=np.int32)),
        lambda t: t.record(ids, layer=0, mask=asarray(np.ones(T, dtype=np.int32))),
        lambda t: t.record_counts(counts * 1.7, layer=0),
        lambda t: t.record_counts(counts.astype(bool), layer=0),
        lambda t: t.record_counts(-counts, layer=0),
        lambda t: t.record_counts(counts * 2**32, layer=0),
        lambda t: t.record_counts(counts, layer=np.array(num_layers)),
    ]
    for call in bad_calls:
        with pytest.raises((TypeError, ValueError)):
            call(tracker)
        after = _state(tracker)
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)
    assert int(tracker.step().load().sum()) == min(window, 2) * T * K  # still records fine


# ------------------------------------------ values unreadable without a sync: the device rules


def _mixed_layers(num_layers: int) -> list[int]:
    return [0, -1, num_layers - 1, num_layers, -num_layers, INT32_MAX, num_layers // 2]


@pytest.mark.parametrize(("num_layers", "num_experts"), [(1, 1), (L, E)])
def test_jax_traced_layer_out_of_range_counts_nothing(jax, num_layers, num_experts):
    """Under jit / lax.scan a layer has no value to check: one outside [0, L) counts nothing.

    Before, -1 counted into the last layer (JAX wraps negative scatter indices).
    """
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    layers = _mixed_layers(num_layers)
    ids = rng.integers(-1, num_experts + 1, (len(layers), T, K)).astype(np.int32)

    @jax.jit
    def run(tracker, layers, ids):
        def body(t, x):
            return t.record(x[1], layer=x[0]), None

        return jax.lax.scan(body, tracker, (layers, ids))[0].step()

    tracker = run(eplb.LoadTracker(num_layers, num_experts, 1, backend="jax"), jnp.asarray(layers), jnp.asarray(ids))
    expected = _oracle_pending(zip(layers, (i.reshape(-1).tolist() for i in ids), strict=True), num_layers, num_experts)
    assert np.asarray(tracker.load()).tolist() == expected


@pytest.mark.parametrize(("num_layers", "num_experts"), [(1, 1), (L, E)])
def test_jax_traced_counts_are_saturated(jax, num_layers, num_experts):
    """Traced counts are clipped to [0, 2**31 - 1] (never negative, never wrapped).

    A traced layer out of range counts nothing.
    """
    jnp = jax.numpy
    raw = np.array([-5, INT32_MAX, 7, -(2**31)], dtype=np.int32)[:num_experts]
    raw = np.resize(raw, num_experts)
    jitted = jax.jit(lambda t, c, layer: t.record_counts(c, layer=layer).step())
    for layer in _mixed_layers(num_layers):
        tracker = jitted(eplb.LoadTracker(num_layers, num_experts, 1, backend="jax"), jnp.asarray(raw), layer)
        expected = np.zeros((num_layers, num_experts), dtype=np.int64)
        if 0 <= layer < num_layers:
            expected[layer] = [min(max(int(c), 0), INT32_MAX) for c in raw]
        np.testing.assert_array_equal(np.asarray(tracker.load()), expected)
    every = jax.jit(lambda t, c: t.record_counts(c).step())(
        eplb.LoadTracker(num_layers, num_experts, 1, backend="jax"), jnp.asarray(np.tile(raw, (num_layers, 1)))
    )
    np.testing.assert_array_equal(np.asarray(every.load()), np.tile(np.clip(raw, 0, None), (num_layers, 1)))


@pytest.fixture
def torch_unreadable(monkeypatch):
    """torch CPU tensors taken as unreadable, as CUDA tensors are: the sync-free path, on the CPU."""
    torch = pytest.importorskip("torch")
    import eplb.tracker

    real = eplb.tracker._host_values
    monkeypatch.setattr(eplb.tracker, "_host_values", lambda x: None if isinstance(x, torch.Tensor) else real(x))
    return torch


@pytest.mark.parametrize(("num_layers", "num_experts"), [(1, 1), (L, E)])
def test_torch_device_layer_out_of_range_counts_nothing(torch_unreadable, num_layers, num_experts):
    """The sync-free rule (CUDA tensors): a layer outside [0, L) counts nothing, whatever its integer dtype."""
    torch = torch_unreadable
    rng = np.random.default_rng(2)
    tracker = eplb.LoadTracker(num_layers, num_experts, 1, backend="torch")
    records = []
    for layer in _mixed_layers(num_layers):
        for dtype in (torch.int64, torch.int32, torch.uint8):
            if dtype == torch.uint8 and not 0 <= layer < 256:
                continue
            ids = rng.integers(-1, num_experts + 1, (T, K))
            tracker.record(torch.from_numpy(ids), layer=torch.tensor(layer, dtype=dtype))
            records.append((layer, ids.reshape(-1).tolist()))
    tracker.step()
    assert tracker.load().tolist() == _oracle_pending(records, num_layers, num_experts)


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint64", "uint32", "int8"])
def test_torch_device_counts_are_saturated(torch_unreadable, dtype):
    torch = torch_unreadable
    info = np.iinfo(dtype)
    raw = [info.min, info.max, 0, 7, min(2**31, int(info.max)), max(-3, int(info.min))]
    counts = torch.from_numpy(np.array(raw, dtype=dtype))
    tracker = eplb.LoadTracker(2, len(raw), 1, backend="torch")
    tracker.record_counts(counts, layer=torch.tensor(1)).record_counts(counts, layer=torch.tensor(-1)).step()
    expected = [[0] * len(raw), [min(max(int(c), 0), INT32_MAX) for c in raw]]
    assert tracker.load().tolist() == expected


@pytest.mark.gpu
def test_torch_cuda_checks_do_not_sync():
    """CUDA layer/counts/ids: the checks read only metadata (no sync); the device rules hold, in a CUDA graph too."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tracker = eplb.LoadTracker(L, E, 1, backend="torch", device="cuda")
    layers = [torch.tensor(v, device="cuda") for v in (1, -1, L, INT32_MAX)]
    ids = torch.tensor([[2**32 + 3, 3], [-1, E - 1]], dtype=torch.int64, device="cuda")
    counts = torch.tensor([-5, 2**40, *range(E - 2)], dtype=torch.int64, device="cuda")
    mask = torch.tensor([True, False], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in layers:
            tracker.record(ids, layer=layer, mask=mask)
            tracker.record_counts(counts, layer=layer)
        tracker.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = np.zeros((L, E), dtype=np.int64)
    expected[1, 3] += 1  # 2**32 + 3 is no expert; the masked-out row is not counted
    expected[1] += [0, INT32_MAX, *range(E - 2)]
    np.testing.assert_array_equal(tracker.load().cpu().numpy(), expected)

    layer = torch.tensor(0, device="cuda")
    tracker.reset()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside capture
        tracker.record(ids, layer=layer).record_counts(counts, layer=layer)
    torch.cuda.current_stream().wait_stream(stream)
    tracker.reset()
    with torch.cuda.graph(graph):
        tracker.record(ids, layer=layer).record_counts(counts, layer=layer).step()
    tracker.reset()
    for value in (2, -1, L):
        layer.fill_(value)
        graph.replay()
    expected = np.zeros((L, E), dtype=np.int64)  # window 1: the last replay (layer L) counts nothing
    np.testing.assert_array_equal(tracker.load().cpu().numpy(), expected)
    layer.fill_(2)
    graph.replay()
    expected[2] = [0, INT32_MAX, *range(E - 2)]
    expected[2, 3] += 1
    expected[2, E - 1] += 1
    np.testing.assert_array_equal(tracker.load().cpu().numpy(), expected)


@pytest.mark.gpu
def test_jax_gpu_layer_is_not_read(jax):
    """A JAX array on a GPU is not read on the host: an out-of-range one counts nothing, eagerly too."""
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("no JAX GPU")
    jnp = jax.numpy
    tracker = eplb.LoadTracker(L, E, 1, backend="jax", device=gpu)
    ids = jax.device_put(jnp.asarray([[1, 2]]), gpu)
    for value in (-1, L, 1):
        tracker = tracker.record(ids, layer=jax.device_put(jnp.int32(value), gpu))
        tracker = tracker.record_counts(jax.device_put(jnp.full(E, -2, dtype=jnp.int32), gpu), layer=jnp.int32(value))
    expected = np.zeros((L, E), dtype=np.int64)
    expected[1, [1, 2]] = 1
    np.testing.assert_array_equal(np.asarray(tracker.step().load()), expected)
