"""Placement quality: GPU loads, balancedness, and lower bounds on the best max GPU load.

Pure functions of ``(weight, phy2log)`` and the config, written once against
the array API: they accept and return numpy, torch or JAX arrays. Loads are
float32 (as the placement itself sees them): a replica of expert ``e`` carries
``weight[e] * fl(1/logcnt[e])`` and a GPU's load is the left-to-right float32
sum over its slots.

GPUs of unequal speed (``gpu_capacity [G]``, as for
:func:`eplb.rebalance_experts`): a GPU's *time* is its load divided by its
capacity (:func:`gpu_times`), and balance is measured in time: the layer is
done when its slowest GPU is, and at best every live GPU finishes together,
at ``total load / total live capacity``. So ``balancedness`` becomes that
ideal time over the slowest GPU's time (the share of the live GPUs' compute
the layer uses; with equal capacities, mean load / max load), and
``lower_bound`` bounds the slowest time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from eplb import _validate, _xp
from eplb.algorithms.bounds import capacity_bound, capacity_node_bound, node_lower_bound, node_set_bound
from eplb.algorithms.packing import sum_left_to_right
from eplb.algorithms.pair_bound import pair_bound
from eplb.algorithms.replication import replica_load
from eplb.algorithms.speed import capacity_live, clean_capacity
from eplb.algorithms.survivable import surviving_load_share

__all__ = [
    "Locality",
    "Summary",
    "balancedness",
    "gpu_loads",
    "gpu_times",
    "locality",
    "lower_bound",
    "lower_bound_lp",
    "replica_counts",
    "slot_loads",
    "summarize",
    "surviving_load",
]


def _float32(weight: Any) -> tuple[Any, Any]:
    xp = _xp.array_namespace(weight)
    return xp, xp.astype(xp.asarray(weight), xp.float32)


def replica_counts(phy2log: Any, num_experts: int) -> Any:
    """``logcnt [L, E]``: how many slots of ``phy2log [L, R]`` hold each expert."""
    xp = _xp.array_namespace(phy2log)
    return _xp.count_rows(phy2log, num_experts, xp=xp)


def slot_loads(weight: Any, phy2log: Any) -> Any:
    """``[L, R]`` float32: the load each slot serves, ``w[e] * fl(1/logcnt[e])``; 0 for an empty slot (``-1``,
    a failed GPU's slot under ``active_gpus``)."""
    xp, weight32 = _float32(weight)
    logcnt = replica_counts(phy2log, weight32.shape[1])
    reciprocal = _xp.reciprocal_table(phy2log.shape[1], xp=xp, device=_xp.device(phy2log))
    per_replica = replica_load(weight32, logcnt, reciprocal, xp=xp)
    held = phy2log >= 0
    loads = _xp.take_along(per_replica, xp.where(held, phy2log, xp.zeros_like(phy2log)), xp=xp)
    return xp.where(held, loads, xp.zeros_like(loads))


def gpu_loads(weight: Any, phy2log: Any, num_gpus: int) -> Any:
    """``[L, num_gpus]`` float32: load of each GPU (slot ``j`` is on GPU ``j // (R // num_gpus)``)."""
    xp = _xp.array_namespace(phy2log)
    loads = slot_loads(weight, phy2log)
    num_layers, num_slots = loads.shape
    return sum_left_to_right(xp.reshape(loads, (num_layers, num_gpus, num_slots // num_gpus)), xp=xp)


def _capacity(gpu_capacity: Any, num_gpus: int, like: Any, *, xp: Any) -> Any:
    """float32 ``[1, G]`` capacities as the placement reads them, on ``like``'s device; idle GPUs 0."""
    device = None if _xp.is_numpy(xp) else _xp.device(like)
    gpu_capacity = xp.asarray(gpu_capacity, device=device)
    capacity = xp.reshape(clean_capacity(gpu_capacity, xp=xp), (1, num_gpus))
    return xp.where(capacity_live(capacity, xp=xp), capacity, xp.zeros_like(capacity))


def gpu_times(weight: Any, phy2log: Any, num_gpus: int, gpu_capacity: Any) -> Any:
    """``[L, num_gpus]`` float32: each GPU's time, its load (:func:`gpu_loads`) / its capacity.

    ``gpu_capacity [G]``: relative speeds (a numpy array or list, or an array
    of ``phy2log``'s framework). An idle GPU (capacity 0) takes 0 if it holds
    nothing, ``+inf`` if it holds load.
    """
    xp = _xp.array_namespace(phy2log)
    loads = gpu_loads(weight, phy2log, num_gpus)
    capacity = _capacity(gpu_capacity, num_gpus, loads, xp=xp)
    idle = capacity == 0
    times = loads / xp.where(idle, xp.ones_like(capacity), capacity)
    return xp.where(idle, xp.where(loads > 0, xp.inf, 0.0), times)


def _time_balance(weight: Any, phy2log: Any, num_gpus: int, gpu_capacity: Any, *, xp: Any) -> tuple[Any, Any]:
    """``[L]`` ideal time (total load / total live capacity) and slowest GPU's time."""
    times = gpu_times(weight, phy2log, num_gpus, gpu_capacity)
    capacity = _capacity(gpu_capacity, num_gpus, times, xp=xp)
    ideal = xp.sum(gpu_loads(weight, phy2log, num_gpus), axis=-1) / xp.sum(capacity, axis=-1)
    return ideal, xp.max(times, axis=-1)


def _live_mean(loads: Any, phy2log: Any, num_gpus: int, *, xp: Any) -> Any:
    """``[L]`` mean GPU load over live GPUs: those holding at least one expert (a GPU whose slots are all
    ``-1`` failed, see ``active_gpus``). Exactly ``xp.mean`` when no slot is ``-1``."""
    num_layers, num_slots = phy2log.shape
    live = xp.any(xp.reshape(phy2log >= 0, (num_layers, num_gpus, num_slots // num_gpus)), axis=-1)
    count = xp.sum(xp.astype(live, loads.dtype), axis=-1)
    masked = xp.sum(xp.where(live, loads, xp.zeros_like(loads)), axis=-1) / xp.where(count > 0, count, 1.0)
    return xp.where(xp.all(live, axis=-1), xp.mean(loads, axis=-1), masked)


def balancedness(weight: Any, phy2log: Any, num_gpus: int, *, gpu_capacity: Any = None) -> Any:
    """``[L]`` float32: mean GPU load / max GPU load per layer (1.0 = perfect; 1.0 for an all-zero layer).

    With ``-1`` slots (``active_gpus``): over the live GPUs only (a GPU whose slots are all ``-1`` is failed).
    With ``gpu_capacity [G]``: ideal time / slowest GPU's time, the ideal time being total load / total
    capacity (every GPU finishing together); 0.0 when an idle GPU (capacity 0) holds load.
    """
    xp = _xp.array_namespace(phy2log)
    if gpu_capacity is not None:
        ideal, peak = _time_balance(weight, phy2log, num_gpus, gpu_capacity, xp=xp)
        return xp.where(peak > 0, ideal / xp.where(peak > 0, peak, 1.0), 1.0)
    loads = gpu_loads(weight, phy2log, num_gpus)
    peak = xp.max(loads, axis=-1)
    mean = _live_mean(loads, phy2log, num_gpus, xp=xp)
    return xp.where(peak > 0, mean / xp.where(peak > 0, peak, 1.0), 1.0)


def lower_bound(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    hierarchical: bool | None = None,
    gpu_capacity: Any = None,
) -> Any:
    """``[L]`` float32: no placement of this policy can get the max GPU load below this.

    Global policy: the largest of ``total / G``; ``m*``, the smallest
    achievable max per-replica load with ``R`` slots (greedy replication is
    optimal for it); and a pigeonhole bound on experts that must keep a
    single replica (:func:`eplb.algorithms.bounds.pigeonhole_bound`).
    Hierarchical policy (groups stay on one node): the same per node,
    minimised over every assignment of groups to nodes when there are at
    most a thousand or so, otherwise a relaxation that holds for any
    assignment (see :func:`eplb.algorithms.bounds.node_lower_bound`).

    With ``gpu_capacity [G]``: a bound on the slowest GPU's *time* (load /
    capacity) of any placement on those GPUs
    (:func:`eplb.algorithms.bounds.capacity_bound`: total over capacity, the
    best max replica load on the fastest GPU, the lightest experts that the
    slowest GPUs' slots must take, and the pigeonhole bound); hierarchical
    policy: the same per node, minimised over every assignment of groups to
    nodes where there are at most a few thousand
    (:func:`eplb.algorithms.bounds.capacity_node_bound`), else the global
    bound. Needs at least ``E`` live slots.

    Two slots per GPU (``R = 2 G``), every policy, with or without
    capacities: also the pair bound (:func:`eplb.algorithms.pair_bound.pair_bound`,
    Hall's condition on the GPUs' pairs relaxed over replica counts), up to
    14% above the others on the DeepSeek-V3 loads at 144 GPUs. It costs a
    bisection (0.2-0.5 s for 61 layers on numpy; ``docs/benchmarks.md``).
    """
    xp, weight32 = _float32(weight)
    if hierarchical is None:
        hierarchical = num_groups % num_nodes == 0
    capacity = None if gpu_capacity is None else _capacity(gpu_capacity, num_gpus, weight32, xp=xp)
    if capacity is not None and hierarchical and num_nodes > 1:
        bound = capacity_node_bound(weight32, capacity, num_replicas, num_groups, num_nodes, num_gpus, xp=xp)
    elif capacity is not None:
        bound = capacity_bound(weight32, capacity, num_replicas, num_gpus, xp=xp)
    elif not hierarchical or num_nodes == 1:
        bound = node_set_bound(weight32, num_replicas, num_gpus, xp=xp)
    else:
        bound = node_lower_bound(weight32, num_replicas, num_groups, num_nodes, num_gpus, xp=xp)
    if num_replicas == 2 * num_gpus and weight32.shape[0] > 0:  # a hierarchical placement is a placement too
        bound = pair_bound(weight32, bound, num_gpus, capacity, xp=xp)
    return bound


def lower_bound_lp(
    weight: Any, num_replicas: int, num_gpus: int, *, gpu_capacity: Any = None, tolerance: float = 1e-4
) -> Any:
    """numpy ``[L]`` float64: a near-exact bound on the slowest GPU's time at two slots per GPU (offline; SciPy).

    No placement of ``weight [L, E]`` (numpy, torch or JAX; copied to the
    host) on ``num_gpus`` GPUs of two slots each (``num_replicas = 2 *
    num_gpus``; ``gpu_capacity [G]`` as for :func:`eplb.rebalance_experts`,
    idle GPUs hold nothing) has its slowest GPU's time (load / capacity,
    exact arithmetic) below this; every policy, as a hierarchical placement is
    a placement too. It is the linear relaxation of the placement's integer
    model (:mod:`eplb.pair_lp`), solved by SciPy's HiGHS in a bisection on the
    time between :func:`lower_bound` and the time of
    ``rebalance_experts(..., gpu_capacity=)``, to ``tolerance`` of the
    latter; at least :func:`lower_bound` less ``2**-20`` of it (that one is float32, so it may sit a
    rounding above the exact optimum). About 10 linear programs a layer,
    a few seconds a layer on a CPU core: a yardstick for benchmarks, not for a
    serving loop. ``ImportError`` without SciPy (``pip install eplb[lp]``).
    """
    import numpy as np

    def host(x: Any) -> np.ndarray:  # torch (any device, grad or not) or JAX: a host copy
        return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)

    weight64 = host(weight)
    if weight64.ndim != 2 or weight64.size == 0:
        raise ValueError(f"weight must be a non-empty 2-D [layers, experts] array, got shape {weight64.shape}")
    if weight64.dtype.kind not in "iuf":
        raise TypeError(f"weight must hold real numbers, got dtype {weight64.dtype}")
    weight64 = weight64.astype(np.float64)
    if not np.all(np.isfinite(weight64)) or np.any(weight64 < 0):
        raise ValueError("weight must hold finite loads >= 0")
    if num_replicas != 2 * num_gpus:
        raise ValueError(
            f"lower_bound_lp models two slots per GPU: num_replicas={num_replicas} must be "
            f"2 * num_gpus = {2 * num_gpus}"
        )
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be in (0, 1)")
    try:
        import scipy.optimize  # noqa: F401
    except ImportError as error:
        raise ImportError("eplb.metrics.lower_bound_lp needs SciPy (pip install scipy, or eplb[lp])") from error
    from eplb import pair_lp
    from eplb._api import rebalance_experts

    weight32 = weight64.astype(np.float32)
    speeds = {} if gpu_capacity is None else {"gpu_capacity": host(gpu_capacity).astype(np.float32)}
    capacity = (
        np.ones(num_gpus) if gpu_capacity is None else _capacity(speeds["gpu_capacity"], num_gpus, weight32, xp=np)[0]
    )
    capacity = np.asarray(capacity, np.float64)
    num_experts = weight64.shape[1]
    num_live = int((capacity > 0).sum())
    if 2 * num_live < num_experts:
        raise ValueError(f"{num_live} live GPUs hold {2 * num_live} replicas: fewer than the {num_experts} experts")
    # lower_bound is float32, so it may sit a rounding above the exact optimum: start 2**-20 of it lower.
    plain = lower_bound(weight32, num_replicas, 1, 1, num_gpus, gpu_capacity=speeds.get("gpu_capacity"))
    low = np.asarray(plain, np.float64) * (1 - 2.0**-20)
    # The bisection's top: our placement's slowest time in float64 (gpu_times is float32, a rounding below the
    # exact time, where the relaxation's feasibility is decided).
    placement = rebalance_experts(weight32, num_replicas, 1, 1, num_gpus, **speeds)
    phy2log, logcnt = np.asarray(placement.phy2log), np.asarray(placement.logcnt)
    held = phy2log >= 0
    per_slot = np.where(held, np.take_along_axis(weight64 / np.maximum(logcnt, 1), np.maximum(phy2log, 0), 1), 0.0)
    per_gpu = per_slot.reshape(weight64.shape[0], num_gpus, 2).sum(-1)
    high = np.max(np.where(capacity > 0, per_gpu / np.where(capacity > 0, capacity, 1.0), 0.0), axis=-1)
    bound = pair_lp.pair_lp_bound(weight64, capacity, low, np.maximum(high, low), tolerance=tolerance)
    return np.maximum(bound, low)


class Locality(NamedTuple):
    """How much of each group's traffic stays on one node, per layer (``[L]`` arrays)."""

    home_share: Any  # share of the layer's load served on its group's home node (1.0 = all)
    nodes_per_group: Any  # mean number of nodes holding a replica of a group (1.0 = hierarchical)


def surviving_load(weight: Any, phy2log: Any, num_nodes: int) -> Any:
    """``[L, N]`` float32: share of layer ``l``'s load whose expert keeps a replica when node ``n`` fails.

    Slot ``j`` is on node ``j // (R // num_nodes)``; ``-1`` slots hold nothing. An all-zero layer survives
    whole (1.0). The worst single-node failure of a layer is the row's minimum (``policy="survivable"``
    raises it; ``docs/benchmarks.md``).
    """
    xp = _xp.array_namespace(phy2log)
    num_nodes = _validate.check_count("num_nodes", num_nodes)
    if phy2log.shape[1] % num_nodes:
        raise ValueError(f"the number of slots {phy2log.shape[1]} must be a multiple of num_nodes={num_nodes}")
    _, w32 = _float32(weight)
    return surviving_load_share(w32, phy2log, num_nodes, xp=xp)


def locality(weight: Any, phy2log: Any, num_groups: int, num_nodes: int) -> Locality:
    """Locality of ``phy2log [L, R]`` for group-limited routing.

    A group's home node is the node serving the largest share of its load;
    a token routed to that group stays on the home node with probability
    ``home_share`` (replicas of an expert share its load equally). Slot ``j``
    is on node ``j // (R // num_nodes)``; group of expert ``e`` is
    ``e // (E // num_groups)``.
    """
    xp = _xp.array_namespace(phy2log)
    loads = slot_loads(weight, phy2log)  # [L, R]
    num_layers, num_slots = loads.shape
    group_size = weight.shape[1] // num_groups
    groups = xp.arange(num_groups, dtype=phy2log.dtype, device=_xp.device(phy2log))
    in_group = (phy2log // group_size)[:, :, None] == groups  # [L, R, groups]
    shape = (num_layers, num_nodes, num_slots // num_nodes, num_groups)
    served = xp.sum(xp.reshape(xp.where(in_group, loads[:, :, None], 0.0), shape), axis=2)  # [L, N, groups]
    present = xp.sum(xp.astype(xp.any(xp.reshape(in_group, shape), axis=2), xp.float32), axis=1)  # [L, groups]
    total = xp.sum(served, axis=(1, 2))
    home = xp.sum(xp.max(served, axis=1), axis=-1)
    share = xp.where(total > 0, home / xp.where(total > 0, total, 1.0), 1.0)
    return Locality(home_share=share, nodes_per_group=xp.mean(present, axis=-1))


class Summary(NamedTuple):
    """Scalar quality figures of a placement (Python floats)."""

    balancedness: float  # mean over layers of mean/max GPU load
    balancedness_sum: float  # sum over layers of mean GPU load / sum of max GPU load
    imbalance: float  # mean over layers of max/mean GPU load
    bound_ratio: float | None  # mean over layers of lower bound / max GPU load (1.0 = provably optimal)


def summarize(
    weight: Any,
    phy2log: Any,
    num_gpus: int,
    bound: Any = None,
    *,
    gpu_capacity: Any = None,
) -> Summary:
    """Summary figures of ``phy2log [L, R]`` against ``weight [L, E]``; ``bound [L]`` from :func:`lower_bound`.

    Layers with no load count as perfectly balanced. Means are over live GPUs
    (failed GPUs, all of whose slots are ``-1``, are left out). Reads the values to the
    host (it returns Python floats): use it for reports, not on a hot path.
    With ``gpu_capacity [G]`` every figure is in time (see :func:`balancedness`): max and
    mean GPU load become the slowest GPU's time and the ideal time; ``bound`` should then be
    ``lower_bound(..., gpu_capacity=)``.
    """
    xp = _xp.array_namespace(phy2log)
    if gpu_capacity is not None:
        mean, peak = _time_balance(weight, phy2log, num_gpus, gpu_capacity, xp=xp)
    else:
        loads = gpu_loads(weight, phy2log, num_gpus)
        peak = xp.max(loads, axis=-1)
        mean = _live_mean(loads, phy2log, num_gpus, xp=xp)
    busy = peak > 0
    safe_peak = xp.where(busy, peak, 1.0)
    per_layer = xp.where(busy, mean / safe_peak, 1.0)
    imbalance = xp.where(busy, peak / xp.where(busy, mean, 1.0), 1.0)
    ratio = None
    if bound is not None:
        ratio = float(xp.mean(xp.where(busy, xp.astype(bound, xp.float32) / safe_peak, 1.0)))
    peak_sum = float(xp.sum(peak))
    return Summary(
        balancedness=float(xp.mean(per_layer)),
        balancedness_sum=float(xp.sum(mean)) / peak_sum if peak_sum > 0 else 1.0,
        imbalance=float(xp.mean(imbalance)),
        bound_ratio=ratio,
    )
