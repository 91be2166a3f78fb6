"""Transfer plans: the expert copies that turn one placement into another.

:func:`plan_transfers` lists, per layer, the copies ``(source GPU, source slot,
destination GPU, destination slot)`` that a migration from ``old_phy2log`` to
``new_phy2log`` needs, choosing sources near the destination and spreading
the sends; executors (:mod:`eplb.executors`) carry a plan out on
``torch.distributed`` or JAX collectives. Plans are host (numpy) data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eplb import _validate, _xp
from eplb.algorithms.relabel import count_moves

__all__ = ["TransferError", "TransferPlan", "moved_experts", "plan_transfers"]


class TransferError(RuntimeError):
    """A migration failed part-way; every rank kept its old expert weights.

    Attributes
    ----------
    transfer : int or None
        Row of the failed copy in the :class:`TransferPlan` (``None``: the
        failure was not tied to one copy, e.g. a rank failed before sending).
    layer, expert, src_gpu, src_slot, dst_gpu, dst_slot : int or None
        That copy, when known.
    rank : int or None
        The rank (GPU) that reported the failure.
    """

    def __init__(
        self, message: str, *, plan: TransferPlan | None = None, transfer: int | None = None, rank: int | None = None
    ):
        self.transfer, self.rank = transfer, rank
        self.layer = self.expert = self.src_gpu = self.src_slot = self.dst_gpu = self.dst_slot = None
        if plan is not None and transfer is not None and 0 <= transfer < len(plan):
            row = plan.row(transfer)
            self.layer, self.expert = row["layer"], row["expert"]
            self.src_gpu, self.src_slot, self.dst_gpu, self.dst_slot = (
                row["src_gpu"],
                row["src_slot"],
                row["dst_gpu"],
                row["dst_slot"],
            )
            message = (
                f"transfer {transfer} (layer {self.layer}: expert {self.expert} from GPU {self.src_gpu} "
                f"slot {self.src_slot} to GPU {self.dst_gpu} slot {self.dst_slot}) failed"
                + (f" on rank {rank}" if rank is not None else "")
                + f": {message}"
            )
        elif rank is not None:
            message = f"rank {rank}: {message}"
        super().__init__(message + "; old weights kept")


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """The copies that turn ``old_phy2log`` into ``new_phy2log`` (see :func:`plan_transfers`).

    Attributes
    ----------
    layer, expert, src_gpu, src_slot, dst_gpu, dst_slot : numpy.ndarray [T], int64
        One row per copy, sorted by layer, destination GPU, destination slot.
        Slots are numbered within their GPU (``0 .. R/G - 1``).
    stage : numpy.ndarray [T], int64
        0: read the source slot's *old* weights; 1: read the destination
        GPU's *new* weights (a second copy of an expert the GPU receives in
        stage 0; ``src_gpu == dst_gpu``).
    num_layers, num_gpus, num_nodes, slots_per_gpu : int
        The shape of the placements.
    expert_bytes : int or None
        Size of one expert's weights, if given.
    """

    layer: np.ndarray
    expert: np.ndarray
    src_gpu: np.ndarray
    src_slot: np.ndarray
    dst_gpu: np.ndarray
    dst_slot: np.ndarray
    stage: np.ndarray
    num_layers: int
    num_gpus: int
    num_nodes: int
    slots_per_gpu: int
    expert_bytes: int | None = None

    def __len__(self) -> int:
        return len(self.layer)

    def row(self, index: int) -> dict[str, int]:
        """Copy ``index`` as a dict of Python ints."""
        names = ("layer", "expert", "src_gpu", "src_slot", "dst_gpu", "dst_slot", "stage")
        return {name: int(getattr(self, name)[index]) for name in names}

    @property
    def remote(self) -> np.ndarray:
        """``[T]`` bool: the copy crosses GPUs."""
        return self.src_gpu != self.dst_gpu

    @property
    def moved(self) -> np.ndarray:
        """``[L]`` int64: experts copied between GPUs per layer (the traffic)."""
        return np.bincount(self.layer[self.remote], minlength=self.num_layers)

    @property
    def local(self) -> np.ndarray:
        """``[L]`` int64: copies within a GPU per layer (a slot takes an expert the GPU already holds)."""
        return np.bincount(self.layer[~self.remote], minlength=self.num_layers)

    @property
    def cross_node(self) -> np.ndarray:
        """``[L]`` int64: copies between nodes per layer."""
        per_node = self.num_gpus // self.num_nodes
        between = self.src_gpu // per_node != self.dst_gpu // per_node
        return np.bincount(self.layer[between], minlength=self.num_layers)

    @property
    def bytes_moved(self) -> np.ndarray | None:
        """``[L]`` int64: bytes copied between GPUs per layer (``None`` without ``expert_bytes``)."""
        return None if self.expert_bytes is None else self.moved * self.expert_bytes

    @property
    def sends(self) -> np.ndarray:
        """``[L, G]`` int64: copies each GPU sends to other GPUs, per layer."""
        return self._per_gpu(self.src_gpu)

    @property
    def receives(self) -> np.ndarray:
        """``[L, G]`` int64: copies each GPU receives from other GPUs, per layer."""
        return self._per_gpu(self.dst_gpu)

    def _per_gpu(self, gpu: np.ndarray) -> np.ndarray:
        index = self.layer[self.remote] * self.num_gpus + gpu[self.remote]
        return np.bincount(index, minlength=self.num_layers * self.num_gpus).reshape(self.num_layers, self.num_gpus)

    def copies(self, layer: int) -> list[tuple[int, int, int, int]]:
        """Layer ``layer``'s copies as ``(src_gpu, src_slot, dst_gpu, dst_slot)``, stage 0 before stage 1."""
        rows = np.flatnonzero(self.layer == layer)
        rows = rows[np.argsort(self.stage[rows], kind="stable")]
        return [
            (int(self.src_gpu[i]), int(self.src_slot[i]), int(self.dst_gpu[i]), int(self.dst_slot[i])) for i in rows
        ]


