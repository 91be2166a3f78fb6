"""Carry out a :class:`eplb.TransferPlan` with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

One process per GPU: rank ``g`` of the process group is GPU ``g`` of the
plan and holds its slots of every layer, ``[L, R/G, ...]`` per weight
tensor. The migration runs in three steps:

1. *prepare*: check shapes, allocate a staging buffer for every destination
   slot of this rank and make its local copies; all ranks agree (one
   ``all_reduce``) before any data moves;
2. *transfer*: per pair of ranks and weight tensor, one message holding
   every copy between them (packed in plan order when preparing), all posted
   together with ``batch_isend_irecv``; then second copies within a GPU
   (stage 1);
3. *commit*: all ranks agree that every copy arrived (one ``all_reduce``);
   only then are the staged slots written into the weights.

Failures are voted on by every rank that can still vote, so no rank commits
unless all can, and no rank waits for a peer that gave up:

- a *transfer failure* (an error of ``torch.distributed``: a peer that dies,
  a timeout, a ``DistBackendError`` or other ``RuntimeError`` of a
  collective or point-to-point op; running out of memory while staging; an
  exception in ``on_transfer``, which marks its copy as failed) makes every
  rank raise :class:`eplb.TransferError` naming the first failed copy;
- any other exception on a rank (invalid arguments, checked before anything
  is staged, or a bug) is re-raised there unchanged (with a note) once the
  rank has told the others, which raise :class:`eplb.TransferError` naming
  it.

Either way every rank keeps its weights untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from eplb.migration import TransferError, TransferPlan

__all__ = ["apply_plan"]

_NO_FAILURE = 2**62

# What a torch.distributed call raises when communication fails: DistError and its subclasses
# (DistBackendError, DistNetworkError, DistStoreError) and the plain RuntimeError of gloo ("Connection closed
# by peer", "Timed out") are RuntimeErrors; timeouts and sockets may also surface as TimeoutError or OSError.
_COMMUNICATION_ERRORS = (RuntimeError, TimeoutError, OSError)
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # older torch: CUDA's only


class _Failure(NamedTuple):
    """A failure seen by this rank: the plan row it concerns (-1: none) and the exception.

    ``transfer``: a failure of the transfer itself, raised as :class:`TransferError`; otherwise the exception
    (bad arguments, a bug) is re-raised unchanged after the vote.
    """

    row: int
    error: BaseException
    transfer: bool


def _local(error: BaseException) -> _Failure:
    """An exception of this rank's own work (checks, staging, unpacking): only running out of memory is a
    transfer failure; anything else is a bad argument or a bug, to be seen as it is."""
    return _Failure(-1, error, isinstance(error, _OUT_OF_MEMORY))


def _communication(row: int, error: BaseException) -> _Failure:
    """An exception of a ``torch.distributed`` call: its communication errors are transfer failures."""
    return _Failure(row, error, isinstance(error, _COMMUNICATION_ERRORS))


def _flatten(weights: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors of ``weights`` (a tensor, a sequence or a mapping of tensors) and how to rebuild it."""
    if isinstance(weights, torch.Tensor):
        return [weights], lambda ts: ts[0]
    if isinstance(weights, Mapping) and weights and all(isinstance(t, torch.Tensor) for t in weights.values()):
        keys = list(weights)
        return [weights[k] for k in keys], lambda ts: type(weights)(zip(keys, ts, strict=True))
    if isinstance(weights, Sequence) and weights and all(isinstance(t, torch.Tensor) for t in weights):
        return list(weights), lambda ts: type(weights)(ts)
    raise TypeError(f"weights must be a tensor, or a non-empty sequence or mapping of tensors, got {type(weights)}")


