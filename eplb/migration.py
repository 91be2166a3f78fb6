"""Transfer plans: the expert copies that turn one placement into another.

:func:`plan_transfers` lists, per layer, the copies ``(source GPU, source slot,
destination GPU, destination slot)`` that a migration from ``old_phy2log`` to
``new_phy2log`` needs, choosing sources near the destination and spreading
the sends; executors (:mod:`eplb.executors`) carry a plan out on
``torch.distributed`` or JAX collectives. Plans are host (numpy) data.
:func:`moved_experts` counts the ``(expert, GPU)`` pairs a new placement adds,
the quantity ``rebalance_experts(..., previous=)`` minimises; it runs on the
placements' own backend, without a host sync.
"""

from __future__ import annotations

import warnings
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

    Notes
    -----
    Per layer, write ``old_g(e)`` and ``new_g(e)`` for the number of slots
    of GPU ``g`` that hold expert ``e`` in the old and new placement. The
    plan has one row per slot whose expert changes, and

    - ``remote_copies = #{(g, e) : old_g(e) = 0 < new_g(e)}``: one copy
      between GPUs per expert a GPU lacked and gains (further copies of it on
      that GPU are local, stage 1);
    - ``local_copies``: the other rows (the GPU already held the expert, or
      received it in stage 0);
    - :func:`moved_experts` ``= sum over (g, e) of max(0, new_g(e) - old_g(e))``.

    Hence ``remote_copies <= moved_experts`` in every layer, with equality
    iff no GPU gains a second copy of an expert: a GPU that gains 2 copies
    of an expert it lacked counts 2 moved pairs but costs 1 remote and 1
    local copy, and a GPU that held 1 copy and now holds 2 counts 1 moved
    pair for 1 local copy.
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
        """``[T]`` bool: the copy crosses GPUs (``src_gpu != dst_gpu``)."""
        return self.src_gpu != self.dst_gpu

    @property
    def remote_copies(self) -> np.ndarray:
        """``[L]`` int64: copies between GPUs per layer (the traffic).

        One per ``(expert, GPU)`` pair where the GPU held no copy of the
        expert and gains at least one; at most :func:`moved_experts`, which
        counts every added copy (see the class notes).
        """
        return np.bincount(self.layer[self.remote], minlength=self.num_layers)

    @property
    def local_copies(self) -> np.ndarray:
        """``[L]`` int64: copies within a GPU per layer (a slot takes an expert its GPU holds or receives)."""
        return np.bincount(self.layer[~self.remote], minlength=self.num_layers)

    @property
    def cross_node_copies(self) -> np.ndarray:
        """``[L]`` int64: copies between nodes per layer (a subset of ``remote_copies``)."""
        per_node = self.num_gpus // self.num_nodes
        between = self.src_gpu // per_node != self.dst_gpu // per_node
        return np.bincount(self.layer[between], minlength=self.num_layers)

    @property
    def remote_bytes(self) -> np.ndarray | None:
        """``[L]`` int64: bytes copied between GPUs per layer, ``remote_copies * expert_bytes`` (``None`` without
        ``expert_bytes``)."""
        return None if self.expert_bytes is None else self.remote_copies * self.expert_bytes

    # Deprecated names (one release): ``moved`` read like :func:`moved_experts`, a different count.
    @property
    def moved(self) -> np.ndarray:
        """Deprecated alias of :attr:`remote_copies` (not :func:`moved_experts`)."""
        _deprecated("moved", "remote_copies")
        return self.remote_copies

    @property
    def local(self) -> np.ndarray:
        """Deprecated alias of :attr:`local_copies`."""
        _deprecated("local", "local_copies")
        return self.local_copies

    @property
    def cross_node(self) -> np.ndarray:
        """Deprecated alias of :attr:`cross_node_copies`."""
        _deprecated("cross_node", "cross_node_copies")
        return self.cross_node_copies

    @property
    def bytes_moved(self) -> np.ndarray | None:
        """Deprecated alias of :attr:`remote_bytes`."""
        _deprecated("bytes_moved", "remote_bytes")
        return self.remote_bytes

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


