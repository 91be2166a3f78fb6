"""Input checks for the public API: each error names the argument and the rule."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = [
    "check_active_gpus",
    "check_config",
    "check_count",
    "check_flag",
    "check_gpu_capacity",
    "check_previous_placement",
    "check_spill",
    "check_weight_dtype",
    "check_weight_shape",
    "check_weight_values",
]

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_count(name: str, value: Any) -> int:
    """A positive Python/numpy integer (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name}={value} must be positive")
    return value


def check_flag(name: str, value: Any) -> bool | None:
    """``None``, or a Python/numpy bool as a Python bool.

    numpy scalars count as the Python type they stand for, everywhere in the
    API: ``np.True_`` is a bool as ``np.int64(4)`` is an int. Anything else
    (``"no"``, ``0``, ``1``) is a ``TypeError``: a truthy string must not
    silently mean ``True``.
    """
    if value is None or isinstance(value, bool | np.bool_):
        return None if value is None else bool(value)
    raise TypeError(f"{name} must be True, False or None, got {type(value).__name__} {value!r}")


def check_weight_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-D [layers, experts], got shape {tuple(shape)}")
    num_layers, num_experts = shape
    if num_layers == 0 or num_experts == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(shape)}")
    return int(num_layers), int(num_experts)


def check_weight_dtype(kind: str, dtype: Any) -> None:
    """``kind`` is numpy's dtype kind letter ('i', 'u', 'f', 'b', 'c', ...)."""
    if kind == "b":
        raise TypeError(f"weight must hold numbers (token counts or loads), got boolean dtype {dtype}")
    if kind == "c":
        raise TypeError(f"weight must be real, got complex dtype {dtype}")
    if kind not in "iuf":
        raise TypeError(f"weight must have an integer or floating dtype, got {dtype}")


def check_weight_values(weight: np.ndarray) -> None:
    """No NaN, inf or negative loads, and per-layer totals that fit float32.

    Runs on every call with a host array, so it makes as few passes as it can
    (a few microseconds on small loads): integer totals always fit float32
    (``E * 2**64`` is far below its max), so only floats are summed.
    """
    floating = weight.dtype.kind == "f"
    if floating and not np.isfinite(weight).all():
        if np.isnan(weight).any():
            raise ValueError("weight must not contain NaN")
        raise ValueError("weight must be finite, got inf")
    if weight.size and weight.min() < 0:
        raise ValueError("weight must be non-negative (token counts or loads)")
    if floating and weight.size and float(weight.astype(np.float64).sum(axis=-1).max()) > _FLOAT32_MAX:
        raise ValueError("weight per layer must sum to at most float32 max (~3.4e38); rescale the loads")


def check_config(
    num_experts: int,
    num_replicas: Any,
    num_groups: Any,
    num_nodes: Any,
    num_gpus: Any,
    hierarchical: bool | None,
) -> tuple[int, int, int, int, bool]:
    """Validate the sizes; returns them as ints plus whether the hierarchical policy runs.

    The hierarchical policy runs iff ``num_groups % num_nodes == 0`` (the
    published rule) unless ``hierarchical`` forces it on or off. Group rules
    are checked only when it runs.
    """
    num_replicas = check_count("num_replicas", num_replicas)
    num_groups = check_count("num_groups", num_groups)
    num_nodes = check_count("num_nodes", num_nodes)
    num_gpus = check_count("num_gpus", num_gpus)
    if num_replicas < num_experts:
        raise ValueError(
            f"num_replicas={num_replicas} must be >= the number of experts {num_experts} "
            "(every expert needs at least one replica)"
        )
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    hierarchical = check_flag("hierarchical", hierarchical)
    if hierarchical is None:
        hierarchical = num_groups % num_nodes == 0
    if hierarchical:
        if num_groups % num_nodes:
            raise ValueError(
                f"num_groups={num_groups} must be a multiple of num_nodes={num_nodes} "
                "for the hierarchical policy (each node holds whole groups)"
            )
        if num_experts % num_groups:
            raise ValueError(
                f"the number of experts {num_experts} must be a multiple of num_groups={num_groups} "
                "for the hierarchical policy"
            )
    return num_replicas, num_groups, num_nodes, num_gpus, hierarchical


def check_spill(spill: Any, num_experts: int, num_replicas: int, num_nodes: int, hierarchical: bool) -> int:
    """``spill`` replicas per node away from home: an int in ``[0, (R - E) // N]``, hierarchical only."""
    if isinstance(spill, bool) or not isinstance(spill, numbers.Integral):
        raise TypeError(f"spill must be an int, got {type(spill).__name__} {spill!r}")
    spill = int(spill)
    if spill < 0:
        raise ValueError(f"spill={spill} must be >= 0")
    if spill and not hierarchical:
        raise ValueError(
            f"spill={spill} needs the hierarchical policy (groups on nodes); the global policy has no home nodes"
        )
    most = (num_replicas - num_experts) // num_nodes
    if spill > most:
        raise ValueError(
            f"spill={spill} must be <= (num_replicas - experts) // num_nodes = {most}: "
            "each node needs a slot for every expert of its own groups"
        )
    return spill


