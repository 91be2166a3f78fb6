"""eplb.GraphedPlanner: rebalance_experts replayed as CUDA graphs (torch CUDA); any other input passed through.

The CPU tests check the pass-through and the argument rules; the GPU tests (skipped without one) check that
replays give numpy's placements on new loads, previous placements and masks, with no sync after the first call
of a signature, one capture per signature, and a warned eager fallback where a capture fails.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import eplb
from eplb.graphed import _static_inputs

from . import cases
from .conftest import needs_gpu

needs_torch_cuda = needs_gpu("torch")

# (config, options, per-call vectors): degenerate shapes included (one expert; one slot per GPU).
PASS_THROUGH = [
    ((16, 4, 2, 8), {}),
    ((16, 4, 2, 8), {"policy": "refined"}),
    ((16, 4, 2, 8), {"balance_tolerance": 0.01, "max_moves": 3}),
    ((4, 1, 1, 4), {}),  # one expert, one slot per GPU
    ((12, 4, 2, 12), {"balance_tolerance": 0.0}),  # one slot per GPU
]


def _loads(rng, layers: int, experts: int) -> np.ndarray:
    weight = cases.lognormal_f32(rng, layers, experts)
    weight[0] = 0  # an all-zero layer
    return weight


@pytest.mark.parametrize(("config", "options"), PASS_THROUGH)
def test_other_inputs_are_passed_to_rebalance_experts(config, options):
    """numpy, lists and torch CPU tensors: the planner returns rebalance_experts' placement, bit for bit."""
    experts = 1 if config[1] == 1 else 12
    rng = np.random.default_rng(3)
    old, new = _loads(rng, 3, experts), _loads(rng, 3, experts)
    previous = eplb.rebalance_experts(old, *config)
    planner = eplb.GraphedPlanner(*config, **options)
    knobs = {k: v for k, v in options.items() if k in ("balance_tolerance", "max_moves")}
    per_call = eplb.GraphedPlanner(*config, **{k: v for k, v in options.items() if k not in knobs})  # knobs per call
    inputs = [(new, previous), (new.tolist(), previous.phy2log)]
    torch = _maybe_torch()
    if torch is not None:
        inputs.append((torch.as_tensor(new), previous))
    for weight, prev in inputs:
        for kwargs in ({}, {"previous": prev}):
            if not kwargs and options:  # the knobs need previous=
                continue
            want = eplb.rebalance_experts(weight, *config, **kwargs, **options)
            for got in (planner(weight, **kwargs), per_call(weight, **kwargs, **knobs)):
                for a, b in zip(got, want, strict=True):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert planner.captures == 0 and per_call.captures == 0


def _maybe_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"previous": np.zeros((1, 16), int)}, TypeError, "pass previous to each call"),
        ({"gpu_capacity": [1.0] * 8, "active_gpus": [True] * 8}, TypeError, "active_gpus, gpu_capacity"),
        ({"balance_tolernce": 0.01}, TypeError, "unknown option"),
        ({"weight": np.zeros((1, 12))}, TypeError, "unknown option"),
        ({"balance_tolerance": True}, TypeError, "balance_tolerance must be a Python number"),
        ({"max_moves": np.zeros(())}, TypeError, "max_moves must be a Python number"),
        ({"check_values": True}, ValueError, "check_values=True"),
        ({"max_graphs": 0}, ValueError, "max_graphs must be an int >= 1"),
        ({"copy_outputs": 1}, TypeError, "copy_outputs must be a bool"),
    ],
)
def test_bad_options_are_refused(kwargs, error, words):
    with pytest.raises(error, match=words):
        eplb.GraphedPlanner(16, 4, 2, 8, **kwargs)


def test_a_knob_is_fixed_or_passed_per_call_not_both():
    planner = eplb.GraphedPlanner(16, 4, 2, 8, balance_tolerance=0.01, max_moves=None)
    weight = cases.lognormal_f32(np.random.default_rng(2), 2, 12)
    previous = eplb.rebalance_experts(weight, 16, 4, 2, 8)
    with pytest.raises(TypeError, match="balance_tolerance is fixed for this planner"):
        planner(weight, previous=previous, balance_tolerance=0.02)
    got = planner(weight, previous=previous, max_moves=2)  # max_moves=None at construction: not fixed
    want = eplb.rebalance_experts(weight, 16, 4, 2, 8, previous=previous, balance_tolerance=0.01, max_moves=2)
    np.testing.assert_array_equal(got.phy2log, want.phy2log)


