"""Equals :func:`eplb.executors.torch._word_sums` of ``rows[index]``: checksums of chosen slots in one launch (Triton).

Proved by ``tests/test_kernels_checksum_triton.py``: Triton's CPU
interpreter and CUDA against ``_word_sums`` of the gathered rows (random
words, sums that wrap around ``2**32``, rows shorter than a block, rows
whose length is not a multiple of a block, repeated and unsorted indices,
an empty index).

The torch executor's senders checksum every copy of at least
``ZERO_COPY_BYTES`` straight from its weight slot (nothing is gathered, so
there is no batch to reduce). One torch reduction per row of ``[1, N]``
words runs at 43% of an H200's copy bandwidth; this kernel reads every
chosen row once, split into chunks over a ``[rows, chunks]`` grid (enough
programs to fill the card even for a single row), and adds each chunk's
partial sum into its row's int64 total with an ``atomic_add``; the totals are
reduced modulo ``2**32`` at the end.

Why the result is exact and the same as torch's: the checksum is the sum of
the row's 32-bit words (read as int32) modulo ``2**32``. Each lane sums its
words in wrapping int32 (exact modulo ``2**32``), the lanes' and programs'
totals are summed in int64, and the row's total is reduced modulo ``2**32``
once; integer addition is associative and commutative, so the chunking, the
order of the atomics and the reduction tree change nothing.
Rows whose bytes are not a multiple of 4 (``_word_sums`` then sums 16- or
8-bit words) are not handled here (:func:`fits`).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from eplb.kernels.greedy_triton import ensure_cache_dir

__all__ = ["fits", "word_sums", "word_sums_kernel"]

BLOCK = 2048  # words per load: 8 KiB, four 16-byte vectors per thread at 4 warps
CHUNK_BLOCKS = 16  # blocks per program: 128 KiB a program, thousands of programs for a few 88 MB rows


@triton.jit
def word_sums_kernel(words_ptr, index_ptr, out_ptr, row_words, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr):
    """``out[r] += sum(words[index[r], chunk c])`` (int64) for program ``(r, c)``."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    row = tl.load(index_ptr + r).to(tl.int64)  # row * row_words can pass 2**31 words
    base = words_ptr + row * row_words
    first = c.to(tl.int64) * (BLOCK * CHUNK_BLOCKS)
    lanes = tl.arange(0, BLOCK)
    # Lane sums in int32 (wrapping: exact mod 2**32; int64 lanes read at 2,900 GB/s on an H200, int32 ones at
    # 3,603, in two runs), the
    # program's total and the row's in int64: Triton's interpreter raises where an int32 reduction or atomic
    # overflows. The caller reduces the row's total mod 2**32.
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for b in range(CHUNK_BLOCKS):
        at = first + b * BLOCK + lanes
        acc += tl.load(base + at, mask=at < row_words, other=0)
    tl.atomic_add(out_ptr + r, tl.sum(acc.to(tl.int64), axis=0))


def fits(rows: torch.Tensor) -> bool:
    """Whether the kernel applies to ``rows [n, ...]``: contiguous, and each row a whole number of 32-bit words."""
    row_bytes = rows[0].numel() * rows.element_size() if rows.shape[0] else 0
    return rows.is_contiguous() and row_bytes % 4 == 0


def word_sums(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[n]`` int32: the checksum (32-bit words summed modulo ``2**32``) of each row ``rows[index[k]]``.

    ``rows [S, ...]`` contiguous, any dtype, each row a multiple of 4 bytes
    (:func:`fits`); ``index [n]`` integer row numbers on the same device
    (unchecked: callers pass rows of the plan). One zero fill and one launch
    on the current stream; no host sync.
    """
    if not fits(rows):
        raise ValueError(f"rows must be contiguous rows of whole 32-bit words, got shape {tuple(rows.shape)}")
    out = torch.zeros(index.shape[0], dtype=torch.int64, device=rows.device)
    row_words = rows[0].numel() * rows.element_size() // 4 if rows.shape[0] else 0
    if index.shape[0] == 0 or row_words == 0:
        return out.to(torch.int32)
    words = rows.reshape(-1).view(torch.uint8).view(torch.int32)
    grid = (index.shape[0], triton.cdiv(row_words, BLOCK * CHUNK_BLOCKS))
    ensure_cache_dir()
    with torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext():
        word_sums_kernel[grid](words, index, out, row_words, BLOCK=BLOCK, CHUNK_BLOCKS=CHUNK_BLOCKS, num_warps=4)
    return _low_words(out)


def _low_words(total: torch.Tensor) -> torch.Tensor:
    """int64 ``[n]`` to int32 ``[n]`` modulo ``2**32`` (two's complement): the int32 sum's wrapped value."""
    low = torch.bitwise_and(total, 0xFFFFFFFF)
    return torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)
