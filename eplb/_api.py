"""Public entry points: validate, pick the backend from the input, run."""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, NamedTuple

import numpy as np

from eplb import _validate, _xp
from eplb.algorithms import packing as _packing
from eplb.algorithms import replication as _replication
from eplb.algorithms.elastic import node_fallback_needed
from eplb.algorithms.loads import clean_loads
from eplb.algorithms.policies import POLICIES
from eplb.backends import get_backend

__all__ = ["Placement", "balanced_packing", "rebalance_experts", "replicate_experts"]


class Placement(NamedTuple):
    """Result of :func:`rebalance_experts`; unpacks like the published 3-tuple.

    Attributes
    ----------
    phy2log : array [L, R], integer
        Logical expert held by each physical slot; slot ``j`` lives on GPU
        ``j // (R // num_gpus)`` and node ``j // (R // num_nodes)``.
    log2phy : array [L, E, R - E + 1], integer
        Slots of each expert, ordered by replica number, padded with ``-1``.
    logcnt : array [L, E], integer
        Replicas per expert (>= 1, summing to ``R`` per layer).
    """

    phy2log: Any
    log2phy: Any
    logcnt: Any


def _checked_weight(weight: Any, check_values: bool | None) -> tuple[Any, Any]:
    """Validate ``weight`` [L, E]; returns (backend module, weight)."""
    check_values = _validate.check_flag("check_values", check_values)
    name, weight = _as_weight(weight)
    backend = get_backend(name)
    _validate.check_weight_shape(tuple(weight.shape))
    _validate.check_weight_dtype(backend.dtype_kind(weight), weight.dtype)
    if check_values is not False:
        values = backend.host_values(weight, force=bool(check_values))
        if values is not None:
            _validate.check_weight_values(values)
    return backend, weight


def _validated_settings(
    num_experts: int,
    num_replicas: Any,
    num_groups: Any,
    num_nodes: Any,
    num_gpus: Any,
    hierarchical: Any,
    policy: Any,
    spill: Any,
) -> tuple[int, int, int, int, bool, int]:
    """Sizes, policy and spill checked: ``(num_replicas, num_groups, num_nodes, num_gpus, hierarchical, spill)``."""
    num_replicas, num_groups, num_nodes, num_gpus, hierarchical = _validate.check_config(
        num_experts, num_replicas, num_groups, num_nodes, num_gpus, hierarchical
    )
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} must be one of {', '.join(map(repr, POLICIES))}")
    if policy == "survivable":  # a global placement over num_nodes failure domains
        if num_gpus % num_nodes:
            raise ValueError(f"policy='survivable' spreads replicas over nodes: num_gpus={num_gpus} must be a "
                             f"multiple of num_nodes={num_nodes}")  # fmt: skip
        if spill:
            raise ValueError("policy='survivable' is a global placement: spill needs the hierarchical policy")
        hierarchical = False
    spill = _validate.check_spill(spill, num_experts, num_replicas, num_nodes, hierarchical)
    return num_replicas, num_groups, num_nodes, num_gpus, hierarchical, spill


# A live job calls with the same settings every time; checking them costs more
# than a GPU call's kernel, so results for plain Python values are remembered.
_SETTINGS: dict[tuple[Any, ...], tuple[int, int, int, int, bool, int]] = {}
_PLAIN = (int, bool, str, type(None))


def _checked_settings(*settings: Any) -> tuple[int, int, int, int, bool, int]:
    """:func:`_validated_settings`, remembered when every setting is a plain int, bool, str or None."""
    if not all(type(v) in _PLAIN for v in settings):
        return _validated_settings(*settings)
    key = (settings, tuple(type(v) for v in settings))  # 1 and True are different settings
    checked = _SETTINGS.get(key)
    if checked is None:
        checked = _validated_settings(*settings)  # raises for bad settings: nothing remembered
        if len(_SETTINGS) < 1024:
            _SETTINGS[key] = checked
    return checked


