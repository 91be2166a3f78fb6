"""torch backend: batched eager ops on the input's device, no host sync on CUDA.

Nothing here reads a tensor's values on the host (no ``.item()``, ``.cpu()``,
``nonzero`` or boolean-mask indexing), so a CUDA call only queues kernels.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import array_api_compat.torch as xp
import numpy as np
import torch

from eplb.algorithms.capacity_stable import place_capacity_stable
from eplb.algorithms.elastic import place_elastic_stable
from eplb.algorithms.stability import place_stable
from eplb.backends import _numpy

__all__ = ["dtype_kind", "host_values", "rebalance", "rebalance_stable"]


def dtype_kind(weight: torch.Tensor) -> str:
    if weight.dtype == torch.bool:
        return "b"
    if weight.dtype.is_complex:
        return "c"
    if weight.dtype.is_floating_point:
        return "f"
    return "u" if weight.dtype == torch.uint8 else "i"


def host_values(weight: torch.Tensor, force: bool) -> np.ndarray | None:
    if weight.device.type != "cpu" and not force:
        return None  # reading CUDA values would stall the host
    weight = weight.detach().cpu()
    if weight.dtype.is_floating_point and weight.dtype != torch.float64:
        weight = weight.float()  # numpy has no bfloat16/float8; float32 holds them exactly
    return weight.numpy()


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernel_applies(options: dict[str, Any]) -> bool:
    """The fused greedy kernel covers the greedy policy without extra options (no ``active_gpus``, ``gpu_capacity``)."""
    plain = options.get("active_gpus") is None and options.get("gpu_capacity") is None
    return plain and options.get("policy", "greedy") == "greedy" and not options.get("spill", 0)


def _refined_kernel_applies(options: dict[str, Any]) -> bool:
    """The fused kernels of the refined policy cover it without ``spill`` (and without ``gpu_capacity``)."""
    plain = options.get("gpu_capacity") is None
    return plain and options.get("policy", "greedy") == "refined" and not options.get("spill", 0)


def rebalance(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    impl: str | None = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Placement of a tensor, on its device; ``options`` are :func:`eplb.algorithms.policies.place`'s keywords.

    ``impl``: ``"torch"`` runs torch ops; ``"numpy"`` (CPU tensors only) runs
    the numpy backend on a zero-copy view (the compiled greedy kernel of
    :mod:`eplb.backends._numba` when numba is installed), since a torch CPU
    op costs about 7 us against numpy's 1-3 us and the loop is made of many
    tiny ops;
    ``"triton"`` (CUDA; greedy policy, or refined policy without ``spill``)
    runs the fused kernel of :mod:`eplb.backends._triton`, or for the refined
    policy the kernels of :mod:`eplb.kernels.refined_triton`; ``None``
    picks numpy on the CPU, the kernels on CUDA where they apply and Triton
    is installed, torch ops otherwise. All give the same placement.
    """
    if impl is None:
        if weight.device.type == "cpu":
            impl = "numpy"
        elif weight.device.type != "cuda" or not _has_triton():  # (another device: MPS, XPU, meta)
            impl = "torch"
        elif _kernel_applies(options):
            from eplb.kernels import greedy_triton

            nodes = num_nodes if options["hierarchical"] else 1
            impl = "triton" if greedy_triton.kernel_fits(weight.shape[1], num_replicas, nodes) else "torch"
        elif _refined_kernel_applies(options):
            from eplb.kernels import refined_triton

            sizes = (num_groups, num_nodes) if options["hierarchical"] else (1, 1)
            fits = refined_triton.kernel_fits(weight.shape[1], num_replicas, *sizes, num_gpus)
            impl = "triton" if fits else "torch"
        else:
            impl = "torch"
    if impl == "triton":
        if weight.device.type != "cuda" or not (_kernel_applies(options) or _refined_kernel_applies(options)):
            raise ValueError(
                f"impl='triton' needs a CUDA tensor and the greedy policy or the refined policy without spill, "
                f"got a tensor on {weight.device} and {options}"
            )
        hierarchical = options["hierarchical"]
        if _refined_kernel_applies(options):
            from eplb.kernels import refined_triton

            return refined_triton.rebalance_refined_cuda(
                weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical
            )
        from eplb.backends import _triton

        return _triton.rebalance_greedy_cuda(weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical)
    weight32 = weight.detach().to(torch.float32).contiguous()
    if impl == "numpy":
        if weight.device.type != "cpu":
            raise ValueError(f"impl='numpy' needs a CPU tensor, got device {weight.device}")
        for key in ("active_gpus", "gpu_capacity"):
            if options.get(key) is not None:
                options = {**options, key: options[key].detach().cpu().numpy()}
        placement = _numpy.rebalance(weight32.numpy(), num_replicas, num_groups, num_nodes, num_gpus, **options)
        return tuple(torch.from_numpy(a) for a in placement)
    if impl != "torch":
        raise ValueError(f"impl must be 'torch', 'numpy' or None, got {impl!r}")
    if options.get("active_gpus") is not None or options.get("gpu_capacity") is not None:
        # On CUDA, the replication and the packing onto the live GPUs by Triton kernels (one launch each for the
        # loops' hundreds of torch ops; the same placement); by time too (gpu_capacity).
        kernels = _elastic_kernels(weight32, num_replicas, num_groups, num_nodes, num_gpus, options)
        options = {**options, **{k: kernels[k] for k in ("sticky_pack_fn", "replicate_fn", "split_fn") if k in kernels}}
        if options.get("gpu_capacity") is not None:
            options = {**options, **_capacity_kernels(weight32, num_replicas, num_groups, num_nodes, num_gpus, options)}
    return _numpy.placer(options)(weight32, num_replicas, num_groups, num_nodes, num_gpus, xp=xp, **options)


