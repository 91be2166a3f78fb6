"""Public entry points: validate, pick the backend from the input, run."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from eplb import _validate, _xp
from eplb.backends import get_backend

__all__ = ["Placement", "rebalance_experts"]


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


def _as_weight(weight: Any) -> tuple[str, Any]:
    name = _xp.backend_name(weight)
    if name == "numpy":
        weight = np.asarray(weight)
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
    check_values: bool | None = None,
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
    check_values : bool or None, keyword-only
        Check the loads for NaN, inf and negatives. ``None`` (default) checks
        wherever it is free: numpy, torch CPU, concrete JAX arrays on the CPU.
        CUDA tensors and JAX device arrays are checked only with ``True``
        (it copies the loads to the host); JAX tracers cannot be checked.

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
        Bad shape, an empty or negative/NaN/inf load, or sizes that do not divide.

    Examples
    --------
    >>> import numpy as np, eplb
    >>> w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
    >>> phy2log, log2phy, logcnt = eplb.rebalance_experts(w, 16, 4, 2, 8)
    >>> phy2log.tolist()
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]
    """
    name, weight = _as_weight(weight)
    backend = get_backend(name)
    _, num_experts = _validate.check_weight_shape(tuple(weight.shape))
    _validate.check_weight_dtype(backend.dtype_kind(weight), weight.dtype)
    num_replicas, num_groups, num_nodes, num_gpus, hierarchical = _validate.check_config(
        num_experts, num_replicas, num_groups, num_nodes, num_gpus, hierarchical
    )
    if check_values is not False:
        values = backend.host_values(weight, force=bool(check_values))
        if values is not None:
            _validate.check_weight_values(values)
    return Placement(*backend.rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical))
