"""The torch paths read nothing on the host: every call on ``meta`` tensors returns ``meta`` tensors.

A ``meta`` tensor has a shape and a dtype but no data, so every host read raises on it: ``.item()``,
``bool()``, ``.tolist()``, ``.cpu()``, ``nonzero`` and boolean-mask indexing (checked below). A call that
returns ``meta`` tensors has therefore read no value of its inputs or of its intermediate tensors on the
host: on CUDA it would queue its work without a synchronisation. This runs the torch-ops paths (the adapter
picks the Triton kernels on CUDA only; their launchers only allocate and launch) with every loop step run,
as on CUDA (``eplb._xp.refine_rows`` runs all rounds off the CPU), without a GPU. The CUDA tests check the
same on the card with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest

import eplb

torch = pytest.importorskip("torch")

EXPERTS, SLOTS, GROUPS, NODES, GPUS = 8, 16, 4, 2, 4


def _meta(*shape: int, dtype=None):
    return torch.empty(*shape, dtype=dtype or torch.float32, device="meta")


@pytest.mark.parametrize(
    "read",
    [
        lambda x: x.sum().item(),
        lambda x: bool(x.any()),
        lambda x: x.tolist(),
        lambda x: x.cpu(),
        lambda x: x.nonzero(),
        lambda x: x[x > 0],
    ],
    ids=["item", "bool", "tolist", "cpu", "nonzero", "mask"],
)
def test_meta_tensors_refuse_host_reads(read):
    with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
        read(_meta(3))


CALLS = {
    "greedy": {},
    "refined": {"policy": "refined"},
    "spill": {"spill": 2},
    "survivable": {"policy": "survivable"},
    "previous": {"previous": True},
    "previous + tolerance": {"previous": True, "balance_tolerance": 0.01},
    "previous + max_moves": {"previous": True, "max_moves": 3},
    # Knobs as 0-d tensors on the loads' device (a dtype here: such a tensor): read there, never on the host.
    "previous + knobs as tensors": {"previous": True, "balance_tolerance": torch.float32, "max_moves": torch.int64},
    "active_gpus": {"active_gpus": True},
    "active_gpus + previous": {"active_gpus": True, "previous": True},
    "active_gpus + previous + tolerance": {"active_gpus": True, "previous": True, "balance_tolerance": torch.float32},
    "gpu_capacity": {"gpu_capacity": True},
    "gpu_capacity + previous + tolerance": {"gpu_capacity": True, "previous": True, "balance_tolerance": 0.01},
    # Two slots per GPU: placement by time's pair stage (and its budget sets), with the keep-in-place search.
    "gpu_capacity + previous + tolerance, 2 slots per GPU": {
        "gpu_capacity": True,
        "previous": True,
        "balance_tolerance": 0.01,
        "gpus": SLOTS // 2,
    },
}


# spill needs the hierarchical policy (groups on home nodes): that pair alone is left out.
# (the two-slot call runs globally only: its hierarchical pair stage adds seconds on meta tensors)
_PAIRS = [
    (name, hier) for name in CALLS for hier in (True, False)
    if not (hier and "gpus" in CALLS[name]) and (hier or not CALLS[name].get("spill"))
]  # fmt: skip


@pytest.fixture
def no_host_copies(monkeypatch):
    """Fails the test if eplb copies host data (a Python scalar, a list, a numpy array) to a ``meta`` device,
    except in :func:`eplb._xp.constant` (a config's table, made once per device and kept). On CUDA such a copy
    waits for the stream (a sync) and breaks a CUDA graph capture; array-api-compat's torch ``minimum`` and
    ``maximum`` with a Python scalar made one per call (and per loop step of the sticky repacking) before."""
    from eplb import _xp

    copies: list[str] = []
    in_constant = [False]

    def refusing(real):
        def create(data, *args, **kwargs):
            device = kwargs.get("device")
            on_meta = device is not None and torch.device(device).type == "meta"
            if on_meta and not isinstance(data, torch.Tensor) and not in_constant[0]:
                copies.append(repr(data)[:40])
            return real(data, *args, **kwargs)

        return create

    real_constant = _xp.constant

    def constant(*args, **kwargs):
        in_constant[0] = True
        try:
            return real_constant(*args, **kwargs)
        finally:
            in_constant[0] = False

    for name in ("asarray", "tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, refusing(getattr(torch, name)))
    monkeypatch.setattr(_xp, "constant", constant)
    yield
    assert not copies, f"host data copied to the device: {copies}"


@pytest.mark.parametrize("before", [6, 3], ids=["down", "up"])
@pytest.mark.parametrize("vectors", ["none", "active_gpus", "gpu_capacity"])
def test_a_changed_gpu_count_reads_nothing_on_the_host(before, vectors, no_host_copies):
    """``previous`` from another GPU count (the global rule on ``max(before, G)`` GPUs): no host read, no host
    data copied to the device (the all-up mask of the new count was a host array copied every call before)."""
    per_gpu = SLOTS // GPUS
    kwargs = {"previous": _meta(3, before * per_gpu, dtype=torch.int64), "balance_tolerance": 0.01}
    if vectors == "active_gpus":
        kwargs["active_gpus"] = torch.ones(GPUS, dtype=torch.bool, device="meta")
    elif vectors == "gpu_capacity":
        kwargs["gpu_capacity"] = _meta(GPUS)
    placement = eplb.rebalance_experts(_meta(3, EXPERTS), SLOTS, 1, 1, GPUS, hierarchical=False, **kwargs)
    assert [x.device.type for x in placement] == ["meta"] * 3 and placement.phy2log.shape == (3, SLOTS)


@pytest.mark.parametrize(
    ("options", "hierarchical"),
    [(CALLS[name], hier) for name, hier in _PAIRS],
    ids=[f"{name}-{'hierarchical' if hier else 'global'}" for name, hier in _PAIRS],
)
def test_every_call_reads_nothing_on_the_host(options, hierarchical, no_host_copies):
    """... and copies no host data to the device (``no_host_copies``)."""
    kwargs = dict(options)
    gpus = kwargs.pop("gpus", GPUS)
    if kwargs.pop("previous", False):
        kwargs["previous"] = _meta(3, SLOTS, dtype=torch.int64)
    if kwargs.pop("active_gpus", False):
        kwargs["active_gpus"] = torch.ones(gpus, dtype=torch.bool, device="meta")
    if kwargs.pop("gpu_capacity", False):
        kwargs["gpu_capacity"] = _meta(gpus)
    for knob in ("balance_tolerance", "max_moves"):
        if isinstance(kwargs.get(knob), torch.dtype):
            kwargs[knob] = torch.empty((), dtype=kwargs[knob], device="meta")
    placement = eplb.rebalance_experts(
        _meta(3, EXPERTS), SLOTS, GROUPS, NODES, gpus, hierarchical=hierarchical, **kwargs
    )
    assert [x.device.type for x in placement] == ["meta"] * 3
    assert placement.phy2log.shape == (3, SLOTS) and placement.logcnt.shape == (3, EXPERTS)
    assert placement.log2phy.shape[:2] == (3, EXPERTS)
    assert all(x.dtype == torch.int64 for x in placement)


@pytest.mark.parametrize("hierarchical", [True, False], ids=["hierarchical", "global"])
@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "previous"])
def test_refined_pair_stage_reads_nothing_on_the_host(hierarchical, previous, no_host_copies):
    """Two slots per GPU: the refined policy's pair stage (its count search runs every round off the CPU)."""
    gpus = SLOTS // 2
    kwargs = {"previous": _meta(3, SLOTS, dtype=torch.int64), "balance_tolerance": 0.01} if previous else {}
    placement = eplb.rebalance_experts(
        _meta(3, EXPERTS), SLOTS, GROUPS, NODES, gpus, hierarchical=hierarchical, policy="refined", **kwargs
    )
    assert [x.device.type for x in placement] == ["meta"] * 3
    assert placement.phy2log.shape == (3, SLOTS) and placement.logcnt.shape == (3, EXPERTS)


def test_load_tracker_records_without_host_reads():
    """record (routed expert ids, one layer or all, with a mask), record_counts, step and load on meta tensors."""
    tracker = eplb.LoadTracker(num_layers=3, num_experts=EXPERTS, window=4, backend="torch", device="meta")
    topk = torch.empty(3, 5, 2, dtype=torch.int64, device="meta")  # [L, tokens, k]
    tracker.record(topk).record(topk[1], layer=1, mask=torch.ones(5, dtype=torch.bool, device="meta"))
    tracker.record_counts(_meta(3, EXPERTS, dtype=torch.int32)).step()
    load = tracker.load()
    assert load.device.type == "meta" and tuple(load.shape) == (3, EXPERTS)


def test_rebalancer_records_without_host_reads():
    """Rebalancer.record never reads the load on the host (its docstring's promise; step copies once, by design)."""
    initial = eplb.rebalance_experts(_meta(3, EXPERTS), SLOTS, GROUPS, NODES, GPUS)
    for rebalancer in (eplb.Rebalancer(SLOTS, GROUPS, NODES, GPUS), eplb.Rebalancer(SLOTS, GROUPS, NODES, GPUS,
                                                                                    initial=initial)):  # fmt: skip
        for _ in range(3):  # (with a placement in force: the window's GPU loads under it, on the device)
            rebalancer.record(_meta(3, EXPERTS))


def test_metrics_read_nothing_on_the_host():
    """eplb.metrics on device tensors stay on the device (summarize, which returns Python floats, excepted)."""
    from eplb import metrics

    weight, phy2log = _meta(3, EXPERTS), _meta(3, SLOTS, dtype=torch.int64)
    capacity = _meta(GPUS)
    outputs = [
        metrics.replica_counts(phy2log, EXPERTS),
        metrics.slot_loads(weight, phy2log),
        metrics.gpu_loads(weight, phy2log, GPUS),
        metrics.gpu_times(weight, phy2log, GPUS, capacity),
        metrics.balancedness(weight, phy2log, GPUS),
        metrics.balancedness(weight, phy2log, GPUS, gpu_capacity=capacity),
        metrics.lower_bound(weight, SLOTS, GROUPS, NODES, GPUS),
        metrics.lower_bound(weight, 2 * GPUS, GROUPS, NODES, GPUS),  # two slots per GPU: the pair bound too
        metrics.lower_bound(weight, 2 * GPUS, GROUPS, NODES, GPUS, hierarchical=False, gpu_capacity=capacity),
        metrics.surviving_load(weight, phy2log, NODES),
        *metrics.locality(weight, phy2log, GROUPS, NODES),
    ]
    assert all(x.device.type == "meta" for x in outputs)