def _elastic_kernels(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The Triton kernels of :func:`eplb.algorithms.elastic.place_elastic_stable`'s steps on CUDA (the exact
    relabelling, the sticky repackings and the fresh placements' replication and packing, the local search,
    slot alignment, heaviest GPUs, the polish, the groups' split and the near group split: each one launch instead of
    hundreds to thousands of torch ops), where they take every node count the call may use; else none (the
    array-API steps)."""
    if weight.device.type != "cuda" or not _has_triton():
        return {}
    from eplb.kernels import (
        choose_triton,
        group_split_triton,
        polish_triton,
        relabel_triton,
        repair_triton,
        replication_triton,
    )

    nodes = {1, num_nodes} if options["hierarchical"] else {1}
    num_log = weight.shape[1]
    if not all(
        relabel_triton.fits(num_replicas, num_gpus, n) and repair_triton.fits(num_replicas, num_log, num_gpus, n)
        for n in nodes
    ):
        return {}
    kernels = {
        "relabel_pinned_fn": relabel_triton.relabel_pinned,
        "sticky_pack_fn": repair_triton.sticky_pack,  # (the fresh placements' packing too)
        "repair_fn": repair_triton.repair,
        "align_slots_fn": repair_triton.align_slots,
    }
    if choose_triton.fits(num_replicas, num_log, num_gpus):
        kernels["heaviest_gpu_fn"] = choose_triton.heaviest_gpu
    if all(polish_triton.fits(num_replicas, num_log + 1, num_gpus, n) for n in nodes):
        kernels["polish_fn"] = polish_triton.polish  # (empty slots as one more expert: polish_live)
    if replication_triton.fits(num_log, num_replicas):  # (per node: fewer experts and slots, within it too)
        kernels["replicate_fn"] = replication_triton.replicate_experts
    if options["hierarchical"] and group_split_triton.live_fits(num_log, num_replicas, num_groups, num_nodes, num_gpus):
        kernels["split_fn"] = group_split_triton.group_split  # groups to nodes, by live capacity or by load
        if num_nodes > 1 and group_split_triton.fits(num_log, num_replicas, num_groups, num_nodes):
            kernels["group_split_fn"] = group_split_triton.sticky_group_split  # the near split: its group swaps
    return kernels


def _capacity_kernels(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, options: dict[str, Any]
) -> dict[str, Any]:
    """The Triton kernels of placement by time's loops on CUDA (:mod:`eplb.kernels.speed_triton`: LPT on time,
    pairing by a time budget, swaps out of the slowest GPU; 8,000-32,000 torch ops a call before), where they
    take every row the call may pack (per node and globally, and the groups onto nodes); else none."""
    if weight.device.type != "cuda" or not _has_triton():
        return {}
    from eplb.kernels import pairs_triton, replication_triton, speed_triton

    nodes = {1, num_nodes} if options["hierarchical"] else {1}
    rows = [(num_replicas // n, num_gpus // n) for n in nodes]  # (slots, GPUs) of a row
    if options["hierarchical"] and num_nodes > 1:
        rows.append((num_groups, num_nodes))  # groups onto nodes
    if not all(speed_triton.fits(items, packs) for items, packs in rows):
        return {}
    kernels: dict[str, Any] = {
        "lpt_pack_fn": speed_triton.lpt_pack_speed,
        "pair_pack_fn": speed_triton.pair_pack_speed,
        "swaps_fn": speed_triton.refine_by_swaps_speed,
    }
    if replication_triton.fits(weight.shape[1], num_replicas):
        kernels["replicate_fn"] = replication_triton.replicate_experts
    if all(pairs_triton.fits(weight.shape[1] // n, num_replicas // n) for n in nodes):
        kernels["pair_counts_fn"] = pairs_triton.pair_counts  # two slots per GPU: the pair set's search
    return kernels


def _capacity_stable_kernels(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, options: dict[str, Any]
) -> dict[str, Any]:
    """:func:`~eplb.algorithms.capacity_stable.place_capacity_stable`'s steps as Triton kernels on CUDA: the
    fresh placement's (:func:`_capacity_kernels`, and the blind placement's packing, replication and group
    split), the relabelling among equal-capacity GPUs and the slot order, where every one of them fits;
    else none (the array-API steps)."""
    elastic = _elastic_kernels(weight, num_replicas, num_groups, num_nodes, num_gpus, options)
    by_time = _capacity_kernels(weight, num_replicas, num_groups, num_nodes, num_gpus, options)
    if not elastic or not by_time:
        return {}
    picked = ("sticky_pack_fn", "replicate_fn", "split_fn", "relabel_pinned_fn", "align_slots_fn")
    return {**{k: elastic[k] for k in picked if k in elastic}, **by_time}


def rebalance_stable(
    weight: torch.Tensor,
    previous: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    impl: str | None = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """:func:`rebalance` keeping ``previous [L, R]``'s experts in place (same ``impl`` rule)."""
    if impl is None:
        impl = "numpy" if weight.device.type == "cpu" else "torch"
    weight32 = weight.detach().to(torch.float32).contiguous()
    previous = previous.detach().to(device=weight.device, dtype=torch.int64).contiguous()
    elastic = options.get("active_gpus") is not None
    by_time = options.get("gpu_capacity") is not None
    if impl == "numpy":
        if weight.device.type != "cpu":
            raise ValueError(f"impl='numpy' needs a CPU tensor, got device {weight.device}")
        for key in ("active_gpus", "gpu_capacity"):
            if options.get(key) is not None:
                options = {**options, key: options[key].detach().cpu().numpy()}
        placement = _numpy.rebalance_stable(
            weight32.numpy(), previous.numpy(), num_replicas, num_groups, num_nodes, num_gpus, **options
        )
        return tuple(torch.from_numpy(a) for a in placement)
    if impl != "torch":
        raise ValueError(f"impl must be 'torch', 'numpy' or None, got {impl!r}")
    if by_time:  # gpu_capacity: the array-API path, its loops as Triton kernels on CUDA
        if options.get("max_moves") is not None:
            raise ValueError("gpu_capacity cannot be combined with max_moves= yet")
        options = {k: v for k, v in options.items() if k != "max_moves"}
        return place_capacity_stable(
            weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, xp=xp,
            **_capacity_stable_kernels(weight32, num_replicas, num_groups, num_nodes, num_gpus, options), **options,
        )  # fmt: skip
    if elastic:  # active_gpus: the array-API path
        if options.get("max_moves") is not None:
            raise ValueError("active_gpus cannot be combined with max_moves= yet")
        options = {k: v for k, v in options.items() if k != "max_moves"}
        elastic_kernels = _elastic_kernels(weight32, num_replicas, num_groups, num_nodes, num_gpus, options)
        return place_elastic_stable(
            weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, xp=xp, **elastic_kernels, **options
        )
    kernels: dict[str, Any] = {}
    if weight.device.type == "cuda" and _has_triton():
        # The fused kernels where they apply: the fresh placement (greedy or refined, as rebalance picks)
        # and the relabelling (eplb.kernels.relabel_triton); the same placement as torch ops.
        from eplb.kernels import relabel_triton

        def place_on_device(w: torch.Tensor, *sizes: int, xp: Any, **place_options: Any) -> tuple[Any, Any, Any]:
            return rebalance(w, *sizes, **place_options)

        kernels["place_fn"] = place_on_device
        nodes = num_nodes if options["hierarchical"] else 1
        if relabel_triton.fits(num_replicas, num_gpus, nodes):
            kernels["relabel_fn"] = relabel_triton.relabel
            kernels["log2phy_fn"] = relabel_triton.log2phy_in_slot_order
        knobs = options.get("tolerance") is not None or options.get("max_moves") is not None
        if knobs:
            # The knobs' steps (eplb.kernels.repair_triton, eplb.kernels.polish_triton): sticky repacking,
            # local search, slot alignment, replica counts, the swaps back toward old, each one launch, equal
            # to the array-API functions.
            from eplb.kernels import polish_triton, repair_triton

            if repair_triton.fits(num_replicas, weight.shape[1], num_gpus, nodes):
                kernels["sticky_pack_fn"] = repair_triton.sticky_pack
                kernels["repair_fn"] = repair_triton.repair
                kernels["align_slots_fn"] = repair_triton.align_slots
                kernels["replica_counts_fn"] = repair_triton.replica_counts
            if polish_triton.fits(num_replicas, weight.shape[1], num_gpus, nodes):
                kernels["polish_fn"] = polish_triton.polish
            from eplb.kernels import choose_triton, group_split_triton

            if choose_triton.fits(num_replicas, weight.shape[1], num_gpus):
                # The load limit and the choice among the candidates (about 60 torch ops), one launch each.
                kernels["heaviest_gpu_fn"] = choose_triton.heaviest_gpu
                kernels["choose_fn"] = choose_triton.choose

            if nodes > 1 and group_split_triton.fits(weight.shape[1], num_replicas, num_groups, num_nodes):
                kernels["group_split_fn"] = group_split_triton.near_group_split  # the near split's group swap
    return place_stable(weight32, previous, num_replicas, num_groups, num_nodes, num_gpus, xp=xp, **kernels, **options)