def _checked_previous(
    previous: Any,
    weight: Any,
    backend: Any,
    sizes: tuple[int, int, int, bool],
    check_values: bool | None,
    max_moves: int | None,
    allow_empty: bool = False,
) -> Any:
    """Validate ``previous`` [L, R] (integer expert ids) and convert it to ``weight``'s kind and device.

    ``sizes`` is ``(num_replicas, num_groups, num_nodes, num_gpus, hierarchical)``. With
    ``max_moves``, readable ids must also form a placement of this config.
    ``allow_empty`` (with ``active_gpus`` or ``gpu_capacity``): ``-1`` marks the slots of a GPU that was down,
    all of them (readable ids are checked: the local search takes a GPU as live or empty as a whole).
    """
    num_replicas, num_groups, num_nodes, num_gpus, hierarchical = sizes
    if isinstance(previous, Placement):
        previous = previous.phy2log
    name = _xp.backend_name(weight)
    try:
        same_kind = _xp.backend_name(previous) == name
    except TypeError:
        same_kind = False
    if name == "numpy" or not same_kind:
        try:
            previous = np.asarray(previous)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"previous must be a rectangular [layers, num_replicas] array: {err}") from None
        except (TypeError, RuntimeError) as err:  # e.g. a CUDA tensor for a numpy weight
            raise TypeError(f"previous must be an integer array [layers, num_replicas]: {err}") from None
        if previous.dtype.kind not in "iu":
            raise TypeError(f"previous must hold integer expert ids, got dtype {previous.dtype}")
        if name == "torch":
            previous = sys.modules["torch"].as_tensor(previous, device=weight.device)
        elif name == "jax":
            previous = sys.modules["jax"].numpy.asarray(previous)
    elif name == "torch":
        previous = previous.to(weight.device)
    if backend.dtype_kind(previous) not in "iu":
        raise TypeError(f"previous must hold integer expert ids, got dtype {previous.dtype}")
    expected = (weight.shape[0], num_replicas)
    if tuple(previous.shape) != expected:
        raise ValueError(
            f"previous must have shape [layers, num_replicas] = {list(expected)}, got {list(previous.shape)}"
        )
    if check_values is not False:
        values = backend.host_values(previous, force=bool(check_values))
        low = -1 if allow_empty else 0
        if values is not None and values.size and (values.min() < low or values.max() >= weight.shape[1]):
            raise ValueError(
                f"previous must hold expert ids in [0, {weight.shape[1]})"
                + (" or -1 (an empty slot)" if allow_empty else "")
                + f", got values from {values.min()} to {values.max()}"
                + (
                    " (-1 marks an empty slot: pass active_gpus=, all True after a scale-up, to plan from it)"
                    if values.min() == -1 and not allow_empty
                    else ""
                )
            )
        if values is not None and allow_empty and values.size and values.min() == -1:
            by_gpu = np.reshape(values, (values.shape[0], num_gpus, -1)) == -1
            partial = np.argwhere(by_gpu.any(axis=-1) & ~by_gpu.all(axis=-1))
            if partial.size:
                layer, gpu = partial[0].tolist()
                raise ValueError(
                    f"previous: -1 marks the slots of a GPU that was down and must fill whole GPUs "
                    f"({num_replicas // num_gpus} slots each); layer {layer}, GPU {gpu} holds both -1 and experts"
                )
        if values is not None and max_moves is not None:
            _validate.check_previous_placement(values, weight.shape[1], num_groups, num_nodes, hierarchical)
    return previous


def _like_loads(host: np.ndarray, weight: Any) -> Any:
    """A host array as an array of ``weight``'s kind, on its device (a mask the host has read and decided on)."""
    name = _xp.backend_name(weight)
    if name == "torch":
        return sys.modules["torch"].as_tensor(host, device=weight.device)
    if name == "jax":
        return sys.modules["jax"].numpy.asarray(host)
    return host


def _gpu_vector(
    value: Any,
    arg: str,
    weight: Any,
    backend: Any,
    num_gpus: int,
    check_values: bool | None,
    nouns: tuple[str, str],
    check_dtype: Any,
    device_dtype: Any,
) -> tuple[Any, Any]:
    """A per-GPU vector ``value [G]`` on ``weight``'s kind and device; returns ``(array, host values or None)``.

    A numpy array or list is read on the host (always; converted to ``device_dtype`` for a torch or JAX
    weight); an array of the loads' framework is read where free (the ``check_values`` rule). ``nouns``: what
    the array must be, for the messages (``"a bool array"``, ``"bool array"``); ``check_dtype(kind, dtype)``
    raises the ``TypeError`` of a wrong dtype.
    """
    name = _xp.backend_name(weight)
    host = None
    try:
        kind = _xp.backend_name(value)
    except TypeError:
        kind = None
    if kind == "numpy":
        try:
            value = np.asarray(value)
        except ValueError as err:
            raise ValueError(f"{arg} must be a 1-D [num_gpus] {nouns[1]}: {err}") from None
        check_dtype(value.dtype.kind, value.dtype)
        host = value  # host data: always read (also when it goes on to a device)
    elif kind != name:
        what = type(value).__module__ + "." + type(value).__qualname__
        raise TypeError(
            f"{arg} must be {nouns[0]} of the loads' framework ({name}), a numpy array or a list; got {what}"
        )
    else:
        check_dtype(backend.dtype_kind(value), value.dtype)
    if tuple(value.shape) != (num_gpus,):
        raise ValueError(f"{arg} must have shape [num_gpus] = [{num_gpus}], got {list(value.shape)}")
    if host is not None:
        if name == "torch":
            value = sys.modules["torch"].as_tensor(host.astype(device_dtype), device=weight.device)
        elif name == "jax":
            value = sys.modules["jax"].numpy.asarray(host.astype(device_dtype))
    elif name == "torch":
        value = value.to(weight.device)
    if host is None and check_values is not False:
        host = backend.host_values(value, force=bool(check_values))
    return value, host


def _bools(kind: str, dtype: Any) -> None:
    if kind != "b":
        raise TypeError(f"active_gpus must hold bools (True: the GPU is up), got dtype {dtype}")


def _speeds(kind: str, dtype: Any) -> None:
    if kind == "b":
        raise TypeError(
            "gpu_capacity must hold relative speeds (numbers, 0 for an idle GPU), got bools; "
            "pass a mask of failed GPUs as active_gpus="
        )
    if kind not in "iuf":
        raise TypeError(f"gpu_capacity must hold real numbers (relative speeds), got dtype {dtype}")


def _checked_active_gpus(
    active_gpus: Any, weight: Any, backend: Any, sizes: tuple[int, int, int], check_values: bool | None
) -> tuple[Any, Any]:
    """``active_gpus`` [G] bool, on ``weight``'s kind and device; returns ``(mask, host values or None)``.

    ``sizes`` is ``(num_experts, num_replicas, num_gpus)``. The values (a
    numpy array or list: always; an array of the loads' framework: where
    free, as for the loads, see ``check_values``) must leave at least ``E``
    live slots.
    """
    num_experts, num_replicas, num_gpus = sizes
    nouns = ("a bool array", "bool array")
    mask, values = _gpu_vector(active_gpus, "active_gpus", weight, backend, num_gpus, check_values, nouns, _bools, bool)
    if values is not None:
        values = np.asarray(values).astype(bool)
        _validate.check_active_gpus(values, num_experts, num_replicas, num_gpus)
    return mask, values


