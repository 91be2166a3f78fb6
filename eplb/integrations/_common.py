"""Shared by the stack adapters: eplb's options, the old placement as ``previous=``, the call."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from eplb import _validate
from eplb._api import Placement, rebalance_experts
from eplb.algorithms.policies import POLICIES

# eplb's keyword-only knobs that an adapter exposes, with the defaults that keep the stack's behaviour:
# the published greedy policy, its own hierarchical rule, no spill, no bound on moves.
OPTIONS: dict[str, Any] = {
    "policy": "greedy",
    "hierarchical": None,
    "spill": 0,
    "balance_tolerance": None,
    "max_moves": None,
}


def check_options(options: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``options`` restricted to eplb's knobs (and ``extra``): a ``TypeError`` names any other key."""
    unknown = sorted(set(options) - set(OPTIONS) - set(extra))
    if unknown:
        known = ", ".join([*OPTIONS, *extra])
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}; the options are {known}")
    if "policy" in options and options["policy"] not in POLICIES:
        raise ValueError(f"policy={options['policy']!r} must be one of {', '.join(map(repr, POLICIES))}")
    return dict(options)


def torch_module() -> Any:
    """torch, imported on first use (the stacks' interfaces are torch-only)."""
    try:
        import torch
    except ModuleNotFoundError as err:
        if err.name != "torch":
            raise
        raise ModuleNotFoundError(
            "eplb.integrations need torch (vLLM and SGLang pass torch tensors)", name="torch"
        ) from err
    return torch


def as_tensor(value: Any, name: str) -> Any:
    """``value`` as a torch tensor (tensors pass through, detached; numpy arrays and lists are converted)."""
    torch = torch_module()
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a tensor or array, got {type(value).__name__}: {err}") from None


def usable_previous(previous: Any, num_layers: int, num_replicas: int, num_experts: int) -> Any:
    """The old placement as a host int64 tensor ``[L, R]`` when it can serve as ``previous=``, else ``None``.

    It can when it has this call's shape and holds expert ids in ``[0, E)``. A
    map of another width (the stack changed its GPU count, as vLLM's elastic
    EP does) or with unmapped slots (``-1``) is not a placement of this
    config: the call then plans from scratch, as the stacks' own policies do.
    """
    if previous is None:
        return None
    torch = torch_module()
    previous = as_tensor(previous, "the old placement").cpu()
    if tuple(previous.shape) != (num_layers, num_replicas):
        return None
    if previous.dtype.is_floating_point or previous.dtype.is_complex or previous.dtype == torch.bool:
        return None
    if previous.numel() and (int(previous.min()) < 0 or int(previous.max()) >= num_experts):
        return None
    return previous.to(torch.int64)


def plan(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    previous: Any,
    options: dict[str, Any],
) -> Placement:
    """:func:`eplb.rebalance_experts` with ``options``; knobs that need ``previous`` are dropped without it.

    ``balance_tolerance`` and ``max_moves`` only mean something relative to a
    placement in use: on a call without a usable one (the first rebalance,
    a changed GPU count) they are left out rather than raising inside the
    stack. ``max_moves`` also needs ``previous`` to be a placement of this
    config (every expert has a slot; hierarchical: each group on one node);
    where it is not (vLLM's initial linear map, for one), it is left out for
    that call with a ``RuntimeWarning``.
    """
    options = {**OPTIONS, **options}
    if previous is None:
        options["balance_tolerance"] = options["max_moves"] = None
    elif options["max_moves"] is not None:
        num_experts = int(weight.shape[1])
        _, groups, nodes, _, hierarchical = _validate.check_config(
            num_experts, num_replicas, num_groups, num_nodes, num_gpus, options["hierarchical"]
        )
        try:
            _validate.check_previous_placement(previous.numpy(), num_experts, groups, nodes, hierarchical)
        except ValueError as err:
            warnings.warn(f"max_moves={options['max_moves']} left out of this rebalance: {err}", RuntimeWarning, 3)
            options["max_moves"] = None
    return rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, previous=previous, **options)