def _host_placement(name: str, phy2log: Any) -> np.ndarray:
    try:
        phy2log = np.asarray(phy2log)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be an integer array [layers, slots]: {err}") from None
    if phy2log.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer expert ids, got dtype {phy2log.dtype}")
    if phy2log.ndim != 2 or 0 in phy2log.shape:
        raise ValueError(f"{name} must be a non-empty 2-D [layers, slots] array, got shape {list(phy2log.shape)}")
    if phy2log.min() < 0:
        raise ValueError(f"{name} must hold expert ids >= 0, got {phy2log.min()}")
    return phy2log.astype(np.int64)


def plan_transfers(
    old_phy2log: Any, new_phy2log: Any, num_gpus: int, num_nodes: int = 1, *, expert_bytes: int | None = None
) -> TransferPlan:
    """The copies that turn placement ``old_phy2log`` into ``new_phy2log``.

    Parameters
    ----------
    old_phy2log, new_phy2log : array [L, R], integer
        Placements (``Placement.phy2log``): slot ``j`` is on GPU
        ``j // (R // num_gpus)``. numpy, torch or JAX arrays, or lists.
    num_gpus : int
        GPUs ``G``; ``R % G == 0``.
    num_nodes : int
        Nodes; ``G % num_nodes == 0``. Only used to prefer close sources.
    expert_bytes : int, optional, keyword-only
        Bytes of one expert's weights (all its matrices), for ``bytes_moved``.

    Returns
    -------
    TransferPlan
        Every destination slot whose expert changes gets exactly one copy, so
        the plan is minimal: from a slot of the same GPU that already holds
        the expert (local), else from another GPU (remote; one per expert and
        destination GPU, further copies on that GPU are local, stage 1). A
        remote source is a GPU of the destination's node if one holds the
        expert, then the candidate with the fewest sends so far in the layer
        (then in the whole plan, then the lowest index); copies with fewer
        candidates are assigned first. Slots whose expert is unchanged need
        nothing.

    Raises
    ------
    ValueError
        Shapes differ or do not divide, or ``new_phy2log`` needs an expert
        that ``old_phy2log`` does not hold in that layer.

    Examples
    --------
    >>> import eplb
    >>> plan = eplb.plan_transfers([[0, 1, 2, 3]], [[0, 2, 1, 3]], num_gpus=2, expert_bytes=10)
    >>> plan.copies(0), plan.moved.tolist(), plan.bytes_moved.tolist()
    ([(1, 0, 0, 1), (0, 1, 1, 0)], [2], [20])
    """
    old = _host_placement("old_phy2log", old_phy2log)
    new = _host_placement("new_phy2log", new_phy2log)
    if old.shape != new.shape:
        raise ValueError(
            f"old_phy2log and new_phy2log must have the same shape, got {list(old.shape)} and {list(new.shape)}"
        )
    num_gpus = _validate.check_count("num_gpus", num_gpus)
    num_nodes = _validate.check_count("num_nodes", num_nodes)
    num_layers, num_phy = old.shape
    if num_phy % num_gpus:
        raise ValueError(f"the number of slots {num_phy} must be a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if expert_bytes is not None:
        expert_bytes = _validate.check_count("expert_bytes", expert_bytes)
    per_gpu, per_node = num_phy // num_gpus, num_gpus // num_nodes
    rows: list[tuple[int, ...]] = []
    total_sends = np.zeros(num_gpus, dtype=np.int64)
    for layer in range(num_layers):
        rows.extend(_plan_layer(layer, old[layer], new[layer], num_gpus, per_gpu, per_node, total_sends))
    columns = np.asarray(rows, dtype=np.int64).reshape(-1, 7).T
    return TransferPlan(*columns, num_layers, num_gpus, num_nodes, per_gpu, expert_bytes)


def _plan_layer(
    layer: int, old: np.ndarray, new: np.ndarray, num_gpus: int, per_gpu: int, per_node: int, total_sends: np.ndarray
) -> list[tuple[int, ...]]:
    """Rows ``(layer, expert, src_gpu, src_slot, dst_gpu, dst_slot, stage)`` of one layer."""
    old2, new2 = old.reshape(num_gpus, per_gpu), new.reshape(num_gpus, per_gpu)
    holders: dict[int, dict[int, int]] = {}  # expert -> {gpu: first old slot}
    for gpu in range(num_gpus):
        for slot in range(per_gpu):
            holders.setdefault(int(old2[gpu, slot]), {}).setdefault(gpu, slot)
    rows: dict[tuple[int, int], tuple[int, ...]] = {}  # (dst_gpu, dst_slot) -> row
    needs: list[tuple[int, int, int]] = []  # remote copies still without a source: (dst_gpu, dst_slot, expert)
    duplicates: list[tuple[int, int, int, int]] = []  # (dst_gpu, dst_slot, expert, first dst slot)
    for gpu in range(num_gpus):
        first_received: dict[int, int] = {}
        for slot in range(per_gpu):
            expert = int(new2[gpu, slot])
            if expert == old2[gpu, slot]:
                continue
            here = holders.get(expert, {})
            if gpu in here:
                rows[gpu, slot] = (layer, expert, gpu, here[gpu], gpu, slot, 0)
            elif expert in first_received:
                duplicates.append((gpu, slot, expert, first_received[expert]))
            elif not here:
                raise ValueError(f"new_phy2log needs expert {expert} in layer {layer}, which old_phy2log does not hold")
            else:
                first_received[expert] = slot
                needs.append((gpu, slot, expert))

    # Most constrained first: fewest candidates on the destination's node, then fewest overall.
    def constraint(need: tuple[int, int, int]) -> tuple[int, int, int, int]:
        gpu, slot, expert = need
        near = sum(1 for g in holders[expert] if g // per_node == gpu // per_node)
        return (near if near else num_gpus + len(holders[expert]), len(holders[expert]), gpu, slot)

    sends = np.zeros(num_gpus, dtype=np.int64)
    for gpu, slot, expert in sorted(needs, key=constraint):
        source = min(holders[expert], key=lambda g: (g // per_node != gpu // per_node, sends[g], total_sends[g], g))
        sends[source] += 1
        total_sends[source] += 1
        rows[gpu, slot] = (layer, expert, source, holders[expert][source], gpu, slot, 0)
    for gpu, slot, expert, first in duplicates:
        rows[gpu, slot] = (layer, expert, gpu, first, gpu, slot, 1)
    return [rows[key] for key in sorted(rows)]


def moved_experts(old_phy2log: Any, new_phy2log: Any, num_gpus: int) -> Any:
    """``[L]``: ``(expert, GPU)`` pairs of ``new_phy2log`` that ``old_phy2log`` lacks, per layer.

    Parameters
    ----------
    old_phy2log, new_phy2log : array [L, R], integer
        Placements; numpy, torch or JAX (both of one kind).
    num_gpus : int
        GPUs; slot ``j`` is on GPU ``j // (R // num_gpus)``.

    Returns
    -------
    array [L], integer
        Multiset counts per GPU (a GPU that holds one copy of an expert and
        gets two counts one move), the quantity ``previous=`` minimises. A
        :class:`TransferPlan` copies between GPUs at most this many experts
        (a second copy that a GPU lacked comes from its first, locally).

    Examples
    --------
    >>> import eplb
    >>> eplb.moved_experts([[0, 1, 2, 3]], [[1, 0, 3, 2]], 2).tolist()
    [0]
    """
    if _xp.backend_name(new_phy2log) == "numpy":
        xp, old, new = np, np.asarray(old_phy2log), np.asarray(new_phy2log)
    else:
        xp, new = _xp.array_namespace(new_phy2log), new_phy2log
        old = xp.asarray(old_phy2log, device=_xp.device(new))
    num_gpus = _validate.check_count("num_gpus", num_gpus)
    if old.shape != new.shape or old.ndim != 2 or old.shape[1] % num_gpus:
        raise ValueError(
            f"placements must share one [layers, slots] shape with slots a multiple of num_gpus={num_gpus}, "
            f"got {list(old.shape)} and {list(new.shape)}"
        )
    return count_moves(new, xp.astype(old, new.dtype), num_gpus, xp=xp)