def _checked_gpu_capacity(
    gpu_capacity: Any, weight: Any, backend: Any, num_gpus: int, check_values: bool | None
) -> tuple[Any, Any]:
    """``gpu_capacity`` [G] real numbers, on ``weight``'s kind and device; returns ``(capacity, host values or None)``.

    Values of a numpy array or list are always read; an array of the loads' framework where free (the
    ``check_values`` rule). The values themselves are checked by the caller (after ``active_gpus``).
    """
    nouns = ("an array", "array of numbers")
    capacity, host = _gpu_vector(
        gpu_capacity, "gpu_capacity", weight, backend, num_gpus, check_values, nouns, _speeds, np.float32
    )
    return capacity, (None if host is None else np.asarray(host, dtype=np.float64))


def _capacity_options(
    gpu_capacity: Any,
    active_gpus: Any,
    weight: Any,
    backend: Any,
    sizes: tuple[int, int, int, int, bool],
    check_values: bool | None,
    keep: bool = False,
) -> dict[str, Any]:
    """The backend options that place on ``gpu_capacity`` (and ``active_gpus``): ``{}`` (the plain
    placement: equal capacities, every GPU live), ``{"active_gpus": ...}`` (equal capacities, some idle)
    or ``{"gpu_capacity": ..., "uniform": ..., "node_fallback": ...}``.

    ``keep`` (a ``previous=`` call): always the capacity rule, ``uniform`` told where the values are read. A
    vector the host cannot read (CUDA, traced) runs the capacity rule's keep-in-place whatever its values, so
    equal values read on the host must run it too, or the same call would place differently by backend.
    ``sizes`` is ``(num_experts, num_replicas, num_nodes, num_gpus, hierarchical)``.
    """
    num_experts, num_replicas, num_nodes, num_gpus, hierarchical = sizes
    capacity, values = _checked_gpu_capacity(gpu_capacity, weight, backend, num_gpus, check_values)
    if values is not None:
        _validate.check_gpu_capacity(values, num_experts, num_replicas, num_gpus, count=active_gpus is None)
    if active_gpus is not None:  # both: a GPU is live iff it is up and its capacity is positive
        mask_sizes = (num_experts, num_replicas, num_gpus)
        active, live = _checked_active_gpus(active_gpus, weight, backend, mask_sizes, check_values)
        capacity = _xp.array_namespace(weight).where(active, capacity, 0)
        values = None if values is None or live is None else np.where(live, values, 0.0)
        if values is not None:
            _validate.check_gpu_capacity(values, num_experts, num_replicas, num_gpus)
    if values is None:
        return {"gpu_capacity": capacity}  # decided on the device
    values32 = values.astype(np.float32)
    live = values32 > 0
    fallback = node_fallback_needed(live, num_experts, num_replicas, num_nodes, num_gpus) if hierarchical else None
    uniform = bool(np.unique(values32[live]).size == 1)
    if uniform and not keep:  # equal capacities: the capacity-blind placement, bit for bit
        if live.all():
            return {}
        return {"active_gpus": _like_loads(live, weight), **({"node_fallback": fallback} if hierarchical else {})}
    return {"gpu_capacity": capacity, "uniform": uniform, **({"node_fallback": fallback} if hierarchical else {})}


def _unsupported_with_gpu_capacity(policy: str, spill: int, max_moves: Any) -> None:
    """``gpu_capacity`` supports the greedy policy without spill (and ``previous=`` with or without
    ``balance_tolerance``), not ``max_moves`` yet: a ``ValueError`` naming the other argument."""
    others = [
        f"policy={policy!r}" if policy != "greedy" else None,
        f"spill={spill}" if spill else None,
        "max_moves=" if max_moves is not None else None,
    ]
    others = [o for o in others if o is not None]
    if others:
        raise ValueError(
            f"gpu_capacity cannot be combined with {', '.join(others)} yet: placement by time supports the "
            "greedy policy (hierarchical or global) without spill, and previous= (with balance_tolerance=)"
        )


def _traced_knob(name: str, value: Any, kind: str) -> bool:
    """Whether ``value`` is an array knob kept as an array, its value used on the device (no recompile or
    recapture per value, no host read): a JAX array (traced or not) or a torch tensor off the CPU; checked for
    shape and dtype only. ``kind``: "f" (a float) or "i" (an int)."""
    jax, torch = sys.modules.get("jax"), sys.modules.get("torch")
    if jax is not None and isinstance(value, jax.Array):
        framework = "jax"
    elif torch is not None and isinstance(value, torch.Tensor) and value.device.type != "cpu":
        framework = "torch"
    else:
        return False
    noun = "a JAX array" if framework == "jax" else "a torch tensor"
    if tuple(value.shape) != ():
        raise ValueError(f"{name} as {noun} must be 0-d, got shape {tuple(value.shape)}")
    dtype_kind = get_backend(framework).dtype_kind(value)
    if dtype_kind not in ("fi" if kind == "f" else "iu"):
        raise TypeError(f"{name} must be {'a float' if kind == 'f' else 'an int'}, got {noun} of {value.dtype}")
    return True


