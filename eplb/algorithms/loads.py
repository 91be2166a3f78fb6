"""The loads every implementation places: tiny loads read as zero.

CPUs and GPUs disagree on float32 subnormals (below ``2**-126``): XLA flushes
them to zero (on the CPU too), numpy, numba and torch keep them. A load of
``1e-44`` next to its equals would then be placed as a load on one backend
and as an empty expert on another. So before any arithmetic, every load
below :data:`TINY_LOAD` (``2**-64``, about ``5.4e-20``) is read as ``+0.0``
(``-0.0`` too). With every load zero or at least ``2**-64``, every
intermediate value of the policies stays zero or normal: replica loads
divide by at most ``2**20`` replicas, and differences of float32 values of
at least ``2**-84`` are multiples of their ulp (at least ``2**-107``), far
above the subnormal range. Token counts and normalised loads are never that
small, so this changes no real placement.

The fused kernels apply the same rule where they read the loads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TINY_LOAD", "flush_tiny_loads"]

TINY_LOAD = 2.0**-64


def flush_tiny_loads(weight: Any, *, xp: Any) -> Any:
    """``weight`` (float, any shape) with every value below :data:`TINY_LOAD` (``-0.0`` included) made ``+0.0``."""
    return xp.where(weight < TINY_LOAD, xp.zeros_like(weight), weight)
