"""Row copies for the JAX executor as one Pallas kernel (Triton lowering on GPUs): ``out[dst[i]] = src[i]``.

:func:`copy_rows` copies whole rows of 2-D arrays ``[rows, D]`` (a slot of expert weights flattened), the
rows chosen by an index array, in one launch over a grid ``(copies, D / block)``: each program moves one block
of one row (one load, one store, no arithmetic, so every byte is copied exactly, NaN payloads included). The
destination is either a fresh array (a gather) or an existing array updated in place through
``input_output_aliases`` (under ``jax.jit`` with the array donated, XLA writes into its buffer: no copy of the
untouched rows). A source may be the destination array itself (a move within the array), which is only
correct when no copy of the launch writes a row that another copy of it reads: the caller stages such rows.

:func:`permute_rows` moves rows within one array in place with no staging at all, for copies that read rows
other copies overwrite (a rotation, a swap): the copies come in groups (a layer's copies within a device), and
one program moves one block of columns of every copy of a group, loading all of them before storing any (a
barrier between), so that every copy reads the old bytes; programs touch disjoint columns or groups.

``interpret=True`` runs the kernel with Pallas' interpreter (any backend: the tests, on a CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SELF", "copy_rows", "permute_rows", "supported"]

SELF = None
"""A source of :func:`copy_rows` that is the destination array itself (an in-place move)."""

# The kernel moves unsigned words of the dtype's width (a bitcast, free in XLA): no float loads, so no backend
# may quiet a NaN (Pallas' interpreter on a CPU does, for bfloat16).
_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


BLOCK_BYTES = 8192
"""Bytes one program of :func:`copy_rows` moves (rounded down to a power of two of elements). On an H200, 8 to
64 KB a program with 4 or 8 warps gather 88 MB rows at 86-93% of a jitted copy's bandwidth, 8 KB and 4 warps
fastest."""
NUM_WARPS = 4
"""Triton warps per program of :func:`copy_rows`."""


def supported(dtype) -> bool:
    """Whether :func:`copy_rows` takes arrays of ``dtype``: 1, 2 or 4 bytes an element, not bool."""
    dtype = np.dtype(dtype)
    return dtype != np.bool_ and dtype.itemsize in _WORDS and dtype.kind in "fiuV"


def _block(width: int, itemsize: int, block_bytes: int) -> int:
    """Elements per program: a power of two of at most ``block_bytes`` bytes, no larger than the row needs."""
    block = max(1, block_bytes // itemsize)
    block = 1 << (block.bit_length() - 1)
    return max(1, min(block, 1 << max(0, (width - 1).bit_length())))


def copy_rows(
    dst: jax.Array | int,
    sources: Sequence[jax.Array | None],
    index: jax.Array,
    *,
    block_bytes: int | None = None,
    num_warps: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Copy rows of ``sources`` into ``dst``: for every column ``i`` of ``index [2, n] int32``, row ``index[0, i]``
    of the sources stacked (``[sources[0]; sources[1]; ...]``) into row ``index[1, i]`` of ``dst``.

    ``dst``: an array ``[N, D]`` updated in place (the result; rows no copy writes keep their bytes), or an int
    ``N``: a fresh array whose rows no copy writes are undefined. ``sources``: arrays ``[n_k, D]`` of ``dst``'s
    dtype, or :data:`SELF` (``None``: ``dst`` itself, in place only). A copy whose source row is outside the
    stacked sources or whose destination row is outside ``[0, N)`` is skipped (padding). Copies must write
    distinct rows, and none may write a row of ``dst`` that a :data:`SELF` copy reads. ``block_bytes`` (bytes
    one program moves) and ``num_warps`` (Triton's) default to :data:`BLOCK_BYTES` and :data:`NUM_WARPS`.
    """
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    num_warps = NUM_WARPS if num_warps is None else num_warps
    index = jnp.asarray(index, dtype=jnp.int32)
    if index.ndim != 2 or index.shape[0] != 2:
        raise ValueError(f"index must be [2, n], got {index.shape}")
    fresh = isinstance(dst, int)
    arrays = [s for s in sources if s is not None]
    if fresh and len(arrays) != len(sources):
        raise ValueError("SELF needs dst to be an array (an in-place copy)")
    like = arrays[0] if fresh else dst
    if like.ndim != 2 or any(a.ndim != 2 or a.shape[1] != like.shape[1] or a.dtype != like.dtype for a in arrays):
        raise ValueError("dst and the sources must be [rows, D] arrays of one D and dtype")
    if not supported(like.dtype):
        raise TypeError(f"copy_rows does not take {like.dtype}")
    rows, width = (dst if fresh else dst.shape[0]), like.shape[1]
    copies = index.shape[1]
    if copies == 0 or width == 0:
        return jnp.zeros((rows, width), like.dtype) if fresh else dst
    dtype, word = like.dtype, _WORDS[like.dtype.itemsize]
    arrays = [jax.lax.bitcast_convert_type(a, word) for a in arrays]
    sources = [None if s is None else a for s, a in zip(sources, _fill(sources, arrays), strict=True)]
    if not fresh:
        dst = jax.lax.bitcast_convert_type(dst, word)
    block = _block(width, dtype.itemsize, block_bytes)
    offsets, start = [], 0
    for source in sources:
        offsets.append(start)
        start += rows if source is None else source.shape[0]
    kernel = functools.partial(
        _kernel, offsets=tuple(offsets), sizes=tuple(rows if s is None else s.shape[0] for s in sources),
        selfs=tuple(s is None for s in sources), rows=rows, width=width, block=block, fresh=fresh,
    )  # fmt: skip
    from jax.experimental import pallas as pl

    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, width), word),
        grid=(copies, -(-width // block)),
        input_output_aliases={} if fresh else {1: 0},
        interpret=interpret,
        **params,
    )
    return jax.lax.bitcast_convert_type(call(index, *([] if fresh else [dst]), *arrays), dtype)


def _fill(sources, arrays):
    """``arrays`` (the sources that are arrays) in the places of ``sources``, ``None`` for :data:`SELF`."""
    it = iter(arrays)
    return [None if s is None else next(it) for s in sources]


def _kernel(index_ref, *refs, offsets, sizes, selfs, rows, width, block, fresh):
    from jax.experimental import pallas as pl

    out_ref = refs[-1]
    buffer_ref = None if fresh else refs[0]
    source_refs = iter(refs[0 if fresh else 1 : -1])
    i, chunk = pl.program_id(0), pl.program_id(1)
    src, dst = index_ref[0, i], index_ref[1, i]
    start = chunk * block
    columns = pl.ds(start, block)
    mask = None if width % block == 0 else (start + jnp.arange(block, dtype=jnp.int32)) < width
    valid = (dst >= 0) & (dst < rows)
    for offset, size, is_self in zip(offsets, sizes, selfs, strict=True):
        ref = buffer_ref if is_self else next(source_refs)

        @pl.when(valid & (src >= offset) & (src < offset + size))
        def _(ref=ref, offset=offset):
            _move(ref, src - offset, out_ref, dst, columns, mask)


def _move(src_ref, src, dst_ref, dst, columns, mask):
    if mask is None:
        dst_ref[dst, columns] = src_ref[src, columns]
        return
    from jax.experimental.pallas import triton as plgpu

    plgpu.store(dst_ref.at[dst, columns], plgpu.load(src_ref.at[src, columns], mask=mask), mask=mask)


PERMUTE_GROUP_BYTES = 32768
"""Bytes one program of :func:`permute_rows` holds (all copies of a group, one block of columns each)."""
MAX_GROUP = 64
"""The most copies of one group :func:`permute_rows` takes (each holds a block in registers)."""


def permute_rows(buffer: jax.Array, index: jax.Array, *, interpret: bool = False) -> jax.Array:
    """``buffer [N, D]`` with, for every group ``g`` and copy ``j`` of ``index [n, per, 2] int32``, row
    ``index[g, j, 1]`` set to the *old* row ``index[g, j, 0]``, in place (``input_output_aliases``).

    Every copy reads the bytes the rows held before the call, also when another copy of its group writes them
    (a cycle moves with no staging). A copy with a source or destination outside ``[0, N)`` is skipped. Copies
    must write distinct rows, and no copy may read a row that a copy of *another* group writes. ``per <=``
    :data:`MAX_GROUP`.
    """
    index = jnp.asarray(index, dtype=jnp.int32)
    if index.ndim != 3 or index.shape[2] != 2:
        raise ValueError(f"index must be [groups, copies, 2], got {index.shape}")
    if buffer.ndim != 2 or not supported(buffer.dtype):
        raise ValueError(f"buffer must be a [rows, D] array of a supported dtype, got {buffer.shape} {buffer.dtype}")
    groups, per = index.shape[:2]
    if per > MAX_GROUP:
        raise ValueError(f"permute_rows takes at most {MAX_GROUP} copies a group, got {per}")
    rows, width = buffer.shape
    if groups == 0 or per == 0 or width == 0:
        return buffer
    dtype, word = buffer.dtype, _WORDS[buffer.dtype.itemsize]
    block = _block(width, dtype.itemsize, max(dtype.itemsize, PERMUTE_GROUP_BYTES // per))
    from jax.experimental import pallas as pl

    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=1)
    call = pl.pallas_call(
        functools.partial(_permute_kernel, per=per, rows=rows, width=width, block=block, barrier=not interpret),
        out_shape=jax.ShapeDtypeStruct((rows, width), word),
        grid=(groups, -(-width // block)),
        input_output_aliases={1: 0},
        interpret=interpret,
        **params,
    )
    return jax.lax.bitcast_convert_type(call(index, jax.lax.bitcast_convert_type(buffer, word)), dtype)


def _permute_kernel(index_ref, buffer_ref, out_ref, *, per, rows, width, block, barrier):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    group, chunk = pl.program_id(0), pl.program_id(1)
    start = chunk * block
    columns = pl.ds(start, block)
    inside = (start + jnp.arange(block, dtype=jnp.int32)) < width
    held = []
    for j in range(per):  # every copy's block loaded ...
        src, dst = index_ref[group, j, 0], index_ref[group, j, 1]
        valid = (src >= 0) & (src < rows) & (dst >= 0) & (dst < rows)
        mask = inside & valid
        value = plgpu.load(buffer_ref.at[jnp.where(valid, src, 0), columns], mask=mask)
        held.append((jnp.where(valid, dst, 0), value, mask))
    if barrier:  # ... by every thread of the program before any is stored
        plgpu.debug_barrier()
    for dst, value, mask in held:
        plgpu.store(out_ref.at[dst, columns], value, mask=mask)
