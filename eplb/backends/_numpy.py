"""numpy backend: the reference. Runs the batched algorithm eagerly."""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.algorithms.policies import place
from eplb.algorithms.stability import place_stable
from eplb.backends import _numba

__all__ = ["dtype_kind", "host_values", "rebalance", "rebalance_stable"]


def dtype_kind(weight: np.ndarray) -> str:
    return weight.dtype.kind


def host_values(weight: np.ndarray, force: bool) -> np.ndarray:
    return weight


def rebalance(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    impl: str | None = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Placement of a numpy array; ``options`` are :func:`eplb.algorithms.policies.place`'s keywords.

    ``impl``: ``"numba"`` runs the compiled greedy kernel
    (:mod:`eplb.backends._numba`; plain greedy options only); ``"xp"`` the
    array-API algorithm layer; ``None`` picks ``"numba"`` when numba is
    installed and the options are plain greedy, else ``"xp"``. Both give the
    same placement. The kernel compiles on its first call in a process (a
    few seconds).
    """
    weight32 = np.ascontiguousarray(weight, dtype=np.float32)
    if impl is None:
        impl = "numba" if _numba.supports(options) and _numba.available() else "xp"
    if impl == "numba":
        return _numba.rebalance(weight32, num_replicas, num_groups, num_nodes, num_gpus, **options)
    if impl != "xp":
        raise ValueError(f"impl must be 'numba', 'xp' or None, got {impl!r}")
    placement = place(weight32, num_replicas, num_groups, num_nodes, num_gpus, xp=np, **options)
    return tuple(np.asarray(a, dtype=np.int64) for a in placement)


def rebalance_stable(
    weight: np.ndarray,
    previous: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Placement keeping ``previous [L, R]``'s experts in place (:func:`eplb.algorithms.stability.place_stable`)."""
    weight32 = np.ascontiguousarray(weight, dtype=np.float32)
    previous = np.ascontiguousarray(previous, dtype=np.int64)
    placement = place_stable(weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, xp=np, **options)
    return tuple(np.asarray(a, dtype=np.int64) for a in placement)
