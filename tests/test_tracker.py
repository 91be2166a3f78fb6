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
