"""Carry out a :class:`eplb.TransferPlan` on expert-sharded JAX arrays.

The weights of one kind of expert matrix are one array ``[L, R, ...]`` (any
dtype) sharded over a mesh axis of ``G`` devices along ``R``
(``PartitionSpec(None, axis)``: device ``g`` holds GPU ``g``'s slots ``[L,
R/G, ...]``); all matrices of an expert (``{"w_in": [L, R, d, f], "w_out":
[L, R, f, d]}``) form a pytree of such arrays, moved together. With
``ranks=`` (after a failure, on a mesh of the survivors) the axis has ``M``
devices for the plan's ``G`` GPUs: ``ranks[g]`` is the device of plan GPU
``g`` (``-1``: none, and no rows of the layers moved touch it), and the
arrays are ``[L, M * S, ...]`` (``S = plan.slots_per_gpu``), device ``k``
holding the slots of the GPU ``g`` with ``ranks[g] == k``; the plan is
renamed onto the devices once, up front, and moves as below. A transfer of
a group of layers is two jitted ``shard_map`` programs:

1. *transfer and verify* (the weights are only read): every device gathers
   what it sends into a buffer ``[G, K, ...]`` per array (``K``: the most
   copies between one pair of devices in the group), one ``all_to_all`` per
   array exchanges them and, with ``verify=True``, one more carries a uint32
   checksum per copy, computed by the sender and compared with the receiver's
   own. Outputs: the *update buffer* of each device (the copies received,
   without the buffer's padding, and the experts reloaded, second copies of
   them, then, with ``donate=True`` and XLA's copies only, the copies within
   the device whose old slot the commit overwrites, read from it), and ``ok
   [G, G, K]``. Reload rows (a plan from ``plan_transfers(...,
   allow_reload=True)``) are read on the host with the caller's
   ``load_expert(layer, expert)`` before this program is dispatched and
   enter it as one more input per array. A group with no copies between
   devices, no reloads and nothing to stage runs no transfer program.
2. *commit*, dispatched only after the host has read ``ok`` (the one host
   read): with ``donate=True`` the update buffer's rows and the other copies
   within the device written into the donated weights, in place; otherwise
   one gather of every new slot from ``[old slots; update buffer]`` into new
   arrays. On GPUs the row copies (the commit's, and the transfer program's
   gathers) are Pallas kernels (:mod:`eplb.kernels.copy_pallas`, Triton
   lowering: every moved byte read and written once); with donation they
   move a layer's copies within the device in place with no staging, also
   in cycles. Elsewhere XLA's gather and scatter (``COPY_KERNEL``).

:func:`begin` dispatches step 1 and returns a :class:`PendingTransfer`, so
the caller can dispatch compute meanwhile (JAX dispatch is asynchronous);
:meth:`PendingTransfer.finish` checks and commits. :func:`apply_plan` is
``begin(...).finish()``, optionally one layer group at a time
(:func:`layer_groups`) so that one group's buffers are alive at a time. Index
arrays are built from the plan on the host with numpy, one ``int32`` array
per group and one ``device_put``. This host work is memoised per plan object
(the last :data:`CACHED_PLANS` plans): a call with a plan seen before (its
arrays compared with a copy taken then, so a plan written in place is built
again), the same mesh, axis, layers, ``ranks``, ``capacity``, ``verify``,
``fault`` and bytes per slot reuses its checks, layer groups, index arrays and
their device copies, and costs the argument checks of what varies (weights,
``load_expert``) and the programs' dispatches (about 0.03 ms on a 2-core CPU,
against 0.25-0.3 ms for a new plan). A transfer failure (a checksum mismatch,
or an XLA runtime error of either program) raises :class:`eplb.TransferError`
with the old weights intact (see :func:`apply_plan` for groups and
donation); invalid arguments and errors while tracing a program (bugs)
propagate unchanged.

:func:`make_transfer` and :func:`plan_arrays` are the single-program form:
one jitted function ``weights -> (new weights, ok)`` that can sit inside the
caller's ``jax.jit`` (the caller then checks ``ok`` before using the new
weights); it takes no ``ranks`` (the plan's GPU ``g`` is device ``g``) and no
reload rows.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eplb.migration import TransferError, TransferPlan

__all__ = ["PendingTransfer", "PlanArrays", "apply_plan", "begin", "layer_groups", "make_transfer", "plan_arrays"]


class PlanArrays(NamedTuple):
    """A plan as per-device index arrays (numpy, leading axis = device), see :func:`plan_arrays`.

    Attributes
    ----------
    send : int32 [G, G, K]
        ``send[s, d, k]``: local flat slot ``layer * (R/G) + slot`` that
        device ``s`` sends as its ``k``-th copy to device ``d`` (0 if unused).
    gather : int32 [G, L * R/G]
        Per device and local flat slot, where its new weights come from: its
        own old slots ``0 .. L*R/G - 1``, then the received buffer (``src * K
        + k`` after them).
    second : int32 [G, L * R/G]
        Then, per flat slot, the new slot to copy (itself unless a stage-1
        copy of an expert received in the first step).
    row : int32 [G, G, K]
        ``row[d, s, k]``: the plan row that device ``d`` receives from ``s``
        as copy ``k`` (-1 if unused).
    """

    send: np.ndarray
    gather: np.ndarray
    second: np.ndarray
    row: np.ndarray


def _rank_within(keys: np.ndarray) -> np.ndarray:
    """``[N]`` int64: how many earlier entries of ``keys [N]`` have the same key (0 for the first of each)."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - run_start
    return rank


def _pair_need(plan: TransferPlan) -> int:
    pairs = plan.src_gpu[plan.remote] * plan.num_gpus + plan.dst_gpu[plan.remote]
    return int(np.bincount(pairs, minlength=plan.num_gpus * plan.num_gpus).max(initial=0))


def _check_capacity(capacity: int | None, need: int) -> int:
    capacity = max(need, 1) if capacity is None else int(capacity)
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be positive")
    if capacity < need:
        raise ValueError(f"capacity={capacity} is below the plan's {need} copies between one pair of devices")
    return capacity


def plan_arrays(plan: TransferPlan, capacity: int | None = None) -> PlanArrays:
    """Index arrays for :func:`make_transfer` from ``plan``.

    ``capacity`` (``K``): copies per (sender, receiver) pair; at least the
    plan's largest, which is the default (at least 1). A fixed capacity lets
    plans of different sizes share one compiled program. Copies between one
    pair of devices take ``k = 0, 1, ...`` in plan order. A plan with reload
    rows is a ``ValueError`` (:func:`apply_plan` and :func:`begin` take them,
    with ``load_expert``).
    """
    if plan.reload.any():
        raise ValueError(
            "plan has reload rows (src_gpu == -1, from plan_transfers(..., allow_reload=True)), which the "
            "single-program form cannot carry out: use apply_plan or begin with load_expert="
        )
    num_gpus, per_gpu, num_layers = plan.num_gpus, plan.slots_per_gpu, plan.num_layers
    capacity = _check_capacity(capacity, _pair_need(plan))
    flat = num_layers * per_gpu
    send = np.zeros((num_gpus, num_gpus, capacity), dtype=np.int32)
    row = np.full((num_gpus, num_gpus, capacity), -1, dtype=np.int32)
    gather = np.tile(np.arange(flat, dtype=np.int32), (num_gpus, 1))
    second = gather.copy()
    src, dst = plan.src_gpu, plan.dst_gpu
    target = plan.layer * per_gpu + plan.dst_slot
    source = plan.layer * per_gpu + plan.src_slot
    stage1 = plan.stage == 1
    second[dst[stage1], target[stage1]] = source[stage1]
    first = np.flatnonzero(~stage1)  # in plan order: a later row for the same slot wins, as in a loop
    remote = src[first] != dst[first]
    moved = first[remote]
    k = np.zeros(len(first), dtype=np.int64)
    k[remote] = _rank_within(src[moved] * num_gpus + dst[moved])
    send[src[moved], dst[moved], k[remote]] = source[moved]
    row[dst[moved], src[moved], k[remote]] = moved
    gather[dst[first], target[first]] = np.where(remote, flat + src[first] * capacity + k, source[first])
    return PlanArrays(send, gather, second, row)


def _words(x: jax.Array) -> jax.Array:
    """``x [..., D]`` as uint32 words ``[..., W]``: its bytes 4 at a time when a row's bytes allow, else one word per
    element (zero-extended)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(*x.shape[:-1], -1)
    per = 4 // size
    if x.shape[-1] % per == 0:
        return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, per), jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """uint32 ``[...]`` per row of ``x [..., D]``: ``sum_i (2i + 1) * word_i mod 2**32`` over the row's 32-bit words.

    One fused pass (bitcast, multiply, reduce). Every odd weight is invertible mod 2**32, so any error confined to one
    word (every single-bit flip) changes the sum; a random corruption goes unnoticed with probability about 2**-32.
    """
    words = _words(x)
    weights = jnp.arange(words.shape[-1], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(words * weights, axis=-1, dtype=jnp.uint32)


def _bytes(x: jax.Array) -> jax.Array:
    """``x [..., D]`` as uint8 ``[..., D * itemsize]``."""
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(*x.shape[:-1], -1)


def _flip_first_bit(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x [G, K, D]`` with the lowest bit of the first byte flipped where ``mask [G, K]``."""
    data = _bytes(x)
    data = data.at[:, :, 0].set(jnp.where(mask, data[:, :, 0] ^ jnp.uint8(1), data[:, :, 0]))
    size = x.dtype.itemsize
    data = data.reshape(*x.shape, size) if size > 1 else data.reshape(x.shape)
    return jax.lax.bitcast_convert_type(data, x.dtype)