def _deprecated(old: str, new: str) -> None:
    # stacklevel 3: the warning points at the user's ``plan.<old>``, not at the property.
    warnings.warn(
        f"TransferPlan.{old} is deprecated and will be removed in the next release; use TransferPlan.{new}",
        DeprecationWarning,
        stacklevel=3,
    )


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
    old_phy2log: Any, new_phy2log: Any, *, num_gpus: int, num_nodes: int = 1, expert_bytes: int | None = None
) -> TransferPlan:
    """The copies that turn placement ``old_phy2log`` into ``new_phy2log``.

    Parameters
    ----------
    old_phy2log, new_phy2log : array [L, R], integer
        Placements (``Placement.phy2log``): slot ``j`` is on GPU
        ``j // (R // num_gpus)``. numpy, torch or JAX arrays, or lists; read
        on the host (a plan is host data).
    num_gpus : int, keyword-only
        GPUs ``G``; ``R % G == 0``.
    num_nodes : int, keyword-only
        Nodes; ``G % num_nodes == 0``. Only used to prefer close sources.
    expert_bytes : int, optional, keyword-only
        Bytes of one expert's weights (all its matrices), for ``remote_bytes``.

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
    TypeError
        A placement is not an integer array, or a size is passed by position
        (the sizes are keyword-only, unlike ``rebalance_experts``' positional
        ``num_groups, num_nodes, num_gpus``, so that a swapped pair cannot
        plan another layout).
    ValueError
        Shapes differ or do not divide, an id is negative, or ``new_phy2log``
        needs an expert that ``old_phy2log`` does not hold in that layer.

    Examples
    --------
    >>> import eplb
    >>> plan = eplb.plan_transfers([[0, 1, 2, 3]], [[0, 2, 1, 3]], num_gpus=2, expert_bytes=10)
    >>> plan.copies(0), plan.remote_copies.tolist(), plan.remote_bytes.tolist()
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


_ARRAY_TYPES = {"numpy": "numpy array or list", "torch": "torch.Tensor", "jax": "jax.Array"}


def _framework(name: str, phy2log: Any) -> str:
    """``"numpy"`` (numpy arrays, lists, tuples), ``"torch"`` or ``"jax"``."""
    try:
        return _xp.backend_name(phy2log)
    except TypeError:
        kind = f"{type(phy2log).__module__}.{type(phy2log).__name__}"
        raise TypeError(f"{name} must be a numpy array, a list, a torch.Tensor or a jax.Array, got {kind}") from None


def _is_integer(framework: str, dtype: Any) -> bool:
    if framework == "torch":  # torch dtypes have no numpy kind
        return not (dtype.is_floating_point or dtype.is_complex) and str(dtype) != "torch.bool"
    return np.dtype(dtype).kind in "iu"  # numpy and JAX (bfloat16's kind is 'V')


def moved_experts(old_phy2log: Any, new_phy2log: Any, num_gpus: int) -> Any:
    """``[L]``: ``(expert, GPU)`` pairs of ``new_phy2log`` that ``old_phy2log`` lacks, per layer.

    Parameters
    ----------
    old_phy2log, new_phy2log : array [L, R], integer
        Placements; slot ``j`` is on GPU ``j // (R // num_gpus)``. Both
        torch tensors, both JAX arrays (traced ones too), or host data
        (numpy arrays, lists) on one or both sides: host data goes to the
        other argument's framework and device (a torch CPU tensor also moves
        to the other's CUDA device). Mixing torch and JAX is an error.
    num_gpus : int
        GPUs ``G``; ``R % G == 0``.

    Returns
    -------
    array [L], integer
        In the framework (and on the device) of the non-host argument, else
        numpy; the inputs' promoted integer dtype. With ``old_g(e)`` and
        ``new_g(e)`` the copies of expert ``e`` on GPU ``g``, per layer
        ``sum over (g, e) of max(0, new_g(e) - old_g(e))``: multisets, so a
        GPU that holds one copy of an expert and gets two counts one move.
        This is the quantity ``previous=`` minimises. A
        :class:`TransferPlan`'s ``remote_copies`` is at most this: it copies
        one expert a GPU lacked once between GPUs, and further copies of it
        locally (see :class:`TransferPlan`).

    Raises
    ------
    TypeError
        A placement is not an integer array of numpy, torch or JAX (float
        and bool dtypes included), placements mix torch and JAX, or
        ``num_gpus`` is not an int.
    ValueError
        A placement is not 2-D, the shapes differ, ``R`` is not a multiple of
        ``num_gpus``, ``num_gpus < 1``, or host data (numpy, lists, torch CPU
        tensors) holds a negative id. Ids on a CUDA or JAX device are not
        read: checking them would need a host sync (or be impossible under
        ``jax.jit``).

    Examples
    --------
    >>> import eplb
    >>> eplb.moved_experts([[0, 1, 2, 3]], [[1, 0, 3, 2]], 2).tolist()
    [0]
    >>> eplb.moved_experts([[0, 1, 2, 3]], [[0, 1, 0, 0]], 2).tolist()  # GPU 1 gains expert 0 twice
    [2]
    """
    kinds = {name: _framework(name, x) for name, x in (("old_phy2log", old_phy2log), ("new_phy2log", new_phy2log))}
    device_kinds = {kind for kind in kinds.values() if kind != "numpy"}
    if len(device_kinds) > 1:
        raise TypeError(
            f"old_phy2log and new_phy2log must be arrays of one framework (or host data, a numpy array or a list, "
            f"on either side), got a {_ARRAY_TYPES[kinds['old_phy2log']]} and a {_ARRAY_TYPES[kinds['new_phy2log']]}"
        )
    arrays = {}
    for name, phy2log in (("old_phy2log", old_phy2log), ("new_phy2log", new_phy2log)):
        if kinds[name] == "numpy":
            try:
                host = np.asarray(phy2log)
            except (TypeError, ValueError) as err:  # ragged lists
                raise TypeError(f"{name} must be an integer array [layers, slots]: {err}") from None
            if host.size == 0 and not isinstance(phy2log, np.ndarray):
                host = host.astype(np.int64)  # an empty list has no integer dtype to infer
            phy2log = host
        if not _is_integer(kinds[name], phy2log.dtype):
            raise TypeError(f"{name} must hold integer expert ids, got dtype {phy2log.dtype}")
        arrays[name] = phy2log
    old, new = arrays["old_phy2log"], arrays["new_phy2log"]
    num_gpus = _validate.check_count("num_gpus", num_gpus)
    for name, phy2log in arrays.items():
        if phy2log.ndim != 2:
            raise ValueError(f"{name} must be 2-D [layers, slots], got shape {list(phy2log.shape)}")
    if tuple(old.shape) != tuple(new.shape):
        raise ValueError(
            f"old_phy2log and new_phy2log must have the same shape, got {list(old.shape)} and {list(new.shape)}"
        )
    if old.shape[1] % num_gpus:
        raise ValueError(f"the number of slots {old.shape[1]} must be a multiple of num_gpus={num_gpus}")
    for name, phy2log in arrays.items():
        # Only host data is read: a CUDA or JAX array would need a sync (a JAX tracer cannot be read at all).
        on_host = kinds[name] == "numpy" or (kinds[name] == "torch" and phy2log.device.type == "cpu")
        if on_host and phy2log.shape[0] * phy2log.shape[1] and bool((phy2log < 0).any()):
            raise ValueError(f"{name} must hold expert ids >= 0, got {int(phy2log.min())}")
    if not device_kinds:
        xp = np
    else:
        xp = _xp.array_namespace(new if kinds["new_phy2log"] != "numpy" else old)
        old, new = _same_device(old, new, kinds, xp)
    dtype = xp.result_type(old.dtype, new.dtype)
    return count_moves(xp.astype(new, dtype), xp.astype(old, dtype), num_gpus, xp=xp)


def _same_device(old: Any, new: Any, kinds: dict[str, str], xp: Any) -> tuple[Any, Any]:
    """``old`` and ``new`` in one framework and on one device: host data goes to the other's device."""
    if _xp.is_jax(xp):  # host data becomes a constant (under jit too), placed by JAX
        old = xp.asarray(old) if kinds["old_phy2log"] == "numpy" else old
        return old, xp.asarray(new) if kinds["new_phy2log"] == "numpy" else new
    if kinds["old_phy2log"] == "numpy":
        return xp.asarray(old, device=new.device), new
    if kinds["new_phy2log"] == "numpy":
        return old, xp.asarray(new, device=old.device)
    if old.device == new.device:
        return old, new
    # Host (CPU) tensors move to the other's device; copying a CUDA tensor off its device would sync.
    if old.device.type == "cpu":
        return old.to(new.device), new
    if new.device.type == "cpu":
        return old, new.to(old.device)
    raise ValueError(f"old_phy2log and new_phy2log must be on one device, got {old.device} and {new.device}")
