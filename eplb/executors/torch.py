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

Any failure (a peer that dies, a timeout, an exception in ``on_transfer``)
is voted on by every rank that can still vote, so each raises
:class:`eplb.TransferError` naming the first failed copy, with its weights
untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eplb.migration import TransferError, TransferPlan

__all__ = ["apply_plan"]

_NO_FAILURE = 2**62


def _flatten(weights: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors of ``weights`` (a tensor, a sequence or a mapping of tensors) and how to rebuild it."""
    if isinstance(weights, torch.Tensor):
        return [weights], lambda ts: ts[0]
    if isinstance(weights, Mapping):
        keys = list(weights)
        return [weights[k] for k in keys], lambda ts: type(weights)(zip(keys, ts, strict=True))
    if isinstance(weights, Sequence) and weights and all(isinstance(t, torch.Tensor) for t in weights):
        return list(weights), lambda ts: type(weights)(ts)
    raise TypeError(f"weights must be a tensor, or a non-empty sequence or mapping of tensors, got {type(weights)}")


def _check(plan: TransferPlan, tensors: list[torch.Tensor], world: int) -> None:
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


def _vote(
    failure: tuple[int, BaseException] | None,
    plan: TransferPlan,
    rank: int,
    world: int,
    group: Any,
    device: torch.device,
    step: str,
) -> None:
    """Agree on failures across ranks; raise :class:`TransferError` on every rank if any failed.

    Each rank contributes ``(failed copy + 1) * world + rank`` (copy -1 for a
    failure not tied to a copy) or a sentinel; the minimum names the first
    failed copy and the rank that saw it.
    """
    code = _NO_FAILURE if failure is None else (failure[0] + 1) * world + rank
    flag = torch.full((1,), code, dtype=torch.int64, device=device)
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    except Exception as err:  # a peer is gone: no agreement possible, keep the old weights
        transfer = failure[0] if failure is not None and failure[0] >= 0 else None
        cause = f"{failure[1]!r}; then the {step} vote failed: {err}" if failure else f"the {step} vote failed: {err}"
        raise TransferError(cause, plan=plan, transfer=transfer, rank=rank) from err
    code = int(flag.item())
    if code == _NO_FAILURE:
        return
    transfer, reporter = code // world - 1, code % world
    if reporter == rank and failure is not None:
        cause = repr(failure[1])
    else:
        cause = f"reported by rank {reporter} during {step}"
    error = TransferError(cause, plan=plan, transfer=transfer if transfer >= 0 else None, rank=reporter)
    raise error from (failure[1] if failure is not None else None)


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
        A copy or a rank failed; every rank that can still communicate
        raises, naming the first failed copy, with its weights unchanged.
    """
    tensors, rebuild = _flatten(weights)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = tensors[0].device
    failure: tuple[int, BaseException] | None = None

    # 1. Prepare: staging buffers for every slot this rank writes, local copies from old weights,
    # and per peer one message per tensor with every copy between the two ranks, in plan order.
    messages: list[tuple[Any, torch.Tensor, int, int]] = []  # (op, buffer, peer, first plan row)
    unpack: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (staged, positions, received)
    exchanges: list[tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = []  # all_to_all: out, in, splits
    try:
        if transport not in ("p2p", "all_to_all"):
            raise ValueError(f"transport={transport!r} must be 'p2p' or 'all_to_all'")
        _check(plan, tensors, world)
        if any(not t.is_contiguous() for t in tensors):
            raise ValueError("weights tensors must be contiguous")
        rows = np.flatnonzero(plan.dst_gpu == rank)
        position = {int(row): k for k, row in enumerate(rows)}
        by_slot = {(int(plan.layer[row]), int(plan.dst_slot[row])): k for k, row in enumerate(rows)}
        staged = [t.new_empty((len(rows), *t.shape[2:])) for t in tensors]
        flat_slots = plan.num_layers * plan.slots_per_gpu
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
        failure = (-1, err)
    _vote(failure, plan, rank, world, group, device, "preparation")

    # 2. Transfer: all messages posted together; a failed message names its first copy.
    incoming = np.flatnonzero(plan.remote & (plan.dst_gpu == rank))
    for received, sent, received_splits, sent_splits in exchanges:
        try:
            dist.all_to_all_single(received, sent, received_splits, sent_splits, group=group)
        except Exception as err:
            failure = failure or (int(incoming[0]) if len(incoming) else -1, err)
    try:
        ops = [dist.P2POp(op, buffer, group=group, group_peer=peer) for op, buffer, peer, _ in messages]
        works = dist.batch_isend_irecv(ops) if ops else []
        # gloo returns one work per op; NCCL may coalesce a batch into one.
        for i, work in enumerate(works):
            try:
                work.wait()
            except Exception as err:
                failure = failure or (messages[i][3] if len(works) == len(ops) else -1, err)
    except Exception as err:
        failure = failure or (-1, err)
    if failure is None:
        try:
            with torch.no_grad():
                for buffer, index, received in unpack:
                    buffer.index_copy_(0, index, received)
                for row in rows[plan.stage[rows] == 1]:  # second copies of an expert this rank received
                    source = by_slot[int(plan.layer[row]), int(plan.src_slot[row])]
                    for buffer in staged:
                        buffer[position[int(row)]].copy_(buffer[source])
        except Exception as err:
            failure = (-1, err)
    if failure is None and on_transfer is not None:
        for row in incoming.tolist():
            try:
                on_transfer(row)
            except Exception as err:
                failure = (row, err)
                break

    # 3. Commit once every rank has everything.
    _vote(failure, plan, rank, world, group, device, "transfer")
    out = tensors if in_place else [t.clone() for t in tensors]
    if len(rows):
        layers = torch.as_tensor(plan.layer[rows], device=device)
        slots = torch.as_tensor(plan.dst_slot[rows], device=device)
        with torch.no_grad():
            for tensor, buffer in zip(out, staged, strict=True):
                tensor[layers, slots] = buffer
    return weights if in_place else rebuild(out)
