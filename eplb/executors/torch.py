"""Carry out a :class:`eplb.TransferPlan` with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

One process per GPU: rank ``g`` of the process group is GPU ``g`` of the
plan and holds its slots of every layer, ``[L, R/G, ...]`` per weight
tensor. A migration of some layers runs in three steps:

1. *prepare* (:func:`begin`): check the arguments, allocate one staging
   buffer per tensor for every slot this rank writes, make the local copies
   into it (one gather per tensor), read the lost experts of a plan with
   reload rows into it (``load_expert``), and agree that every rank is ready (one
   ``all_reduce``) before any data moves;
2. *transfer* (:func:`begin`, asynchronous): every copy between two ranks is
   posted at once with ``batch_isend_irecv`` (or one ``all_to_all_single``
   per tensor) and lands straight in its staging row. A copy of at least
   ``ZERO_COPY_BYTES`` is sent straight from its weight slot (a slot of
   ``[L, R/G, ...]`` is contiguous) and received straight into its staging
   row; smaller copies to one peer are packed into one message (one gather).
   With ``verify=True`` (default) each copy travels with a checksum;
3. *commit* (:meth:`PendingTransfer.finish`): wait for the messages, make the
   second copies of an expert received once, compare the checksums, and
   agree that every rank has every copy (one ``all_reduce``); only then are
   the staged slots written into the weights (one scatter per tensor).

:func:`apply_plan` is ``begin(...).finish()``, layer group by layer group
when ``max_staging_bytes`` caps the staging memory. Between :func:`begin`
and :meth:`~PendingTransfer.finish` the weights are only read, so a forward
pass can keep running on the old ones; on CUDA the copies run on a side
stream (``stream=``), and :meth:`~PendingTransfer.done` tells without
blocking whether ``finish`` would wait.

What the all-or-nothing guarantee costs: staging memory for every slot this
rank writes in the layer group (received and local copies alike), and one
device copy of those bytes at the commit. Receiving straight into the
weights would save that copy but lose the old weights on a failure.

Failures are voted on by every rank that can still vote, so no rank commits
unless all can, and no rank waits for a peer that gave up:

- a *transfer failure* (an error of ``torch.distributed``: a peer that dies,
  a timeout, a ``DistBackendError`` or other ``RuntimeError`` of a
  collective or point-to-point op; a checksum that does not match; running
  out of memory while staging; an exception in ``on_transfer``, which marks
  its copy as failed) makes every rank raise :class:`eplb.TransferError`
  naming the first failed copy;
- any other exception on a rank (invalid arguments, checked before anything
  is staged, or a bug) is re-raised there unchanged (with a note) once the
  rank has told the others, which raise :class:`eplb.TransferError` naming
  it.

Either way every rank keeps the old weights of the failed layer group. With
one group (the default), that is all of them; with ``max_staging_bytes``,
the groups committed before keep their new weights, the same on every rank,
and the error lists their layers (``TransferError.committed_layers``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from eplb.backends._torch import _has_triton
from eplb.migration import TransferError, TransferPlan

__all__ = ["ZERO_COPY_BYTES", "PendingTransfer", "apply_plan", "begin"]

ZERO_COPY_BYTES = 4 << 20
"""A copy of at least this many bytes (one slot of one tensor) is its own message, sent from the weights and
received into staging without packing; smaller ones to one peer share a message (the packing gather costs less
than a message each)."""

_NO_FAILURE = 2**62

# What a torch.distributed call raises when communication fails: DistError and its subclasses
# (DistBackendError, DistNetworkError, DistStoreError) and the plain RuntimeError of gloo ("Connection closed
# by peer", "Timed out") are RuntimeErrors; timeouts and sockets may also surface as TimeoutError or OSError.
_COMMUNICATION_ERRORS = (RuntimeError, TimeoutError, OSError)
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # older torch: CUDA's only


class _Clock:
    """Where the time goes (benchmarks/executors_torch.py sets ``_clock.laps`` to a dict); off by default."""

    laps: dict[str, float] | None = None
    sync: Callable[[], None] | None = None

    def lap(self, name: str, since: float) -> float:
        if self.laps is None:
            return since
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - since
        return now


_clock = _Clock()


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


def _check(plan: Any, tensors: list[torch.Tensor], world: int, options: dict[str, Any]) -> None:
    """Validate the arguments before anything is staged; each error names the argument and the rule."""
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be an eplb.TransferPlan (from eplb.plan_transfers), got {type(plan).__name__}")
    if options["transport"] not in ("p2p", "all_to_all"):
        raise ValueError(f"transport={options['transport']!r} must be 'p2p' or 'all_to_all'")
    if options["on_transfer"] is not None and not callable(options["on_transfer"]):
        raise TypeError(f"on_transfer must be callable or None, got {type(options['on_transfer']).__name__}")
    for name in ("in_place", "verify"):
        if not isinstance(options[name], bool | np.bool_):  # numpy bools count as bools, as everywhere in eplb
            raise TypeError(f"{name} must be a bool, got {type(options[name]).__name__}")
    if options["ranks"] is None and plan.num_gpus != world:
        raise ValueError(
            f"the plan is for {plan.num_gpus} GPUs but the process group has {world} ranks (pass ranks= to say "
            f"which rank holds which GPU, -1 for a GPU without a process)"
        )
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
    stream = options["stream"]
    if stream is not None:
        if not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"stream must be a torch.cuda.Stream or None, got {type(stream).__name__}")
        if tensors[0].device.type != "cuda":
            raise ValueError(f"stream is for CUDA weights; these are on {tensors[0].device}")


def _rank_of_gpu(plan: TransferPlan, ranks: Any, world: int, mask: np.ndarray) -> np.ndarray:
    """``[G]`` int64: the group rank of each plan GPU (``ranks``; default the identity, ``G == world``)."""
    if ranks is None:  # _check made sure that plan.num_gpus == world
        return np.arange(world, dtype=np.int64)
    if isinstance(ranks, str | bytes) or not isinstance(ranks, Sequence | np.ndarray):
        raise TypeError(
            f"ranks must be a sequence of ints (one per GPU of the plan) or None, got {type(ranks).__name__}"
        )
    values = list(ranks)
    if any(isinstance(r, bool | np.bool_) or not isinstance(r, int | np.integer) for r in values):
        raise TypeError(f"ranks must hold ints, got {values}")
    rank_of_gpu = np.asarray(values, dtype=np.int64).reshape(-1)
    if len(rank_of_gpu) != plan.num_gpus:
        raise ValueError(f"ranks must have one entry per GPU of the plan ({plan.num_gpus}), got {len(rank_of_gpu)}")
    live = rank_of_gpu[rank_of_gpu >= 0]
    if (rank_of_gpu < -1).any() or sorted(live.tolist()) != list(range(world)):
        raise ValueError(
            f"ranks must name every rank of the group (0 .. {world - 1}) once and -1 for GPUs without a "
            f"process, got {values}"
        )
    chosen = mask[plan.layer]
    dead = (rank_of_gpu[plan.dst_gpu] < 0) | ((plan.src_gpu >= 0) & (rank_of_gpu[np.maximum(plan.src_gpu, 0)] < 0))
    if (chosen & dead).any():
        row = int(np.flatnonzero(chosen & dead)[0])
        raise ValueError(f"ranks: plan row {row} {plan.row(row)} reads or writes a GPU without a process (rank -1)")
    return rank_of_gpu


def _check_reloads(plan: Any, load_expert: Any) -> None:
    """A plan with reload rows needs a callable ``load_expert`` (the same answer on every rank: no vote)."""
    if load_expert is not None and not callable(load_expert):
        raise TypeError(f"load_expert must be callable or None, got {type(load_expert).__name__}")
    if isinstance(plan, TransferPlan) and plan.reload.any() and load_expert is None:
        rows = np.flatnonzero(plan.reload)
        raise ValueError(
            f"plan has {len(rows)} reload rows (src_gpu == -1: experts no surviving GPU holds, from "
            f"plan_transfers(..., allow_reload=True), first: {plan.row(int(rows[0]))}); pass "
            f"load_expert=(layer, expert) -> that expert's weights to read them from a checkpoint"
        )


def _layer_mask(plan: TransferPlan, layers: Any) -> np.ndarray:
    """``[L]`` bool: the layers to move (``None``: all)."""
    if layers is None:
        return np.ones(plan.num_layers, dtype=bool)
    if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of layer indices or None, got {type(layers).__name__}")
    chosen = list(layers)
    for layer in chosen:
        if isinstance(layer, bool | np.bool_) or not isinstance(layer, int | np.integer):
            raise TypeError(f"layers must hold ints, got {type(layer).__name__} {layer!r}")
        if not 0 <= layer < plan.num_layers:
            raise ValueError(f"layers: {layer} is not a layer of the plan (0 .. {plan.num_layers - 1})")
    mask = np.zeros(plan.num_layers, dtype=bool)
    mask[np.asarray(chosen, dtype=np.int64)] = True
    if mask.sum() != len(chosen):
        raise ValueError(f"layers must not repeat a layer, got {chosen}")
    return mask


class _Layout(NamedTuple):
    """This rank's share of a plan restricted to some layers (host arrays; flat slot = ``layer * R/G + slot``).

    The staging rows are, in order: local stage-0 copies (plan order), reloads (plan order), copies received
    from each peer (by peer, plan order within), second copies (stage 1). ``staged_rows [n]`` are their plan
    rows, ``commit_dst [n]`` their flat destination slots.
    """

    staged_rows: np.ndarray
    commit_dst: np.ndarray
    local_src: np.ndarray  # [n_local] flat source slots
    reload_rows: np.ndarray  # [n_reload] plan rows filled by load_expert (staging rows n_local ...)
    received_from: np.ndarray  # [world + 1] offsets of each peer's copies among the staging rows
    second_src: np.ndarray  # [n_second] staging rows they copy
    sent_rows: list[np.ndarray]  # per peer: plan rows this rank sends, plan order
    sent_src: list[np.ndarray]  # per peer: their flat source slots


def _layout(plan: TransferPlan, rank: int, world: int, mask: np.ndarray, rank_of_gpu: np.ndarray) -> _Layout:
    """This rank's share of the chosen layers' rows; peers are group ranks (``rank_of_gpu [G]`` maps the plan's
    GPUs onto them), so a plan over GPUs without a process (``-1``, no rows) moves between the others."""
    per_gpu = plan.slots_per_gpu
    chosen = mask[plan.layer]
    remote = plan.remote
    src_rank = np.where(plan.src_gpu >= 0, rank_of_gpu[plan.src_gpu], -1)  # reload rows: no source
    dst_rank = rank_of_gpu[plan.dst_gpu]
    mine = chosen & (dst_rank == rank)
    reload = plan.reload
    local = np.flatnonzero(mine & ~remote & ~reload & (plan.stage == 0))
    reloaded = np.flatnonzero(mine & reload)
    received = np.flatnonzero(mine & remote)
    received = received[np.argsort(src_rank[received], kind="stable")]
    second = np.flatnonzero(mine & (plan.stage == 1))
    staged = np.concatenate([local, reloaded, received, second])
    commit_dst = plan.layer[staged] * per_gpu + plan.dst_slot[staged]
    where = np.full(plan.num_layers * per_gpu, -1, dtype=np.int64)
    where[commit_dst] = np.arange(len(staged))
    first = len(local) + len(reloaded) + len(received)
    second_src = where[plan.layer[second] * per_gpu + plan.src_slot[second]]
    if ((second_src < 0) | (second_src >= first)).any():
        raise ValueError("plan: a stage-1 copy reads a slot that no stage-0 copy of its GPU writes")
    counts = np.bincount(src_rank[received], minlength=world)
    received_from = len(local) + len(reloaded) + np.concatenate([[0], np.cumsum(counts)])
    outgoing = np.flatnonzero(chosen & remote & (src_rank == rank))
    outgoing = outgoing[np.argsort(dst_rank[outgoing], kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(dst_rank[outgoing], minlength=world))])
    sent_rows = [outgoing[bounds[p] : bounds[p + 1]] for p in range(world)]
    sent_src = [plan.layer[rows] * per_gpu + plan.src_slot[rows] for rows in sent_rows]
    return _Layout(staged, commit_dst, plan.layer[local] * per_gpu + plan.src_slot[local], reloaded,
                   received_from, second_src, sent_rows, sent_src)  # fmt: skip


def _word_sums(rows: torch.Tensor) -> torch.Tensor:
    """``[n]`` int32 checksum of each row of ``rows [n, ...]``: the sum of its 32-bit words mod 2**32 (16- or
    8-bit words when the row's bytes do not divide), in one pass. Any change of one word changes it; integer
    sums do not depend on the order of the reduction, so every device computes the same value."""
    data = rows.reshape(rows.shape[0], -1).view(torch.uint8)
    size = data.shape[1]
    words = data.view(torch.int32) if size % 4 == 0 else data.view(torch.int16) if size % 2 == 0 else data
    return words.sum(dim=1, dtype=torch.int32)  # int32 accumulation: 30x faster than int64 on a CPU


def _slot_sums(flat: torch.Tensor, index: torch.Tensor, sources: np.ndarray) -> torch.Tensor:
    """``[n]`` int32: ``_word_sums(flat[sources])`` without gathering the rows (``index``: ``sources`` on the
    device). On CUDA one Triton launch over every row (:mod:`eplb.kernels.checksum_triton`; a reduction per
    row of ``[1, N]`` reads at 43% of an H200's copy bandwidth), else one reduction per row."""
    if flat.is_cuda and _has_triton():
        from eplb.kernels import checksum_triton

        if checksum_triton.fits(flat):
            return checksum_triton.word_sums(flat, index)
    return torch.stack([_word_sums(flat[s : s + 1])[0] for s in sources.tolist()])


def _row_bytes(rows: torch.Tensor) -> int:
    """Bytes of one row of ``rows [n, ...]`` (one slot of one tensor)."""
    return int(np.prod(rows.shape[1:], dtype=np.int64)) * rows.element_size()


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


_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per CUDA device, made once (a stream per call would leak)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class _Null:
    """A context manager that does nothing (CPU: no streams)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class PendingTransfer:
    """A migration of some layers in flight (from :func:`begin`); call :meth:`finish` on every rank.

    Until :meth:`finish` returns, the weights are only read: a forward pass may keep using them. ``layers``
    (a tuple) are the layers it moves.
    """

    def __init__(self, **state: Any):
        self.__dict__.update(state)
        self._finished = False

    def done(self) -> bool:
        """Whether every message of this rank has completed (never blocks; :meth:`finish` still votes)."""
        if self._finished or self._failure is not None:
            return True
        if self._event is not None and not self._event.query():
            return False
        return all(work.is_completed() for work in self._works)

    def finish(self) -> Any:
        """Wait for the messages, check them, agree with every rank, and commit.

        Returns the weights of the new placement (``weights`` itself with ``in_place=True``). Raises
        :class:`eplb.TransferError` on a transfer failure on any rank, with this group's layers unchanged on
        every rank. Call it once.
        """
        if self._finished:
            raise RuntimeError("finish() was already called for this transfer")
        self._finished = True
        layout, failure, clock = self._layout, self._failure, time.perf_counter()
        with self._context():
            for i, work in enumerate(self._works):
                try:
                    work.wait()
                except Exception as err:
                    if failure is None:
                        row = self._message_rows[i] if len(self._works) == len(self._message_rows) else -1
                        failure = _communication(row, err)
            clock = _clock.lap("wait", clock)
            if failure is None:
                try:
                    failure = self._check_received()
                except Exception as err:
                    failure = _local(err)
            clock = _clock.lap("second copies and checksums", clock)
            if failure is None and self._on_transfer is not None:
                received = layout.staged_rows[layout.received_from[0] : layout.received_from[-1]]
                for row in np.sort(received).tolist():
                    try:
                        self._on_transfer(row)
                    except Exception as err:  # documented: the user's check rejects this copy
                        failure = _Failure(row, err, True)
                        break
            _vote(failure, self._plan, self._rank, self._world, self._vote_group, self._vote_on, "transfer")
            clock = _clock.lap("votes", clock)
        out = self._tensors if self._in_place else [t.clone() for t in self._tensors]
        if self._event is not None:
            torch.cuda.current_stream(self._device).wait_stream(self._stream)
            for buffer in self._staged:
                buffer.record_stream(torch.cuda.current_stream(self._device))
        if len(layout.staged_rows):
            dst = torch.as_tensor(layout.commit_dst, device=self._device)
            with torch.no_grad():
                for tensor, buffer in zip(out, self._staged, strict=True):
                    _commit(tensor.view(-1, *tensor.shape[2:]), dst, layout.commit_dst, buffer)
        _clock.lap("commit", clock)
        return self._weights if self._in_place else self._rebuild(out)

    def _context(self) -> Any:
        return torch.cuda.stream(self._stream) if self._stream is not None else _Null()

    def _check_received(self) -> _Failure | None:
        """Second copies of the experts received once, then the checksums of every received copy."""
        layout, staged = self._layout, self._staged
        first, second = layout.received_from[-1], torch.as_tensor(layout.second_src, device=self._device)
        with torch.no_grad():
            for buffer in staged:
                if len(second):
                    torch.index_select(buffer[:first], 0, second, out=buffer[first:])
            if self._sums_in is None or layout.received_from[-1] == layout.received_from[0]:
                return None
            begin, end = layout.received_from[0], layout.received_from[-1]
            sums = torch.stack([_word_sums(buffer[begin:end]) for buffer in staged], dim=1)
            bad = (sums != self._sums_in).any(dim=1).nonzero().flatten()
            if len(bad) == 0:  # the one host read of the check
                return None
        rows = layout.staged_rows[begin + bad.cpu().numpy()]
        row = int(rows.min())
        return _Failure(row, RuntimeError(f"checksum mismatch in {len(rows)} received copies"), True)


def begin(
    plan: TransferPlan,
    weights: Any,
    *,
    layers: Iterable[int] | None = None,
    group: Any = None,
    vote_group: Any = None,
    in_place: bool = True,
    verify: bool = True,
    on_transfer: Callable[[int], None] | None = None,
    transport: str = "p2p",
    stream: torch.cuda.Stream | None = None,
    load_expert: Callable[[int, int], Any] | None = None,
    ranks: Sequence[int] | None = None,
) -> PendingTransfer:
    """Start moving the weights of ``layers`` as ``plan`` says; returns at once with a :class:`PendingTransfer`.

    Call it on every rank of ``group`` with the same ``plan`` and ``layers``, then ``finish()`` on every rank.
    The arguments are those of :func:`apply_plan`, plus:

    stream : torch.cuda.Stream, optional
        CUDA only: the stream that stages, packs and checks (NCCL runs the messages on its own streams, after
        it). Default: one side stream per device, so that the copies overlap the caller's work on the current
        stream; ``finish`` makes the current stream wait for it before the commit.
    vote_group : ProcessGroup, optional
        The group that votes (default: ``group``). A gloo group over the same ranks keeps the votes off the
        GPU: with NCCL, a vote reads one number back from the device.

    Only the preparation vote blocks here (one small ``all_reduce``, so that no rank sends into a rank that
    will not receive); everything after it is queued (CUDA) or runs in gloo's threads (CPU).
    """
    _check_reloads(plan, load_expert)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    vote_group = group if vote_group is None else vote_group
    failure: _Failure | None = None
    device: torch.device | None = None
    side: torch.cuda.Stream | None = None
    clock = time.perf_counter()
    # 1. Prepare: check the arguments, then staging buffers for every slot this rank writes, local copies from
    # the old weights, packed messages of small copies. Nothing here communicates, so an exception is a bad
    # argument or a bug (or memory): it is voted on, so that the other ranks stop too, and re-raised unchanged.
    state: dict[str, Any] = {}
    try:
        tensors, rebuild = _flatten(weights)
        device = tensors[0].device
        options = {"transport": transport, "on_transfer": on_transfer, "in_place": in_place, "verify": verify}
        _check(plan, tensors, world, {**options, "stream": stream, "ranks": ranks})
        mask = _layer_mask(plan, layers)
        layout = _layout(plan, rank, world, mask, _rank_of_gpu(plan, ranks, world, mask))
        clock = _clock.lap("layout (host)", clock)
        if device.type == "cuda":
            side = stream if stream is not None else _side_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))  # the weights as the caller's stream left them
        with torch.cuda.stream(side) if side is not None else _Null(), torch.no_grad():
            keys = list(weights) if isinstance(weights, Mapping) else None
            state = _stage(plan, tensors, layout, rank, world, transport, verify, device, load_expert, keys)
        clock = _clock.lap("stage and pack", clock)
    except _ReloadFailed as err:
        failure = _Failure(err.row, err.error, True)
    except Exception as err:
        failure = _local(err)
    vote_on = _vote_device(vote_group) if device is None or vote_group is not group else device
    _vote(failure, plan, rank, world, vote_group, vote_on, "preparation")
    clock = _clock.lap("votes", clock)

    # 2. Transfer: all messages posted together. A failed message names its first copy; only errors of the
    # torch.distributed calls themselves are transfer failures, kept for finish() to vote on.
    works: list[Any] = []
    with torch.cuda.stream(side) if side is not None else _Null():
        for received, sent, received_splits, sent_splits in state["exchanges"]:
            try:
                works.append(dist.all_to_all_single(received, sent, received_splits, sent_splits, group=group,
                                                    async_op=True))  # fmt: skip
            except Exception as err:
                failure = failure or _communication(state["first_received"], err)
        messages = state["messages"]
        try:
            ops = [dist.P2POp(op, buffer, group=group, group_peer=peer) for op, buffer, peer, _ in messages]
        except Exception as err:
            ops, failure = [], failure or _local(err)
        try:
            works += dist.batch_isend_irecv(ops) if ops else []
        except Exception as err:
            failure = failure or _communication(-1, err)
        event = None
        if side is not None:
            event = torch.cuda.Event()
            event.record(side)
    _clock.lap("post messages", clock)
    return PendingTransfer(
        _plan=plan, _weights=weights, _tensors=tensors, _rebuild=rebuild, _layout=layout, _staged=state["staged"],
        _sums_in=state["sums_in"], _works=works,
        _message_rows=[state["first_received"]] * len(state["exchanges"]) + [row for *_, row in messages],
        _failure=failure, _rank=rank, _world=world, _vote_group=vote_group, _vote_on=vote_on,
        _in_place=in_place, _on_transfer=on_transfer, _device=device, _stream=side, _event=event,
        layers=tuple(int(i) for i in np.flatnonzero(mask)),
    )  # fmt: skip


def _stage(
    plan: TransferPlan,
    tensors: list[torch.Tensor],
    layout: _Layout,
    rank: int,
    world: int,
    transport: str,
    verify: bool,
    device: torch.device,
    load_expert: Callable[[int, int], Any] | None,
    keys: list[Any] | None,
) -> dict[str, Any]:
    """Staging buffers with the local copies made and the lost experts reloaded, and the messages to post (send
    buffers are views of the weights or packed gathers; receive buffers are views of the staging rows)."""
    flats = [t.view(-1, *t.shape[2:]) for t in tensors]
    staged = [t.new_empty((len(layout.staged_rows), *t.shape[2:])) for t in tensors]
    local = torch.as_tensor(layout.local_src, device=device)
    for flat, buffer in zip(flats, staged, strict=True):
        torch.index_select(flat, 0, local, out=buffer[: len(local)])
    for k, row in enumerate(layout.reload_rows.tolist(), start=len(local)):
        _reload(plan, row, load_expert, tensors, [buffer[k] for buffer in staged], keys)
    offsets = layout.received_from
    sums_in = None
    if verify and offsets[-1] > offsets[0]:
        sums_in = torch.empty((int(offsets[-1] - offsets[0]), len(tensors)), dtype=torch.int32, device=device)
    messages: list[tuple[Any, torch.Tensor, int, int]] = []  # (op, buffer, peer, first plan row)
    exchanges: list[tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = []
    first_received = int(layout.staged_rows[offsets[0]]) if offsets[-1] > offsets[0] else -1
    if transport == "all_to_all":
        sources = torch.as_tensor(np.concatenate(layout.sent_src), device=device)
        sent_splits = [len(rows) for rows in layout.sent_rows]
        received_splits = np.diff(offsets).tolist()
        for flat, buffer in zip(flats, staged, strict=True):
            packed = flat.index_select(0, sources)
            exchanges.append((buffer[offsets[0] : offsets[-1]], packed, received_splits, sent_splits))
        if verify:
            sums_out = torch.stack([_word_sums(packed) for _, packed, _, _ in exchanges], dim=1)
            sums_in = sums_in if sums_in is not None else sums_out.new_empty((0, len(tensors)))
            exchanges.append((sums_in, sums_out, received_splits, sent_splits))
        return {"staged": staged, "sums_in": sums_in, "messages": messages, "exchanges": exchanges,
                "first_received": first_received}  # fmt: skip
    for peer in range(world):
        rows, sources = layout.sent_rows[peer], layout.sent_src[peer]
        if len(rows):
            index = torch.as_tensor(sources, device=device)
            sums = []
            for flat in flats:
                if _row_bytes(flat) >= ZERO_COPY_BYTES:
                    for row, source in zip(rows.tolist(), sources.tolist(), strict=True):
                        messages.append((dist.isend, flat[source], peer, row))
                    if verify:
                        sums.append(_slot_sums(flat, index, sources))
                else:
                    packed = flat.index_select(0, index)
                    messages.append((dist.isend, packed, peer, int(rows[0])))
                    if verify:
                        sums.append(_word_sums(packed))
            if verify:
                messages.append((dist.isend, torch.stack(sums, dim=1), peer, int(rows[0])))
        begin, end = offsets[peer], offsets[peer + 1]
        if end > begin:
            first = int(layout.staged_rows[begin])
            for buffer in staged:
                if _row_bytes(buffer) >= ZERO_COPY_BYTES:
                    for k in range(begin, end):
                        messages.append((dist.irecv, buffer[k], peer, int(layout.staged_rows[k])))
                else:
                    messages.append((dist.irecv, buffer[begin:end], peer, first))
            if verify:
                messages.append((dist.irecv, sums_in[begin - offsets[0] : end - offsets[0]], peer, first))
    return {"staged": staged, "sums_in": sums_in, "messages": messages, "exchanges": exchanges,
            "first_received": first_received}  # fmt: skip


def _commit(flat: torch.Tensor, dst: torch.Tensor, dst_host: np.ndarray, staged: torch.Tensor) -> None:
    """``flat[dst[k]] = staged[k]``: one scatter, or on a GPU one copy per row for rows of at least
    ``ZERO_COPY_BYTES`` (``index_copy_`` runs at a third of the card's copy bandwidth there; a contiguous row
    copy runs at full speed, and the few launches cost less than the difference)."""
    if staged.is_cuda and _row_bytes(staged) >= ZERO_COPY_BYTES:
        for k, row in enumerate(dst_host.tolist()):
            flat[row].copy_(staged[k])
    else:
        flat.index_copy_(0, dst, staged)


class _ReloadFailed(Exception):
    """``load_expert`` raised for plan row ``row`` (a transfer failure: every rank raises TransferError)."""

    def __init__(self, row: int, error: BaseException):
        super().__init__(row, error)
        self.row, self.error = row, error


def _reload(
    plan: TransferPlan,
    row: int,
    load_expert: Callable[[int, int], Any] | None,
    tensors: list[torch.Tensor],
    rows: list[torch.Tensor],
    keys: list[Any] | None,
) -> None:
    """Fill the staging ``rows`` (one per weight tensor) of reload row ``row`` with ``load_expert(layer, expert)``.

    An exception of the callback is a transfer failure (:class:`_ReloadFailed`); a result of the wrong
    structure, shape or dtype is a ``TypeError``/``ValueError`` of this rank (a caller's bug).
    """
    if load_expert is None:  # begin() refuses such plans first; kept for direct callers
        raise ValueError(f"plan row {row} is a reload: pass load_expert=")
    layer, expert = int(plan.layer[row]), int(plan.expert[row])
    try:
        loaded = load_expert(layer, expert)
    except Exception as err:
        raise _ReloadFailed(row, err) from err
    try:
        if keys is not None and isinstance(loaded, Mapping):  # a mapping's tensors by the weights' keys
            missing = [k for k in keys if k not in loaded]
            if missing or len(loaded) != len(keys):
                raise ValueError(f"load_expert({layer}, {expert}) returned keys {list(loaded)}; weights has {keys}")
            loaded = [loaded[k] for k in keys]
        parts, _ = _flatten(loaded)
    except TypeError:
        raise TypeError(
            f"load_expert({layer}, {expert}) must return the weights of one slot with the structure of weights "
            f"(a tensor, or a sequence or mapping of tensors), got {type(loaded).__name__}"
        ) from None
    if len(parts) != len(tensors):
        raise ValueError(f"load_expert({layer}, {expert}) returned {len(parts)} tensors; weights has {len(tensors)}")
    for i, (part, tensor, dst) in enumerate(zip(parts, tensors, rows, strict=True)):
        if tuple(part.shape) != tuple(tensor.shape[2:]) or part.dtype != tensor.dtype:
            raise ValueError(
                f"load_expert({layer}, {expert}) tensor {i} must be one slot of weights tensor {i}: shape "
                f"{list(tensor.shape[2:])}, dtype {tensor.dtype}; got {list(part.shape)}, {part.dtype}"
            )
        dst.copy_(part, non_blocking=True)


def _groups(plan: TransferPlan, tensors: list[torch.Tensor], mask: np.ndarray, cap: int | None) -> list[np.ndarray]:
    """The chosen layers in groups whose staging fits ``cap`` bytes on every rank (the same groups everywhere)."""
    chosen = np.flatnonzero(mask)
    if cap is None or len(chosen) == 0:
        return [chosen]
    slot = sum(_row_bytes(t.view(-1, *t.shape[2:])) for t in tensors)
    rows = np.zeros((plan.num_layers, plan.num_gpus), dtype=np.int64)  # staging rows per layer and rank
    np.add.at(rows, (plan.layer, plan.dst_gpu), 1)
    need = rows.max(axis=1) * slot
    if (need[chosen] > cap).any():
        layer = int(chosen[np.argmax(need[chosen] > cap)])
        raise ValueError(
            f"max_staging_bytes={cap} is below layer {layer}'s staging on one rank ({int(need[layer])} bytes); "
            f"a layer moves in one piece"
        )
    groups, current, used = [], [], 0
    for layer in chosen.tolist():
        if used + need[layer] > cap and current:
            groups.append(np.asarray(current))
            current, used = [], 0
        current.append(layer)
        used += need[layer]
    groups.append(np.asarray(current))
    return groups


def apply_plan(
    plan: TransferPlan,
    weights: Any,
    *,
    layers: Iterable[int] | None = None,
    group: Any = None,
    vote_group: Any = None,
    in_place: bool = True,
    verify: bool = True,
    max_staging_bytes: int | None = None,
    on_transfer: Callable[[int], None] | None = None,
    transport: str = "p2p",
    load_expert: Callable[[int, int], Any] | None = None,
    ranks: Sequence[int] | None = None,
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
        device, contiguous, the same shapes on every rank. NCCL needs CUDA
        tensors, gloo takes CPU tensors.
    layers : iterable of int, optional
        The layers to move (default: all). Rows of other layers are left
        alone, so a plan can be carried out a few layers at a time.
    group : ProcessGroup, optional
        Default: the default group.
    vote_group : ProcessGroup, optional
        The group for the two votes (default: ``group``); see :func:`begin`.
    in_place : bool
        ``True`` (default): write the new slots into ``weights`` once all
        ranks succeeded, and return ``weights``. ``False``: leave
        ``weights`` untouched and return new tensors of the same structure.
    verify : bool
        ``True`` (default): every copy between ranks travels with a checksum
        (the sum of its 32-bit words mod 2**32, one pass over the bytes on each side)
        and a mismatch is a transfer failure. ``False`` trusts the transport.
    max_staging_bytes : int, optional
        Cap on the staging memory: the layers move in consecutive groups
        whose staging fits on every rank, each group all-or-nothing (see
        the module notes). A layer whose staging alone exceeds it is a
        ``ValueError``. Default: one group.
    on_transfer : callable, optional
        Called with the plan row of each copy this rank received, after it
        arrived and passed its checksum (for checks or progress); an
        exception marks that copy as failed.
    transport : {"p2p", "all_to_all"}
        ``"p2p"`` (default): point-to-point messages between the ranks that
        exchange copies (``batch_isend_irecv``). ``"all_to_all"``: one
        ``all_to_all_single`` per weight tensor over the whole group (every
        rank takes part; NCCL runs collectives faster than point-to-point
        pairs over NVLink). Same result and failure handling.
    load_expert : callable, optional
        ``load_expert(layer, expert)`` returns the weights of one slot of
        ``expert`` in ``layer`` (``weights``' structure, each tensor of
        shape ``[...]`` and dtype of its weights tensor, on any device),
        e.g. read from a checkpoint. Required when ``plan`` has reload rows
        (``plan_transfers(..., allow_reload=True)``: experts whose every
        replica was on failed GPUs); called on the destination rank of each
        reload row while staging, and its result is committed with the
        rest. An exception of the callback is a transfer failure (every rank
        raises :class:`TransferError` naming that row, no weights change).
    ranks : sequence of int, optional
        The rank in ``group`` of each GPU of the plan, ``-1`` for a GPU
        with no process (a failed one, or one that left); such a GPU must
        have no rows in the layers moved (no source, no destination: plan
        with ``old``/``new`` holding ``-1`` there). Default: GPU ``g`` is
        rank ``g``, and the plan has as many GPUs as the group has ranks.
        After a failure the survivors form a new group and pass, e.g.,
        ``ranks=[0, -1, 1, 2]`` for GPU 1 lost of 4.

    Returns
    -------
    Same structure as ``weights``: the weights of the new placement.

    Raises
    ------
    TransferError
        The transfer failed: a ``torch.distributed`` error (a peer that died,
        a timeout, a ``DistBackendError`` or ``RuntimeError`` of an op), a
        checksum mismatch, out of memory while staging, an exception of
        ``on_transfer``, or another rank failed. Every rank that can still
        communicate raises, naming the first failed copy (or the rank), with
        the weights of the failed group's layers unchanged;
        ``committed_layers`` lists the layers of earlier groups, already
        moved (empty without ``max_staging_bytes``).
    TypeError, ValueError
        Invalid arguments on this rank: ``plan`` not a :class:`TransferPlan`
        or for another number of ranks, or with reload rows but no
        ``load_expert`` (every rank raises it, before anything moves), a
        ``load_expert`` result of the wrong structure, shape or dtype,
        ``weights`` not tensors of shape
        ``[L, R/G, ...]`` on one device, contiguous; ``layers``,
        ``transport``, ``on_transfer``, ``in_place``, ``verify``,
        ``max_staging_bytes`` invalid. Checked before anything is staged;
        this rank raises the error unchanged after telling the others (which
        raise :class:`TransferError`). Other exceptions of eplb's own code
        (bugs) behave the same. No weights change.
    """
    _check_reloads(plan, load_expert)
    if max_staging_bytes is not None:
        if isinstance(max_staging_bytes, bool | np.bool_) or not isinstance(max_staging_bytes, int | np.integer):
            raise TypeError(f"max_staging_bytes must be an int or None, got {type(max_staging_bytes).__name__}")
        if max_staging_bytes < 1:
            raise ValueError(f"max_staging_bytes must be a positive int or None, got {max_staging_bytes!r}")
    groups = [None]
    if max_staging_bytes is not None and isinstance(plan, TransferPlan):
        tensors, _ = _flatten(weights)
        groups = _groups(plan, tensors, _layer_mask(plan, layers), int(max_staging_bytes))
    elif layers is not None:
        groups = [layers]
    committed: list[int] = []
    out = weights
    options = {"group": group, "vote_group": vote_group, "verify": verify, "on_transfer": on_transfer,
               "load_expert": load_expert, "ranks": ranks}  # fmt: skip
    for chosen in groups:
        try:
            pending = begin(plan, out, layers=chosen, in_place=in_place or bool(committed), transport=transport,
                            **options)  # fmt: skip
            out = pending.finish()
        except TransferError as err:
            err.committed_layers = tuple(committed)
            raise
        committed += list(pending.layers)
    return out
