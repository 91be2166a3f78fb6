"""JAX backend: ``jax.jit`` with the sizes static, ``jax.vmap`` over layers.

Works on concrete arrays and on tracers (inside a user's ``jit``/``vmap``).
Never touches global flags: without ``jax_enable_x64`` indices are int32.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eplb.algorithms.policies import place
from eplb.algorithms.stability import place_stable

__all__ = ["dtype_kind", "host_values", "rebalance", "rebalance_stable"]


def dtype_kind(weight: jax.Array) -> str:
    # bfloat16, float8 and int4 are ml_dtypes types that numpy files under 'V'.
    if jnp.issubdtype(weight.dtype, jnp.floating):
        return "f"
    if jnp.issubdtype(weight.dtype, jnp.integer):
        return "u" if jnp.issubdtype(weight.dtype, jnp.unsignedinteger) else "i"
    return np.dtype(weight.dtype).kind


def host_values(weight: jax.Array, force: bool) -> np.ndarray | None:
    if isinstance(weight, jax.core.Tracer):
        return None  # values unknown while tracing
    if not force and any(d.platform != "cpu" for d in weight.devices()):
        return None  # reading device values would stall the host
    values = np.asarray(weight)
    # ml_dtypes types (bfloat16, float8, int4) arrive with numpy kind 'V'.
    if values.dtype.kind in "iuf":
        return values
    return values.astype(np.float32 if jnp.issubdtype(weight.dtype, jnp.floating) else np.int32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rebalance(
    weight: jax.Array, config: tuple[int, int, int, int], options: tuple[tuple[str, Any], ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    def one_layer(row: jax.Array) -> tuple[jax.Array, ...]:
        placement = place(row[None, :], *config, xp=jnp, **dict(options))
        return tuple(a[0] for a in placement)

    return jax.vmap(one_layer)(weight.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _kernel_placement(weight: jax.Array, config: tuple[int, int, int, int], hierarchical: bool) -> tuple[Any, ...]:
    """The fused Triton kernel through ``jax_triton.triton_call`` (lowered on CUDA only)."""
    import jax_triton

    from eplb.backends._triton_kernel import greedy_kernel, launch_config

    num_replicas, num_groups, num_nodes, num_gpus = config
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    num_layers, num_experts = weight.shape
    grid, meta = launch_config(num_layers, num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    num_warps = meta.pop("num_warps")
    index = jnp.arange(1).dtype  # JAX's default integer
    table = np.zeros(meta["MAXCNT"] + 2, dtype=np.float32)
    table[1:] = np.float32(1) / np.arange(1, meta["MAXCNT"] + 2, dtype=np.float32)  # exact on the host
    out_shape = [
        jax.ShapeDtypeStruct((num_layers, num_replicas), index),
        jax.ShapeDtypeStruct((num_layers, num_experts, meta["MAXCNT"]), index),
        jax.ShapeDtypeStruct((num_layers, num_experts), index),
    ]
    return tuple(
        jax_triton.triton_call(
            weight.astype(jnp.float32),
            jnp.asarray(table),
            kernel=greedy_kernel,
            out_shape=out_shape,
            grid=grid,
            num_warps=num_warps,
            enable_fp_fusion=False,
            **meta,
        )
    )


def kernel_available() -> bool:
    """Whether the fused kernel can be used on GPUs (``triton`` and ``jax-triton`` installed)."""
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("jax_triton") is not None


def rebalance(
    weight: jax.Array,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    impl: str | None = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Placement of a JAX array; ``options`` are :func:`eplb.algorithms.policies.place`'s keywords (static).

    ``impl``: ``"xla"`` (the array-API algorithm under ``jit`` + ``vmap``),
    ``"triton"`` (the greedy policy as one fused kernel on CUDA, through
    ``jax-triton``; XLA elsewhere, chosen at lowering by
    ``lax.platform_dependent``, so it works on tracers too), or ``None``
    (XLA). The kernel stays opt-in: ``jax-triton`` reaches into JAX's private
    modules, so a JAX upgrade can break it.
    """
    config = (num_replicas, num_groups, num_nodes, num_gpus)
    frozen = tuple(sorted(options.items()))
    applies = options.get("policy", "greedy") == "greedy" and not options.get("spill", 0)
    if impl is None:
        impl = "xla"
    if impl == "xla":
        return _rebalance(weight, config, frozen)
    if impl != "triton" or not applies:
        raise ValueError(f"impl must be 'xla', 'triton' (greedy policy only) or None, got {impl!r} with {options}")
    from eplb.backends._triton_kernel import ensure_cache_dir

    placement = jax.lax.platform_dependent(
        weight,
        cuda=lambda w: _kernel_placement(w, config, options["hierarchical"]),
        default=lambda w: _rebalance(w, config, frozen),
    )
    ensure_cache_dir()  # jax-triton empties Triton's cache setting when it compiles
    return placement


@functools.partial(jax.jit, static_argnums=(2, 3))
def _rebalance_stable(
    weight: jax.Array, previous: jax.Array, config: tuple[int, int, int, int], options: tuple[tuple[str, Any], ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    index = jnp.arange(1).dtype  # JAX's default integer

    def one_layer(row: jax.Array, old: jax.Array) -> tuple[jax.Array, ...]:
        placement = place_stable(row[None, :], old[None, :], *config, xp=jnp, **dict(options))
        return tuple(a[0] for a in placement)

    return jax.vmap(one_layer)(weight.astype(jnp.float32), previous.astype(index))


def rebalance_stable(
    weight: jax.Array,
    previous: jax.Array,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """:func:`rebalance` keeping ``previous [L, R]``'s experts in place; ``options`` static."""
    config = (num_replicas, num_groups, num_nodes, num_gpus)
    return _rebalance_stable(weight, previous, config, tuple(sorted(options.items())))
