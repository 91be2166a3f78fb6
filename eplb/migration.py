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

        A *reload* row (only with ``plan_transfers(..., allow_reload=True)``)
        has ``src_gpu = src_slot = -1``, stage 0: no live slot of the old
        placement holds the expert (its GPUs failed), so the destination
        loads it from a checkpoint. Reloads count in :attr:`reloads`, not in
        ``remote_copies``, ``local_copies``, ``sends`` or ``receives``.
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
        """``[T]`` bool: the copy crosses GPUs (``src_gpu != dst_gpu``, a reload excepted)."""
        return (self.src_gpu != self.dst_gpu) & (self.src_gpu >= 0)

    @property
    def reload(self) -> np.ndarray:
        """``[T]`` bool: the row loads the expert from a checkpoint (``src_gpu == -1``)."""
        return self.src_gpu < 0

    @property
    def reloads(self) -> np.ndarray:
        """``[L]`` int64: reload rows per layer (experts no live old slot holds; 0 without ``allow_reload``)."""
        return np.bincount(self.layer[self.reload], minlength=self.num_layers)

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
        return np.bincount(self.layer[~(self.remote | self.reload)], minlength=self.num_layers)

    @property
    def cross_node_copies(self) -> np.ndarray:
        """``[L]`` int64: copies between nodes per layer (a subset of ``remote_copies``)."""
        per_node = self.num_gpus // self.num_nodes
        between = (self.src_gpu // per_node != self.dst_gpu // per_node) & self.remote
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
        columns = (self.src_gpu[rows], self.src_slot[rows], self.dst_gpu[rows], self.dst_slot[rows])
        return list(zip(*(column.tolist() for column in columns), strict=True))


def _deprecated(old: str, new: str) -> None:
    # stacklevel 3: the warning points at the user's ``plan.<old>``, not at the property.
    warnings.warn(
        f"TransferPlan.{old} is deprecated and will be removed in the next release; use TransferPlan.{new}",
        DeprecationWarning,
        stacklevel=3,
    )


def _host_placement(name: str, phy2log: Any, empty_ok: bool = False) -> np.ndarray:
    try:
        phy2log = np.asarray(phy2log)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be an integer array [layers, slots]: {err}") from None
    if phy2log.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer expert ids, got dtype {phy2log.dtype}")
    if phy2log.ndim != 2 or 0 in phy2log.shape:
        raise ValueError(f"{name} must be a non-empty 2-D [layers, slots] array, got shape {list(phy2log.shape)}")
    if phy2log.min() == -1 and not empty_ok:
        raise ValueError(
            f"{name} holds -1 (an empty slot of a failed GPU, from rebalance_experts(..., active_gpus=)): "
            "plan_transfers needs expert ids >= 0: it does not plan moves to or from failed GPUs yet"
        )
    if phy2log.min() < (-1 if empty_ok else 0):
        raise ValueError(f"{name} must hold expert ids >= 0{' or -1' if empty_ok else ''}, got {phy2log.min()}")
    return phy2log.astype(np.int64, copy=False)  # read only: no copy needed


def plan_transfers(
    old_phy2log: Any,
    new_phy2log: Any,
    *,
    num_gpus: int,
    num_nodes: int = 1,
    expert_bytes: int | None = None,
    allow_reload: bool = False,
) -> TransferPlan:
    """The copies that turn placement ``old_phy2log`` into ``new_phy2log``.

    Parameters
    ----------
    old_phy2log, new_phy2log : array [L, R], integer
        Placements (``Placement.phy2log``): slot ``j`` is on GPU
        ``j // (R // num_gpus)``. numpy, torch or JAX arrays, or lists; read
        on the host (a plan is host data). ``-1`` marks an empty slot (a
        failed GPU's, from ``rebalance_experts(..., active_gpus=)``): in
        ``new_phy2log`` it receives nothing (no row), in ``old_phy2log`` it
        is no source.

        A scale up or down: ``old_phy2log [L, R_old]`` may come from
        another number of GPUs with the same slots per GPU
        (``R_old = S * G_old``, ``S = R / num_gpus``); GPU ``g`` is the same
        GPU on both sides. The plan then spans ``max(G_old, num_gpus)``
        GPUs (its ``num_gpus``), the side without a GPU holding ``-1``
        there: GPUs that leave send what they hold before they go, GPUs
        that join receive.
    num_gpus : int, keyword-only
        GPUs ``G`` of ``new_phy2log``; ``R % G == 0``.
    num_nodes : int, keyword-only
        Nodes of ``new_phy2log``; ``G % num_nodes == 0`` (across sizes, the
        plan's GPUs must fill whole nodes of ``G / num_nodes`` GPUs, or all
        be one node when ``num_nodes`` is 1). Only used to prefer close
        sources.
    expert_bytes : int, optional, keyword-only
        Bytes of one expert's weights (all its matrices), for ``remote_bytes``.
    allow_reload : bool, keyword-only
        An expert that ``new_phy2log`` needs and no slot of ``old_phy2log``
        holds in that layer (*lost*: every GPU holding it failed) is a
        ``ValueError`` by default; with ``True``, its first slot per
        destination GPU gets a reload row (``src_gpu = src_slot = -1``:
        load it from a checkpoint; :attr:`TransferPlan.reloads`), the GPU's
        further slots of it copy from there (stage 1).

    Returns
    -------
    TransferPlan
        Every destination slot whose expert changes gets exactly one copy, so
        the plan is minimal: from the first slot of the same GPU that holds
        the expert in ``old_phy2log`` (local), else from another GPU (remote:
        one per expert and destination GPU, into the first such destination
        slot in slot order; the GPU's further slots of that expert copy it
        from there, stage 1). Slots whose expert is unchanged need nothing.

        The *candidates* of a remote copy are the GPUs of the destination's
        node that hold the expert, or, if none of them does, every GPU that
        holds it: a copy crosses nodes only when it must. The source (read
        from its first slot holding the expert) is the candidate that spreads
        the sends: in the returned plan, for every remote copy of layer ``l``
        from GPU ``s`` and every other candidate ``c`` of that copy, with
        ``sends`` as in :attr:`TransferPlan.sends`,

        - ``sends[l, s] <= sends[l, c] + 1``, and
        - if ``sends[l, s] == sends[l, c] + 1``, then
          ``sends[:, s].sum() <= sends[:, c].sum() + 1``:

        no copy can switch to another candidate and lower the sum of squared
        sends of its layer, or keep that sum and lower the sum of squared
        per-GPU sends of the whole plan. (So among copies with the same
        candidates, such as all copies of an expert into one node, each
        source used sends at most one copy more in the layer than the least
        busy candidate.)

        The choice is deterministic. Each copy starts at its candidate with
        the fewest expected sends in the layer (a copy with ``k`` candidates
        counts ``1/k`` on each, rounded down to a multiple of ``1/2520``;
        ties: the fewest in the whole plan, then the lowest GPU); copies with
        the same candidates are dealt round robin from there, in row order.
        Then, in rounds until none is left, a copy moves to its best
        candidate (fewest sends in the layer, then in the plan, then the
        lowest GPU) if that one sends at least 2 fewer copies in the layer,
        or exactly 1 fewer in the layer and at least 2 fewer in the plan. A
        round makes several moves at once only when together they provably
        lower ``(sum over l, g of sends[l, g]^2, sum over g of
        sends[:, g].sum()^2)`` (compared in that order), so the rounds end.
        All of it is vectorised numpy: one sort of the slots, then a few
        rounds over the copies that have several candidates.

    Raises
    ------
    TypeError
        A placement is not an integer array, or a size is passed by position
        (the sizes are keyword-only, unlike ``rebalance_experts``' positional
        ``num_groups, num_nodes, num_gpus``, so that a swapped pair cannot
        plan another layout).
    ValueError
        The layers differ, sizes do not divide (across sizes: slots per GPU
        differ), an id is below -1, or ``new_phy2log``
        needs an expert that ``old_phy2log`` does not hold in that layer
        (without ``allow_reload``).

    Examples
    --------
    >>> import eplb
    >>> plan = eplb.plan_transfers([[0, 1, 2, 3]], [[0, 2, 1, 3]], num_gpus=2, expert_bytes=10)
    >>> plan.copies(0), plan.remote_copies.tolist(), plan.remote_bytes.tolist()
    ([(1, 0, 0, 1), (0, 1, 1, 0)], [2], [20])
    """
    old = _host_placement("old_phy2log", old_phy2log, empty_ok=True)
    new = _host_placement("new_phy2log", new_phy2log, empty_ok=True)
    num_gpus = _validate.check_count("num_gpus", num_gpus)
    num_nodes = _validate.check_count("num_nodes", num_nodes)
    if old.shape[0] != new.shape[0]:
        raise ValueError(
            f"old_phy2log and new_phy2log must have the same number of layers, got {list(old.shape)} and "
            f"{list(new.shape)}"
        )
    if new.shape[1] % num_gpus:
        raise ValueError(f"the number of slots {new.shape[1]} must be a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if old.shape != new.shape:  # a scale up or down: the same slots per GPU, GPU g the same on both sides
        old, new, num_gpus, num_nodes = _pad_to_one_size(old, new, num_gpus, num_nodes)
    num_layers, num_phy = old.shape
    if expert_bytes is not None:
        expert_bytes = _validate.check_count("expert_bytes", expert_bytes)
    allow_reload = _validate.check_flag("allow_reload", allow_reload)
    columns = _plan_columns(old, new, num_gpus, num_nodes, bool(allow_reload))
    return TransferPlan(*columns, num_layers, num_gpus, num_nodes, num_phy // num_gpus, expert_bytes)


def _pad_to_one_size(
    old: np.ndarray, new: np.ndarray, num_gpus: int, num_nodes: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``old [L, S * G_old]`` and ``new [L, S * G_new]`` padded with empty slots (``-1``) to ``max(G_old, G_new)``
    GPUs of ``S`` slots (``S`` from ``new``), in nodes of ``G_new / num_nodes`` GPUs (one node if ``num_nodes`` is
    1)."""
    per_gpu, per_node = new.shape[1] // num_gpus, num_gpus // num_nodes
    if old.shape[1] % per_gpu:
        raise ValueError(
            f"old_phy2log has {old.shape[1]} slots and new_phy2log {new.shape[1]}: placements of different sizes "
            f"(a scale up or down) must have the same slots per GPU, new_phy2log's {per_gpu} (num_gpus={num_gpus})"
        )
    total = max(old.shape[1], new.shape[1]) // per_gpu
    if num_nodes == 1:  # one node: every GPU of the plan on it
        per_node = total
    if total % per_node:
        raise ValueError(
            f"a plan across sizes spans {total} GPUs, not a whole number of nodes of {per_node} GPUs "
            f"(num_gpus={num_gpus} / num_nodes={num_nodes})"
        )

    def padded(phy2log: np.ndarray) -> np.ndarray:
        empty = np.full((phy2log.shape[0], total * per_gpu - phy2log.shape[1]), -1, dtype=phy2log.dtype)
        return np.concatenate([phy2log, empty], axis=1)

    return padded(old), padded(new), total, total // per_node


def _plan_columns(
    old: np.ndarray, new: np.ndarray, num_gpus: int, num_nodes: int, allow_reload: bool = False
) -> tuple[np.ndarray, ...]:
    """The plan's columns ``(layer, expert, src_gpu, src_slot, dst_gpu, dst_slot, stage)``, with numpy only.

    One sort of integer keys ``(layer, expert, node, GPU in node, new?, slot)``, one per old slot and one per
    changed new slot, makes each ``(layer, expert, GPU)`` a run: its old slots first (the first of them is the
    GPU's *holder* of the expert), then the changed slots that want the expert there. A changed slot copies from
    its run's holder (local); in a run without one, the first changed slot is a remote *need* and the others copy
    from it (stage 1). The holders of one ``(layer, expert)``, and among them those of one node, are consecutive:
    a need's candidate sources are one such range, and :func:`_spread_sources` picks among them.

    ``-1`` (an empty slot): in ``new`` no row; in ``old`` a holder of an extra id that no slot needs. A need with
    no holder is a reload (``allow_reload``; source ``-1``) or a ``ValueError``.
    """
    num_layers, num_phy = old.shape
    per_gpu, per_node = num_phy // num_gpus, num_gpus // num_nodes
    differs = (old != new) & (new >= 0)
    changed = np.flatnonzero(differs)  # flat slots in (layer, GPU, slot) order: the rows' order
    num_new = changed.size
    layer, dst_gpu, dst_slot = np.nonzero(differs.reshape(num_layers, num_gpus, per_gpu))
    expert = new.ravel()[changed]
    src_gpu, src_slot, stage = dst_gpu.copy(), np.empty_like(dst_slot), np.zeros_like(dst_slot)
    if not num_new:
        return layer, expert, src_gpu, src_slot, dst_gpu, dst_slot, stage

    # Key fields, low to high: slot (s bits), new? (1 bit), GPU in node, node, layer * num_ids + expert.
    slot_bits, node_bits = _bits(per_gpu), _bits(num_nodes)
    gpu_shift = slot_bits + 1
    node_shift = gpu_shift + _bits(per_node)
    expert_shift = node_shift + node_bits
    num_ids = int(max(old.max(), new.max())) + 1
    empty_old = bool(old.min() < 0)
    if empty_old:  # empty old slots: holders of id num_ids, which no changed slot needs
        old = np.where(old < 0, num_ids, old)
        num_ids += 1
    if num_ids > 2 * num_phy:  # sparse ids: number each layer's old ones 0, 1, ... (ids old lacks: past them)
        old, new = old.copy(), new.copy()
        for row_old, row_new in zip(old, new, strict=True):
            ids = np.unique(row_old)
            found = np.minimum(np.searchsorted(ids, row_new), ids.size - 1)
            hit = ids[found] == row_new
            lacking = np.unique(row_new[~hit])  # each its own id: reloads of two experts stay apart
            row_new[:] = np.where(hit, found, ids.size + np.searchsorted(lacking, row_new))
            row_old[:] = np.searchsorted(ids, row_old)
        num_ids = int(max(old.max(), new.max())) + 1
    dtype = np.int32 if expert_shift + _bits(num_layers * num_ids) <= 31 else np.int64
    # ``code``: the low key fields (slot, GPU in node, node) of each slot ``j`` of a layer; ``code_slot`` and
    # ``code_gpu`` read them back.
    index = np.arange(num_phy, dtype=dtype)
    gpu = index // per_gpu
    code = ((gpu // per_node) << node_shift) | ((gpu % per_node) << gpu_shift) | (index - gpu * per_gpu)
    code_position = np.zeros(1 << expert_shift, dtype=np.int64)
    code_position[code + (1 << slot_bits)] = np.arange(num_phy)  # codes of changed slots (new? set)
    code_gpu = np.zeros(1 << (expert_shift - gpu_shift), dtype=np.int64)
    code_gpu[code[::per_gpu] >> gpu_shift] = np.arange(num_gpus)
    base = ((np.arange(num_layers, dtype=dtype) * num_ids) << expert_shift)[:, None] + code
    num_old = old.size
    keys = np.empty(num_old + num_new, dtype=dtype)
    np.left_shift(old, expert_shift, out=keys[:num_old].reshape(old.shape), casting="unsafe")
    keys[:num_old] += base.ravel()
    np.left_shift(new.ravel()[changed], expert_shift, out=keys[num_old:], casting="unsafe")
    keys[num_old:] += base.ravel()[changed]
    keys[num_old:] += 1 << slot_bits
    keys.sort()

    slot_mask = (1 << slot_bits) - 1
    is_new = (keys & (1 << slot_bits)) != 0
    run = keys >> gpu_shift  # (layer, expert, GPU)
    starts = _run_starts(run)
    new_at = np.flatnonzero(is_new)  # sorted positions of the changed slots
    holder_at = np.flatnonzero(starts > is_new)  # the first old slot of each (layer, expert, GPU)
    num_holders = holder_at.size
    h_key = keys[holder_at]
    # Holders before each changed slot: the old slots before it, less those repeating their run's expert.
    before = new_at - np.arange(num_new)
    if keys.size - num_new - num_holders:
        before -= np.searchsorted(np.flatnonzero(~(starts | is_new)), new_at)
    last = before - 1  # the holder of the changed slot's run, if it has one (-1 reads the last: never its run)
    local = run[holder_at[last]] == run[new_at]
    need = starts[new_at]  # the first changed slot of a run without a holder
    n_key = keys[new_at]
    n_slot = n_key & slot_mask
    row_of = np.empty(num_old, dtype=np.int64)
    row_of[changed] = np.arange(num_new)
    row = row_of[(n_key >> expert_shift) // num_ids * num_phy + code_position[n_key & ((1 << expert_shift) - 1)]]
    src_slot[row] = np.where(local, h_key[last] & slot_mask, n_slot)
    need_i = np.flatnonzero(need)
    dup_i = np.flatnonzero(~(local | need))
    if dup_i.size:  # more slots of a received expert: stage 1, from the run's first changed slot
        src_slot[row[dup_i]] = n_slot[need_i[np.searchsorted(need_i, dup_i) - 1]]
        stage[row[dup_i]] = 1
    need_row = row[need_i]

    # Candidates of each need: the holders of its (layer, expert) on its node if any (a run of equal
    # ``h_node``), else all of them (a run of equal ``h_expert``).
    need_key = n_key[need_i]
    after = before[need_i]  # the first holder after the need
    h_node = h_key >> node_shift
    node_flags = _run_starts(h_node)
    node_first = np.flatnonzero(node_flags)
    node_id = np.cumsum(node_flags, dtype=np.int64)
    node_id -= 1
    need_node = need_key >> node_shift
    prev_in = (h_node[after - 1] == need_node) & (after > 0)  # -1 reads the last holder: ruled out
    near = prev_in | (h_node[np.minimum(after, num_holders - 1)] == need_node)
    node_run = node_id[np.where(prev_in, after - 1, np.minimum(after, num_holders - 1))]
    h_expert = h_key >> expert_shift
    expert_first = np.flatnonzero(_run_starts(h_expert))
    held = h_expert[expert_first]  # the (layer, expert) pairs old holds
    expert_run = np.empty(num_layers * num_ids, dtype=np.int64)
    expert_run[held] = np.arange(expert_first.size)
    expert_count = np.zeros(num_layers * num_ids, dtype=np.int64)
    expert_count[held] = np.diff(expert_first, append=num_holders)
    need_expert = need_key >> expert_shift
    count = expert_count[need_expert]
    missing = np.flatnonzero(count == 0)
    if missing.size and not allow_reload:
        bad = need_row[missing].min()
        raise ValueError(
            f"new_phy2log needs expert {expert[bad]} in layer {layer[bad]}, which old_phy2log does not hold"
            + (
                " in a live slot (expert ids >= 0; -1 is an empty slot): plan_transfers(..., allow_reload=True) "
                "reloads it from a checkpoint"
                if empty_old
                else ""
            )
        )
    if missing.size:  # reloads: no source; the other needs go on
        src_gpu[need_row[missing]] = -1
        src_slot[need_row[missing]] = -1
        found = count > 0
        need_row, need_expert, count = need_row[found], need_expert[found], count[found]
        near, node_run = near[found], node_run[found]
        if not need_row.size:
            return layer, expert, src_gpu, src_slot, dst_gpu, dst_slot, stage
    need_run = expert_run[need_expert]
    source = expert_first[need_run]
    source[near] = node_first[node_run[near]]
    node_end = np.append(node_first[1:], num_holders)
    count[near] = node_end[node_run[near]] - source[near]
    h_gpu = code_gpu[(h_key >> gpu_shift) & ((1 << (expert_shift - gpu_shift)) - 1)]
    multi = np.flatnonzero(count > 1)
    if multi.size:
        h_lg = h_expert // num_ids * num_gpus + h_gpu
        runs = (node_run, need_run, node_first, expert_run[h_expert])
        source[multi] = _spread_sources(source, multi, count, ~near, runs, h_lg, h_gpu, num_layers, num_gpus)
    src_gpu[need_row] = h_gpu[source]
    src_slot[need_row] = h_key[source] & slot_mask
    return layer, expert, src_gpu, src_slot, dst_gpu, dst_slot, stage


def _spread_sources(
    source: np.ndarray,
    multi: np.ndarray,
    count: np.ndarray,
    cross: np.ndarray,
    runs: tuple[np.ndarray, ...],
    h_lg: np.ndarray,
    h_gpu: np.ndarray,
    num_layers: int,
    num_gpus: int,
) -> np.ndarray:
    """The holder each need of ``multi`` (several candidates) copies from: :func:`plan_transfers`' spread rule.

    ``source``/``count``: per need, its first candidate holder and how many; ``cross``: the candidates are all
    holders of the expert (none on the need's node). ``runs``: per need its node run and expert run, per node
    run its first holder, per holder its expert run. ``h_lg``: each holder's ``layer * G + GPU``.

    The potential is ``(sum over layers and GPUs of sends^2, sum over GPUs of plan sends^2)``, compared
    lexicographically. A *layer move* gives a need to a candidate with at least 2 fewer sends in the layer (the
    first sum drops); a *swap* to one with exactly 1 fewer in the layer and at least 2 fewer in the plan (the first
    sum stays, the second drops). Rounds make such moves until none is left.
    """
    need_node, need_expert, node_first, holder_expert = runs
    single = np.ones(source.size, dtype=bool)
    single[multi] = False
    num_lg = num_layers * num_gpus
    fixed = np.bincount(h_lg[source[single]], minlength=num_lg)
    # The sub-problem: the holders of the experts that multi needs copy, node runs inside expert runs.
    node_end = np.append(node_first[1:], h_lg.size)
    used = np.zeros(int(holder_expert[-1]) + 1, dtype=bool)
    used[need_expert[multi]] = True
    nodes = np.flatnonzero(used[holder_expert[node_first]])
    length = node_end[nodes] - node_first[nodes]
    node_at = np.zeros(nodes.size, dtype=np.int64)  # first sub-holder of each node run
    np.cumsum(length[:-1], out=node_at[1:])
    sub = np.arange(int(length.sum())) + np.repeat(node_first[nodes] - node_at, length)
    node_expert = holder_expert[node_first[nodes]]
    expert_flags = _run_starts(node_expert)
    expert_at = np.flatnonzero(expert_flags)  # first node run (in ``nodes``) of each expert run
    node_pos = np.zeros(node_first.size, dtype=np.int64)
    node_pos[nodes] = np.arange(nodes.size)
    expert_pos = np.zeros(used.size, dtype=np.int64)
    expert_pos[node_expert[expert_flags]] = np.arange(expert_at.size)
    m_cross = cross[multi]
    m_expert = expert_pos[need_expert[multi]]
    m_node = node_pos[need_node[multi]]
    group = np.where(m_cross, nodes.size + m_expert, m_node)  # into concatenate((node minima, expert minima))
    lo = node_at[np.where(m_cross, expert_at[m_expert], m_node)]
    cnt = count[multi]
    s_lg, s_gpu = h_lg[sub], h_gpu[sub]
    num_sub = sub.size
    index = np.arange(num_sub)
    rank = np.empty(num_gpus, dtype=np.int64)
    gpus = np.arange(num_gpus)

    def best(loads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per need, the candidate with the fewest ``loads`` in its layer, then in the plan, then the lowest GPU;
        every candidate's ``(load * G + rank in the plan) * num_sub + index``; the plan's loads per GPU."""
        per_layer = loads.reshape(num_layers, num_gpus)
        totals = per_layer.sum(axis=0)
        rank[np.argsort(totals, kind="stable")] = gpus
        value = (per_layer * num_gpus + rank).ravel()[s_lg]
        value *= num_sub
        value += index
        node_min = np.minimum.reduceat(value, node_at)
        minima = np.concatenate((node_min, np.minimum.reduceat(node_min, expert_at)))
        return minima[group] % num_sub, value, totals

    # Start: the candidate with the fewest expected sends (a need with c candidates counts 1/c on each), the
    # needs of one candidate range dealt round robin from it.
    spread = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt - lo, cnt)
    expected = np.bincount(s_lg[spread], weights=np.repeat(_SHARE // cnt, cnt), minlength=num_lg)
    start = best(fixed * _SHARE + expected.astype(np.int64))[0]
    pick = lo + (start - lo + _ranks(group)) % cnt
    loads = fixed + np.bincount(s_lg[pick], minlength=num_lg)
    scale = num_gpus * num_sub  # values stay below (copies + 1) * scale: far from 2**63 at any real size
    while True:
        alt, value, totals = best(loads)
        gain = value[pick] // scale - value[alt] // scale
        cur_gpu, alt_gpu = s_gpu[pick], s_gpu[alt]
        moves = np.flatnonzero((gain >= 2) | ((gain == 1) & (totals[cur_gpu] - totals[alt_gpu] >= 2)))
        if not moves.size:
            return sub[pick]
        cur_lg, alt_lg = s_lg[pick[moves]], s_lg[alt[moves]]
        gain, cur_gpu, alt_gpu = gain[moves], cur_gpu[moves], alt_gpu[moves]
        if moves.size <= _FEW_MOVES:
            accept = _accept_in_turn(gain, cur_lg, alt_lg, cur_gpu, alt_gpu, loads, totals)
        else:
            accept = _accept_together(gain, cur_lg, alt_lg, cur_gpu, alt_gpu, totals)
        np.subtract.at(loads, cur_lg[accept], 1)
        np.add.at(loads, alt_lg[accept], 1)
        moves = moves[accept]
        pick[moves] = alt[moves]


_FEW_MOVES = 64  # rounds with at most this many candidate moves try them one by one
_SHARE = 2520  # 1/c for c = 1 .. 10 in integers (the start's expected sends)


def _accept_together(
    gain: np.ndarray,
    cur_lg: np.ndarray,
    alt_lg: np.ndarray,
    cur_gpu: np.ndarray,
    alt_gpu: np.ndarray,
    totals: np.ndarray,
) -> np.ndarray:
    """``bool``: candidate moves that can all be made at once, the potential still dropping.

    Priority: layer moves (``gain >= 2``) first, then in order. A layer move ``a -> b`` of gain ``d`` goes if
    ``d >= 2 + r_a + r_b``, ``r_a`` (``r_b``) counting the candidates of higher priority that leave ``a`` (reach
    ``b``) in the layer: the layer's sum of squares changes by at most ``sum over moves of 2 (1 + r_a + r_b - d)``.
    A swap goes if ``r_a = r_b = 0`` (the layer's sum cannot grow) and the plan totals differ by at least
    ``2 + r'_a + r'_b`` (the same count among the swaps, per GPU): the plan's sum drops if the layers' do not.
    The first candidate always goes.
    """
    second = gain < 2
    order = np.argsort(second, kind="stable")
    ranks = np.empty(gain.size, dtype=np.int64)
    ranks[order] = _ranks(cur_lg[order]) + _ranks(alt_lg[order])
    accept = gain >= 2 + ranks
    swap = np.flatnonzero(second & (ranks == 0))
    if swap.size:
        from_gpu, to_gpu = cur_gpu[swap], alt_gpu[swap]
        accept[swap] = totals[from_gpu] - totals[to_gpu] >= 2 + _ranks(from_gpu) + _ranks(to_gpu)
    return accept


def _accept_in_turn(
    gain: np.ndarray,
    cur_lg: np.ndarray,
    alt_lg: np.ndarray,
    cur_gpu: np.ndarray,
    alt_gpu: np.ndarray,
    loads: np.ndarray,
    totals: np.ndarray,
) -> np.ndarray:
    """``bool``: candidate moves that still lower the potential when made one after the other (layer moves first,
    then in order); the first candidate always goes."""
    accept = np.zeros(gain.size, dtype=bool)
    load: dict[int, int] = {}
    total: dict[int, int] = {}
    cur_lg, alt_lg, cur_gpu, alt_gpu = cur_lg.tolist(), alt_lg.tolist(), cur_gpu.tolist(), alt_gpu.tolist()
    for i in np.argsort(gain < 2, kind="stable").tolist():
        a, b, ga, gb = cur_lg[i], alt_lg[i], cur_gpu[i], alt_gpu[i]
        la, lb = load.get(a, int(loads[a])), load.get(b, int(loads[b]))
        ta, tb = total.get(ga, int(totals[ga])), total.get(gb, int(totals[gb]))
        if la - lb >= 2 or (la - lb == 1 and ta - tb >= 2):
            load[a], load[b], total[ga], total[gb] = la - 1, lb + 1, ta - 1, tb + 1
            accept[i] = True
    return accept


def _bits(count: int) -> int:
    """Bits that hold ``0 .. count - 1``."""
    return (count - 1).bit_length()


def _run_starts(key: np.ndarray) -> np.ndarray:
    """``bool [n]``: entry ``i`` of sorted ``key`` starts a run of equal values."""
    flags = np.empty(key.size, dtype=bool)
    flags[:1] = True
    np.not_equal(key[1:], key[:-1], out=flags[1:])
    return flags


def _ranks(key: np.ndarray) -> np.ndarray:
    """``[n]`` int64: how many earlier entries have the same (non-negative) ``key``."""
    n = key.size
    order = np.argsort(key * n + np.arange(n))  # distinct values: the order is the stable one
    first = np.where(_run_starts(key[order]), np.arange(n), 0)
    np.maximum.accumulate(first, out=first)
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n) - first
    return ranks


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
        Placements; slot ``j`` is on GPU ``j // (R // num_gpus)``; ``-1``
        is an empty slot (a failed GPU's, see ``rebalance_experts(...,
        active_gpus=)``): it holds nothing and receives nothing. Both
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
        tensors) holds an id below -1. Ids on a CUDA or JAX device are not
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
        if on_host and phy2log.shape[0] * phy2log.shape[1] and bool((phy2log < -1).any()):
            raise ValueError(
                f"{name} must hold expert ids >= 0 (or -1: an empty slot of a failed GPU), got {int(phy2log.min())}"
            )
    if not device_kinds:
        xp = np
    else:
        xp = _xp.array_namespace(new if kinds["new_phy2log"] != "numpy" else old)
        old, new = _same_device(old, new, kinds, xp)
    dtype = xp.result_type(old.dtype, new.dtype)
    old, new = xp.astype(old, dtype), xp.astype(new, dtype)
    # An empty new slot (-1) receives nothing: give it the old slot's content, which it then keeps (it adds the
    # same copy to both sides of its GPU's multiset). An empty old slot holds nothing that new could keep.
    new = xp.where(new == -1, old, new)
    return count_moves(new, old, num_gpus, xp=xp)


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