def test_per_call_knobs_are_checked_before_the_graph_reads_them():
    """A per-call knob is checked as rebalance_experts checks it (a CPU tensor read as a number), or kept as a 0-d
    tensor on the loads' device; on another device it is refused (checked on CPU and meta tensors)."""
    torch = pytest.importorskip("torch")
    from eplb.graphed import _checked_knobs

    weight, prev = torch.ones(2, 12), torch.zeros(2, 16, dtype=torch.int64)
    got = _checked_knobs({"balance_tolerance": torch.tensor(0.25), "max_moves": 3}, weight, prev, 0)
    assert got == {"balance_tolerance": 0.25, "max_moves": 3}
    assert list(_checked_knobs({"max_moves": 3}, weight, prev, 0)) == ["max_moves"]
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        _checked_knobs({"balance_tolerance": -0.1}, weight, prev, 0)
    with pytest.raises(ValueError, match="only apply with previous="):
        _checked_knobs({"max_moves": 2}, weight, None, 0)
    with pytest.raises(TypeError, match=r"must be on the loads' device \(cpu\), got meta"):
        _checked_knobs({"balance_tolerance": torch.zeros((), device="meta")}, weight, prev, 0)
    on_meta = torch.ones(2, 12, device="meta")
    knob = torch.zeros((), dtype=torch.int32, device="meta")
    assert _checked_knobs({"max_moves": knob}, on_meta, prev, 0)["max_moves"] is knob
    with pytest.raises(TypeError, match=r"max_moves must be an int, got a torch tensor of torch\.float32"):
        _checked_knobs({"max_moves": knob.float()}, on_meta, prev, 0)