def make_transfer(mesh: Mesh, axis_name: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A jitted ``transfer(weights, send, gather, second, corrupt) -> (new_weights, ok)``: one program.

    ``weights [L, R, ...]`` is sharded ``PartitionSpec(None, axis_name)``;
    ``send``, ``gather``, ``second`` are :class:`PlanArrays` fields and
    ``corrupt`` a bool ``[G, G, K]`` (all false except to test failure
    handling: it flips the received copies it marks), each sharded over
    ``axis_name`` on its leading axis. ``ok [G, G, K]`` tells, per receiving
    device, sender and copy, whether the received bytes match the sender's
    checksum (unused entries are true). Compiled once per shape and
    capacity; the plan itself is data. It builds every new slot, so it holds
    a full new ``[L, R, ...]`` beside the old one; :func:`apply_plan` and
    :func:`begin` materialise only the received copies before committing.
    """
    num_devices = mesh.shape[axis_name]
    by_device = PartitionSpec(axis_name)

    def local(weights: jax.Array, send: jax.Array, gather: jax.Array, second: jax.Array, corrupt: jax.Array) -> Any:
        layers, per_gpu = weights.shape[:2]
        flat = weights.reshape(layers * per_gpu, -1)  # [L*s, D]
        capacity = send.shape[-1]
        outgoing = jnp.take(flat, send[0].reshape(-1), axis=0).reshape(num_devices, capacity, -1)  # [G, K, D]
        sums = _checksum(outgoing)  # [G, K]
        incoming = jax.lax.all_to_all(outgoing, axis_name, 0, 0, tiled=True)  # [G (sender), K, D]
        incoming_sums = jax.lax.all_to_all(sums, axis_name, 0, 0, tiled=True)
        incoming = _flip_first_bit(incoming, corrupt[0])  # a no-op unless a test marks copies
        ok = _checksum(incoming) == incoming_sums
        both = jnp.concatenate([flat, incoming.reshape(num_devices * capacity, -1)], axis=0)
        new = jnp.take(both, gather[0], axis=0)
        new = jnp.take(new, second[0], axis=0)
        return new.reshape(weights.shape), ok[None]

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(None, axis_name), by_device, by_device, by_device, by_device),
        out_specs=(PartitionSpec(None, axis_name), by_device),
    )
    return jax.jit(mapped)


@functools.lru_cache(maxsize=16)
def _cached_transfer(mesh: Mesh, axis_name: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    return make_transfer(mesh, axis_name)


# ----------------------------------------------------------------------------------------------------------------
# The two-program form: transfer + verify, then commit.


class _Sizes(NamedTuple):
    """Static sizes of a group's programs, per device: ``K`` copies per device pair (0: the group has no copies
    between devices and takes no ``capacity``; nothing is exchanged), ``incoming`` rows of the update buffer read
    from the received buffer (received copies and reloads, then second copies of them), ``local`` rows read
    from old slots (*staged* copies within the device: with donation only, and only those whose old slot the
    commit overwrites), ``full``: the flat slots ``L * R/G`` of a whole-array gather (0 when the commit writes
    into donated weights), ``reloads``: rows of the reload buffer (the most reload rows of one device; 0: the
    program takes no reload buffer), and ``direct``: copies within the device that the commit into donated
    weights makes straight from old slots (their slot is no commit's target); all but ``capacity`` and ``full``
    rounded up by :func:`_round_up`. Without donation the gather reads every copy within the device from the old
    slots, so ``local`` and ``direct`` are 0. ``per_layer`` (the copy kernel with donation): every copy within a
    device is direct, none staged, laid out per layer of the group (``direct = layers * per_layer``, a layer's
    copies at ``position * per_layer + j``) for :func:`eplb.kernels.copy_pallas.permute_rows`, which reads all
    of a layer's old slots before writing them; 0: a flat list.

    A device's index row: ``send [G*K]`` (the flat slot sent as copy ``k`` to device ``d``, at ``d*K + k``), then
    ``targets [incoming + local]`` (the flat slot each row of the update buffer goes to; past the end: unused),
    ``incoming_rows [incoming]`` (rows of ``[received buffer [G*K], sender-major; reload buffer [reloads]]``),
    ``local_sources [local]`` (old flat slots), ``direct_targets [direct]`` (past the end: unused),
    ``direct_sources [direct]`` (old flat slots), then ``gather [full]`` (per flat slot, its row of ``[old
    slots; update buffer]``).
    """

    capacity: int
    incoming: int
    local: int
    full: int = 0
    reloads: int = 0
    direct: int = 0
    per_layer: int = 0

    @property
    def updates(self) -> int:
        """Rows of the update buffer."""
        return self.incoming + self.local

    def width(self, num_devices: int) -> int:
        return num_devices * self.capacity + 2 * self.updates + 2 * self.direct + self.full

    def staged(self) -> bool:
        """Whether the group needs the transfer program (copies between devices, reloads or staged rows)."""
        return self.capacity > 0 or self.updates > 0


def _round_up(n: int) -> int:
    """``n`` rounded up to a multiple of 1/16 of the power of two at or above it (at most 1/8 more; ``n <= 16``
    unchanged): eight sizes per doubling to compile for, little padding to move."""
    n = int(n)
    if n <= 16:
        return max(n, 0)
    step = (1 << (n - 1).bit_length()) // 16
    return -(-n // step) * step


def _local_block(x: jax.Array) -> jax.Array:
    """A device's block ``[L, s, ...]`` as flat slots ``[L*s, ...]``."""
    return x.reshape(-1, *x.shape[2:])


@functools.lru_cache(maxsize=32)
def _stage_program(mesh: Mesh, axis_name: str, verify: bool, faulty: bool) -> Callable[..., Any]:
    """Jitted ``(leaves, idx, corrupt, sizes, reloaded=None) -> (updates, ok)``: gather, checksum, ``all_to_all``,
    verify.

    ``updates``: per leaf ``[G (device), incoming + local, ...]``, the copies the device received, its reloads
    and the second copies of those experts (gathered from the received and reload buffers, without padding),
    then the copies within the device (read from its old slots); everything the commit writes. ``ok [G, G, K]``
    (per receiver, sender, copy), or ``None`` without ``verify``. ``corrupt [G, G, K]`` flips the marked
    received copies (tests; ``None`` unless ``faulty``). ``reloaded``: per leaf ``[G, sizes.reloads, ...]``,
    sharded over the devices, the experts each device reloads (``None`` when ``sizes.reloads == 0``).
    """
    num_devices = mesh.shape[axis_name]
    by_device, by_slot = PartitionSpec(axis_name), PartitionSpec(None, axis_name)

    def run(
        leaves: list[jax.Array],
        idx: jax.Array,
        corrupt: jax.Array | None,
        sizes: _Sizes,
        reloaded: list[jax.Array] | None = None,
        kernel: str | None = None,
    ) -> Any:
        capacity, width = sizes.capacity, num_devices * sizes.capacity
        start = width + sizes.updates

        def local(leaves: list[jax.Array], idx: jax.Array, *extra: Any) -> Any:
            corrupt = extra[:1] if faulty else ()
            loaded = extra[-1] if sizes.reloads else [None] * len(leaves)
            send = idx[0, :width]
            incoming_rows = idx[0, start : start + sizes.incoming]
            local_sources = idx[0, start + sizes.incoming : start + sizes.updates]
            updates, sent_sums, got_sums = [], [], []
            for weights, reload in zip(leaves, loaded, strict=True):
                flat, rest = _local_block(weights), weights.shape[2:]
                received = None
                if capacity:  # copies between devices: exchange (and checksum) them
                    outgoing = _gather(flat, send, kernel).reshape(num_devices, capacity, *rest)
                    if verify:
                        sent_sums.append(_checksum(outgoing.reshape(num_devices, capacity, -1)))
                    incoming = jax.lax.all_to_all(outgoing, axis_name, 0, 0, tiled=True)  # [G (sender), K, ...]
                    if faulty:
                        bad = _flip_first_bit(incoming.reshape(num_devices, capacity, -1), corrupt[0][0])
                        incoming = bad.reshape(incoming.shape)
                    if verify:
                        got_sums.append(_checksum(incoming.reshape(num_devices, capacity, -1)))
                    received = incoming.reshape(width, *rest)
                if reload is not None:  # the reload buffer after the received one
                    received = reload[0] if received is None else jnp.concatenate([received, reload[0]], axis=0)
                parts = []
                if sizes.incoming:
                    parts.append(_gather(received, incoming_rows, kernel))
                if sizes.local:
                    parts.append(_gather(flat, local_sources, kernel))
                if not parts:  # only padding copies travel (a fixed capacity): an empty update buffer
                    parts.append(jnp.zeros((0, *rest), weights.dtype))
                updates.append((jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0])[None])
            if not verify:
                return updates
            if not capacity:
                return updates, jnp.ones((1, num_devices, 0), dtype=bool)
            sums = jax.lax.all_to_all(jnp.stack(sent_sums, axis=-1), axis_name, 0, 0, tiled=True)
            ok = jnp.all(jnp.stack(got_sums, axis=-1) == sums, axis=-1)
            return updates, ok[None]

        extra = ((corrupt,) if faulty else ()) + ((reloaded,) if sizes.reloads else ())
        mapped = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(by_slot, by_device) + (by_device,) * len(extra),
            out_specs=(by_device, by_device) if verify else by_device,
            **({"check_vma": False} if kernel else {}),  # pallas_call's outputs carry no varying-axes type
        )
        out = mapped(leaves, idx, *extra)
        return out if verify else (out, None)

    return jax.jit(run, static_argnums=(3, 5))


def _gather(x: jax.Array, rows: jax.Array, kernel: str | None) -> jax.Array:
    """``x[rows]`` along the first axis (rows in range): XLA's gather, or one :func:`~eplb.kernels.copy_pallas.
    copy_rows` launch with ``kernel``."""
    if kernel is None:
        return jnp.take(x, rows, axis=0)
    from eplb.kernels import copy_pallas

    count = rows.shape[0]
    index = jnp.stack([rows.astype(jnp.int32), jnp.arange(count, dtype=jnp.int32)])
    flat = copy_pallas.copy_rows(count, [x.reshape(x.shape[0], -1)], index, interpret=kernel == "interpret")
    return flat.reshape(count, *x.shape[1:])


