"""JAX backend: ``jax.jit`` with the sizes static, ``jax.vmap`` over layers.

Works on concrete arrays and on tracers (inside a user's ``jit``/``vmap``).
On CUDA the greedy policy runs as one Pallas kernel (:mod:`eplb.kernels.greedy_pallas`), the refined one
through :mod:`eplb.kernels.refined_pallas`, ``previous=`` relabels with :mod:`eplb.kernels.relabel_pallas`
and its knobs (``balance_tolerance``, ``max_moves``; no ``active_gpus``) run the sticky repacking and the
local search as :mod:`eplb.kernels.repair_pallas`'s kernels where they fit (else XLA, same placement); on
the CPU the compiled numba kernels run through a host callback.
Never touches global flags: without ``jax_enable_x64`` indices are int32.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eplb.algorithms.capacity import place_capacity
from eplb.algorithms.capacity_stable import place_capacity_stable
from eplb.algorithms.elastic import place_elastic, place_elastic_stable
from eplb.algorithms.policies import place
from eplb.algorithms.stability import place_stable
from eplb.backends import _jax_host, _numba

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


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _rebalance(
    weight: jax.Array, config: tuple[int, int, int, int], options: tuple[tuple[str, Any], ...], host: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The array-API placement under ``vmap`` over layers. ``host``: the refined policy's pair search (two slots
    per GPU) through numba's kernel via a host callback on the CPU (:func:`_jax_host.pair_counts`); else XLA."""
    refined = dict(options).get("policy") == "refined"
    searched = {"pair_counts_fn": _jax_host.pair_counts} if refined and host else {}

    def one_layer(row: jax.Array) -> tuple[jax.Array, ...]:
        placement = place(row[None, :], *config, xp=jnp, **dict(options), **searched)
        return tuple(a[0] for a in placement)

    return _tied_to(weight, jax.vmap(one_layer)(weight.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _rebalance_elastic(
    weight: jax.Array, active: jax.Array, config: tuple[int, int, int, int], options: tuple[tuple[str, Any], ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_rebalance` with ``active_gpus`` (``active [G]`` bool, traced: a new mask does not recompile)."""

    def one_layer(row: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        placement = place_elastic(row[None, :], *config, xp=jnp, active_gpus=mask, **dict(options))
        return tuple(a[0] for a in placement)

    placement = jax.vmap(one_layer, in_axes=(0, None))(weight.astype(jnp.float32), active.astype(bool))
    return _tied_to(weight, placement)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _rebalance_capacity(
    weight: jax.Array, capacity: jax.Array, config: tuple[int, int, int, int], options: tuple[tuple[str, Any], ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_rebalance` with ``gpu_capacity`` (``capacity [G]``, traced: a new vector does not recompile)."""

    def one_layer(row: jax.Array, speeds: jax.Array) -> tuple[jax.Array, ...]:
        # Two slots per GPU: the pair set's count search through numba on the CPU (XLA's sorts are slow there).
        placement = place_capacity(
            row[None, :], *config, xp=jnp, gpu_capacity=speeds, pair_counts_fn=_jax_host.pair_counts, **dict(options)
        )
        return tuple(a[0] for a in placement)

    placement = jax.vmap(one_layer, in_axes=(0, None))(weight.astype(jnp.float32), capacity.astype(jnp.float32))
    return _tied_to(weight, placement)


# Per masked call (the vector's keyword): its keep-in-place placement, the vector's dtype, and which of
# _pallas_kernels' kernels it plugs in (gpu_capacity's time loops have no Pallas twins).
_RELABEL_AND_PACK = ("relabel_pinned_fn", "sticky_pack_fn", "align_slots_fn")
_MASKED = {
    "active_gpus": (place_elastic_stable, jnp.bool_, (*_RELABEL_AND_PACK, "repair_fn", "polish_fn")),
    "gpu_capacity": (place_capacity_stable, jnp.float32, _RELABEL_AND_PACK),
}


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _rebalance_masked_stable(
    weight: jax.Array,
    previous: jax.Array,
    per_gpu: jax.Array,
    tolerance: jax.Array | None,
    config: tuple[int, int, int, int],
    options: tuple[tuple[str, Any], ...],
    impl: str,
    name: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`_rebalance_elastic` (``name="active_gpus"``, ``per_gpu`` the mask) or :func:`_rebalance_capacity`
    (``"gpu_capacity"``, the capacities) keeping ``previous``'s experts in place (the vector and the tolerance
    traced: new values do not recompile).

    ``impl="host"``: on the CPU the numpy adapter's compiled kernels through a host callback
    (:func:`eplb.backends._jax_host.placement_elastic_stable`), chosen at lowering; the array-API path under
    ``jit`` + ``vmap`` over layers elsewhere (and with ``impl="xla"``). ``impl="pallas"``: the same, and on CUDA
    :func:`_masked_stable_pallas`. Same placement.
    """
    placer, dtype, _ = _MASKED[name]
    index = jnp.arange(1).dtype  # JAX's default integer

    def one_layer(row: jax.Array, old: jax.Array, vector: jax.Array) -> tuple[jax.Array, ...]:
        placement = placer(
            row[None, :], old[None, :], *config, xp=jnp, tolerance=tolerance, **{name: vector}, **dict(options)
        )
        return tuple(a[0] for a in placement)

    def xla(w: jax.Array, p: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        layers = jax.vmap(one_layer, in_axes=(0, 0, None))
        return _tied_to(w, layers(w.astype(jnp.float32), p.astype(index), v.astype(dtype)))

    host_applies = _jax_host.applies_stable(*weight.shape, config[0])
    if impl == "xla" or (impl == "host" and not host_applies):
        return xla(weight, previous, per_gpu)

    def host(w: jax.Array, p: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
        return _jax_host.placement_elastic_stable(w, p, v, tolerance, config, dict(options), name=name)

    branches = {"cpu": host} if host_applies else {}
    if impl == "pallas":

        def kernel(w: jax.Array, p: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
            return _masked_stable_pallas(w, p.astype(index), v.astype(dtype), tolerance, config, options, name)

        branches["cuda"] = kernel
    return tuple(jax.lax.platform_dependent(weight, previous, per_gpu, **branches, default=xla))


def _pallas_kernels(weight_shape: tuple[int, ...], config: tuple[int, int, int, int], options: dict) -> dict[str, Any]:
    """The Pallas kernels of the masked keep-in-place loops (as torch CUDA's Triton ones): the pinned
    relabelling (:func:`eplb.kernels.relabel_pallas.relabel_pinned`) and, where :mod:`eplb.kernels.repair_pallas`
    fits both the within-nodes and the global rule, the sticky repackings (the fresh placements' packing too),
    the local search and the slot alignment; and the polish (:mod:`eplb.kernels.polish_pallas`, taken by the
    ``active_gpus`` call) where it fits. Empty where the relabelling does not fit: then XLA throughout."""
    from eplb.kernels import polish_pallas, relabel_pallas, repair_pallas

    num_layers, num_log = weight_shape
    num_replicas, _, num_nodes, num_gpus = config
    if options.get("policy", "greedy") != "greedy" or options.get("spill"):
        return {}
    if not relabel_pallas.fits(num_layers, num_replicas, num_gpus, 1, pinned=True):
        return {}
    kernels: dict[str, Any] = {"relabel_pinned_fn": relabel_pallas.relabel_pinned}
    nodes = {1, num_nodes if options.get("hierarchical", True) else 1}
    # stabilize_elastic searches 4 candidates a layer: 4 L rows (fits counts rows in threes).
    if all(repair_pallas.fits(num_replicas, num_log, num_gpus, n, 2 * num_layers) for n in nodes):
        kernels |= {
            "sticky_pack_fn": repair_pallas.sticky_pack,
            "repair_fn": repair_pallas.repair,
            "align_slots_fn": repair_pallas.align_slots,
        }
    # The polish of the active_gpus call (polish_live: the empty slots as one more expert, E + 1 ids).
    if all(polish_pallas.fits(num_replicas, num_log + 1, num_gpus, n, num_layers) for n in nodes):
        kernels["polish_fn"] = polish_pallas.polish
    return kernels


def _masked_stable_pallas(
    weight: jax.Array,
    previous: jax.Array,
    per_gpu: jax.Array,
    tolerance: jax.Array | None,
    config: tuple[int, int, int, int],
    options: tuple[tuple[str, Any], ...],
    name: str,
) -> tuple[jax.Array, ...]:
    """The masked keep-in-place call on CUDA (``name``: ``"active_gpus"`` or ``"gpu_capacity"``):
    :func:`eplb.algorithms.elastic.place_elastic_stable` or
    :func:`eplb.algorithms.capacity_stable.place_capacity_stable` over all layers at once (not ``vmap``-ed per
    layer: every loop is then one Pallas launch over the layers, or one XLA loop), with the kernels of
    :func:`_pallas_kernels` it takes (``gpu_capacity``: the relabelling on capacity classes and the sticky
    repackings; placement by time's loops and the swap search stay XLA). Same placement as the XLA path."""
    placer, _, takes = _MASKED[name]
    kernels = _pallas_kernels(weight.shape, config, dict(options))
    steps = {k: kernels[k] for k in takes if k in kernels}
    placement = placer(
        weight.astype(jnp.float32), previous, *config, xp=jnp, tolerance=tolerance, **{name: per_gpu},
        **dict(options), **steps,
    )  # fmt: skip
    return _tied_to(weight, placement)


def _tied_to(weight: jax.Array, placement: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """``placement``, as values computed from ``weight``.

    An output of a ``jit`` that depends on no input (a degenerate config's
    fixed placement: one slot per expert, say) is a constant, which JAX
    places on the default device, not the inputs' (seen with JAX 0.11 on a
    GPU machine: CPU loads, GPU ``phy2log``). An optimisation barrier over
    both makes every output a result of the computation, where the inputs
    live; it costs nothing at run time.
    """
    return jax.lax.optimization_barrier((weight, placement))[1]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _kernel_placement(weight: jax.Array, config: tuple[int, int, int, int], hierarchical: bool) -> tuple[Any, ...]:
    """The fused Triton kernel through ``jax_triton.triton_call`` (lowered on CUDA only)."""
    import jax_triton

    from eplb.kernels.greedy_triton import greedy_kernel, launch_config, scratch_size

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
        jax.ShapeDtypeStruct((scratch_size(num_layers, num_nodes, meta),), jnp.int32),  # the kernel's scratch
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
        )[:3]
    )


def kernel_available() -> bool:
    """Whether the fused kernel can be used on GPUs (``triton`` and ``jax-triton`` installed)."""
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("jax_triton") is not None


IMPLS = ("pallas", "triton", "host", "xla")


@functools.cache
def pallas_available() -> bool:
    """Whether this JAX ships Pallas' Triton lowering, which both Pallas kernels are written for.

    JAX 0.11 deprecates that backend (a ``DeprecationWarning`` at lowering);
    once a release drops it, ``impl=None`` falls back to XLA on CUDA instead
    of failing inside ``jit``.
    """
    return importlib.util.find_spec("jax.experimental.pallas.triton") is not None


@functools.cache
def _has_cuda() -> bool:
    """Whether this process has a CUDA backend (cached; JAX is already initialised by the caller's array)."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _placement(
    weight: jax.Array, config: tuple[int, int, int, int], options: tuple[tuple[str, Any], ...], impl: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One jitted call: the XLA algorithm, or a kernel on CUDA with XLA elsewhere (chosen at lowering)."""
    if impl == "xla":
        return _rebalance(weight, config, options, host=False)
    hierarchical = dict(options)["hierarchical"]

    def xla(w: jax.Array) -> tuple[jax.Array, ...]:
        return _rebalance(w, config, options)

    if dict(options).get("policy") == "refined":  # impl "pallas": its candidate stage as one kernel on CUDA
        if impl == "host":  # XLA, with the pair search through numba on the CPU
            return _rebalance(weight, config, options)
        from eplb.kernels import refined_pallas

        sizes = (config[2], config[3]) if hierarchical else (1, config[3])
        if not refined_pallas.fits(*weight.shape, config[0], *sizes):
            return _rebalance(weight, config, options)

        def refined(w: jax.Array) -> tuple[jax.Array, ...]:
            return refined_pallas.placement(w, config, hierarchical)

        return tuple(jax.lax.platform_dependent(weight, cuda=refined, default=xla))

    def host(w: jax.Array) -> tuple[jax.Array, ...]:
        return _jax_host.placement(w, config, hierarchical)

    # Off CUDA: the numba kernel through a host callback on the CPU (where it applies), XLA elsewhere.
    branches = {"cpu": host} if _jax_host.applies(dict(options), *weight.shape, config[0]) else {}
    if impl == "host":
        return tuple(jax.lax.platform_dependent(weight, **branches, default=xla))
    if impl == "pallas":
        from eplb.kernels import greedy_pallas

        if not greedy_pallas.fits(weight.shape[0], weight.shape[1], config[0]):
            return _rebalance(weight, config, options)  # int32 flat indices would overflow

        def kernel(w: jax.Array) -> tuple[jax.Array, ...]:
            return greedy_pallas.placement(w, config, hierarchical)

    else:

        def kernel(w: jax.Array) -> tuple[jax.Array, ...]:
            return _kernel_placement(w, config, hierarchical)

    return tuple(jax.lax.platform_dependent(weight, cuda=kernel, **branches, default=xla))


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

    One ``jax.jit`` call. ``impl``:

    - ``None`` (default): ``"pallas"`` where this process has a CUDA backend
      and JAX ships Pallas' Triton lowering (:func:`pallas_available`;
      greedy and refined policies, no ``spill``); else for the greedy and
      refined policies ``"host"`` where numba is installed; ``"xla"``
      otherwise;
    - ``"pallas"``: the greedy policy as one fused Pallas (Triton) kernel,
      one program per (layer, node) (:mod:`eplb.kernels.greedy_pallas`), on CUDA;
      the XLA path elsewhere. The choice is made at lowering by
      ``lax.platform_dependent``, so it works on tracers, inside a user's
      ``jit``/``vmap`` (a batch is folded into the layers: still one launch)
      and for computations placed on the CPU. For the refined policy, its
      candidate stage (replication, starts, swap rounds) is one Pallas
      kernel and the rest XLA ops (:mod:`eplb.kernels.refined_pallas`);
    - ``"triton"``: the same greedy kernel written in Triton, through
      ``jax-triton`` (opt-in: it reaches into JAX's private modules), chosen
      at lowering in the same way;
    - ``"host"``: on the CPU, the compiled numba kernel through a
      ``jax.pure_callback`` (:mod:`eplb.backends._jax_host`; needs numba, the
      ``fast`` extra), XLA elsewhere; ``"pallas"`` and ``"triton"`` take the
      same CPU branch, and ``None`` picks it where this process has no CUDA
      backend. For the refined policy, XLA with the pair stage's count search
      (two slots per GPU) as numba's kernel through a callback on the CPU
      (:func:`eplb.backends._jax_host.pair_counts`); ``"pallas"`` does the same
      off CUDA;
    - ``"xla"``: the array-API algorithm under ``jit`` + ``vmap`` over layers,
      every policy.

    All give bit-identical placements. ``"triton"`` applies to the greedy
    policy only, ``"host"`` and ``"pallas"`` to the greedy and refined policies
    (no ``spill``).
    """
    config = (num_replicas, num_groups, num_nodes, num_gpus)
    capacity = options.pop("gpu_capacity", None)
    if capacity is not None:
        # Placement by time (gpu_capacity): the array-API path under jit + vmap; no kernel implements it.
        if impl not in (None, "xla"):
            raise ValueError(f"gpu_capacity runs on impl='xla' (or None) only, got impl={impl!r}")
        return _rebalance_capacity(weight, capacity, config, tuple(sorted(options.items())))
    active = options.pop("active_gpus", None)
    if active is not None:
        # Elastic placement (active_gpus): the array-API path under jit + vmap; no kernel implements it.
        if impl not in (None, "xla"):
            raise ValueError(f"active_gpus runs on impl='xla' (or None) only, got impl={impl!r}")
        return _rebalance_elastic(weight, active, config, tuple(sorted(options.items())))
    spill = bool(options.get("spill", 0))
    greedy = options.get("policy", "greedy") == "greedy" and not spill
    refined = options.get("policy") == "refined" and not spill
    # Pallas kernels exist for the greedy and refined policies only: any other policy (survivable) must take
    # XLA, or the default would run the greedy kernel on CUDA and return the greedy placement for it.
    kernel = greedy or refined
    if impl is None:
        pallas = kernel and _has_cuda() and pallas_available()
        host = (greedy and _jax_host.applies(options)) or (refined and _numba.available())
        impl = "pallas" if pallas else "host" if host else "xla"
    if impl not in IMPLS or (impl == "triton" and not greedy) or (impl in ("host", "pallas") and not kernel):
        raise ValueError(
            "impl must be 'pallas' or 'host' (greedy or refined policy, no spill), 'triton' (greedy policy only), "
            f"'xla' or None, got {impl!r} with {options}"
        )
    if impl == "pallas" and not pallas_available():
        raise ValueError(
            f"impl='pallas' needs Pallas' Triton lowering (jax.experimental.pallas.triton), which JAX "
            f"{jax.__version__} does not ship; use impl='xla' or None"
        )
    placement = _placement(weight, config, tuple(sorted(options.items())), impl)
    if impl == "triton":
        from eplb.kernels.greedy_triton import ensure_cache_dir

        ensure_cache_dir()  # jax-triton empties Triton's cache setting when it compiles
    return placement


Knobs = tuple[Any, Any]  # (tolerance float32 [] or None, max_moves int [] or None): traced, not static


@functools.partial(jax.jit, static_argnums=(3, 4))
def _rebalance_stable_xla(
    weight: jax.Array,
    previous: jax.Array,
    knobs: Knobs,
    config: tuple[int, int, int, int],
    options: tuple[tuple[str, Any], ...],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    index = jnp.arange(1).dtype  # JAX's default integer
    tolerance, max_moves = knobs

    def one_layer(row: jax.Array, old: jax.Array) -> tuple[jax.Array, ...]:
        placement = place_stable(
            row[None, :], old[None, :], *config, xp=jnp, tolerance=tolerance, max_moves=max_moves, **dict(options)
        )
        return tuple(a[0] for a in placement)

    return _tied_to(weight, jax.vmap(one_layer)(weight.astype(jnp.float32), previous.astype(index)))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _rebalance_stable(
    weight: jax.Array,
    previous: jax.Array,
    knobs: Knobs,
    config: tuple[int, int, int, int],
    options: tuple[tuple[str, Any], ...],
    impl: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """XLA; with ``impl="host"`` (or ``"pallas"``) the compiled CPU kernels through a host callback on the
    CPU; with ``impl="pallas"`` the Pallas kernels on CUDA (the knobs' too); chosen at lowering."""
    host_applies = _jax_host.applies_stable(*weight.shape, config[0])
    if impl == "xla" or (impl == "host" and not host_applies):
        return _rebalance_stable_xla(weight, previous, knobs, config, options)

    def xla(w: jax.Array, p: jax.Array, k: Knobs) -> tuple[jax.Array, ...]:
        return _rebalance_stable_xla(w, p, k, config, options)

    def host(w: jax.Array, p: jax.Array, k: Knobs) -> tuple[jax.Array, ...]:
        return _jax_host.placement_stable(w, p, k, config, dict(options))

    branches = {"cpu": host} if host_applies else {}
    if impl == "pallas":

        def kernel(w: jax.Array, p: jax.Array, k: Knobs) -> tuple[jax.Array, ...]:
            return _rebalance_stable_pallas(w, p, config, options, k)

        branches["cuda"] = kernel
    return tuple(jax.lax.platform_dependent(weight, previous, knobs, **branches, default=xla))


def _stable_pallas_applies(weight_shape: tuple[int, ...], config: tuple[int, int, int, int], options: dict) -> bool:
    """Whether ``previous=`` (no ``active_gpus``) can run the Pallas kernels on CUDA: the fresh placement's
    kernel (greedy or refined policy, no ``spill``) and the relabelling's (:func:`fits`); with the knobs,
    :mod:`eplb.kernels.repair_pallas` runs where it fits, XLA for those steps otherwise."""
    from eplb.kernels import relabel_pallas

    if options.get("spill") or options.get("policy", "greedy") not in ("greedy", "refined"):
        return False
    nodes = config[2] if options.get("hierarchical", True) else 1
    return relabel_pallas.fits(weight_shape[0], config[0], config[3], nodes)


def _rebalance_stable_pallas(
    weight: jax.Array,
    previous: jax.Array,
    config: tuple[int, int, int, int],
    options: tuple[tuple[str, Any], ...],
    knobs: Knobs = (None, None),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``previous=`` on CUDA: the fresh placement by :func:`_placement`'s Pallas kernel, the relabelling by
    :mod:`eplb.kernels.relabel_pallas`, with the knobs (traced ``(tolerance, max_moves)``) the sticky
    repacking and the local search by :mod:`eplb.kernels.repair_pallas` and the polish by
    :mod:`eplb.kernels.polish_pallas` where they fit (else XLA), the rest
    (kept pairs, slot alignment, loads, the pick, ``log2phy``) XLA ops over all layers at once. Same
    placement as :func:`_rebalance_stable_xla`."""
    from eplb.kernels import polish_pallas, relabel_pallas, repair_pallas

    index = jnp.arange(1).dtype  # JAX's default integer
    rest = dict(options)
    hierarchical = rest.pop("hierarchical")
    tolerance, max_moves = knobs
    kernels: dict[str, Any] = {}
    if tolerance is not None or max_moves is not None:
        rest |= {"tolerance": tolerance, "max_moves": max_moves}
        nodes = config[2] if hierarchical else 1
        if repair_pallas.fits(config[0], weight.shape[1], config[3], nodes, weight.shape[0]):
            kernels = {
                "sticky_pack_fn": repair_pallas.sticky_pack,
                "repair_fn": repair_pallas.repair,
                "align_slots_fn": repair_pallas.align_slots,
                "replica_counts_fn": repair_pallas.replica_counts,
            }
        if polish_pallas.fits(config[0], weight.shape[1], config[3], nodes, weight.shape[0]):
            kernels["polish_fn"] = polish_pallas.polish

    def place_fn(w: jax.Array, *sizes: int, hierarchical: bool, xp: Any, **policy: Any) -> tuple[jax.Array, ...]:
        # The fresh placement, or near_split's per-node one (its own sizes, the global policy).
        return _placement(
            w, sizes, tuple(sorted({**dict(options), **policy, "hierarchical": hierarchical}.items())), "pallas"
        )

    placement = place_stable(
        weight.astype(jnp.float32),
        previous.astype(index),
        *config,
        hierarchical=hierarchical,
        xp=jnp,
        place_fn=place_fn,
        relabel_fn=relabel_pallas.relabel,
        **kernels,
        **rest,
    )
    return _tied_to(weight, placement)


def rebalance_stable(
    weight: jax.Array,
    previous: jax.Array,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    impl: str | None = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """:func:`rebalance` keeping ``previous [L, R]``'s experts in place; ``options`` static.

    ``impl``: ``"host"`` (the default where numba is installed): on the CPU,
    the numpy adapter's compiled kernels through a host callback
    (:func:`eplb.backends._jax_host.placement_stable`), chosen at lowering,
    XLA elsewhere; ``"xla"``: the array-API algorithm under ``jit`` + ``vmap``.
    ``None`` where this process has a CUDA backend and Pallas' Triton
    lowering: on CUDA the Pallas kernels (the fresh placement's,
    :mod:`eplb.kernels.relabel_pallas` and, with ``tolerance`` or
    ``max_moves``, :mod:`eplb.kernels.repair_pallas` and
    :mod:`eplb.kernels.polish_pallas` where they fit, XLA otherwise), the
    same CPU branch elsewhere. Same placement. With ``active_gpus`` or ``gpu_capacity``
    (traced, as the tolerance): ``"host"`` as above, ``"xla"``, or ``"pallas"``: on CUDA the whole batch at once
    with the Pallas kernels of :func:`_pallas_kernels` (for ``gpu_capacity`` its relabelling and sticky
    repacking; placement by time stays XLA), the host's branch on the CPU. ``None``: ``"pallas"`` where
    this process has a CUDA backend and Pallas' Triton lowering, else ``"host"``.
    """
    for name in ("gpu_capacity", "active_gpus"):
        # Failed or slower GPUs with previous=: on the CPU the compiled kernels via the host, else the array-API
        # path under jit + vmap (the vector and the tolerance traced). (The API folds a mask into capacities.)
        per_gpu = options.pop(name, None)
        if per_gpu is None:
            continue
        if impl not in (None, "host", "pallas", "xla"):
            raise ValueError(f"{name} with previous= takes impl='host', 'pallas', 'xla' or None, got impl={impl!r}")
        if impl == "pallas" and not pallas_available():
            raise ValueError("impl='pallas' needs Pallas' Triton lowering (jax.experimental.pallas.triton)")
        if options.pop("max_moves", None) is not None:
            raise ValueError(f"{name} cannot be combined with max_moves= yet")
        tolerance = options.pop("tolerance", None)
        knob = None if tolerance is None else jnp.asarray(tolerance, dtype=jnp.float32)
        config = (num_replicas, num_groups, num_nodes, num_gpus)
        chosen = "xla" if impl == "xla" else "host"
        # On CUDA the Pallas kernels for the loops that have them (all of active_gpus'; gpu_capacity's time loops
        # stay XLA); the CPU branch stays the host's.
        default_pallas = impl is None and _has_cuda() and pallas_available()
        if impl == "pallas" or default_pallas:
            chosen = "pallas"
        rest = tuple(sorted(options.items()))
        return _rebalance_masked_stable(weight, previous, per_gpu, knob, config, rest, chosen, name)
    if impl not in (None, "host", "xla"):
        raise ValueError(f"impl must be 'host', 'xla' or None for a call with previous=, got {impl!r}")
    config = (num_replicas, num_groups, num_nodes, num_gpus)
    # The knobs' values are traced arguments (a new value does not recompile); whether each is given is static.
    tolerance, max_moves = options.pop("tolerance", None), options.pop("max_moves", None)
    if impl is None:
        impl = "host" if _jax_host.applies_stable() else "xla"
        # On CUDA: the Pallas kernels (placement, relabelling, the knobs' repair); the CPU branch stays as chosen.
        if _has_cuda() and pallas_available() and _stable_pallas_applies(weight.shape, config, options):
            impl = "pallas"
    knobs = (
        None if tolerance is None else jnp.asarray(tolerance, dtype=jnp.float32),
        None if max_moves is None else jnp.asarray(max_moves, dtype=jnp.int32),
    )
    return _rebalance_stable(weight, previous, knobs, config, tuple(sorted(options.items())), impl)