def test_torch_tensor_knobs_follow_the_loads():
    """rebalance_experts: a 0-d torch CPU tensor knob is read as a number (the same placement); a tensor knob
    off the loads' device, or not 0-d, is refused."""
    torch = pytest.importorskip("torch")
    config = (16, 4, 2, 8)
    weight = cases.lognormal_f32(np.random.default_rng(4), 3, 12)
    previous = eplb.rebalance_experts(cases.lognormal_f32(np.random.default_rng(5), 3, 12), *config).phy2log
    want = eplb.rebalance_experts(weight, *config, previous=previous, balance_tolerance=0.02, max_moves=4)
    got = eplb.rebalance_experts(
        torch.as_tensor(weight),
        *config,
        previous=previous,
        balance_tolerance=torch.tensor(0.02),
        max_moves=torch.tensor(4),
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    with pytest.raises(TypeError, match="balance_tolerance as a torch array on meta needs torch loads on meta"):
        eplb.rebalance_experts(weight, *config, previous=previous, balance_tolerance=torch.zeros((), device="meta"))
    with pytest.raises(ValueError, match="max_moves as a torch tensor must be 0-d"):
        eplb.rebalance_experts(weight, *config, previous=previous, max_moves=torch.ones(2, dtype=torch.int64))


def test_per_call_arguments_must_be_tensors_on_the_loads_device():
    """The graph's inputs: torch tensors on the loads' device, or a TypeError naming the argument (checked here on
    CPU tensors: the rule is the same)."""
    torch = pytest.importorskip("torch")
    weight = torch.ones(2, 12)
    prev = torch.zeros(2, 16, dtype=torch.int64)
    got = _static_inputs(weight, previous=prev, active_gpus=None, gpu_capacity=None)
    assert list(got) == ["weight", "previous"] and got["previous"] is prev
    with pytest.raises(TypeError, match=r"previous must be a torch tensor on the loads' device \(cpu\).*ndarray"):
        _static_inputs(weight, previous=prev.numpy())
    with pytest.raises(TypeError, match=r"active_gpus must be .* got list"):
        _static_inputs(weight, active_gpus=[True] * 8)
    with pytest.raises(TypeError, match=r"gpu_capacity must be .* got a torch tensor on meta"):
        _static_inputs(weight, gpu_capacity=torch.ones(8, device="meta"))


# --- GPU ---------------------------------------------------------------------------------------------------

# Fixed options, and knobs given per call (a list: one value per call; the third call passes it as a 0-d CUDA
# tensor of another dtype, copied into the graph's buffer).
LIVE = {
    "fresh": {},
    "previous + tolerance per call": {"balance_tolerance": [0.005, 0.02, 0.0]},
    "previous + max_moves per call": {"max_moves": [16, 3, 0]},
    "previous + fixed knobs": {"balance_tolerance": 0.005, "max_moves": 16},
    "active_gpus + previous": {"active_gpus": True, "balance_tolerance": 0.05},
    "gpu_capacity + previous": {"gpu_capacity": True, "balance_tolerance": [0.01, 0.0, 0.05]},
}


@needs_torch_cuda
@pytest.mark.parametrize("call", LIVE, ids=lambda name: name.replace(" ", ""))
@pytest.mark.parametrize("config", [(288, 8, 4, 32), (288, 8, 3, 144)], ids=lambda c: f"{c[3]}gpus")
def test_replays_give_numpy_placements_without_a_sync(config, call):
    """Three calls of one signature (new loads, previous placement, mask/capacities and per-call knobs each time):
    one capture, each result equal to numpy's, no sync after the first call, results not overwritten later."""
    import torch

    options = dict(LIVE[call])
    vector_name = next((key for key in ("active_gpus", "gpu_capacity") if options.pop(key, False)), None)
    per_call = {name: options.pop(name) for name in list(options) if isinstance(options[name], list)}
    loads, vectors = cases.replan_inputs(vector_name, config[3])
    planner = eplb.GraphedPlanner(*config, **options)
    results = []
    for k in range(3):
        weight = loads[(k + 1) % 3]
        kwargs = {} if vector_name is None else {vector_name: vectors[k]}
        if call != "fresh":
            kwargs["previous"] = np.asarray(eplb.rebalance_experts(loads[k], *config, **kwargs).phy2log)
        knobs = {name: values[k] for name, values in per_call.items()}
        want = eplb.rebalance_experts(weight, *config, **kwargs, **knobs, **options)
        on_gpu = {name: torch.as_tensor(x, device="cuda") for name, x in kwargs.items()}
        if k == 2:  # as 0-d tensors on the device, of another dtype than the graph's buffers
            dtypes = {"balance_tolerance": torch.float64, "max_moves": torch.int32}
            knobs = {name: torch.tensor(v, dtype=dtypes[name], device="cuda") for name, v in knobs.items()}
        weight_gpu = torch.as_tensor(weight, device="cuda")
        torch.cuda.synchronize()
        if k:
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = planner(weight_gpu, **on_gpu, **knobs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append((got, want))
    assert planner.captures == 1
    for got, want in results:  # the first results are still there: every call returns its own tensors
        for a, b in zip(got, want, strict=True):
            assert a.device.type == "cuda"
            np.testing.assert_array_equal(a.cpu().numpy(), b)


# (config, options, previous's GPU count or None): the other calls a job makes, each expected to capture.
OTHER_CALLS = [
    ((288, 8, 4, 32), {"policy": "refined", "spill": 2}, None),
    ((288, 8, 4, 32), {"policy": "survivable"}, None),
    ((288, 1, 1, 32), {"balance_tolerance": 0.05}, 36),  # scale down: previous placed on 36 GPUs
    ((288, 1, 1, 36), {}, 32),  # scale up
]


@needs_torch_cuda
@pytest.mark.parametrize(("config", "options", "before"), OTHER_CALLS, ids=["spill", "survivable", "down", "up"])
def test_other_calls_capture_too(config, options, before):
    """Refined with spill, the survivable policy, and re-plans across a changed GPU count: captured (no
    fallback warning), each of two calls equal to numpy's placement."""
    import torch

    loads = [cases.lognormal_f32(np.random.default_rng(seed), 4, 256) for seed in (6, 7, 8)]
    planner = eplb.GraphedPlanner(*config, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for k in (1, 2):
            kwargs = {}
            if before is not None:
                per_gpu = config[0] // config[3]
                old = eplb.rebalance_experts(loads[k - 1], per_gpu * before, 1, 1, before).phy2log
                kwargs["previous"] = np.asarray(old)
            want = eplb.rebalance_experts(loads[k], *config, **kwargs, **options)
            on_gpu = {name: torch.as_tensor(x, device="cuda") for name, x in kwargs.items()}
            got = planner(torch.as_tensor(loads[k], device="cuda"), **on_gpu)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a.cpu().numpy(), b)
    assert planner.captures == 1


@needs_torch_cuda
def test_signatures_outputs_and_eviction():
    """A new shape is a new capture; ``copy_outputs=False`` returns the graph's tensors (overwritten by the
    next call); beyond ``max_graphs`` the oldest graph is freed and captured again when it returns."""
    import torch

    config = (288, 8, 4, 32)
    rng = np.random.default_rng(5)
    loads = [cases.lognormal_f32(rng, layers, 256) for layers in (6, 6, 4)]
    planner = eplb.GraphedPlanner(*config, copy_outputs=False, max_graphs=1)
    first = planner(torch.as_tensor(loads[0], device="cuda"))
    first_ptr, first_value = first.phy2log.data_ptr(), first.phy2log.cpu().numpy()
    second = planner(torch.as_tensor(loads[1], device="cuda"))
    assert second.phy2log.data_ptr() == first_ptr and planner.captures == 1
    np.testing.assert_array_equal(second.phy2log.cpu().numpy(), eplb.rebalance_experts(loads[1], *config).phy2log)
    np.testing.assert_array_equal(first_value, eplb.rebalance_experts(loads[0], *config).phy2log)
    third = planner(torch.as_tensor(loads[2], device="cuda"))  # 4 layers: a new signature, the 6-layer one freed
    assert planner.captures == 2
    np.testing.assert_array_equal(third.logcnt.cpu().numpy(), eplb.rebalance_experts(loads[2], *config).logcnt)
    planner(torch.as_tensor(loads[0], device="cuda"))
    assert planner.captures == 3
    with pytest.raises(TypeError, match="previous must be a torch tensor"):
        planner(torch.as_tensor(loads[0], device="cuda"), previous=first_value)
    with pytest.raises(ValueError, match="previous"):  # the first call of a signature validates the arguments
        planner(
            torch.as_tensor(loads[0], device="cuda"), previous=torch.zeros(6, 100, dtype=torch.int64, device="cuda")
        )


@needs_torch_cuda
def test_calls_on_two_streams_do_not_overwrite_each_other():
    """Calls queued back to back from two streams, no host wait between them: each waits for the previous
    call's work on the graph's buffers, so every result is numpy's for its own loads."""
    import torch

    config = (288, 8, 3, 144)  # the slowest replay of these calls: the longest window for a race
    loads = [cases.lognormal_f32(np.random.default_rng(seed), 8, 256) for seed in range(6)]
    planner = eplb.GraphedPlanner(*config, policy="refined")
    on_gpu = [torch.as_tensor(w, device="cuda") for w in loads]
    planner(on_gpu[0])  # the capture
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:  # the loads were made on the default stream (the caller's job, as in any torch code)
        stream.wait_stream(torch.cuda.current_stream())
    results = []
    for k, weight in enumerate(on_gpu):
        with torch.cuda.stream(streams[k % 2]):
            results.append(planner(weight))
    torch.cuda.synchronize()
    for got, weight in zip(results, loads, strict=True):
        want = eplb.rebalance_experts(weight, *config, policy="refined")
        np.testing.assert_array_equal(got.phy2log.cpu().numpy(), want.phy2log)


@needs_torch_cuda
def test_a_failed_capture_warns_and_runs_eagerly(monkeypatch):
    """A plan that synchronises cannot be captured: the planner warns once and answers eagerly, correctly."""
    import torch

    import eplb.graphed as graphed

    def syncing(weight, *args, **kwargs):
        float(weight.sum())  # a device-to-host copy: not allowed while capturing
        return eplb.rebalance_experts(weight, *args, **kwargs)

    monkeypatch.setattr(graphed, "rebalance_experts", syncing)
    config = (288, 8, 4, 32)
    loads = [cases.lognormal_f32(np.random.default_rng(seed), 3, 256) for seed in (1, 2)]
    planner = graphed.GraphedPlanner(*config)
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = planner(torch.as_tensor(loads[0], device="cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = planner(torch.as_tensor(loads[1], device="cuda"))
    for placement, weight in ((got, loads[0]), (again, loads[1])):
        np.testing.assert_array_equal(placement.phy2log.cpu().numpy(), eplb.rebalance_experts(weight, *config).phy2log)
    assert planner.captures == 1