def check_previous_placement(
    previous: np.ndarray, num_experts: int, num_groups: int, num_nodes: int, hierarchical: bool
) -> None:
    """``previous [L, R]`` (host ids in ``[0, E)``) is a placement of this config, as ``max_moves`` needs.

    Every expert has a slot in every layer; under the hierarchical policy the
    slots of each group lie on one node. Raises ``ValueError`` naming the
    first offending layer.
    """
    num_layers, num_replicas = previous.shape
    rows = np.arange(num_layers)[:, None]
    present = np.zeros((num_layers, num_experts), dtype=bool)
    present[rows, previous] = True
    if not present.all():
        layer, expert = np.argwhere(~present)[0]
        raise ValueError(
            f"previous is not a placement of this configuration (layer {layer} has no slot for expert {expert}), "
            "so max_moves cannot be honoured; pass previous= alone (or with balance_tolerance=) to relabel from it"
        )
    if not hierarchical or num_nodes == 1:
        return
    group = previous // (num_experts // num_groups)  # [L, R]
    node = np.broadcast_to(np.arange(num_replicas) // (num_replicas // num_nodes), group.shape)
    low = np.full((num_layers, num_groups), num_nodes)
    high = np.full((num_layers, num_groups), -1)
    np.minimum.at(low, (rows, group), node)
    np.maximum.at(high, (rows, group), node)
    if (low != high).any():
        layer, g = np.argwhere(low != high)[0]
        raise ValueError(
            f"previous is not a placement of this configuration (layer {layer}: group {g} spans nodes "
            f"{low[layer, g]} to {high[layer, g]}, and the hierarchical policy keeps each group on one node), "
            "so max_moves cannot be honoured; pass previous= alone (or with balance_tolerance=) to relabel from it"
        )


def check_active_gpus(live: np.ndarray, num_experts: int, num_replicas: int, num_gpus: int) -> None:
    """Readable ``active_gpus`` (host bools ``[G]``) leave at least ``E`` live slots."""
    per_gpu = num_replicas // num_gpus
    count = int(np.count_nonzero(live))
    if count * per_gpu < num_experts:
        raise ValueError(
            f"active_gpus leaves {count} of {num_gpus} GPUs up, {count * per_gpu} live slots "
            f"({per_gpu} per GPU): fewer than the {num_experts} experts, each of which needs a slot"
        )


def check_gpu_capacity(
    capacity: np.ndarray, num_experts: int, num_replicas: int, num_gpus: int, *, count: bool = True
) -> None:
    """Readable ``gpu_capacity`` (host numbers ``[G]``): finite, ``>= 0``, each positive one at least
    ``2**-64`` and ``2**-40`` times the largest, and (``count``; values masked by ``active_gpus`` where
    given) at least ``E`` live slots."""
    capacity = np.asarray(capacity, dtype=np.float64)
    bad = ~np.isfinite(capacity) | (capacity < 0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"gpu_capacity must hold finite numbers >= 0 (0: an idle GPU), got gpu_capacity[{index}]={capacity[index]}"
        )
    if (capacity > _FLOAT32_MAX).any():
        index = int(np.flatnonzero(capacity > _FLOAT32_MAX)[0])
        raise ValueError(f"gpu_capacity[{index}]={capacity[index]} exceeds float32's range")
    capacity32 = capacity.astype(np.float32).astype(np.float64)  # as the placement reads it
    top = float(capacity32.max(initial=0.0))
    tiny = (capacity > 0) & ((capacity32 < 2.0**-64) | (capacity32 < top * 2.0**-40))
    if tiny.any():
        index = int(np.flatnonzero(tiny)[0])
        raise ValueError(
            f"gpu_capacity[{index}]={capacity[index]} is positive but below 2**-64 or 2**-40 times the largest "
            f"capacity ({top}): too slow to place by; pass 0 for an idle GPU"
        )
    if not count:
        return
    per_gpu = num_replicas // num_gpus
    live = int(np.count_nonzero(capacity > 0))
    if live * per_gpu < num_experts:
        raise ValueError(
            f"gpu_capacity leaves {live} of {num_gpus} GPUs with a positive capacity (active), {live * per_gpu} "
            f"live slots ({per_gpu} per GPU): fewer than the {num_experts} experts, each of which needs a slot"
        )