def _check(plan: Any, tensors: list[torch.Tensor], world: int, transport: Any, on_transfer: Any, in_place: Any) -> None:
    """Validate the arguments before anything is staged; each error names the argument and the rule."""
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be an eplb.TransferPlan (from eplb.plan_transfers), got {type(plan).__name__}")
    if transport not in ("p2p", "all_to_all"):
        raise ValueError(f"transport={transport!r} must be 'p2p' or 'all_to_all'")
    if on_transfer is not None and not callable(on_transfer):
        raise TypeError(f"on_transfer must be callable or None, got {type(on_transfer).__name__}")
    if not isinstance(in_place, bool | np.bool_):  # numpy bools count as bools, as everywhere in eplb
        raise TypeError(f"in_place must be a bool, got {type(in_place).__name__}")
    if plan.num_gpus != world:
        raise ValueError(f"the plan is for {plan.num_gpus} GPUs but the process group has {world} ranks")
    expected = (plan.num_layers, plan.slots_per_gpu)
    for i, tensor in enumerate(tensors):
        if tuple(tensor.shape[:2]) != expected:
            raise ValueError(
                f"weights tensor {i} must have shape [layers, slots per GPU, ...] = {list(expected)} + [...], "
                f"got {list(tensor.shape)}"
            )
        if tensor.device != tensors[0].device:
            raise ValueError(f"weights tensors must share one device, got {tensors[0].device} and {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"weights tensor {i} must be contiguous")


def _vote_device(group: Any) -> torch.device:
    """Where the vote lives when ``weights`` named no device: NCCL votes on the current CUDA device."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_unchanged(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)
    raise error


def _vote(
    failure: _Failure | None,
    plan: TransferPlan,
    rank: int,
    world: int,
    group: Any,
    device: torch.device,
    step: str,
) -> None:
    """Agree on failures across ranks; raise on every rank if any failed.

    Each rank contributes ``((failed row + 1) * 2 + own error) * world + rank``
    (row -1 for a failure not tied to a copy; ``own error`` 1 for an
    exception that is not a transfer failure) or a sentinel; the minimum
    names the first failed copy and the rank that saw it. A rank whose own
    failure is not a transfer failure re-raises it; the others raise
    :class:`TransferError`.
    """
    code = _NO_FAILURE if failure is None else ((failure.row + 1) * 2 + (not failure.transfer)) * world + rank
    flag = torch.full((1,), code, dtype=torch.int64, device=device)
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        code = int(flag.item())  # where an asynchronous NCCL error surfaces
    except _COMMUNICATION_ERRORS as err:  # a peer is gone: no agreement possible, keep the old weights
        if failure is not None and not failure.transfer:
            note = f"eplb: rank {rank} could not tell the other ranks ({step} vote failed: {err}); no weights changed"
            _raise_unchanged(failure.error, note)
        transfer = failure.row if failure is not None and failure.row >= 0 else None
        cause = (
            f"{failure.error!r}; then the {step} vote failed: {err}" if failure else f"the {step} vote failed: {err}"
        )
        raise TransferError(cause, plan=plan, transfer=transfer, rank=rank) from err
    if failure is not None and not failure.transfer:
        note = f"eplb: rank {rank} told the other ranks during {step}; they raise TransferError, no weights changed"
        _raise_unchanged(failure.error, note)
    if code == _NO_FAILURE:
        return
    reporter, own_error, transfer = code % world, (code // world) % 2, code // world // 2 - 1
    if reporter == rank and failure is not None:
        cause = repr(failure.error)
    elif own_error:
        cause = f"raised an exception of its own during {step} (invalid arguments or a bug; see its traceback)"
    else:
        cause = f"reported by rank {reporter} during {step}"
    error = TransferError(cause, plan=plan, transfer=transfer if transfer >= 0 else None, rank=reporter)
    raise error from (failure.error if failure is not None else None)


def _prepare_exchange(
    plan: TransferPlan,
    tensors: list[torch.Tensor],
    staged: list[torch.Tensor],
    position: dict[int, int],
    rank: int,
    world: int,
    exchanges: list,
    unpack: list,
) -> None:
    """Send and receive buffers of one ``all_to_all_single`` per tensor: copies grouped by peer, plan order."""
    device = tensors[0].device
    out = [np.flatnonzero(plan.remote & (plan.src_gpu == rank) & (plan.dst_gpu == peer)) for peer in range(world)]
    into = [np.flatnonzero(plan.remote & (plan.dst_gpu == rank) & (plan.src_gpu == peer)) for peer in range(world)]
    sent = np.concatenate(out)
    index = torch.as_tensor(plan.layer[sent] * plan.slots_per_gpu + plan.src_slot[sent], device=device)
    positions = torch.as_tensor([position[int(r)] for r in np.concatenate(into)], dtype=torch.int64, device=device)
    flat_slots = plan.num_layers * plan.slots_per_gpu
    for tensor, buffer in zip(tensors, staged, strict=True):
        packed = tensor.reshape(flat_slots, *tensor.shape[2:]).index_select(0, index)
        received = buffer.new_empty((len(positions), *buffer.shape[1:]))
        exchanges.append((received, packed, [len(r) for r in into], [len(r) for r in out]))
        unpack.append((buffer, positions, received))


def apply_plan(
    plan: TransferPlan,
    weights: Any,
    *,
    group: Any = None,
    in_place: bool = True,
    on_transfer: Callable[[int], None] | None = None,
    transport: str = "p2p",
) -> Any:
    """Move expert weights as ``plan`` says, on every rank of ``group`` (call it on all of them).

    Parameters
    ----------
    plan : TransferPlan
        From :func:`eplb.plan_transfers`, the same on every rank; its GPU
        ``g`` is rank ``g`` of ``group``.
    weights : torch.Tensor [L, R/G, ...], or a sequence or mapping of them
        This rank's slots of every layer (e.g. ``{"w13": [L, s, 2I, H],
        "w2": [L, s, H, I]}``); every tensor moves slot by slot. On one
        device, contiguous. NCCL needs CUDA tensors, gloo takes CPU tensors.
    group : ProcessGroup, optional
        Default: the default group.
    in_place : bool
        ``True`` (default): write the new slots into ``weights`` once all
        ranks succeeded, and return ``weights``. ``False``: leave
        ``weights`` untouched and return new tensors of the same structure.
    on_transfer : callable, optional
        Called with the plan row of each copy this rank received, after it
        arrived (for checks or progress); an exception marks that copy as
        failed.
    transport : {"p2p", "all_to_all"}
        ``"p2p"`` (default): point-to-point messages between the ranks that
        exchange copies (``batch_isend_irecv``). ``"all_to_all"``: one
        ``all_to_all_single`` per weight tensor over the whole group (every
        rank takes part; NCCL runs collectives faster than point-to-point
        pairs over NVLink). Same result and failure handling.

    Returns
    -------
    Same structure as ``weights``: the weights of the new placement.

    Raises
    ------
    TransferError
        The transfer failed: a ``torch.distributed`` error (a peer that died,
        a timeout, a ``DistBackendError`` or ``RuntimeError`` of an op), out
        of memory while staging, an exception of ``on_transfer``, or another
        rank failed. Every rank that can still communicate raises, naming
        the first failed copy (or the rank), with its weights unchanged.
    TypeError, ValueError
        Invalid arguments on this rank: ``plan`` not a :class:`TransferPlan`
        or for another number of ranks, ``weights`` not tensors of shape
        ``[L, R/G, ...]`` on one device, contiguous; ``transport``,
        ``on_transfer``, ``in_place`` invalid. Checked before anything is
        staged; this rank raises the error unchanged after telling the
        others (which raise :class:`TransferError`). Other exceptions of
        eplb's own code (bugs) behave the same. No weights change.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    failure: _Failure | None = None
    device: torch.device | None = None

    # 1. Prepare: check the arguments, then staging buffers for every slot this rank writes, local copies from
    # old weights, and per peer one message per tensor with every copy between the two ranks, in plan order.
    # Nothing here communicates, so an exception is a bad argument or a bug (or memory): it is voted on, so that
    # the other ranks stop too, and re-raised unchanged here.
    messages: list[tuple[Any, torch.Tensor, int, int]] = []  # (op, buffer, peer, first plan row)
    unpack: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (staged, positions, received)
    exchanges: list[tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = []  # all_to_all: out, in, splits
    try:
        tensors, rebuild = _flatten(weights)
        device = tensors[0].device
        _check(plan, tensors, world, transport, on_transfer, in_place)
        rows = np.flatnonzero(plan.dst_gpu == rank)
        position = {int(row): k for k, row in enumerate(rows)}
        by_slot = {(int(plan.layer[row]), int(plan.dst_slot[row])): k for k, row in enumerate(rows)}
        staged = [t.new_empty((len(rows), *t.shape[2:])) for t in tensors]
        flat_slots = plan.num_layers * plan.slots_per_gpu
        # The commit's indices, made now so that nothing but the writes is left after the last vote.
        commit_layers = torch.as_tensor(plan.layer[rows], device=device)
        commit_slots = torch.as_tensor(plan.dst_slot[rows], device=device)
        with torch.no_grad():
            for row in rows[(plan.src_gpu[rows] == rank) & (plan.stage[rows] == 0)]:
                layer, slot = int(plan.layer[row]), int(plan.src_slot[row])
                for tensor, buffer in zip(tensors, staged, strict=True):
                    buffer[position[int(row)]].copy_(tensor[layer, slot])
            if transport == "all_to_all":
                _prepare_exchange(plan, tensors, staged, position, rank, world, exchanges, unpack)
            for peer in range(world if transport == "p2p" else 0):
                out = np.flatnonzero(plan.remote & (plan.src_gpu == rank) & (plan.dst_gpu == peer))
                if len(out):
                    index = torch.as_tensor(plan.layer[out] * plan.slots_per_gpu + plan.src_slot[out], device=device)
                    for tensor in tensors:
                        packed = tensor.reshape(flat_slots, *tensor.shape[2:]).index_select(0, index)
                        messages.append((dist.isend, packed, peer, int(out[0])))
                into = np.flatnonzero(plan.remote & (plan.dst_gpu == rank) & (plan.src_gpu == peer))
                if len(into):
                    index = torch.as_tensor([position[int(r)] for r in into], device=device)
                    for buffer in staged:
                        received = buffer.new_empty((len(into), *buffer.shape[1:]))
                        messages.append((dist.irecv, received, peer, int(into[0])))
                        unpack.append((buffer, index, received))
    except Exception as err:
        failure = _local(err)
    _vote(failure, plan, rank, world, group, device if device is not None else _vote_device(group), "preparation")

    # 2. Transfer: all messages posted together; a failed message names its first copy. Only errors of the
    # torch.distributed calls themselves are transfer failures.
    incoming = np.flatnonzero(plan.remote & (plan.dst_gpu == rank))
    for received, sent, received_splits, sent_splits in exchanges:
        try:
            dist.all_to_all_single(received, sent, received_splits, sent_splits, group=group)
        except Exception as err:
            if failure is None:
                failure = _communication(int(incoming[0]) if len(incoming) else -1, err)
    try:
        ops = [dist.P2POp(op, buffer, group=group, group_peer=peer) for op, buffer, peer, _ in messages]
    except Exception as err:
        ops, failure = [], failure or _local(err)
    try:
        works = dist.batch_isend_irecv(ops) if ops else []
    except Exception as err:
        works, failure = [], failure or _communication(-1, err)
    # gloo returns one work per op; NCCL may coalesce a batch into one.
    for i, work in enumerate(works):
        try:
            work.wait()
        except Exception as err:
            if failure is None:
                failure = _communication(messages[i][3] if len(works) == len(ops) else -1, err)
    if failure is None:
        try:
            _unpack(plan, rows, position, by_slot, staged, unpack)
        except Exception as err:
            failure = _local(err)
    if failure is None and on_transfer is not None:
        for row in incoming.tolist():
            try:
                on_transfer(row)
            except Exception as err:  # documented: the user's check rejects this copy
                failure = _Failure(row, err, True)
                break

    # 3. Commit once every rank has everything.
    _vote(failure, plan, rank, world, group, device, "transfer")
    out = tensors if in_place else [t.clone() for t in tensors]
    if len(rows):
        with torch.no_grad():
            for tensor, buffer in zip(out, staged, strict=True):
                tensor[commit_layers, commit_slots] = buffer
    return weights if in_place else rebuild(out)


def _unpack(
    plan: TransferPlan,
    rows: np.ndarray,
    position: dict[int, int],
    by_slot: dict[tuple[int, int], int],
    staged: list[torch.Tensor],
    unpack: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> None:
    """Received copies into their staging rows, then the second copies of an expert this rank received."""
    with torch.no_grad():
        for buffer, index, received in unpack:
            buffer.index_copy_(0, index, received)
        for row in rows[plan.stage[rows] == 1]:
            source = by_slot[int(plan.layer[row]), int(plan.src_slot[row])]
            for buffer in staged:
                buffer[position[int(row)]].copy_(buffer[source])
