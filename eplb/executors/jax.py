"""Carry out a :class:`eplb.TransferPlan` on an expert-sharded JAX array.

The weights of one kind of expert matrix are one array ``[L, R, ...]``
sharded over a mesh axis of ``G`` devices along ``R`` (device ``g`` holds
GPU ``g``'s slots ``[L, R/G, ...]``). One ``shard_map`` program moves them:

1. every device gathers what it sends into a buffer ``[G, K, ...]`` (``K``:
   the most copies between one pair of devices) plus a checksum per copy;
2. one ``all_to_all`` over the axis exchanges the buffers and checksums;
3. every device checks each received copy against its checksum and builds
   its new slots by gathering from its old slots and the received buffer
   (then second copies of an expert it received).

The program is a pure function of the weights and of index arrays made from
the plan on the host (:func:`plan_arrays`), so it runs under ``jax.jit``
(:func:`make_transfer`), and a new plan of the same capacity reuses the
compiled program. The old array is never donated: it stays intact, and
:func:`apply_plan` returns the new one only if every checksum matched,
otherwise it raises :class:`eplb.TransferError` naming the first bad copy.
Only transfer failures become :class:`eplb.TransferError` (a checksum
mismatch, or an XLA runtime error while the program runs); invalid arguments
and errors while tracing the program (bugs) propagate unchanged.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eplb.migration import TransferError, TransferPlan

__all__ = ["PlanArrays", "apply_plan", "make_transfer", "plan_arrays"]


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


def plan_arrays(plan: TransferPlan, capacity: int | None = None) -> PlanArrays:
    """Index arrays for :func:`make_transfer` from ``plan``.

    ``capacity`` (``K``): copies per (sender, receiver) pair; at least the
    plan's largest, which is the default (at least 1). A fixed capacity lets
    plans of different sizes share one compiled program.
    """
    num_gpus, per_gpu, num_layers = plan.num_gpus, plan.slots_per_gpu, plan.num_layers
    remote = np.flatnonzero(plan.remote)
    pairs = plan.src_gpu[remote] * num_gpus + plan.dst_gpu[remote]
    need = int(np.bincount(pairs, minlength=num_gpus * num_gpus).max(initial=0))
    capacity = max(need, 1) if capacity is None else int(capacity)
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be positive")
    if capacity < need:
        raise ValueError(f"capacity={capacity} is below the plan's {need} copies between one pair of devices")
    flat = num_layers * per_gpu
    send = np.zeros((num_gpus, num_gpus, capacity), dtype=np.int32)
    row = np.full((num_gpus, num_gpus, capacity), -1, dtype=np.int32)
    gather = np.tile(np.arange(flat, dtype=np.int32), (num_gpus, 1))
    second = gather.copy()
    used = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    for i in range(len(plan)):
        layer, src, dst, stage = int(plan.layer[i]), int(plan.src_gpu[i]), int(plan.dst_gpu[i]), int(plan.stage[i])
        target = layer * per_gpu + int(plan.dst_slot[i])
        source = layer * per_gpu + int(plan.src_slot[i])
        if stage == 1:
            second[dst, target] = source
        elif src == dst:
            gather[dst, target] = source
        else:
            k = used[src, dst]
            used[src, dst] += 1
            send[src, dst, k] = source
            row[dst, src, k] = i
            gather[dst, target] = flat + src * capacity + k
    return PlanArrays(send, gather, second, row)


def _bytes(x: jax.Array) -> jax.Array:
    """``x [..., D]`` as uint8 ``[..., D * itemsize]``."""
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(*x.shape[:-1], -1)


def _checksum(x: jax.Array) -> jax.Array:
    """uint32 ``[...]``: a position-weighted sum of the bytes of each row of ``x [..., D]``, mod 2**32."""
    data = _bytes(x).astype(jnp.uint32)
    weights = jnp.arange(data.shape[-1], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(data * weights, axis=-1, dtype=jnp.uint32)


def _flip_first_bit(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x [G, K, D]`` with the lowest bit of the first byte flipped where ``mask [G, K]``."""
    data = _bytes(x)
    data = data.at[:, :, 0].set(jnp.where(mask, data[:, :, 0] ^ jnp.uint8(1), data[:, :, 0]))
    size = x.dtype.itemsize
    data = data.reshape(*x.shape, size) if size > 1 else data.reshape(x.shape)
    return jax.lax.bitcast_convert_type(data, x.dtype)


def make_transfer(mesh: Mesh, axis_name: str) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A jitted ``transfer(weights, send, gather, second, corrupt) -> (new_weights, ok)``.

    ``weights [L, R, ...]`` is sharded ``PartitionSpec(None, axis_name)``;
    ``send``, ``gather``, ``second`` are :class:`PlanArrays` fields and
    ``corrupt`` a bool ``[G, G, K]`` (all false except to test failure
    handling: it flips the received copies it marks), each sharded over
    ``axis_name`` on its leading axis. ``ok [G, G, K]`` tells, per receiving
    device, sender and copy, whether the received bytes match the sender's
    checksum (unused entries are true). Compiled once per shape and
    capacity; the plan itself is data.
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


