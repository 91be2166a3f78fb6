"""JAX arrays on the CPU through the compiled numba kernel, as a ``jax.pure_callback``.

On the CPU, XLA runs the greedy policy's few hundred dependent steps as a
``while`` loop whose every iteration costs tens of microseconds (1.7 ms at
the DeepSeek-V3 shape, 11+ ms for the global policy over 144 GPUs), while
numba's kernel (:mod:`eplb.backends._numba`, the ``fast`` extra) does the
whole call in about 0.5 ms. A host callback costs a few microseconds on the
CPU, where the data already lives, so CPU computations take this path when
numba is installed; it is chosen at lowering (``lax.platform_dependent``)
and never runs on an accelerator, where a callback would stall the device.

Placements are the numba kernel's, which the test suite checks bit for bit
against the array-API path.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eplb.backends import _numba, _numpy

__all__ = [
    "MAX_LOG2PHY",
    "applies",
    "applies_stable",
    "pair_counts",
    "placement",
    "placement_elastic_stable",
    "placement_stable",
]

# The callback's outputs are copied twice (to JAX's integer type, then into
# XLA's buffer), about 2 ns per log2phy entry on a 2-core CPU; from about 2M
# entries the copies cost what XLA's loop saves (256 x 256 -> 288: 2.2M
# entries, 7.1 ms either way; 94 x 512 -> 768: 12M, 51 ms against XLA's 19 ms).
# The DeepSeek-V3 shape has 0.5M (0.9 ms against 1.5 ms).
MAX_LOG2PHY = 2**21


def applies(options: dict[str, Any], num_layers: int = 1, num_experts: int = 1, num_replicas: int = 1) -> bool:
    """Whether the host kernel covers these options and sizes, and numba imports."""
    small = num_layers * num_experts * (num_replicas - num_experts + 1) <= MAX_LOG2PHY
    return small and _numba.supports(options) and _numba.available()


def applies_stable(num_layers: int = 1, num_experts: int = 1, num_replicas: int = 1) -> bool:
    """Whether :func:`placement_stable` takes these sizes (:func:`applies`' copy bound) and numba imports."""
    return num_layers * num_experts * (num_replicas - num_experts + 1) <= MAX_LOG2PHY and _numba.available()


def _outputs(num_layers: int, num_experts: int, num_replicas: int) -> tuple[Any, tuple[Any, ...]]:
    """JAX's default integer (int32 without x64) and the callback's result shapes: ``phy2log [L, R]``,
    ``log2phy [L, E, R - E + 1]``, ``logcnt [L, E]``."""
    index = jnp.arange(1).dtype
    return index, (
        jax.ShapeDtypeStruct((num_layers, num_replicas), index),
        jax.ShapeDtypeStruct((num_layers, num_experts, num_replicas - num_experts + 1), index),
        jax.ShapeDtypeStruct((num_layers, num_experts), index),
    )


def _tolerance(value: Any) -> float:
    """A traced tolerance read on the host as ``stability._factor`` reads an array one: float32, and a negative
    (or NaN) value counts as 0."""
    return max(float(np.nan_to_num(np.float32(value), nan=0.0)), 0.0)


def placement(weight: jax.Array, config: tuple[int, int, int, int], hierarchical: bool) -> tuple[jax.Array, ...]:
    """``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]``, ``logcnt [L, E]`` of ``weight [L, E]``, via the host.

    Works on tracers; under ``vmap`` one callback takes the whole batch
    (``vmap_method="expand_dims"``: the batch is folded into the layers).
    Outputs have JAX's default integer type.
    """
    num_layers, num_experts = weight.shape
    num_replicas = config[0]
    index, shapes = _outputs(num_layers, num_experts, num_replicas)

    def on_host(loads: np.ndarray) -> tuple[np.ndarray, ...]:
        batch = loads.shape[:-2]  # () unbatched, (B,) or more under vmap
        rows = np.asarray(loads, dtype=np.float32).reshape(-1, num_experts)
        result = _numpy.rebalance(rows, *config, hierarchical=hierarchical, impl="numba")
        return tuple(a.astype(index).reshape(*batch, num_layers, *a.shape[1:]) for a in result)

    return jax.pure_callback(on_host, shapes, weight.astype(jnp.float32), vmap_method="expand_dims")


def placement_stable(
    weight: jax.Array, previous: jax.Array, knobs: tuple[Any, Any], config: tuple[int, int, int, int], options: dict
) -> tuple[jax.Array, ...]:
    """:func:`placement` keeping ``previous [L, R]`` in place: the numpy adapter's ``rebalance_stable``, via the host.

    Its compiled kernels (relabelling, sticky repacking, repair; the array-API
    path while they load) instead of XLA's loops of tiny steps: 344 ms to a
    few ms over 144 GPUs on a 2-core CPU. ``knobs``: ``(tolerance, max_moves)``,
    float32 and int32 scalars (traced) or ``None``; ``options``:
    ``hierarchical``, ``policy``, ``spill``.
    """
    tolerance, max_moves = knobs
    num_layers, num_experts = weight.shape
    num_replicas = config[0]
    index, shapes = _outputs(num_layers, num_experts, num_replicas)

    def on_host(loads: np.ndarray, old: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
        batch = loads.shape[:-2]
        rows = np.asarray(loads, dtype=np.float32).reshape(-1, num_experts)
        old_rows = np.asarray(old, dtype=np.int64).reshape(-1, num_replicas)
        given = iter(np.asarray(v).reshape(-1)[0] for v in values)  # scalars (a vmap adds unit axes)
        # As stability._factor and _cap read an array knob: a negative (or NaN) value counts as 0.
        tol = None if tolerance is None else _tolerance(next(given))
        cap = None if max_moves is None else int(next(given))
        knob_values = {
            "tolerance": tol,
            "max_moves": None if cap is None else max(cap, 0),
        }
        result = _numpy.rebalance_stable(rows, old_rows, *config, **options, **knob_values)
        return tuple(a.astype(index).reshape(*batch, num_layers, *a.shape[1:]) for a in result)

    operands = [k for k in knobs if k is not None]
    return jax.pure_callback(
        on_host, shapes, weight.astype(jnp.float32), previous.astype(index), *operands, vmap_method="expand_dims"
    )


def placement_elastic_stable(
    weight: jax.Array,
    previous: jax.Array,
    per_gpu: jax.Array,
    tolerance: jax.Array | None,
    config: tuple[int, int, int, int],
    options: dict,
    name: str = "active_gpus",
) -> tuple[jax.Array, ...]:
    """:func:`placement_stable` with ``active_gpus`` (or ``gpu_capacity``, ``name``): the numpy adapter's
    ``previous=`` path for failed (or slower) GPUs (its compiled relabelling, repackings and search,
    :mod:`eplb.kernels.repair_numba` and :mod:`eplb.kernels.speed_numba`), via the host.

    XLA on the CPU runs that search as loops of tiny steps: 0.35-2.2 s a call at the DeepSeek-V3 shape on a
    2-core CPU, against 60-100 ms here (``gpu_capacity``: 0.34-0.45 s and a 7-14 s compile, against
    0.11-0.15 s). ``per_gpu [G]`` (bool, or float32 capacities) and ``tolerance`` (a float32 scalar, or
    ``None``) are traced; ``options``: ``hierarchical``, ``policy``, ``spill`` (and what the caller decided on
    the host). Under ``vmap`` the batch is folded into calls, one per batch element (each may have its own
    vector and tolerance).
    """
    num_layers, num_experts = weight.shape
    num_replicas, num_gpus = config[0], config[3]
    index, shapes = _outputs(num_layers, num_experts, num_replicas)
    kind = bool if name == "active_gpus" else np.float32

    def on_host(loads: np.ndarray, old: np.ndarray, vector: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
        batch = loads.shape[:-2]  # () unbatched, (B,) or more under vmap (unbatched operands: unit axes)
        count = int(np.prod(batch, dtype=np.int64))
        rows = np.asarray(loads, dtype=np.float32).reshape(count, num_layers, num_experts)
        olds = np.broadcast_to(np.asarray(old, dtype=np.int64), (*batch, num_layers, num_replicas))
        olds = olds.reshape(count, num_layers, num_replicas)
        vectors = np.broadcast_to(np.asarray(vector, dtype=kind), (*batch, num_gpus)).reshape(count, num_gpus)
        tols = [None] * count
        if tolerance is not None:
            given = np.broadcast_to(np.asarray(values[0], dtype=np.float32), batch).reshape(count)
            tols = [_tolerance(t) for t in given]
        results = [
            _numpy.rebalance_stable(rows[k], olds[k], *config, **{name: vectors[k]}, tolerance=tols[k], **options)
            for k in range(count)
        ]
        return tuple(
            np.stack([r[i] for r in results]).astype(index).reshape(*batch, *results[0][i].shape) for i in range(3)
        )

    operands = [] if tolerance is None else [tolerance]
    return jax.pure_callback(
        on_host,
        shapes,
        weight.astype(jnp.float32),
        previous.astype(index),
        per_gpu.astype(bool if name == "active_gpus" else jnp.float32),
        *operands,
        vmap_method="expand_dims",
    )


def pair_counts(load: jax.Array, count: jax.Array, num_slots: int, num_iters: int, *, xp: Any = jnp) -> jax.Array:
    """:func:`eplb.algorithms.pairs.pair_counts` for the refined policy under ``jit``: on the CPU the numba
    kernel (:mod:`eplb.kernels.pairs_numba`) through a host callback, XLA elsewhere (chosen at lowering).

    XLA's CPU sorts make the search's rounds cost about 10 ms each at 288 slots (a 26 ms refined call over
    144 GPUs took 350 ms); the kernel does all of them in a few ms. Same counts either way.
    """
    from eplb.algorithms import pairs

    def xla(loads: jax.Array, counts: jax.Array) -> jax.Array:
        return pairs.pair_counts(loads, counts, num_slots, num_iters, xp=jnp)

    if not _numba.available():
        return xla(load, count)

    def on_host(loads: np.ndarray, counts: np.ndarray) -> np.ndarray:
        from eplb.kernels import pairs_numba

        width = counts.shape[-1]
        rows = np.asarray(loads, dtype=np.float32).reshape(-1, width)
        start = np.asarray(counts, dtype=np.int64).reshape(-1, width)
        found = pairs_numba.pair_counts(rows, start, num_slots, num_iters)
        return found.astype(counts.dtype).reshape(counts.shape)

    def host(loads: jax.Array, counts: jax.Array) -> jax.Array:
        shape = jax.ShapeDtypeStruct(counts.shape, counts.dtype)
        return jax.pure_callback(on_host, shape, loads, counts, vmap_method="expand_dims")

    return jax.lax.platform_dependent(load, count, cpu=host, default=xla)
