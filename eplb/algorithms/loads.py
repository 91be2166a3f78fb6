"""The loads every implementation places: tiny, NaN, negative and infinite loads read as zero.

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

The public API rejects NaN, infinite and negative loads wherever it can read
them (host arrays). Where it cannot (JAX tracers inside ``jit``, CUDA tensors
and JAX device arrays without ``check_values=True``), such a load would make
the sorts and packings of the policies ill-defined (a NaN compares false with
everything: a sort would no longer be a permutation, a scatter would repeat
indices). So the same rule reads them as ``+0.0`` too: a NaN, negative or
infinite load is placed as an idle expert, identically on every backend.
Finite loads whose layer total exceeds float32's range (also rejected where
checked) saturate where they are summed (see
:func:`eplb.algorithms.packing.lpt_pack`): the placement stays valid, its
balance is then unspecified.

The fused kernels apply the same rule where they read the loads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_LOAD", "TINY_LOAD", "clean_loads"]

TINY_LOAD = 2.0**-64
MAX_LOAD = (2 - 2**-23) * 2.0**127  # float32's largest finite value, exactly


def clean_loads(weight: Any, *, xp: Any) -> Any:
    """float32 ``weight`` (any shape) as the policies read it.

    A value is kept iff ``TINY_LOAD <= value <= MAX_LOAD``; anything else
    (below ``2**-64``, ``-0.0``, negative, NaN, ``+-inf``) becomes ``+0.0``.
    The comparisons are exact on every backend, so is the result.
    """
    keep = (weight >= TINY_LOAD) & (weight <= MAX_LOAD)  # false for NaN
    return xp.where(keep, weight, xp.zeros_like(weight))