def apply_plan(
    plan: TransferPlan,
    weights: jax.Array,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
    *,
    capacity: int | None = None,
    fault: int | None = None,
) -> jax.Array:
    """The weights of the new placement: ``weights`` moved as ``plan`` says.

    Parameters
    ----------
    plan : TransferPlan
        From :func:`eplb.plan_transfers`; its GPU ``g`` is device ``g`` of
        the mesh axis.
    weights : jax.Array [L, R, ...]
        Every layer's slots (all experts' copies of one weight matrix),
        sharded over ``axis_name`` along ``R`` (resharded if not; a numpy
        array is placed so, with ``mesh`` and ``axis_name`` given).
    mesh, axis_name : optional
        The expert-parallel mesh axis; taken from ``weights.sharding`` (a
        ``NamedSharding`` with ``PartitionSpec(None, axis)``) when omitted.
    capacity : int, optional
        Copies per device pair in the compiled program (see :func:`plan_arrays`).
    fault : int, optional
        For tests: corrupt plan row ``fault`` in flight (one flipped bit);
        the checksum catches it and the call raises.

    Returns
    -------
    jax.Array [L, R, ...]
        Same sharding as the input; ``weights`` itself is left unchanged.

    Raises
    ------
    TransferError
        A received copy does not match its sender's checksum (naming the
        first such plan row and the receiving device), or running the
        program failed with a ``RuntimeError`` (``jax.errors.JaxRuntimeError``:
        the collective failed, a device ran out of memory). ``weights``
        stays valid and unchanged.
    TypeError, ValueError
        Invalid arguments (checked before anything runs): ``plan`` not a
        :class:`TransferPlan` or for another number of devices, ``weights``
        of the wrong shape, no mesh axis, a bad ``capacity`` or ``fault``.
        Errors while tracing the program (bugs) also propagate unchanged.
    """
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be an eplb.TransferPlan (from eplb.plan_transfers), got {type(plan).__name__}")
    if plan.reload.any():  # rows from plan_transfers(..., allow_reload=True)
        raise ValueError("plan has reload rows (src_gpu == -1): a load_expert callback is not supported yet")
    for name, value in (("capacity", capacity), ("fault", fault)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    if not isinstance(weights, jax.Array | np.ndarray):
        raise TypeError(f"weights must be a jax.Array [layers, slots, ...], got {type(weights).__name__}")
    if mesh is None or axis_name is None:
        sharding = getattr(weights, "sharding", None)
        if not isinstance(sharding, NamedSharding) or len(sharding.spec) < 2 or sharding.spec[1] is None:
            raise ValueError("pass mesh and axis_name, or weights sharded with PartitionSpec(None, axis)")
        mesh, axis_name = sharding.mesh, sharding.spec[1]
    if axis_name not in mesh.shape:
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
    num_devices = mesh.shape[axis_name]
    if num_devices != plan.num_gpus:
        raise ValueError(f"the plan is for {plan.num_gpus} GPUs but mesh axis {axis_name!r} has {num_devices} devices")
    expected = (plan.num_layers, plan.num_gpus * plan.slots_per_gpu)
    if tuple(weights.shape[:2]) != expected:
        raise ValueError(
            f"weights must have shape [layers, slots, ...] = {list(expected)} + [...], got {list(weights.shape)}"
        )
    arrays = plan_arrays(plan, capacity)
    corrupt = np.zeros(arrays.row.shape, dtype=bool)
    if fault is not None:
        corrupt |= arrays.row == fault
        if not corrupt.any():
            raise ValueError(f"fault={fault} is not a copy between devices in this plan")
    spread = NamedSharding(mesh, PartitionSpec(axis_name))
    # Only a runtime failure (jax.errors.JaxRuntimeError, a RuntimeError: the collective, device memory, also
    # while resharding the inputs) is a transfer failure; tracing raises TypeError, ValueError, IndexError...
    # for bugs, which propagate. The host read of ``ok`` is inside: an asynchronous failure surfaces there.
    try:
        weights = jax.device_put(weights, NamedSharding(mesh, PartitionSpec(None, axis_name)))
        inputs = [jax.device_put(a, spread) for a in (arrays.send, arrays.gather, arrays.second, corrupt)]
        new, ok = _cached_transfer(mesh, axis_name)(weights, *inputs)
        ok = np.asarray(ok)
    except RuntimeError as err:
        raise TransferError(f"the all_to_all carrying {int(plan.remote.sum())} copies failed: {err!r}") from err
    bad = np.argwhere(~ok & (arrays.row >= 0))
    if len(bad):
        rows = arrays.row[tuple(bad.T)]
        first = int(np.argmin(rows))
        raise TransferError(
            "received bytes do not match the sender's checksum",
            plan=plan,
            transfer=int(rows[first]),
            rank=int(bad[first][0]),
        )
    return new
