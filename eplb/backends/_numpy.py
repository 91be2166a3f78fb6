"""numpy backend: the reference. Runs the batched algorithm eagerly."""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.algorithms.capacity import place_capacity
from eplb.algorithms.capacity_stable import place_capacity_stable
from eplb.algorithms.elastic import place_elastic, place_elastic_stable
from eplb.algorithms.policies import place
from eplb.algorithms.stability import place_stable
from eplb.backends import _numba

__all__ = ["dtype_kind", "host_values", "placer", "rebalance", "rebalance_stable"]


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
    log2phy: bool = True,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Placement of a numpy array; ``options`` are :func:`eplb.algorithms.policies.place`'s keywords.

    ``impl``: ``"numba"`` runs the compiled greedy kernel
    (:mod:`eplb.backends._numba`; plain greedy options only); ``"xp"`` the
    array-API algorithm layer; ``None`` picks ``"numba"`` when numba is
    installed, the options are plain greedy and the kernel is loaded
    (:func:`eplb.backends._numba.ready`: the first call in a process starts
    loading it in the background, from numba's disk cache or by compiling),
    else ``"xp"``. Both give the same placement. ``log2phy=False`` (for
    ``previous=``, which builds its own): the compiled kernel leaves the
    second array empty, ``[L, E, 0]``; the array-API path returns it whole.
    With ``active_gpus`` (the array-API rule), ``impl=None`` packs the
    replicas with :func:`eplb.kernels.repair_numba.sticky_pack` once the
    kernels are loaded (the same placement as its LPT loop); with
    ``gpu_capacity``, also placement by time's loops
    (:mod:`eplb.kernels.speed_numba`).
    """
    weight32 = np.ascontiguousarray(weight, dtype=np.float32)
    # active_gpus= (impl=None): the array-API rule, its packing loop by the compiled sticky packing once loaded.
    elastic = options.get("active_gpus") is not None and options.get("gpu_capacity") is None
    packer_ready = elastic and impl is None and _numba.available() and _numba.ready()
    impl_was_none = impl is None
    if impl is None:
        impl = "numba" if _numba.supports(options) and _numba.available() and _numba.ready() else "xp"
    if impl == "numba":
        return _numba.rebalance(weight32, num_replicas, num_groups, num_nodes, num_gpus, log2phy=log2phy, **options)
    if impl != "xp":
        raise ValueError(f"impl must be 'numba', 'xp' or None, got {impl!r}")
    if packer_ready:
        # The replicas packed onto the live GPUs by the compiled sticky packing, and counted by the compiled
        # replica count (the same placement).
        kernels = _repair_hooks()
        options = {
            **options,
            "sticky_pack_fn": kernels["sticky_pack_fn"],
            "replica_counts_fn": kernels["replica_counts_fn"],
        }
    if options.get("gpu_capacity") is not None and impl_was_none and _numba.available() and _numba.ready():
        # Placement by time: its packing loops compiled (eplb.kernels.speed_numba), and the blind placement's
        # packing as above (the same placement).
        from eplb.kernels import pairs_numba, speed_numba

        options = {
            **options,
            "lpt_pack_fn": speed_numba.lpt_pack_speed,
            "pair_pack_fn": speed_numba.pair_pack_speed,
            "swaps_fn": speed_numba.refine_by_swaps_speed,
            "pair_counts_fn": pairs_numba.pair_counts,
            "sticky_pack_fn": _repair_hooks()["sticky_pack_fn"],
        }
    refined = options.get("policy") == "refined" and placer(options) is place
    if refined and impl_was_none and _numba.available() and _numba.ready():
        # Two slots per GPU: the count search of the refined policy compiled (eplb.kernels.pairs_numba).
        from eplb.kernels import pairs_numba

        options = {**options, "pair_counts_fn": pairs_numba.pair_counts}
    placement = placer(options)(weight32, num_replicas, num_groups, num_nodes, num_gpus, xp=np, **options)
    return tuple(np.asarray(a, dtype=np.int64) for a in placement)


def placer(options: dict[str, Any]) -> Any:
    """The array-API placement for these options (``active_gpus``, ``gpu_capacity``: array API only)."""
    if options.get("gpu_capacity") is not None:
        return place_capacity
    return place if options.get("active_gpus") is None else place_elastic


def rebalance_stable(
    weight: np.ndarray,
    previous: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    impl: str | None = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Placement keeping ``previous [L, R]``'s experts in place (:func:`eplb.algorithms.stability.place_stable`).

    ``impl``: ``"numba"`` runs the fresh placement's kernel where it applies
    (:func:`rebalance`'s rule), the relabelling as one compiled kernel
    (:mod:`eplb.kernels.relabel_numba`) and, with ``tolerance`` or
    ``max_moves``, the sticky repacking, the local search and their
    slot-order, replica-count and move-count steps as compiled kernels
    (:mod:`eplb.kernels.repair_numba`), the near split's group swap
    (:mod:`eplb.kernels.group_split_numba`) and the polish
    (:mod:`eplb.kernels.polish_numba`); ``"xp"`` the array-API
    algorithm layer throughout; ``None`` picks ``"numba"`` where numba is installed
    and its kernels are loaded or load within :data:`eplb.backends._numba.STABLE_WAIT`
    seconds (a warm disk cache; a first call with a cold one runs the array-API path
    while they compile). Same placement either way.
    """
    weight32 = np.ascontiguousarray(weight, dtype=np.float32)
    previous = np.ascontiguousarray(previous, dtype=np.int64)
    if options.get("gpu_capacity") is not None:
        return _rebalance_capacity_stable(
            weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, impl, options
        )
    if options.get("active_gpus") is not None:
        return _rebalance_elastic_stable(
            weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, impl, options
        )
    # Ids are checked here even with check_values=False: the compiled kernels index by expert id without
    # bounds checks, and both paths must take the same inputs. Host data: the check costs microseconds.
    if previous.size and (previous.min() < 0 or previous.max() >= weight.shape[1]):
        raise ValueError(
            f"previous must hold expert ids in [0, {weight.shape[1]}), "
            f"got values from {previous.min()} to {previous.max()}"
        )
    if impl is None:
        impl = "numba" if _numba.available() and _numba.ready(wait=_numba.STABLE_WAIT) else "xp"
    if impl not in ("numba", "xp"):
        raise ValueError(f"impl must be 'numba', 'xp' or None, got {impl!r}")
    hooks = {}
    if impl == "numba":
        from eplb.kernels import group_split_numba, relabel_numba

        def place_fn(w: np.ndarray, *sizes: int, xp: Any, **policy: Any) -> tuple[Any, ...]:
            # The greedy kernel where it applies; its log2phy is not needed (log2phy_fn builds the result's).
            return rebalance(w, *sizes, log2phy=False, **policy)

        def relabel_fn(new: np.ndarray, old: np.ndarray, gpus: int, nodes: int, *, xp: Any) -> np.ndarray:
            return relabel_numba.relabel(new, old, gpus, nodes, weight.shape[1])

        hooks = {
            "place_fn": place_fn,
            "relabel_fn": relabel_fn,
            **_repair_hooks(),
            "log2phy_fn": relabel_numba.log2phy_in_slot_order,
            "group_split_fn": group_split_numba.near_group_split,
        }
    placement = place_stable(
        weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, xp=np, **hooks, **options
    )
    return tuple(np.asarray(a, dtype=np.int64) for a in placement)


def _repair_hooks() -> dict[str, Any]:
    """``sticky_pack_fn``, ``repair_fn``, ``align_slots_fn``, ``replica_counts_fn``, ``count_moves_fn``: the
    compiled kernels of :mod:`eplb.kernels.repair_numba` with the array-API functions' signatures (``-1``
    slots, ``initial_load`` and ``reserve`` included; ``-1`` counts for no expert), for
    :func:`~eplb.algorithms.stability.stabilize` and
    :func:`~eplb.algorithms.elastic.stabilize_elastic`; and ``polish_fn``
    (:func:`eplb.kernels.polish_numba.polish`), for ``stabilize`` and
    :func:`~eplb.algorithms.elastic.place_elastic_stable`."""
    from eplb.kernels import polish_numba, repair_numba

    def sticky_pack_fn(*args: Any, xp: Any, **kwargs: Any) -> np.ndarray:
        return repair_numba.sticky_pack(*args, **kwargs)

    def repair_fn(*args: Any, max_iters: int, xp: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return repair_numba.repair(*args, max_iters)

    def align_slots_fn(new: np.ndarray, old: np.ndarray, gpus: int, *, xp: Any) -> np.ndarray:
        return repair_numba.align_slots(new, old, gpus)

    def replica_counts_fn(phy2log: np.ndarray, experts: int, *, xp: Any) -> np.ndarray:
        return repair_numba.replica_counts(phy2log, experts)

    def count_moves_fn(new: np.ndarray, old: np.ndarray, gpus: int, *, xp: Any) -> np.ndarray:
        return repair_numba.count_moves(new, old, gpus)

    def polish_fn(*args: Any, xp: Any) -> np.ndarray:
        return polish_numba.polish(*args)

    return {
        "sticky_pack_fn": sticky_pack_fn,
        "repair_fn": repair_fn,
        "align_slots_fn": align_slots_fn,
        "replica_counts_fn": replica_counts_fn,
        "count_moves_fn": count_moves_fn,
        "polish_fn": polish_fn,
    }


def _elastic_hooks() -> dict[str, Any]:
    """:func:`_repair_hooks` and ``relabel_pinned_fn`` (:func:`eplb.kernels.repair_numba.relabel_pinned`), for
    :func:`~eplb.algorithms.elastic.place_elastic_stable`."""
    from eplb.kernels import repair_numba

    def relabel_pinned_fn(
        new: np.ndarray, old: np.ndarray, live_gpu: np.ndarray, gpus: int, *, num_nodes: int = 1, xp: Any
    ) -> np.ndarray:
        return repair_numba.relabel_pinned(new, old, live_gpu, gpus, num_nodes)

    return {**_repair_hooks(), "relabel_pinned_fn": relabel_pinned_fn}


def _rebalance_elastic_stable(
    weight32: np.ndarray,
    previous: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    impl: str | None,
    options: dict[str, Any],
) -> tuple[Any, Any, Any]:
    """``active_gpus`` with ``previous``: :func:`eplb.algorithms.elastic.place_elastic_stable`.

    ``impl``: ``"numba"`` runs its relabelling, sticky repackings, local
    search and slot ordering as the compiled kernels of
    :mod:`eplb.kernels.repair_numba` and its polish as :mod:`eplb.kernels.polish_numba`'s (the rest stays
    array API); ``"xp"`` the array-API layer throughout;
    ``None`` picks ``"numba"`` where numba is installed and its kernels are
    loaded, or load within :data:`eplb.backends._numba.STABLE_WAIT` seconds
    (as :func:`rebalance_stable`). Same placement either way.
    """
    impl, options = _masked_previous(impl, options, previous, weight32.shape[1], "active_gpus")
    options["active_gpus"] = np.asarray(options["active_gpus"], dtype=bool)
    hooks = {}
    if impl == "numba":
        from eplb.kernels import relabel_numba

        hooks = {**_elastic_hooks(), "log2phy_fn": relabel_numba.log2phy_in_slot_order}
    placement = place_elastic_stable(
        weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, xp=np, **hooks, **options
    )
    return tuple(np.asarray(a, dtype=np.int64) for a in placement)


def _rebalance_capacity_stable(
    weight32: np.ndarray,
    previous: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    impl: str | None,
    options: dict[str, Any],
) -> tuple[Any, Any, Any]:
    """``gpu_capacity`` with ``previous``: :func:`eplb.algorithms.capacity_stable.place_capacity_stable`.

    ``impl``: ``"numba"`` runs placement by time's loops (:mod:`eplb.kernels.speed_numba`, the search toward
    the limit included), the relabelling among equal-capacity GPUs and the slot order as compiled kernels
    (:mod:`eplb.kernels.repair_numba`); ``"xp"`` the array-API layer throughout; ``None`` as
    :func:`rebalance_stable`. Same placement either way.
    """
    impl, options = _masked_previous(impl, options, previous, weight32.shape[1], "gpu_capacity")
    options["gpu_capacity"] = np.asarray(options["gpu_capacity"], dtype=np.float32)
    hooks: dict[str, Any] = {}
    if impl == "numba":
        from eplb.kernels import pairs_numba, speed_numba

        elastic = _elastic_hooks()
        hooks = {
            "lpt_pack_fn": speed_numba.lpt_pack_speed,
            "pair_pack_fn": speed_numba.pair_pack_speed,
            "swaps_fn": speed_numba.refine_by_swaps_speed,
            "pair_counts_fn": pairs_numba.pair_counts,
            "sticky_pack_fn": elastic["sticky_pack_fn"],
            "relabel_pinned_fn": elastic["relabel_pinned_fn"],
            "align_slots_fn": elastic["align_slots_fn"],
        }
    placement = place_capacity_stable(
        weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, xp=np, **hooks, **options
    )
    return tuple(np.asarray(a, dtype=np.int64) for a in placement)


def _masked_previous(
    impl: str | None, options: dict[str, Any], previous: np.ndarray, num_log: int, name: str
) -> tuple[str, dict[str, Any]]:
    """``impl`` picked as :func:`rebalance_stable` does, ``options`` without ``max_moves`` (refused with
    ``name``, the argument that leaves GPUs empty), and ``previous``'s ids checked (``-1``: an empty slot)."""
    if impl is None:
        impl = "numba" if _numba.available() and _numba.ready(wait=_numba.STABLE_WAIT) else "xp"
    if impl not in ("numba", "xp"):
        raise ValueError(f"impl must be 'numba', 'xp' or None, got {impl!r}")
    options = dict(options)
    if options.pop("max_moves", None) is not None:
        raise ValueError(f"{name} cannot be combined with max_moves= yet")
    if previous.size and (previous.min() < -1 or previous.max() >= num_log):
        raise ValueError(
            f"previous must hold expert ids in [0, {num_log}) or -1 (an empty slot), "
            f"got values from {previous.min()} to {previous.max()}"
        )
    return impl, options