@functools.lru_cache(maxsize=32)
def _commit_program(mesh: Mesh, axis_name: str, donate: bool) -> Callable[..., Any]:
    """Jitted ``(leaves, updates, idx, sizes, kernel=None) -> new leaves`` (``updates``: ``None`` when the group
    staged nothing).

    With ``donate``: the update buffer's rows and the direct copies within the device written into the donated
    weights, in place (distinct targets; padding rows target past the end and are dropped). Without: gather
    every new slot from ``[old slots; update buffer]`` in one pass (XLA fuses the concatenation into the gather;
    on a CPU several times faster than a copy and a scatter). ``kernel``: ``None`` for XLA's gather and scatter;
    ``"triton"`` (GPUs) or ``"interpret"`` (tests) for one :func:`eplb.kernels.copy_pallas.copy_rows` launch per
    array instead (every moved byte read once and written once: in place with ``donate``).
    """
    num_devices = mesh.shape[axis_name]
    by_device, by_slot = PartitionSpec(axis_name), PartitionSpec(None, axis_name)

    def run(
        leaves: list[jax.Array],
        updates: list[jax.Array] | None,
        idx: jax.Array,
        sizes: _Sizes,
        kernel: str | None = None,
    ) -> Any:
        width, rows = num_devices * sizes.capacity, sizes.updates
        direct = width + 2 * rows

        def local(leaves: list[jax.Array], idx: jax.Array, *updates: list[jax.Array]) -> Any:
            out = []
            for number, weights in enumerate(leaves):
                flat = _local_block(weights)
                update = updates[0][number][0] if updates else None
                targets = idx[0, width : width + rows]
                direct_targets = idx[0, direct : direct + sizes.direct]
                direct_sources = idx[0, direct + sizes.direct : direct + 2 * sizes.direct]
                gather = idx[0, sizes.width(num_devices) - sizes.full :]
                if kernel is not None:
                    new = _kernel_commit(
                        flat, update, targets, direct_targets, direct_sources, gather, donate, kernel, sizes.per_layer
                    )
                elif donate:
                    new = flat
                    if sizes.direct:  # XLA reads the old slots before the scatter writes
                        moved = jnp.take(flat, direct_sources, axis=0)
                        new = new.at[direct_targets].set(moved, mode="drop", unique_indices=True)
                    if update is not None and rows:
                        new = new.at[targets].set(update, mode="drop", unique_indices=True)
                else:
                    both = flat if update is None else jnp.concatenate([flat, update], axis=0)
                    new = jnp.take(both, gather, axis=0)
                out.append(new.reshape(weights.shape))
            return out

        extra = () if updates is None else (updates,)
        specs = {"in_specs": (by_slot, by_device) + (by_device,) * len(extra), "out_specs": by_slot}
        # pallas_call's outputs carry no varying-axes type: the kernel path skips shard_map's check of them
        mapped = jax.shard_map(local, mesh=mesh, **specs, **({"check_vma": False} if kernel else {}))
        return mapped(leaves, idx, *extra)

    return jax.jit(run, static_argnums=(3, 4), donate_argnums=(0,) if donate else ())


def _kernel_commit(
    flat: jax.Array,
    update: jax.Array | None,
    targets: jax.Array,
    direct_targets: jax.Array,
    direct_sources: jax.Array,
    gather: jax.Array,
    donate: bool,
    kernel: str,
    per_layer: int = 0,
) -> jax.Array:
    """The commit of one array on ``[flat slots, D]``: one :func:`~eplb.kernels.copy_pallas.copy_rows` launch
    (with ``per_layer``, after one :func:`~eplb.kernels.copy_pallas.permute_rows` of the copies within the
    device, which read the old slots before the update buffer's rows land)."""
    from eplb.kernels import copy_pallas

    slots = flat.shape[0]
    rows2d = flat.reshape(slots, -1)
    sources = [] if update is None else [update.reshape(update.shape[0], -1)]
    interpret = kernel == "interpret"
    if donate and per_layer:
        pairs = jnp.stack([direct_sources, direct_targets], axis=-1).reshape(-1, per_layer, 2)
        rows2d = copy_pallas.permute_rows(rows2d, pairs, interpret=interpret)
        direct_sources = direct_targets = direct_sources[:0]
    if donate:  # in place: the update buffer's rows (after the old slots), then the direct copies
        index = jnp.stack(
            [
                jnp.concatenate([slots + jnp.arange(targets.shape[0], dtype=jnp.int32), direct_sources]),
                jnp.concatenate([targets, direct_targets]),
            ]
        )
        new = copy_pallas.copy_rows(rows2d, [copy_pallas.SELF, *sources], index, interpret=interpret)
    else:  # a fresh array: every slot from [old slots; update buffer]
        index = jnp.stack([gather, jnp.arange(slots, dtype=jnp.int32)])
        new = copy_pallas.copy_rows(slots, [rows2d, *sources], index, interpret=interpret)
    return new.reshape(flat.shape)


def _copy_kernel(job: _Job) -> str | None:
    """The commit's copy kernel for ``job`` (see :func:`_commit_program`): ``"triton"`` on GPUs when every array
    suits :func:`eplb.kernels.copy_pallas.copy_rows`, else ``None`` (XLA). ``COPY_KERNEL`` overrides it."""
    mode = COPY_KERNEL
    if mode == "auto":
        mode = "triton" if all(device.platform == "gpu" for device in job.mesh.devices.flat) else None
    if mode is None:
        return None
    try:
        from eplb.kernels import copy_pallas
    except ImportError:  # pragma: no cover - a JAX without Pallas
        return None
    num_devices = job.mesh.shape[job.axis_name]
    for leaf in job.leaves:
        elements = math.prod(leaf.shape) // num_devices
        row = math.prod(leaf.shape[2:])
        # Triton indexes with 32-bit offsets up to 4 GB of one block (signed: 2**31 elements), 64-bit beyond.
        if (
            not copy_pallas.supported(leaf.dtype)
            or row >= 2**31 - 2**20
            or (elements >= 2**31 and elements * np.dtype(leaf.dtype).itemsize <= 2**32)
        ):
            return None
    return mode


COPY_KERNEL: str | None = "auto"
"""The commit's copy kernel: ``"auto"`` (Triton on GPUs, XLA elsewhere), ``"triton"``, ``"interpret"`` (Pallas'
interpreter: tests on a CPU) or ``None`` (XLA's gather and scatter)."""


_REMOTE, _OLD, _DUP, _RELOAD = 0, 1, 2, 3


class _GroupPlan(NamedTuple):
    """A group's host inputs (see :meth:`_Job.group_plan`)."""

    idx: np.ndarray  # [G, width] int32
    row_map: np.ndarray  # [G, G, K]
    sizes: _Sizes
    copies: int  # copies between devices
    faulty: bool  # the group holds the fault row


