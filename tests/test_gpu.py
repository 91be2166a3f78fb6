"""GPU-only checks: no host sync on torch CUDA, and the float facts the design relies on.

Placement identity on GPUs is covered by the cross-backend suite (its
``torch:cuda`` and ``jax:gpu`` params); these tests skip without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb

from . import cases
from .conftest import needs_gpu

needs_torch_cuda = needs_gpu("torch")
needs_jax_gpu = needs_gpu("jax")

CONFIGS = [(288, 8, 4, 32), (288, 8, 3, 144), (16, 4, 2, 16)]


OPTIONS = [{"policy": "greedy"}, {"policy": "refined"}, {"policy": "refined", "spill": 2}]


@needs_torch_cuda
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("dtype", ["int64", "float32", "bfloat16"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_torch_cuda_never_syncs(config, dtype, options):
    import torch

    experts = 16 if config[0] == 16 else 256
    if options.get("spill", 0) > (0 if config[1] % config[2] else (config[0] - experts) // config[2]):
        pytest.skip("this spill needs the hierarchical policy and redundant slots")
    rng = np.random.default_rng(0)
    weight = torch.as_tensor(cases.random_int(rng, 12, experts, total=2**20), device="cuda").to(getattr(torch, dtype))
    expected = eplb.rebalance_experts(weight.cpu(), *config, **options)
    eplb.rebalance_experts(weight, *config, **options)  # first call on a device may build constant tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        placement = eplb.rebalance_experts(weight, *config, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(placement, expected, strict=True):
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), want)


def _captured(call, *, no_sync=False):
    """``(graph, outputs)``: ``call()`` run once on a side stream (a first call may build constant tables:
    a host copy, so a sync, once per device), then captured as one CUDA graph, whose replays write
    ``outputs``. ``no_sync``: the warm call after the first runs eagerly under
    ``set_sync_debug_mode("error")`` (any synchronising operation raises), and so does the capture."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up outside capture and outside the sync check: constant tables are built here
    try:
        if no_sync:
            torch.cuda.set_sync_debug_mode("error")
            with torch.cuda.stream(stream):
                call()  # a warm eager call never syncs
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return graph, outputs


@needs_torch_cuda
def test_torch_cuda_graph_capture_and_replay():
    """No sync and no host-dependent shapes: the whole call captures as one CUDA graph."""
    import torch

    rng = np.random.default_rng(1)
    static_weight = torch.as_tensor(cases.lognormal_f32(rng, 58, 256), device="cuda")
    graph, static_out = _captured(lambda: eplb.rebalance_experts(static_weight, 288, 8, 4, 32))
    for seed in (2, 3):
        new = cases.lognormal_f32(np.random.default_rng(seed), 58, 256)
        static_weight.copy_(torch.as_tensor(new))
        graph.replay()
        torch.cuda.synchronize()
        expected = eplb.rebalance_experts(new, 288, 8, 4, 32)
        for got, want in zip(static_out, expected, strict=True):
            np.testing.assert_array_equal(got.cpu().numpy(), want)


LIVE_CALLS = {
    "previous": {},
    "previous + tolerance": {"balance_tolerance": 0.005},
    "active_gpus + previous + tolerance": {"active_gpus": True, "balance_tolerance": 0.05},
    "gpu_capacity + previous + tolerance": {"gpu_capacity": True, "balance_tolerance": 0.01},
}


@needs_torch_cuda
@pytest.mark.parametrize("call", LIVE_CALLS, ids=lambda name: name.replace(" ", ""))
@pytest.mark.parametrize("config", CONFIGS[:2], ids=lambda c: "-".join(map(str, c)))
def test_torch_cuda_live_replan_captures_as_a_cuda_graph(config, call):
    """The re-plan of a live job (``previous=``, its knobs, a GPU down, slower GPUs) never syncs and captures as
    one CUDA graph: replayed on other loads, previous placements and masks, it gives numpy's placements."""
    import torch

    options = dict(LIVE_CALLS[call])
    options_key = next((key for key in ("active_gpus", "gpu_capacity") if options.pop(key, False)), None)
    loads, vectors = cases.replan_inputs(options_key, config[3])  # vectors: the mask or capacities of each replay
    masked = {} if options_key is None else {options_key: vectors[0]}
    previous = [np.asarray(eplb.rebalance_experts(w, *config, **masked).phy2log) for w in loads]

    def static(x):
        return None if x is None else torch.as_tensor(x, device="cuda")

    weight, prev, vector = static(loads[1]), static(previous[0]), static(vectors[0])
    extra = {} if vector is None else {options_key: vector}
    graph, out = _captured(
        lambda: eplb.rebalance_experts(weight, *config, previous=prev, **extra, **options), no_sync=True
    )
    for k in range(3):  # new loads, previous placement and mask/capacities each replay
        w_now, prev_now = loads[(k + 1) % 3], previous[k]
        weight.copy_(torch.as_tensor(w_now))
        prev.copy_(torch.as_tensor(prev_now))
        now = {}
        if vector is not None:
            vector.copy_(torch.as_tensor(vectors[k]))
            now = {options_key: vectors[k]}
        graph.replay()
        want = eplb.rebalance_experts(w_now, *config, previous=prev_now, **now, **options)
        for got, x in zip(out, want, strict=True):
            np.testing.assert_array_equal(got.cpu().numpy(), x)


@needs_jax_gpu
def test_jax_gpu_float_facts():
    """What the identical-placement rules rely on, re-checked on this GPU.

    Products, comparisons of products and stable descending argsort match
    numpy exactly; float32 division need not (we never compare quotients).
    """
    import jax
    import jax.numpy as jnp

    gpu = jax.devices("gpu")[0]
    rng = np.random.default_rng(5)
    a = rng.lognormal(0, 3, 1_000_000).astype(np.float32)
    b = rng.lognormal(0, 3, 1_000_000).astype(np.float32)
    ga, gb = jax.device_put(a, gpu), jax.device_put(b, gpu)
    np.testing.assert_array_equal(np.asarray(jax.jit(jnp.multiply)(ga, gb)), a * b)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, y: x + y)(ga, gb)), a + b)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, y: x * y > y * x * 1.0)(ga, gb)), a * b > b * a)
    keys = rng.integers(0, 50, (64, 300)).astype(np.float32)
    got = jax.jit(lambda k: jnp.argsort(k, axis=-1, descending=True, stable=True))(jax.device_put(keys, gpu))
    np.testing.assert_array_equal(np.asarray(got), np.argsort(-keys, axis=-1, kind="stable"))
    recip = np.float32(1) / np.arange(1, 300, dtype=np.float32)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(jnp.multiply)(ga[:299], jax.device_put(recip, gpu))), a[:299] * recip
    )
    quotient_mismatch = np.mean(np.asarray(jax.jit(jnp.divide)(ga, gb)) != a / b)
    print(f"JAX GPU float32 a/b differs from numpy in {quotient_mismatch:.1%} of cases")


@needs_jax_gpu
def test_jax_gpu_result_stays_on_gpu():
    import jax

    weight = jax.device_put(cases.lognormal_f32(np.random.default_rng(6), 4, 16), jax.devices("gpu")[0])
    placement = eplb.rebalance_experts(weight, 24, 4, 2, 4)
    for arr in placement:
        assert {d.platform for d in arr.devices()} == {"gpu"}