def _host_knob(name: str, value: Any) -> Any:
    """A 0-d torch CPU tensor knob as a Python number (reading it is free); anything else unchanged."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor) or value.device.type != "cpu":
        return value
    if tuple(value.shape) != ():
        raise ValueError(f"{name} as a torch tensor must be 0-d, got shape {tuple(value.shape)}")
    if value.dtype == torch.bool:
        raise TypeError(f"{name} must be a number, got a torch tensor of {value.dtype}")
    return value.item()


def _checked_knobs(balance_tolerance: Any, max_moves: Any, previous: Any, spill: int) -> tuple[Any, Any]:
    """``balance_tolerance`` (float >= 0) and ``max_moves`` (int >= 0), both only with ``previous``.

    JAX arrays (0-d, also traced) and torch tensors off the CPU stay arrays; a 0-d torch CPU tensor is read as a
    number: see :func:`rebalance_experts`.
    """
    balance_tolerance, max_moves = (
        _host_knob("balance_tolerance", balance_tolerance),
        _host_knob("max_moves", max_moves),
    )
    if balance_tolerance is not None and _traced_knob("balance_tolerance", balance_tolerance, "f"):
        pass
    elif balance_tolerance is not None:
        if isinstance(balance_tolerance, bool) or not isinstance(balance_tolerance, numbers.Real):
            raise TypeError(f"balance_tolerance must be a float, got {type(balance_tolerance).__name__}")
        balance_tolerance = float(balance_tolerance)
        if not (math.isfinite(balance_tolerance) and balance_tolerance >= 0):
            raise ValueError(f"balance_tolerance={balance_tolerance} must be a finite number >= 0")
    if max_moves is not None and _traced_knob("max_moves", max_moves, "i"):
        pass
    elif max_moves is not None:
        if isinstance(max_moves, bool) or not isinstance(max_moves, numbers.Integral):
            raise TypeError(f"max_moves must be an int, got {type(max_moves).__name__} {max_moves!r}")
        max_moves = int(max_moves)
        if max_moves < 0:
            raise ValueError(f"max_moves={max_moves} must be >= 0")
    knobs = [k for k, v in (("balance_tolerance", balance_tolerance), ("max_moves", max_moves)) if v is not None]
    if knobs and previous is None:
        raise ValueError(f"{' and '.join(knobs)} only apply with previous= (the placement in use)")
    if knobs and spill:
        raise ValueError(f"{' and '.join(knobs)} cannot be combined with spill={spill}; previous= alone can")
    return balance_tolerance, max_moves


def _as_float32(weight: Any) -> tuple[Any, Any]:
    """float32 loads as every implementation reads them (:func:`eplb.algorithms.loads.clean_loads`)."""
    xp = _xp.array_namespace(weight)
    return xp, clean_loads(xp.astype(weight, xp.float32), xp=xp)


def _as_weight(weight: Any) -> tuple[str, Any]:
    name = _xp.backend_name(weight)
    if name == "numpy":
        try:
            weight = np.asarray(weight)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"weight must be a rectangular [layers, experts] array: {err}") from None
        if weight.dtype == object or weight.dtype.kind in "OSUV":
            raise TypeError(f"weight must hold numbers, got dtype {weight.dtype}")
    return name, weight


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    hierarchical: bool | None = None,
    policy: str = "greedy",
    spill: int = 0,
    check_values: bool | None = None,
    previous: Any = None,
    balance_tolerance: float | None = None,
    max_moves: int | None = None,
    active_gpus: Any = None,
    gpu_capacity: Any = None,
) -> Placement:
    """Place ``num_replicas`` expert replicas on ``num_gpus`` GPUs, per layer.

    A drop-in for DeepSeek EPLB's function of the same name: same arguments,
    same ``(phy2log, log2phy, logcnt)`` (as a :class:`Placement` tuple), same
    placements on loads without ties.

    Parameters
    ----------
    weight : array [L, E], integer or floating
        Load of each logical expert per layer (token counts). numpy arrays and
        lists give numpy results; torch tensors give torch results on their
        device; JAX arrays give JAX results (usable inside ``jax.jit``).
        Loads are compared as float32; loads below ``2**-64`` (about
        ``5.4e-20``, subnormals included) count as 0, so that every backend
        places them alike (XLA flushes subnormals, numpy does not). See
        ``check_values`` for NaN, negative and infinite loads.
    num_replicas : int
        Physical slots ``R`` per layer; ``R >= E`` and ``R % num_gpus == 0``.
    num_groups : int
        Expert groups (group-limited routing); only used by the hierarchical policy.
    num_nodes : int
        Nodes; ``num_gpus % num_nodes == 0``.
    num_gpus : int
        GPUs; each holds ``R // num_gpus`` slots.
    hierarchical : bool or None, keyword-only
        ``None`` (default) runs the hierarchical policy iff
        ``num_groups % num_nodes == 0``, as published; ``True``/``False`` force it.
    policy : {"greedy", "refined", "survivable"}, keyword-only
        ``"greedy"`` (default): the published algorithm, placement for
        placement. ``"refined"``: better balance from the same constraints
        (alternative group splits, capped replication, several packings
        refined by swaps); per layer its heaviest GPU is never heavier than
        greedy's. ``"survivable"``: a global placement (groups ignored,
        ``hierarchical`` taken as ``False``) that survives a node failure
        better: the greedy replica counts, each expert's replicas packed
        onto different nodes (of ``num_nodes``), then different GPUs,
        wherever a GPU there has room (LPT among those); score with
        ``eplb.metrics.surviving_load``. Not with ``previous=``,
        ``active_gpus``, ``gpu_capacity`` or ``spill`` yet. See
        ``docs/algorithm.md``.
    spill : int, keyword-only
        Hierarchical policy only: up to this many replicas per node may hold
        experts whose group lives on another node (0, the default, keeps
        every group on its node). Trades locality for balance, up to
        ``(num_replicas - E) // num_nodes``; see ``docs/benchmarks.md``.
    check_values : bool or None, keyword-only
        Check the loads for NaN, inf and negatives. ``None`` (default) checks
        wherever it is free: numpy, torch CPU, concrete JAX arrays on the CPU.
        CUDA tensors and JAX device arrays are checked only with ``True``
        (it copies the loads to the host); JAX tracers cannot be checked.
        The same rule applies to the ids in ``previous``. Where loads are
        not checked, a NaN, negative or infinite load is read as 0 (so the
        placement is still valid and the same on every backend).
    previous : array [L, R], integer, keyword-only
        The placement in use (its ``phy2log``, or the :class:`Placement`).
        The result then has the same GPU contents as without it, up to
        labels (each GPU holds the experts of one GPU of that placement, with
        the same ``logcnt``: the same GPU loads as exact sums; float32 sums
        may differ in the last bit, as a GPU's slots may be reordered),
        relabelled to keep the most ``(expert, GPU)`` pairs where they are: nodes as a whole and GPUs within a node
        (hierarchical policy) or all GPUs (global policy) are permuted, an
        assignment solved exactly per layer, and an expert that stays on its
        GPU keeps its slot. An unchanged load moves nothing. Replica numbers
        in ``log2phy`` then follow slot order. See ``docs/migration.md``.
    balance_tolerance : float, keyword-only
        (JAX loads: also a 0-d JAX array, traced or not: a new value then
        needs no recompile, and works inside ``jit``. torch loads off the
        CPU: also a 0-d tensor on their device, read there: no host sync,
        and a CUDA graph of the call replays new values
        (:class:`eplb.GraphedPlanner`); a 0-d CPU tensor is read as a
        number. A negative or NaN array value counts as 0. The bound uses
        ``fl32(1 + fl32(t))`` on every backend.)
        With ``previous``: keep more experts in place at a bounded loss of
        balance. Per layer, the result with the fewest moved experts found
        whose heaviest GPU is at most ``(1 + balance_tolerance)`` times the
        heaviest GPU of the placement without ``previous`` (so balancedness
        drops by at most a factor ``1 / (1 + balance_tolerance)``; ``0.0``:
        never less balanced). Found by local search from the previous
        placement (swaps and replica changes out of the heaviest GPU), then
        swaps that give moves back while every GPU stays within that bound
        (``eplb.algorithms.polish``).
    max_moves : int, keyword-only
        (JAX loads, torch loads off the CPU: also a 0-d integer array, as
        ``balance_tolerance``; a negative array value counts as 0.)
        With ``previous``: move at most this many experts per layer. Alone,
        the result is the lightest heaviest GPU found within the budget
        (balance as without ``previous`` whenever the budget allows); with
        ``balance_tolerance``, both bounds hold where possible. The cap
        needs ``previous`` to be a placement of this config (every expert
        has a slot; under the hierarchical policy each group's slots lie on
        one node): that is checked with the ids (``ValueError`` otherwise).
        Where the ids are not read (``check_values`` above), a layer whose
        ``previous`` is not such a placement gets the relabelled placement
        of ``previous=`` alone, and the cap does not apply to it.
    active_gpus : array [num_gpus], bool, keyword-only
        GPUs that are up (failed GPUs: ``False``). Slots of failed GPUs hold
        no expert: ``-1`` in ``phy2log``, never in ``log2phy``; ``logcnt``
        counts live replicas (>= 1 each, summing to the live slots). The
        greedy rule on the live GPUs alone, scattered back; the hierarchical
        policy falls back to the global rule when a node has fewer live
        slots than the experts of its groups (``docs/algorithm.md``,
        "Failed GPUs"). A numpy array or list, or an array of the loads'
        framework (JAX: may be traced; a new mask does not recompile).
        Needs at least ``E`` live slots (``ValueError`` where the mask is read
        on the host, by the ``check_values`` rule; where it is not, e.g. a
        traced mask, too few live slots give ``phy2log = -1`` and
        ``logcnt = 0`` everywhere). Greedy policy only; not with ``spill``
        or ``max_moves`` yet. Runs the array-API path on every backend, its
        loops as compiled kernels where they exist (``docs/backends.md``),
        identical bit for bit; all-``True`` gives the placement without the
        mask (without ``previous``). Where the failed ranks are known on the
        host (they usually are), pass a list or numpy array: whether a node
        is short of slots is then decided on the host and a call with loads
        on a GPU computes one rule instead of both (torch CUDA with
        ``previous``, 288 slots on 32 GPUs, H200: 9.2 ms against 25.7 ms
        with the mask on the device).
        With ``gpu_capacity``: a GPU is live iff it is up and its capacity
        is positive.

        With ``previous`` (may hold ``-1`` in slots of GPUs that were
        already down, all of a GPU's slots: readable ids are checked,
        ``ValueError``; any mask, even all-``True``, runs this rule): the
        replicas of the placement without ``previous`` repacked onto the
        live GPUs preferring the live GPU that held each one, then (where
        that misses the limit below) a local search of swaps and single-slot
        changes toward it (which may change replica counts; every expert
        keeps one), or, per layer where that moves more, the placement
        without ``previous`` relabelled (live GPUs among live positions). Under the hierarchical
        policy, where every node can still hold its groups, both stay within
        nodes (groups stay on their nodes; nodes are not permuted); elsewhere
        the global rule. Promise, per layer: the heaviest live GPU is at most
        ``1 + balance_tolerance`` (default 0) times that of the placement
        without ``previous`` (up to float32 rounding of the sums), and no
        more experts move than in that placement relabelled.

        **A changed GPU count** (scale up or down): ``previous [L, R_old]``
        may come from ``R_old / S`` GPUs with the same ``S = R / num_gpus``
        slots per GPU; GPU ``g`` is the same GPU on both sides. The elastic
        rule above then runs on ``max(R_old / S, num_gpus)`` GPUs, the ones
        beyond ``num_gpus`` inactive (GPUs that leave: their experts may be
        sources, never destinations) and ``previous`` padded with empty
        slots for GPUs that join; the result is cut back to
        ``num_gpus``. Global policy only (``hierarchical=False``; one group
        and one node count as global), greedy, no ``max_moves`` yet. With
        ``gpu_capacity`` (``[num_gpus]``) the rule of that argument runs
        instead, on the capacities padded with 0 for GPUs that leave.
        ``eplb.plan_transfers(previous, result, num_gpus=num_gpus)`` plans
        the moves across the two sizes.
    gpu_capacity : array [num_gpus], real numbers >= 0, keyword-only
        Relative speed of each GPU (read as float32; 0: an idle GPU, whose
        slots hold ``-1`` as a failed one's under ``active_gpus``). Every GPU
        keeps its ``R // num_gpus`` slots; a GPU's time is its load divided
        by its capacity, and the placement minimises the slowest GPU's time
        per layer: replica sets (greedy, or with some extra slots given to
        the lightest experts, which slow GPUs' slots need) packed by LPT on
        time and refined by swaps, never slower than the capacity-blind
        placement on the same live GPUs (by a ``2**-16`` margin), and that
        placement bit for bit when every live capacity is equal (all equal
        and positive: the placement without ``gpu_capacity``). The
        hierarchical policy packs groups onto nodes by node capacity (the
        sum of its GPUs') and falls back to the global rule as with
        ``active_gpus``. No float division decides anything (exact
        reciprocals, see ``docs/algorithm.md``), so every backend places
        alike, JAX with traced capacities too (a new vector does not
        recompile). A numpy array or list, or an array of the loads'
        framework; values read on the host by the ``check_values`` rule must
        be finite, ``>= 0``, each positive one at least ``2**-64`` and
        ``2**-40`` times the largest, and leave at least ``E`` live slots
        (``ValueError``); unread values read NaN, inf, negative and too small
        ones as 0, and too few live slots give ``phy2log = -1``,
        ``logcnt = 0``. Greedy policy only; not with ``spill`` or
        ``max_moves`` yet. Score with ``eplb.metrics``' ``gpu_capacity=``.

        With ``previous`` (may hold ``-1`` on whole GPUs, as with
        ``active_gpus``, equal capacities included; slots of idle GPUs count
        as empty): the placement above with its GPUs permuted among GPUs of
        equal capacity (and node, under the hierarchical policy) to keep
        the most experts in place, or, per layer where it moves fewer
        experts within the limit, ``previous`` itself or ``previous``
        brought to the new replica counts with the fewest changes, then
        searched by swaps out of the slowest GPU until within the limit
        (``eplb.algorithms.capacity_stable``). Promise, per layer: the
        slowest live GPU's time is at most ``1 + balance_tolerance``
        (default 0) times that of the placement without ``previous`` (up
        to float32 rounding of the sums), and no more experts move than in
        that placement relabelled among equal-capacity GPUs. All equal
        capacities take this rule too, whether the host reads them or not
        (traced, or device tensors with ``check_values`` off): the same
        placement on every backend; its fresh placement is then the plain
        (or ``active_gpus``) one. Same GPU count only.

    Returns
    -------
    Placement
        ``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]``, ``logcnt [L, E]``;
        int64 on numpy and torch, JAX's default integer (int32 without x64).

    Raises
    ------
    TypeError
        ``weight`` is not an array of real numbers, or a count is not an int.
    ValueError
        Bad shape (``previous`` of another slot count: see below), an empty or negative/NaN/inf load, sizes that do not
        divide, or (with ``max_moves``) a ``previous`` that is not a
        placement of this config.

    Examples
    --------
    >>> import numpy as np, eplb
    >>> w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
    >>> phy2log, log2phy, logcnt = eplb.rebalance_experts(w, 16, 4, 2, 8)
    >>> phy2log.tolist()
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]
    """
    check_values = _validate.check_flag("check_values", check_values)
    backend, weight = _checked_weight(weight, check_values)
    settings = (weight.shape[1], num_replicas, num_groups, num_nodes, num_gpus, hierarchical, policy, spill)
    num_replicas, num_groups, num_nodes, num_gpus, hierarchical, spill = _checked_settings(*settings)
    if policy == "survivable" and previous is not None:
        raise ValueError(
            "policy='survivable' cannot be combined with previous= yet (relabelling GPUs freely would undo the "
            "spread over nodes)"
        )
    if previous is not None and _slots_of(previous) not in (None, num_replicas):  # a scale up or down
        sizes = (num_replicas, num_groups, num_gpus, hierarchical and (num_groups > 1 or num_nodes > 1), policy, spill)
        knobs = {"balance_tolerance": balance_tolerance, "max_moves": max_moves, "check_values": check_values}
        return _across_sizes(weight, previous, sizes, active_gpus, gpu_capacity, knobs)
    if gpu_capacity is not None:
        _unsupported_with_gpu_capacity(policy, spill, max_moves)
    if active_gpus is not None:
        _unsupported_with_active_gpus(policy, spill, previous, max_moves, hierarchical, num_groups, num_nodes)
    balance_tolerance, max_moves = _checked_knobs(balance_tolerance, max_moves, previous, spill)
    elastic = {}
    if gpu_capacity is not None:
        sizes = (weight.shape[1], num_replicas, num_nodes, num_gpus, hierarchical)
        keep = previous is not None
        elastic = _capacity_options(gpu_capacity, active_gpus, weight, backend, sizes, check_values, keep=keep)
    elif active_gpus is not None:
        sizes = (weight.shape[1], num_replicas, num_gpus)
        active_gpus, live = _checked_active_gpus(active_gpus, weight, backend, sizes, check_values)
        # With previous= always the elastic rule (a traced all-up mask gives the same placement); without it,
        # a mask read on the host with every GPU up gives the placement without the mask.
        if previous is not None or live is None or not live.all():
            elastic = {"active_gpus": active_gpus}
            if live is not None and hierarchical:
                elastic["node_fallback"] = node_fallback_needed(live, *sizes[:2], num_nodes, num_gpus)
    for knob, value in (("balance_tolerance", balance_tolerance), ("max_moves", max_moves)):
        if isinstance(value, int | float | type(None)):
            continue
        framework = _xp.backend_name(value)
        if framework != _xp.backend_name(weight) or (framework == "torch" and value.device != weight.device):
            noun = {"jax": "JAX", "torch": "torch"}.get(framework, framework)
            where = f" on {value.device}" if framework == "torch" else ""
            raise TypeError(
                f"{knob} as a {noun} array{where} needs {noun} loads{where}; pass a Python number with "
                f"{type(weight).__name__} loads"
            )
    if previous is not None:
        sizes = (num_replicas, num_groups, num_nodes, num_gpus, hierarchical)
        empty_ok = bool(elastic) or gpu_capacity is not None  # -1: the slots of a GPU that was down
        previous = _checked_previous(previous, weight, backend, sizes, check_values, max_moves, empty_ok)
        placement = backend.rebalance_stable(
            weight,
            previous,
            num_replicas,
            num_groups,
            num_nodes,
            num_gpus,
            hierarchical=hierarchical,
            policy=policy,
            spill=spill,
            tolerance=balance_tolerance,
            max_moves=max_moves,
            **elastic,
        )
        return Placement(*placement)
    placement = backend.rebalance(
        weight,
        num_replicas,
        num_groups,
        num_nodes,
        num_gpus,
        hierarchical=hierarchical,
        policy=policy,
        spill=spill,
        **elastic,
    )
    return Placement(*placement)


def _slots_of(previous: Any) -> int | None:
    """The slot count of a 2-D ``previous`` (``None`` when it has no such shape: validated later)."""
    if isinstance(previous, Placement):
        previous = previous.phy2log
    shape = getattr(previous, "shape", None)
    if shape is None:
        try:
            shape = np.shape(previous)
        except ValueError:  # ragged lists: _checked_previous names the problem
            return None
    return int(shape[1]) if len(shape) == 2 else None


def _leaving(values: Any, name: str, num_gpus: int, total: int) -> Any:
    """A per-GPU vector ``[num_gpus]`` (``active_gpus`` or ``gpu_capacity``) padded with zeros (``False``: GPUs
    that leave) to ``[total]``, in its own namespace."""
    if isinstance(values, list | tuple):
        values = np.asarray(values)
    if tuple(getattr(values, "shape", ())) != (num_gpus,):
        raise ValueError(f"{name} must have shape [num_gpus] = [{num_gpus}], got {list(np.shape(values))}")
    space = _xp.array_namespace(values)
    leaving = space.zeros((total - num_gpus,), dtype=values.dtype, device=_xp.device(values))
    return space.concat([values, leaving])


def _across_sizes(
    weight: Any, previous: Any, sizes: tuple, active_gpus: Any, gpu_capacity: Any, knobs: dict[str, Any]
) -> Placement:
    """``previous`` from another GPU count with the same slots per GPU: the elastic rule on ``max(G_old, G)``
    GPUs, GPU ``g`` the same GPU on both sides (the ones beyond ``G`` inactive, ``previous`` padded with empty
    slots where it has fewer), cut back to ``G`` GPUs."""
    num_replicas, num_groups, num_gpus, hierarchical, policy, spill = sizes
    per_gpu, slots_before = num_replicas // num_gpus, _slots_of(previous)
    if slots_before % per_gpu:
        raise ValueError(
            f"previous has {slots_before} slots and the placement {num_replicas}: a previous placement on another "
            f"number of GPUs must have the same slots per GPU ({per_gpu} = num_replicas / num_gpus)"
        )
    others = [
        "the hierarchical policy (pass hierarchical=False)" if hierarchical else None,
        f"policy={policy!r}" if policy != "greedy" else None,
        f"spill={spill}" if spill else None,
        "max_moves=" if knobs["max_moves"] is not None else None,
    ]
    others = [o for o in others if o is not None]
    if others:
        raise ValueError(
            f"previous= from another number of GPUs ({slots_before // per_gpu} -> {num_gpus}) is planned by the "
            f"elastic global rule; not with {', '.join(others)} yet"
        )
    total = max(slots_before // per_gpu, num_gpus)
    if isinstance(previous, Placement):
        previous = previous.phy2log
    if isinstance(previous, list | tuple):
        previous = np.asarray(previous)
    xp = _xp.array_namespace(previous)
    if total * per_gpu > slots_before:  # scale up: the new GPUs held nothing
        empty = xp.full((previous.shape[0], total * per_gpu - slots_before), -1, dtype=previous.dtype,
                        device=_xp.device(previous))  # fmt: skip
        previous = xp.concat([previous, empty], axis=1)
    if active_gpus is not None:
        mask = active_gpus
    elif _xp.backend_name(weight) == "torch" and weight.device.type != "cpu":
        # Every GPU of the new count is up: made on the loads' device (a host mask would be copied there in
        # every call, a sync, for values that decide nothing on the host under the global rule).
        mask = sys.modules["torch"].ones(num_gpus, dtype=sys.modules["torch"].bool, device=weight.device)
    else:
        mask = np.ones(num_gpus, dtype=bool)
    speeds = {}
    if total > num_gpus:  # scale down: GPUs num_gpus.. leave (their experts are sources, not destinations)
        mask = _leaving(mask, "active_gpus", num_gpus, total)
        if gpu_capacity is not None:  # (capacity 0: idle, as a failed GPU)
            speeds["gpu_capacity"] = _leaving(gpu_capacity, "gpu_capacity", num_gpus, total)
    elif gpu_capacity is not None:
        speeds["gpu_capacity"] = gpu_capacity
    if gpu_capacity is not None and active_gpus is None:
        mask = None  # the capacities alone say which GPUs are live
    placement = rebalance_experts(
        weight, total * per_gpu, num_groups, 1, total, hierarchical=False, previous=previous, active_gpus=mask,
        balance_tolerance=knobs["balance_tolerance"], check_values=knobs["check_values"], **speeds,
    )  # fmt: skip
    if total == num_gpus:
        return placement
    width = num_replicas - weight.shape[1] + 1
    return Placement(placement.phy2log[:, :num_replicas], placement.log2phy[:, :, :width], placement.logcnt)


def _unsupported_with_active_gpus(
    policy: str, spill: int, previous: Any, max_moves: Any, hierarchical: bool, num_groups: int, num_nodes: int
) -> None:
    """``active_gpus`` supports the greedy policy without spill (and ``previous=`` with or without
    ``balance_tolerance``), not ``max_moves`` yet: a ``ValueError`` naming the other argument."""
    others = [
        f"policy={policy!r}" if policy != "greedy" else None,
        f"spill={spill}" if spill else None,
        "max_moves=" if max_moves is not None else None,
    ]
    others = [o for o in others if o is not None]
    if others:
        raise ValueError(
            f"active_gpus cannot be combined with {', '.join(others)} yet: elastic placement supports the "
            "greedy policy (hierarchical or global) without spill, and previous= (with balance_tolerance=)"
        )


def balanced_packing(weight: Any, num_packs: int, *, check_values: bool | None = None) -> tuple[Any, Any]:
    """Pack each row's items into ``num_packs`` packs of equal item count (LPT).

    Parameters
    ----------
    weight : array [B, n], integer or floating
        Item weights (compared as float32), one independent problem per row;
        ``n % num_packs == 0``. Read as the policies read loads: below
        ``2**-64`` (and, unchecked, NaN, negative or inf) as 0.
    num_packs : int
        Packs per row; each receives exactly ``n // num_packs`` items.

    Returns
    -------
    pack_index : array [B, n], integer
        Pack of each item.
    rank_in_pack : array [B, n], integer
        Position of each item inside its pack, in arrival order.

    Items are visited heaviest first (equal weights by lower index), each to
    the lightest pack that still has room (equal loads: lower pack index);
    with one item per pack, item ``i`` goes to pack ``i`` (as published); see
    ``docs/algorithm.md``.

    Examples
    --------
    >>> import numpy as np, eplb
    >>> pack_index, rank_in_pack = eplb.balanced_packing(np.array([[4, 3, 2, 1]]), 2)
    >>> pack_index.tolist(), rank_in_pack.tolist()
    ([[0, 1, 1, 0]], [[0, 0, 1, 1]])
    """
    _, weight = _checked_weight(weight, check_values)
    num_packs = _validate.check_count("num_packs", num_packs)
    if weight.shape[1] % num_packs:
        raise ValueError(f"the number of items {weight.shape[1]} must be a multiple of num_packs={num_packs}")
    xp, weight32 = _as_float32(weight)
    return _packing.balanced_packing(weight32, num_packs, xp=xp)


def replicate_experts(weight: Any, num_phy: int, *, check_values: bool | None = None) -> tuple[Any, Any, Any]:
    """Give ``num_phy - E`` extra replicas, one at a time, to the expert with the largest load per replica.

    Parameters
    ----------
    weight : array [B, E], integer or floating
        Expert loads (compared as float32), one independent problem per row;
        read as the policies read loads (below ``2**-64`` as 0).
    num_phy : int
        Physical slots per row, ``>= E``.

    Returns
    -------
    phy2log : array [B, num_phy], integer
        Expert of each slot: slots ``0..E-1`` hold experts ``0..E-1``, then
        the replicas in the order they were handed out.
    phyrank : array [B, num_phy], integer
        Replica number of each slot within its expert.
    logcnt : array [B, E], integer
        Replicas per expert.

    Examples
    --------
    >>> import numpy as np, eplb
    >>> phy2log, phyrank, logcnt = eplb.replicate_experts(np.array([[6, 2, 3]]), 5)
    >>> phy2log.tolist(), logcnt.tolist()
    ([[0, 1, 2, 0, 0]], [[3, 1, 1]])
    """
    _, weight = _checked_weight(weight, check_values)
    num_phy = _validate.check_count("num_phy", num_phy)
    if num_phy < weight.shape[1]:
        raise ValueError(f"num_phy={num_phy} must be >= the number of experts {weight.shape[1]}")
    xp, weight32 = _as_float32(weight)
    return _replication.replicate_experts(weight32, num_phy, xp=xp)