class _Job(NamedTuple):
    """A validated call: the weights' leaves and the plan rows of the moved layers, classified (host data)."""

    plan: TransferPlan
    mesh: Mesh
    axis_name: str
    treedef: Any
    leaves: list[Any]
    slot_bytes: int
    layers: np.ndarray  # [n] the requested layers, ascending
    rows: np.ndarray  # [T'] plan rows of those layers
    # [T'] _REMOTE, _OLD (from a slot's old weights on the destination), _DUP (from a received or reloaded copy),
    # _RELOAD (from load_expert)
    kind: np.ndarray
    read: np.ndarray  # [T'] _OLD: flat old slot on the destination; _DUP: position in ``rows`` of the copy it repeats
    capacity: int | None
    verify: bool
    fault: int | None
    load_expert: Callable[[int, int], Any] | None = None
    # The caller's plan when ``plan`` is it remapped onto the mesh (``ranks=``): errors name its rows' GPUs.
    origin: TransferPlan | None = None
    # Results of split / arrays / group_plan / on_devices / kernel, shared by every call of the same plan and
    # options (see _prepare); None: not memoised.
    memo: dict[Any, Any] | None = None

    @property
    def caller_plan(self) -> TransferPlan:
        """The plan as the caller passed it (GPU ids of the plan, not mesh positions)."""
        return self.plan if self.origin is None else self.origin

    def _memoised(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per ``key`` when the job is memoised (exceptions are not kept)."""
        if self.memo is None:
            return make()
        try:
            return self.memo[key]
        except KeyError:
            value = make()
            if len(self.memo) >= _MEMO_ENTRIES:  # keep the reload rows (see _prepare), drop the rest
                kept = {"reloads": self.memo["reloads"]}
                self.memo.clear()
                self.memo.update(kept)
            self.memo[key] = value
            return value

    def split(self, layers_per_group: int | None, max_staging_bytes: int | None) -> list[np.ndarray]:
        """The layers with copies, ascending, in consecutive groups within both bounds."""
        key = ("split", layers_per_group, max_staging_bytes)
        return list(self._memoised(key, lambda: _read_only(self._split(layers_per_group, max_staging_bytes))))

    def _split(self, layers_per_group: int | None, max_staging_bytes: int | None) -> list[np.ndarray]:
        plan, num_devices = self.plan, self.plan.num_gpus
        layer = plan.layer[self.rows]
        active = np.unique(layer)
        if layers_per_group is None and max_staging_bytes is None:
            return [active] if len(active) else []
        src, dst = plan.src_gpu[self.rows], plan.dst_gpu[self.rows]
        position = np.searchsorted(active, layer)
        remote = self.kind == _REMOTE
        pairs = np.zeros((len(active), num_devices * num_devices), dtype=np.int64)
        np.add.at(pairs, (position[remote], src[remote] * num_devices + dst[remote]), 1)
        per_device = {}
        for kind, mask in (
            ("incoming", self.kind != _OLD),
            ("local", self.kind == _OLD),
            ("reloads", self.kind == _RELOAD),
        ):
            counts = np.zeros((len(active), num_devices), dtype=np.int64)
            np.add.at(counts, (position[mask], dst[mask]), 1)
            per_device[kind] = counts
        limit = layers_per_group or len(active)
        groups: list[list[int]] = []
        totals = None
        for i in range(len(active)):
            layer_counts = (pairs[i], per_device["incoming"][i], per_device["local"][i], per_device["reloads"][i])
            if max_staging_bytes is not None and self._staging_bytes(*layer_counts) > max_staging_bytes:
                raise ValueError(
                    f"max_staging_bytes={max_staging_bytes} is below layer {int(active[i])}'s staging estimate "
                    f"({self._staging_bytes(*layer_counts)} bytes per device; see layer_groups)"
                )
            grown = layer_counts if totals is None else tuple(a + b for a, b in zip(totals, layer_counts, strict=True))
            fits = totals is not None and len(groups[-1]) < limit
            if fits and max_staging_bytes is not None:
                fits = self._staging_bytes(*grown) <= max_staging_bytes
            if fits:
                groups[-1].append(int(active[i]))
                totals = grown
            else:
                groups.append([int(active[i])])
                totals = layer_counts
        return [np.asarray(group, dtype=np.int64) for group in groups]

    def _staging_bytes(self, pairs: np.ndarray, incoming: np.ndarray, local: np.ndarray, reloads: np.ndarray) -> int:
        """Per device: the sent and received buffers ``2 * G * K``, the update buffer and its copy, reload buffer."""
        capacity = _check_capacity(self.capacity, int(pairs.max(initial=0)))
        updates = _round_up(int(incoming.max(initial=0))) + _round_up(int(local.max(initial=0)))
        reloaded = _round_up(int(reloads.max(initial=0)))
        return (2 * (self.plan.num_gpus * capacity + updates) + reloaded) * self.slot_bytes

    def arrays(
        self, group: np.ndarray, full: bool = False, grouped: bool = False
    ) -> tuple[np.ndarray, np.ndarray, _Sizes]:
        """``idx [G, width] int32`` (one ``device_put``), ``row_map [G, G, K]`` (the plan row device ``d`` receives
        from ``s`` as copy ``k``, -1 if unused) and the static sizes of the group ``group`` (layers); with ``full``
        also the whole-array gather of a commit without donation.

        Copies within a device are staged (read into the update buffer by the transfer program) only with
        donation (not ``full``) and only when their old slot is the target of a copy of the group; the others are
        read from the old slots by the commit (the gather, or the direct copies). ``grouped`` (the copy kernel's
        commit with donation): none is staged; the direct copies are laid out per layer (``_Sizes.per_layer``)
        unless a layer has more than :data:`eplb.kernels.copy_pallas.MAX_GROUP` of them on one device.

        Memoised (read-only arrays) when the job is."""
        if self.memo is None:
            return self._arrays(group, full, grouped)
        limit = None
        if grouped and not full:
            from eplb.kernels.copy_pallas import MAX_GROUP as limit
        return self._memoised(
            ("arrays", group.tobytes(), full, grouped, limit), lambda: self._frozen(group, full, grouped)
        )

    def _frozen(self, group: np.ndarray, full: bool, grouped: bool) -> tuple[np.ndarray, np.ndarray, _Sizes]:
        idx, row_map, sizes = self._arrays(group, full, grouped)
        _read_only([idx, row_map])
        return idx, row_map, sizes

    def group_plan(self, group: np.ndarray, full: bool, kernel: str | None) -> _GroupPlan:
        """What :class:`PendingTransfer` needs on the host for the group ``group``: :meth:`arrays` (``grouped``
        with a copy kernel), the copies between devices and whether the group holds the ``fault`` row; memoised
        when the job is."""
        return self._memoised(("group", group.tobytes(), full, kernel), lambda: self._group_plan(group, full, kernel))

    def _group_plan(self, group: np.ndarray, full: bool, kernel: str | None) -> _GroupPlan:
        idx, row_map, sizes = self.arrays(group, full=full, grouped=kernel is not None)
        faulty = self.fault is not None and bool((row_map == self.fault).any())
        return _GroupPlan(idx, row_map, sizes, int((row_map >= 0).sum()), faulty)

    def on_devices(
        self, group: np.ndarray, full: bool, kernel: str | None, host: _GroupPlan
    ) -> tuple[jax.Array, jax.Array | None]:
        """The index array of the group ``group`` (``host``: its :meth:`group_plan` with ``full`` and ``kernel``)
        and, with a fault in it, its
        corruption mask ``[G, G, K]``, sharded over the devices (one ``device_put`` each); memoised when the job
        is, so that a repeated call puts nothing on the devices (made again if the caller deleted them, e.g.
        every live array). A failure raises as it is (a ``RuntimeError``) and is not memoised."""
        key = ("device", group.tobytes(), full, kernel)
        arrays = self._memoised(key, lambda: self._on_devices(host))
        if any(array is not None and array.is_deleted() for array in arrays):
            self.memo.pop(key, None)
            arrays = self._memoised(key, lambda: self._on_devices(host))
        return arrays

    def _on_devices(self, host: _GroupPlan) -> tuple[jax.Array, jax.Array | None]:
        spread = NamedSharding(self.mesh, PartitionSpec(self.axis_name))
        corrupt = jax.device_put(host.row_map == self.fault, spread) if host.faulty else None
        return jax.device_put(host.idx, spread), corrupt

    def kernel(self) -> str | None:
        """:func:`_copy_kernel` of the job (memoised per :data:`COPY_KERNEL` and the leaves' shapes and dtypes)."""
        leaves = tuple((leaf.shape, np.dtype(leaf.dtype)) for leaf in self.leaves)
        return self._memoised(("kernel", COPY_KERNEL, leaves), lambda: _copy_kernel(self))

    def _arrays(self, group: np.ndarray, full: bool, grouped: bool) -> tuple[np.ndarray, np.ndarray, _Sizes]:
        plan, num_devices = self.plan, self.plan.num_gpus
        per_gpu = plan.slots_per_gpu
        flat = plan.num_layers * per_gpu
        mine = np.flatnonzero(_in_group(plan.layer[self.rows], group, plan.num_layers))
        rows = self.rows[mine]
        kind, read = self.kind[mine], self.read[mine]
        src, dst = plan.src_gpu[rows], plan.dst_gpu[rows]
        target = plan.layer[rows] * per_gpu + plan.dst_slot[rows]
        remote, locals_, dups, reloads = kind == _REMOTE, kind == _OLD, kind == _DUP, kind == _RELOAD
        olds = np.zeros(len(rows), dtype=bool)  # staged copies within a device
        per_layer = 0
        if grouped and not full:
            from eplb.kernels.copy_pallas import MAX_GROUP

            in_layer = _rank_within(dst[locals_] * plan.num_layers + plan.layer[rows][locals_])
            per_layer = _round_up(int(in_layer.max(initial=-1)) + 1)
            if per_layer > MAX_GROUP:
                per_layer = 0
        if not full and not per_layer:
            written = np.zeros(num_devices * flat, dtype=bool)
            written[dst * flat + target] = True
            olds[locals_] = written[dst[locals_] * flat + read[locals_]]
        direct = locals_ & ~olds & (not full)
        k = np.zeros(len(rows), dtype=np.int64)
        k[remote] = _rank_within(src[remote] * num_devices + dst[remote])
        inbound = remote | dups | reloads
        slot = np.zeros(len(rows), dtype=np.int64)  # row of the update buffer among the device's inbound (or local)
        slot[inbound] = _rank_within(dst[inbound] * 2 + dups[inbound])
        firsts = np.bincount(dst[remote | reloads], minlength=num_devices)
        slot[dups] += firsts[dst[dups]]  # after the received and reloaded copies
        slot[olds] = _rank_within(dst[olds])
        reload_slot = _rank_within(dst[reloads])  # row of the device's reload buffer, plan order
        direct_slot = _rank_within(dst[direct])
        if per_layer:
            direct_slot = np.searchsorted(group, plan.layer[rows][direct]) * per_layer + in_layer
        need = int(k[remote].max(initial=-1)) + 1
        sizes = _Sizes(
            0 if self.capacity is None and need == 0 else _check_capacity(self.capacity, need),
            _round_up(int(slot[inbound].max(initial=-1)) + 1),
            _round_up(int(slot[olds].max(initial=-1)) + 1),
            flat if full else 0,
            _round_up(int(reload_slot.max(initial=-1)) + 1),
            len(group) * per_layer if per_layer else _round_up(int(direct_slot.max(initial=-1)) + 1),
            per_layer,
        )
        capacity, width = sizes.capacity, num_devices * sizes.capacity
        targets, sources = width, width + sizes.updates  # column offsets, see _Sizes
        row = np.where(olds, sizes.incoming + slot, slot)  # row of the update buffer
        idx = np.zeros((num_devices, sizes.width(num_devices)), dtype=np.int64)
        idx[:, targets:sources] = flat + np.arange(sizes.updates)  # unused rows: distinct targets past the end
        source = plan.layer[rows] * per_gpu + plan.src_slot[rows]
        idx[src[remote], dst[remote] * capacity + k[remote]] = source[remote]
        staged = inbound | olds
        idx[dst[staged], targets + row[staged]] = target[staged]
        direct_targets = sources + sizes.updates
        direct_sources = direct_targets + sizes.direct
        idx[:, direct_targets:direct_sources] = flat + np.arange(sizes.direct)  # unused: past the end
        idx[dst[direct], direct_targets + direct_slot] = target[direct]
        idx[dst[direct], direct_sources + direct_slot] = read[direct]
        # A dup repeats a received copy: its row in the received buffer, within this group.
        position = np.full(len(self.rows), -1, dtype=np.int64)
        position[mine] = np.arange(len(mine))
        repeated = position[read[dups]]
        received_row = np.zeros(len(rows), dtype=np.int64)  # row of [received buffer [G*K]; reload buffer]
        received_row[remote] = src[remote] * capacity + k[remote]
        received_row[reloads] = width + reload_slot
        received_row[dups] = received_row[repeated]
        idx[dst[inbound], sources + row[inbound]] = received_row[inbound]
        idx[dst[olds], sources + row[olds]] = read[olds]
        if full:  # new flat slot t <- [old slots; update buffer][gather[t]]
            gather = idx[:, sizes.width(num_devices) - flat :]
            gather[:] = np.arange(flat)
            gather[dst[inbound], target[inbound]] = flat + row[inbound]
            gather[dst[locals_], target[locals_]] = read[locals_]
        row_map = np.full((num_devices, num_devices, capacity), -1, dtype=np.int64)
        row_map[dst[remote], src[remote], k[remote]] = rows[remote]
        return idx.astype(np.int32), row_map, sizes

    def reload_rows(self, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reload rows of the group ``group`` (layers) in plan order ``[n]``, and the row of its destination
        device's reload buffer each one fills ``[n]`` (as in :meth:`arrays`)."""
        in_group = _in_group(self.plan.layer[self.rows], group, self.plan.num_layers)
        rows = self.rows[in_group & (self.kind == _RELOAD)]
        return rows, _rank_within(self.plan.dst_gpu[rows])


def _read_only(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays``, each made read-only (memoised: shared by later calls)."""
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _in_group(layer: np.ndarray, group: np.ndarray, num_layers: int) -> np.ndarray:
    """``np.isin(layer, group)`` for layers and a group in ``0 .. num_layers - 1``, by a table (faster)."""
    table = np.zeros(num_layers, dtype=bool)
    table[group] = True
    return table[layer]


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_optional_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}={value} must be positive")
    return int(value)


def _check_layers(layers: Any, num_layers: int) -> np.ndarray:
    """``layers`` (None: all) as an ascending int64 array of distinct layers in ``0 .. num_layers - 1``."""
    if layers is None:
        return np.arange(num_layers, dtype=np.int64)
    if isinstance(layers, np.ndarray):
        if layers.ndim != 1 or (layers.size and layers.dtype.kind not in "iu"):
            raise TypeError(f"layers must be a 1-D integer array or an iterable of ints, got {layers!r}")
        values = layers.astype(np.int64).tolist()
    elif isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of layer indices (ints) or None, got {type(layers).__name__}")
    else:
        values = list(layers)
        for value in values:
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
                raise TypeError(f"layers must hold ints, got {type(value).__name__} {value!r} in layers={values!r}")
        values = [int(value) for value in values]
    for value in values:
        if not 0 <= value < num_layers:
            raise ValueError(f"layers={values} holds {value}, outside the plan's layers 0..{num_layers - 1}")
    if len(set(values)) < len(values):
        twice = next(value for value in values if values.count(value) > 1)
        raise ValueError(f"layers={values} holds layer {twice} more than once")
    return np.asarray(sorted(values), dtype=np.int64)


def _check_plan_rows(plan: TransferPlan) -> None:
    """Plan rows inside the plan's shape (a plan from :func:`eplb.plan_transfers` always is); a reload row has
    ``src_gpu == src_slot == -1`` and stage 0."""
    reload = plan.reload
    odd = reload & ((plan.src_gpu != -1) | (plan.src_slot != -1) | (plan.stage != 0))
    if odd.any():
        raise ValueError(f"plan row {int(np.argmax(odd))} is a malformed reload: {plan.row(int(np.argmax(odd)))}")
    bounds = (
        ("layer", plan.num_layers, None),
        ("src_gpu", plan.num_gpus, ~reload),
        ("dst_gpu", plan.num_gpus, None),
        ("src_slot", plan.slots_per_gpu, ~reload),
        ("dst_slot", plan.slots_per_gpu, None),
    )
    for name, bound, rows in bounds:
        column = getattr(plan, name) if rows is None else getattr(plan, name)[rows]
        if len(column) and (column.min() < 0 or column.max() >= bound):
            raise ValueError(f"plan.{name} holds {int(column.min())}..{int(column.max())}, outside 0..{bound - 1}")


def _device_of_gpu(plan: TransferPlan, ranks: Any, num_devices: int | None, axis: str = "") -> np.ndarray | None:
    """``[G]`` int64: the position on the mesh axis of each plan GPU (``ranks``, ``-1``: no device), checked like
    the torch executor's ``ranks``; ``None`` for the identity (``ranks=None``, which needs ``G`` devices).
    ``num_devices=None``: the axis size is the number of non-negative entries (no mesh to compare with)."""
    if ranks is None:
        if num_devices is not None and num_devices != plan.num_gpus:
            raise ValueError(
                f"the plan is for {plan.num_gpus} GPUs but mesh axis {axis!r} has {num_devices} devices (pass "
                "ranks= to say which device of the axis holds which GPU, -1 for a GPU without a device)"
            )
        return None
    if isinstance(ranks, str | bytes) or not isinstance(ranks, Sequence | np.ndarray):
        raise TypeError(
            f"ranks must be a sequence of ints (one per GPU of the plan) or None, got {type(ranks).__name__}"
        )
    if isinstance(ranks, np.ndarray) and ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D (one entry per GPU of the plan), got shape {list(ranks.shape)}")
    values = ranks.tolist() if isinstance(ranks, np.ndarray) else list(ranks)
    if any(isinstance(r, bool | np.bool_) or not isinstance(r, numbers.Integral) for r in values):
        raise TypeError(f"ranks must hold ints, got {values}")
    device_of_gpu = np.asarray(values, dtype=np.int64).reshape(-1)
    if len(device_of_gpu) != plan.num_gpus:
        raise ValueError(f"ranks must have one entry per GPU of the plan ({plan.num_gpus}), got {len(device_of_gpu)}")
    live = device_of_gpu[device_of_gpu >= 0]
    size = len(live) if num_devices is None else num_devices
    if (device_of_gpu < -1).any() or sorted(live.tolist()) != list(range(size)):
        where = f"mesh axis {axis!r}" if axis else "the mesh axis"
        raise ValueError(
            f"ranks must name every device of {where} (0 .. {size - 1}) once and -1 for GPUs without a "
            f"device, got {values}"
        )
    return device_of_gpu


def _on_devices(plan: TransferPlan, device_of_gpu: np.ndarray, rows: np.ndarray) -> TransferPlan:
    """``plan`` over the mesh devices: GPU ``g`` renamed ``device_of_gpu[g]``; the rows ``rows`` (those of the
    layers moved) must not touch a GPU without a device (``ValueError`` naming ``ranks`` and the row). Row order,
    and so row numbers, are kept; rows of other layers that touch such a GPU get device 0 (never read)."""
    src, dst = plan.src_gpu, plan.dst_gpu
    dead = (device_of_gpu[dst] < 0) | ((src >= 0) & (device_of_gpu[np.maximum(src, 0)] < 0))
    bad = rows[dead[rows]]
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"ranks: plan row {row} {plan.row(row)} reads or writes a GPU without a device (rank -1)")
    device = np.maximum(device_of_gpu, 0)
    return dataclasses.replace(
        plan,
        src_gpu=np.where(src >= 0, device[np.maximum(src, 0)], -1),
        dst_gpu=device[dst],
        num_gpus=int((device_of_gpu >= 0).sum()),
        num_nodes=1,
    )


def _check_load_expert(plan: TransferPlan, reloads: np.ndarray, load_expert: Any) -> None:
    """``load_expert`` is callable or None, and given when the plan has reload rows ``reloads`` in the layers
    moved."""
    if load_expert is not None and not callable(load_expert):
        raise TypeError(f"load_expert must be callable or None, got {type(load_expert).__name__}")
    if len(reloads) and load_expert is None:
        raise ValueError(
            f"plan has {len(reloads)} reload rows in the layers moved (src_gpu == -1: experts no live slot "
            f"holds, from plan_transfers(..., allow_reload=True); first: {plan.row(int(reloads[0]))}): pass "
            "load_expert=(layer, expert) -> that expert's weights, e.g. read from a checkpoint"
        )


# ----------------------------------------------------------------------------------------------------------------
# The host work of a call, memoised per plan: a repeated call (the same plan object, options, layers and bytes
# per slot) checks the plan's arrays against a snapshot and reuses the classified rows, the layer groups, the index
# arrays and their device copies (_Job.memo), so it costs argument checks and the two dispatches.

_PLAN_FIELDS = ("layer", "expert", "src_gpu", "src_slot", "dst_gpu", "dst_slot", "stage")
CACHED_PLANS = 8
"""Plans whose host work :func:`apply_plan` and :func:`begin` keep (the plan object, a copy of its arrays, the
classified rows, layer groups, index arrays and their device copies, per mesh, layers and options; the least
recently used dropped). 0: nothing memoised, every call builds it all."""
_CALLS_PER_PLAN = 64  # prepared calls (layers, ranks, options, weights' shapes) kept per plan
_MEMO_ENTRIES = 1024  # memoised results per prepared call (groups, index arrays, device copies)


class _PlanEntry:
    """A plan's prepared calls, valid while its arrays hold what they held when the entry was made."""

    __slots__ = ("jobs", "plan", "snapshot")

    def __init__(self, plan: TransferPlan):
        self.plan = plan  # held, so that its id is not reused while the entry lives
        self.snapshot = _snapshot(plan)
        self.jobs: dict[Any, _Job] = {}

    def current(self, plan: TransferPlan) -> bool:
        """Whether ``plan`` is this entry's plan, unchanged (its arrays may be written in place: compared)."""
        if plan is not self.plan:
            return False
        for name, (shape, dtype, data) in zip(_PLAN_FIELDS, self.snapshot, strict=True):
            column = getattr(plan, name)
            if column.shape != shape or column.dtype != dtype or column.tobytes() != data:
                return False
        return True


def _snapshot(plan: TransferPlan) -> tuple[tuple[tuple[int, ...], np.dtype, bytes], ...]:
    return tuple((column.shape, column.dtype, column.tobytes()) for column in map(plan.__getattribute__, _PLAN_FIELDS))


_plans: collections.OrderedDict[int, _PlanEntry] = collections.OrderedDict()
_plans_lock = threading.Lock()


def _plan_entry(plan: TransferPlan) -> _PlanEntry | None:
    """The cache entry of ``plan`` (a fresh one when it has none or its arrays changed since), its rows checked
    (:func:`_check_plan_rows`, only when the entry is made); None when nothing is cached (``CACHED_PLANS = 0``)."""
    if CACHED_PLANS <= 0:
        _check_plan_rows(plan)
        return None
    with _plans_lock:
        entry = _plans.get(id(plan))
        if entry is not None:
            _plans.move_to_end(id(plan))
    if entry is not None and entry.current(plan):
        return entry
    _check_plan_rows(plan)
    entry = _PlanEntry(plan)
    with _plans_lock:
        _plans[id(plan)] = entry
        _plans.move_to_end(id(plan))
        while len(_plans) > CACHED_PLANS:
            _plans.popitem(last=False)
    return entry


def _prepare(
    plan: Any,
    weights: Any,
    mesh: Mesh | None,
    axis_name: str | None,
    *,
    layers: Any,
    capacity: Any,
    verify: Any,
    fault: Any,
    load_expert: Any = None,
    ranks: Any = None,
) -> _Job:
    """Check every argument (nothing runs on a device) and classify the plan rows of ``layers``; with ``ranks``,
    on the plan remapped onto the mesh devices (the job's ``origin`` is the caller's plan).

    Memoised per plan (see :func:`_plan_entry`): a call with the same plan (unchanged), mesh, axis, layers, ranks,
    ``capacity``, ``verify``, ``fault`` and bytes per slot reuses the job of the first, with its memo (the checks
    of the arguments that vary, weights, ``layers``, ``ranks``, ``load_expert``, run every time)."""
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be an eplb.TransferPlan (from eplb.plan_transfers), got {type(plan).__name__}")
    for name, value in (("capacity", capacity), ("fault", fault)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    verify = _check_flag("verify", verify)
    leaves, treedef = jax.tree_util.tree_flatten(weights)
    if not leaves or not all(isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves):
        bad = next((leaf for leaf in leaves if not isinstance(leaf, jax.Array | np.ndarray)), weights)
        raise TypeError(
            "weights must be a jax.Array [layers, slots, ...] or a pytree (dict, list, tuple) of them, "
            f"got {type(bad).__name__}"
        )
    if mesh is None or axis_name is None:
        shardings = [getattr(leaf, "sharding", None) for leaf in leaves]
        found = [s for s in shardings if isinstance(s, NamedSharding) and len(s.spec) >= 2 and s.spec[1] is not None]
        if not found:
            raise ValueError("pass mesh and axis_name, or weights sharded with PartitionSpec(None, axis)")
        mesh, axis_name = found[0].mesh, found[0].spec[1]
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    num_devices = mesh.shape[axis_name]
    device_of_gpu = _device_of_gpu(plan, ranks, num_devices, axis_name)
    expected = (plan.num_layers, num_devices * plan.slots_per_gpu)
    for number, leaf in enumerate(leaves):
        if leaf.ndim < 2 or tuple(leaf.shape[:2]) != expected:
            name = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(weights)[0][number][0])
            where = f"weights{name}" if name else "weights"
            raise ValueError(
                f"{where} must have shape [layers, slots, ...] = {list(expected)} + [...], got {list(leaf.shape)}"
            )
    entry = _plan_entry(plan)  # checks the plan's rows when they are new
    chosen = None if layers is None else _check_layers(layers, plan.num_layers)
    key = (
        mesh,
        axis_name,
        None if chosen is None else chosen.tobytes(),
        None if device_of_gpu is None else device_of_gpu.tobytes(),
        capacity,
        verify,
        fault,
        sum(math.prod(leaf.shape[2:]) * np.dtype(leaf.dtype).itemsize for leaf in leaves),  # slot_bytes
    )
    job = None if entry is None else entry.jobs.get(key)
    if job is not None:
        _check_load_expert(plan, job.memo["reloads"], load_expert)
        return job._replace(treedef=treedef, leaves=leaves, load_expert=load_expert)
    if chosen is None:
        chosen = np.arange(plan.num_layers, dtype=np.int64)
    selected = np.zeros(plan.num_layers, dtype=bool)
    selected[chosen] = True
    rows = np.flatnonzero(selected[plan.layer])
    reloads = rows[plan.reload[rows]]
    _check_load_expert(plan, reloads, load_expert)
    origin = None
    if device_of_gpu is not None:
        origin, plan = plan, _on_devices(plan, device_of_gpu, rows)
    kind, read = _classify(plan, rows)
    if capacity is not None:
        _check_capacity(capacity, 0)
    if fault is not None and not ((rows == fault) & (kind == _REMOTE)).any():
        raise ValueError(f"fault={fault} is not a copy between devices in the layers moved")
    job = (plan, mesh, axis_name, None, (), key[-1], chosen, rows, kind, read, capacity, verify, fault)
    job = _Job(*job, None, origin, None if entry is None else {"reloads": reloads})
    if entry is not None:  # the template holds neither the caller's weights nor load_expert
        if len(entry.jobs) >= _CALLS_PER_PLAN:
            entry.jobs.clear()
        entry.jobs[key] = job
    return job._replace(treedef=treedef, leaves=leaves, load_expert=load_expert)


def _classify(plan: TransferPlan, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per plan row in ``rows``: where its bytes come from (``kind``) and what to read (``read``, see :class:`_Job`).

    A stage-1 row reads its source slot's *new* weights: the received (or reloaded) copy when a copy between
    devices (or a reload) fills that slot, the old slot that a copy within the device reads when one does, else
    the source slot's old weights.
    """
    per_gpu, flat = plan.slots_per_gpu, plan.num_layers * plan.slots_per_gpu
    src, dst, stage = plan.src_gpu[rows], plan.dst_gpu[rows], plan.stage[rows]
    source = plan.layer[rows] * per_gpu + plan.src_slot[rows]
    target = plan.layer[rows] * per_gpu + plan.dst_slot[rows]
    stage1 = stage == 1
    reload = src < 0
    remote = ~stage1 & (src != dst) & ~reload
    kind = np.select([reload, remote], [_RELOAD, _REMOTE], _OLD)
    read = np.where(reload, -1, source)
    later = np.flatnonzero(stage1)
    if len(later):
        first = np.flatnonzero(~stage1)
        filled = np.full(plan.num_gpus * flat, -1, dtype=np.int64)  # (device, flat slot) -> position of its copy
        filled[dst[first] * flat + target[first]] = first
        by = filled[dst[later] * flat + source[later]]
        received = by >= 0
        received[received] = kind[by[received]] != _OLD
        copied = (by >= 0) & ~received
        kind[later[received]] = _DUP
        read[later[received]] = by[received]
        read[later[copied]] = source[by[copied]]
    return kind, read


class PendingTransfer:
    """A transfer in flight (from :func:`begin`): its update buffer and checks, not yet committed.

    Attributes
    ----------
    layers : tuple of int
        The layers this transfer moves (those of the requested layers that
        have copies in the plan), ascending.
    """

    def __init__(
        self,
        job: _Job,
        leaves: list[jax.Array],
        group: np.ndarray,
        donate: bool,
        *,
        owned: bool = False,
        label: str = "",
    ):
        # owned: the donated buffers are eplb's own (a copy made by an earlier group), not the caller's weights.
        self.layers = tuple(int(layer) for layer in group)
        self._job, self._leaves, self._donate, self._owned, self._label = job, leaves, donate, owned, label
        self._outcome: tuple[bool, Any] | None = None
        self._received: list[jax.Array] | None = None  # the update buffers (None: the group stages nothing)
        self._ok = None
        if not len(group):
            return
        self._kernel = kernel = job.kernel()
        host = job.group_plan(group, not donate, kernel)
        self._row_map, self._sizes, self._copies, faulty = host.row_map, host.sizes, host.copies, host.faulty
        reloaded = None
        loaded = _load_reloads(job, leaves, group, self._sizes.reloads) if self._sizes.reloads else None
        try:
            self._idx, corrupt = job.on_devices(group, not donate, kernel, host)
            if loaded is not None:
                spread = NamedSharding(job.mesh, PartitionSpec(job.axis_name))
                reloaded = [jax.device_put(buffer, spread) for buffer in loaded]
            if self._sizes.staged():  # else every copy is within a device and the commit reads it from old slots
                program = _stage_program(job.mesh, job.axis_name, job.verify, faulty)
                sizes = self._sizes._replace(full=0, direct=0, per_layer=0)
                self._received, self._ok = program(leaves, self._idx, corrupt, sizes, reloaded, self._kernel)
        except RuntimeError as err:
            raise TransferError(
                f"the transfer program of layers {list(self.layers)} ({self._copies} copies between devices of "
                f"{int(job.caller_plan.remote.sum())} in the plan){label} failed: {err!r}"
            ) from err

    def done(self) -> bool:
        """Whether the transfer program has finished (then :meth:`finish` does not wait for it)."""
        pending = [*(self._received or []), *([self._ok] if self._ok is not None else [])]
        return all(array.is_ready() for array in pending)

    def finish(self) -> Any:
        """Check the copies (the one host read), commit them and return the new weights (the structure passed).

        Waits for the transfer program, reads ``ok`` (with ``verify=True``),
        dispatches the commit program and waits for it, so that a failure of
        either program surfaces here. Calling it again returns the same
        weights (or raises the same error).

        Raises
        ------
        TransferError
            A received copy does not match its sender's checksum (naming the
            first such plan row and the receiving device), or either program
            failed while running (a ``RuntimeError``, e.g.
            ``jax.errors.JaxRuntimeError``). The weights passed to
            :func:`begin` are intact (also when donated: a failed commit
            program that had not taken their buffers); ``err.weights`` holds
            them, in the structure passed.
        RuntimeError
            Only with ``donate=True``: the commit program failed after it
            took the donated buffers (a device lost mid-program); the weights
            are lost, and the error says so in a note. Never a
            :class:`TransferError`, which always means the old weights are kept.
        """
        if self._outcome is None:
            try:
                self._outcome = (True, self._finish())
            except BaseException as err:
                self._outcome = (False, err)
                raise
        done, value = self._outcome
        if not done:
            raise value
        return value

    def _finish(self) -> Any:
        job = self._job
        try:
            return jax.tree_util.tree_unflatten(job.treedef, self._commit())
        except TransferError as err:
            err.weights, err.committed_layers = jax.tree_util.tree_unflatten(job.treedef, self._leaves), ()
            raise

    def _commit(self) -> list[jax.Array]:
        """The new leaves, or :class:`TransferError` with ``self._leaves`` intact."""
        job = self._job
        if not self.layers:
            return self._leaves
        try:
            if self._ok is not None:
                ok = np.asarray(self._ok)
            else:
                jax.block_until_ready(self._received)
        except RuntimeError as err:
            raise TransferError(
                f"the transfer program of layers {list(self.layers)} ({self._copies} copies between devices)"
                f"{self._label} failed: {err!r}"
            ) from err
        if self._ok is not None and not ok.all():
            bad = np.argwhere(~ok & (self._row_map >= 0))
            if len(bad):
                rows = self._row_map[tuple(bad.T)]
                first = int(np.argmin(rows))
                raise TransferError(
                    f"received bytes do not match the sender's checksum{self._label}",
                    plan=job.caller_plan,
                    transfer=int(rows[first]),
                    rank=int(bad[first][0]),
                )
        try:
            program = _commit_program(job.mesh, job.axis_name, self._donate)
            new = program(self._leaves, self._received, self._idx, self._sizes, self._kernel)
            jax.block_until_ready(new)
        except RuntimeError as err:
            if self._donate and not self._owned and any(leaf.is_deleted() for leaf in self._leaves):
                note = "eplb: the commit program failed after taking the donated weights; they are lost"
                if hasattr(err, "add_note"):
                    err.add_note(note)
                raise
            raise TransferError(
                f"the commit program of layers {list(self.layers)}{self._label} failed: {err!r}"
            ) from err
        self._received = None  # free the received buffers
        return new


def _load_reloads(job: _Job, leaves: list[jax.Array], group: np.ndarray, size: int) -> list[np.ndarray]:
    """The reload buffers of layer group ``group``: per leaf, numpy ``[G, size, *leaf.shape[2:]]`` of the leaf's
    dtype, device ``d``'s ``j``-th reload row (plan order) at ``[d, j]``, zeros elsewhere; one ``load_expert`` call
    per reload row, on the host.

    An exception of ``load_expert`` raises :class:`eplb.TransferError` naming the row (nothing has run yet); a
    result that is not one slot of ``weights`` (structure, shape, dtype) a ``TypeError`` or ``ValueError``.
    """
    plan = job.plan
    buffers = [np.zeros((plan.num_gpus, size, *leaf.shape[2:]), dtype=leaf.dtype) for leaf in leaves]
    rows, position = job.reload_rows(group)
    for row, j in zip(rows.tolist(), position.tolist(), strict=True):
        device = int(plan.dst_gpu[row])
        for buffer, part in zip(buffers, _load_slot(job, leaves, row), strict=True):
            buffer[device, j] = part
    return buffers


def _load_slot(job: _Job, leaves: list[jax.Array], row: int) -> list[Any]:
    """``job.load_expert(layer, expert)`` of reload row ``row``, checked against one slot of ``leaves``: its leaves
    in ``weights``' order."""
    layer, expert = int(job.plan.layer[row]), int(job.plan.expert[row])
    call = f"load_expert({layer}, {expert})"
    try:
        loaded = job.load_expert(layer, expert)
    except Exception as err:
        raise TransferError(
            f"{call} raised {err!r} (a reload: no live slot of the old placement holds the expert)",
            plan=job.caller_plan,
            transfer=row,
            rank=int(job.plan.dst_gpu[row]),
        ) from err
    paths_parts, treedef = jax.tree_util.tree_flatten_with_path(loaded)
    if treedef != job.treedef:
        raise ValueError(f"{call} must return one slot of weights, with its structure {job.treedef}; got {treedef}")
    for (path, part), leaf in zip(paths_parts, leaves, strict=True):
        where = f"{call}{jax.tree_util.keystr(path)}"
        if not isinstance(part, np.ndarray | np.generic | jax.Array):
            raise TypeError(f"{where} must be a numpy or JAX array (one slot's weights), got {type(part).__name__}")
        if tuple(part.shape) != tuple(leaf.shape[2:]) or np.dtype(part.dtype) != np.dtype(leaf.dtype):
            raise ValueError(
                f"{where} must have the shape {list(leaf.shape[2:])} and dtype {np.dtype(leaf.dtype)} of one slot "
                f"of its weights array [{', '.join(map(str, leaf.shape))}]; got {list(part.shape)}, "
                f"{np.dtype(part.dtype)}"
            )
    return [np.asarray(part) for _, part in paths_parts]


def _place(job: _Job) -> list[jax.Array]:
    """The leaves sharded ``PartitionSpec(None, axis)`` (the same arrays when they already are)."""
    by_slot = job._memoised("by_slot", lambda: NamedSharding(job.mesh, PartitionSpec(None, job.axis_name)))
    try:
        return [
            leaf
            if isinstance(leaf, jax.Array)
            and (leaf.sharding == by_slot or leaf.sharding.is_equivalent_to(by_slot, leaf.ndim))
            else jax.device_put(leaf, by_slot)
            for leaf in job.leaves
        ]
    except RuntimeError as err:
        error = TransferError(f"placing the weights on the mesh failed: {err!r}")
        error.weights, error.committed_layers = jax.tree_util.tree_unflatten(job.treedef, job.leaves), ()
        raise error from err


def begin(
    plan: TransferPlan,
    weights: Any,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
    *,
    layers: Iterable[int] | None = None,
    capacity: int | None = None,
    verify: bool = True,
    donate: bool = False,
    fault: int | None = None,
    load_expert: Callable[[int, int], Any] | None = None,
    ranks: Sequence[int] | None = None,
) -> PendingTransfer:
    """Dispatch the transfer of ``layers`` (one program, all of them at once) and return without waiting.

    Takes the arguments of :func:`apply_plan` (except the grouping ones;
    loop over :func:`layer_groups`, with the same ``ranks``, for bounded
    memory), ``ranks=`` included (a plan over more GPUs than the mesh axis
    has devices, after a failure). The caller may
    dispatch other work, then call :meth:`PendingTransfer.finish` for the
    new weights. With ``donate=True`` the weights must not be used after
    ``finish()`` returns (their buffers hold the new weights); until then
    they are intact. Invalid arguments raise here; a failure to dispatch
    raises :class:`eplb.TransferError` here, other transfer failures in
    ``finish()``. ``load_expert`` is called here, on the host, for every
    reload row of ``layers`` before the program is dispatched: an exception
    of it is a :class:`eplb.TransferError` raised here, a result of the
    wrong structure, shape or dtype a ``TypeError`` or ``ValueError``, the
    weights untouched either way.

    Examples
    --------
    ::

        for group in layer_groups(plan, params, max_staging_bytes=2**30):
            pending = begin(plan, params, layers=group, donate=True)
            loss = train_step(...)  # dispatched while the copies travel
            params = pending.finish()
    """
    donate = _check_flag("donate", donate)
    options = {"layers": layers, "capacity": capacity, "verify": verify, "fault": fault, "load_expert": load_expert}
    job = _prepare(plan, weights, mesh, axis_name, **options, ranks=ranks)
    groups = job.split(None, None)
    leaves = _place(job)
    try:
        return PendingTransfer(job, leaves, groups[0] if groups else np.zeros(0, dtype=np.int64), donate)
    except TransferError as err:
        err.weights, err.committed_layers = jax.tree_util.tree_unflatten(job.treedef, leaves), ()
        raise


def layer_groups(
    plan: TransferPlan,
    weights: Any,
    *,
    layers: Iterable[int] | None = None,
    layers_per_group: int | None = None,
    max_staging_bytes: int | None = None,
    capacity: int | None = None,
    ranks: Sequence[int] | None = None,
) -> list[tuple[int, ...]]:
    """The layer groups :func:`apply_plan` moves one program pair at a time, ascending.

    Only layers with copies in ``plan`` appear. Consecutive layers join a
    group while it has at most ``layers_per_group`` layers and its staging
    estimate is at most ``max_staging_bytes`` per device: ``(2 * (G * K +
    inbound + local) + reloads) * slot_bytes``, with ``K`` the group's most
    copies between one pair of devices (or ``capacity``), ``inbound`` the
    most slots one device fills from what it receives or reloads (received
    copies, reload rows and second copies of them), ``local`` the most it
    fills from its own old slots, ``reloads`` the most reload rows of one
    device (0 without them; all three rounded up by at most 1/8: to a
    multiple of 1/16 of the power of two at or above them, unchanged up to
    16), and ``slot_bytes`` the bytes of one slot over all arrays of
    ``weights``. It bounds the sent and received buffers plus the update
    buffer (and the reload buffer) while transferring, and the update buffer
    and one copy of it while committing (XLA's CPU backend adds temporaries
    of the same order for its ``all_to_all`` and the checksums; the host
    holds ``G * reloads`` slots of a group's reloads while placing them on
    the devices). A layer whose estimate alone
    exceeds the cap is a ``ValueError``. ``weights`` is only read for shapes
    and dtypes (``jax.ShapeDtypeStruct`` leaves will do). ``ranks``: as in
    :func:`apply_plan` (pass the same, so that ``G`` is the mesh axis size
    and the groups are those :func:`apply_plan` forms); with no mesh to
    compare with, its non-negative entries must be ``0 .. M - 1``.
    """
    leaves = jax.tree_util.tree_leaves(weights)
    if not leaves or not all(hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves):
        raise TypeError("weights must be an array [layers, slots, ...] or a pytree of them (shapes and dtypes)")
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be an eplb.TransferPlan (from eplb.plan_transfers), got {type(plan).__name__}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral)):
        raise TypeError(f"capacity must be an int or None, got {type(capacity).__name__} {capacity!r}")
    layers_per_group = _check_optional_count("layers_per_group", layers_per_group)
    max_staging_bytes = _check_optional_count("max_staging_bytes", max_staging_bytes)
    _check_plan_rows(plan)
    chosen = _check_layers(layers, plan.num_layers)
    selected = np.zeros(plan.num_layers, dtype=bool)
    selected[chosen] = True
    rows = np.flatnonzero(selected[plan.layer])
    device_of_gpu = _device_of_gpu(plan, ranks, None)
    if device_of_gpu is not None:
        plan = _on_devices(plan, device_of_gpu, rows)
    kind, read = _classify(plan, rows)
    slot_bytes = sum(math.prod(leaf.shape[2:]) * np.dtype(leaf.dtype).itemsize for leaf in leaves)
    job = _Job(plan, None, None, None, leaves, slot_bytes, chosen, rows, kind, read, capacity, True, None)
    groups = job.split(layers_per_group, max_staging_bytes)
    for group in groups:  # a capacity below a group's need raises here, before anything runs
        job.arrays(group)
    return [tuple(int(layer) for layer in group) for group in groups]


def apply_plan(
    plan: TransferPlan,
    weights: Any,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
    *,
    layers: Iterable[int] | None = None,
    layers_per_group: int | None = None,
    max_staging_bytes: int | None = None,
    capacity: int | None = None,
    verify: bool = True,
    donate: bool = False,
    fault: int | None = None,
    load_expert: Callable[[int, int], Any] | None = None,
    ranks: Sequence[int] | None = None,
) -> Any:
    """The weights of the new placement: ``weights`` moved as ``plan`` says.

    Parameters
    ----------
    plan : TransferPlan
        From :func:`eplb.plan_transfers`; its GPU ``g`` is device ``g`` of
        the mesh axis (``ranks[g]`` with ``ranks``).
    weights : jax.Array [L, R, ...], or a pytree (dict, list, tuple) of them
        Every layer's slots (all experts' copies of a weight matrix), any
        dtype, sharded over ``axis_name`` along ``R`` (resharded if not; a
        numpy array is placed so, with ``mesh`` and ``axis_name`` given).
        Each array may have its own trailing shape and dtype; all move in
        one program pair per group. ``R = G * S`` (``S =
        plan.slots_per_gpu``); with ``ranks``, ``R = M * S`` for an axis of
        ``M`` devices: the slots of the GPUs that have a device only.
    mesh, axis_name : optional
        The expert-parallel mesh axis; taken from the first array sharded
        ``NamedSharding(mesh, PartitionSpec(None, axis))`` when omitted.
    layers : iterable of int, optional, keyword-only
        Layers to move (default: all); the plan's rows of other layers are
        ignored and those layers keep their weights.
    layers_per_group, max_staging_bytes : int, optional, keyword-only
        Move the layers in consecutive groups (see :func:`layer_groups`), one
        transfer and one commit program each, so that the staging buffers of
        one group only are alive at a time. Default: one group.
    capacity : int, optional, keyword-only
        Copies per device pair in the compiled programs (see
        :func:`plan_arrays`). The programs are compiled per capacity, padded
        update-buffer sizes (eight per doubling, see :func:`layer_groups`),
        array shapes and dtypes, ``verify`` and ``donate``; a fixed capacity
        lets groups and plans share them. Default: each group's largest.
    verify : bool, keyword-only
        Checksum every copy (default): the sender and the receiver each read
        the copy once more (one reduction over its 32-bit words, weighted by
        position), and the checksums travel in one extra small ``all_to_all``.
        Any corruption confined to one 32-bit word (every single flipped bit)
        is caught, others with probability ``1 - 2**-32``. ``False`` computes
        and exchanges no checksums and skips the host read of ``ok``: a copy
        corrupted in flight (bit flips on the link, a collective that
        delivers wrong bytes) is then committed silently. Program failures
        are detected either way (``finish`` waits for the transfer program
        before committing).
    donate : bool, keyword-only
        Commit into the buffers of ``weights`` (scatter into the donated
        arrays, no second copy of the weights); ``weights`` must not be used
        afterwards. Default: return new arrays and leave ``weights`` intact.
    fault : int, optional, keyword-only
        For tests: corrupt plan row ``fault`` in flight (one flipped bit);
        the checksum catches it and the call raises.
    load_expert : callable, optional, keyword-only
        ``load_expert(layer, expert)`` returns the weights of one slot of
        ``expert`` in ``layer`` (e.g. read from a checkpoint): the structure
        of ``weights``, each leaf a numpy or JAX array of shape
        ``leaf.shape[2:]`` and the dtype of its weights array. Required when
        the layers moved have reload rows (``plan_transfers(...,
        allow_reload=True)``: experts that only failed GPUs held); called on
        the host once per reload row (each destination device of a lost
        expert, in plan order) as each layer group is dispatched. The loaded
        slots travel to their devices in the transfer program and are
        committed with the copies (second copies of a reloaded expert on its
        device copy the reloaded slot). An exception of the callback is a
        :class:`eplb.TransferError` naming the reload row, raised before the
        group's programs run (the failure rules below apply).
    ranks : sequence of int, optional, keyword-only
        The position on the mesh axis of each GPU of the plan (``len(ranks)
        == plan.num_gpus``), ``-1`` for a GPU without a device (a failed
        one, or one that left): after a failure the survivors' mesh axis
        has ``M`` devices, ``M`` the number of entries ``>= 0``, which must
        be ``0 .. M - 1`` once each. A GPU without a device must have no
        rows in the layers moved (no source, no destination: plan from
        placements holding ``-1`` there, e.g. ``plan_transfers(old, new,
        num_gpus=G, allow_reload=True)`` with ``old`` ``-1`` on the failed
        GPU's slots and ``new`` from ``rebalance_experts(...,
        active_gpus=)``; experts only it held are reload rows, hence
        ``load_expert``). The weights then hold the survivors' slots only,
        ``[L, M * S, ...]``: device ``k``'s block ``[L, S, ...]`` is plan
        GPU ``g`` with ``ranks[g] == k`` (GPU 1 of 4 lost:
        ``ranks=[0, -1, 1, 2]``, the blocks of GPUs 0, 2, 3 in that order),
        and so do the returned ones. Errors name the plan's rows with their
        GPU ids; a :class:`eplb.TransferError`'s ``rank`` is the position on
        the mesh axis of the receiving device. Default: GPU ``g`` is device
        ``g``, and the axis has ``plan.num_gpus`` devices (no remapping, no
        cost).

    Returns
    -------
    jax.Array [L, R, ...] or the pytree passed
        Sharded ``PartitionSpec(None, axis_name)``, same shapes and dtypes;
        every destination slot of the moved layers holds its source slot's
        old bytes exactly (a stage-1 row: its source slot's new bytes; a
        reload row: ``load_expert``'s result), every other slot its own (so
        slots that ``new_phy2log`` marks ``-1``, of GPUs that are down, keep
        their bytes; with ``ranks`` a GPU without a device has no slots
        here).

    Notes
    -----
    Memory: per device, besides the weights, one group's buffers at a time
    (the estimate of :func:`layer_groups`, which ``max_staging_bytes``
    bounds), plus, without ``donate``, one new copy of the weights (the
    first group writes it, later groups scatter into it in place). With
    ``donate`` no copy of the weights is made: the commit scatters into
    their buffers (weights not yet sharded ``PartitionSpec(None, axis)`` are
    resharded first, which copies them).

    Host work: the checks, layer groups and index arrays of a plan (and the
    index arrays' device copies) are memoised per plan object, so that
    calling again with the same plan (another weights pytree of the same
    bytes per slot, or the same weights again) skips them; see the module
    docstring and :data:`CACHED_PLANS`. Results never depend on it.

    Failures: each group is checked before it is committed. Without
    ``donate`` the call is all or nothing: on failure ``weights`` is intact
    and no new array exists. With ``donate`` each group commits on its own:
    a failure in group ``i`` leaves groups ``0 .. i-1`` moved and the other
    layers' old weights in place. Either way the :class:`eplb.TransferError`
    carries ``err.weights`` (the weights as they stand, in the structure
    passed: ``weights`` itself without donation; with it, the donated
    buffers, holding the earlier groups' new weights) and
    ``err.committed_layers`` (those groups' layers; empty without donation).
    A commit program that fails before taking the donated buffers (at
    dispatch) leaves them intact like any other failure.

    Raises
    ------
    TransferError
        A received copy does not match its sender's checksum (naming the
        first such plan row and the receiving device), ``load_expert``
        raised (naming the reload row and its device), or a program failed
        while running (a ``RuntimeError``: ``jax.errors.JaxRuntimeError``,
        the collective failed, a device ran out of memory); see Notes.
    RuntimeError
        ``donate=True`` only: a commit program failed after taking the
        donated buffers; the weights are lost (see
        :meth:`PendingTransfer.finish`).
    TypeError, ValueError
        Invalid arguments (checked before anything runs): ``plan`` not a
        :class:`TransferPlan` or for another number of devices (without
        ``ranks``), ``ranks`` not ints (``TypeError``), of the wrong length,
        not naming each device of the axis once, or with a row of the layers
        moved on a ``-1`` GPU (``ValueError``, naming ``ranks`` and the
        row), ``weights``
        not arrays or of the wrong shape, no mesh axis, ``layers`` not ints
        (``TypeError``) or out of range or repeated (``ValueError``), a bad
        ``capacity``, ``fault``, ``layers_per_group`` or
        ``max_staging_bytes`` (also one below a single layer's estimate),
        reload rows in the layers moved without ``load_expert``
        (``ValueError``), a ``load_expert`` that is not callable
        (``TypeError``). Errors while tracing a program (bugs) also
        propagate unchanged. A ``load_expert`` result of the wrong structure
        or leaf type (``TypeError``), shape or dtype (``ValueError``) is
        found when its group is dispatched, before that group runs: the
        weights are then as after a ``TransferError`` (with ``donate`` and
        earlier groups committed, the error carries ``err.weights`` and
        ``err.committed_layers`` too).
    """
    donate = _check_flag("donate", donate)
    layers_per_group = _check_optional_count("layers_per_group", layers_per_group)
    max_staging_bytes = _check_optional_count("max_staging_bytes", max_staging_bytes)
    options = {"layers": layers, "capacity": capacity, "verify": verify, "fault": fault, "load_expert": load_expert}
    job = _prepare(plan, weights, mesh, axis_name, **options, ranks=ranks)
    groups = job.split(layers_per_group, max_staging_bytes)
    for group in groups[1:]:  # a capacity below a later group's need raises before anything runs
        job.arrays(group)
    original = leaves = _place(job)
    moved: list[int] = []
    for number, group in enumerate(groups):
        label = f" (layer group {number + 1} of {len(groups)})" if len(groups) > 1 else ""
        try:
            # Without donation, the first group makes the new copy and later groups write into it in place.
            pending = PendingTransfer(job, leaves, group, donate or number > 0, owned=not donate, label=label)
            leaves = pending._commit()
        except TransferError as err:
            err.weights = jax.tree_util.tree_unflatten(job.treedef, leaves if donate else original)
            err.committed_layers = tuple(moved) if donate else ()
            raise
        except (TypeError, ValueError) as err:  # a malformed load_expert result, found at this group's dispatch
            if donate and moved:  # the caller's buffers hold the earlier groups' new weights: hand them back
                err.weights = jax.tree_util.tree_unflatten(job.treedef, leaves)
                err.committed_layers = tuple(moved)
                if hasattr(err, "add_note"):
                    err.add_note(f"eplb: layers {moved} are committed; err.weights holds the weights as they stand")
            raise
        moved.extend(int(layer) for layer in group)
    return jax.tree_util.tree_unflatten(job.treedef, leaves)
