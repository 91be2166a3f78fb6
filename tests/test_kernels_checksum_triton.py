"""The senders' checksum kernel (eplb.kernels.checksum_triton) equals eplb.executors.torch._word_sums.

The oracle is ``_word_sums`` of the gathered rows (torch's int32 sum), checked itself against a plain-Python
sum of the words modulo 2**32 here. Cases: random words whose sums wrap around 2**32, rows shorter than a
block, rows of several chunks with a partial last one, repeated and unsorted indices, an empty index, and
float32 / bf16 / fp16 / int32 rows. Under Triton's CPU interpreter (a subprocess: the interpreter is chosen at
import) and on CUDA, where the executor's senders use it (``_slot_sums``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb.executors.torch import _slot_sums, _word_sums

from .conftest import needs_gpu, run_under_triton_interpreter

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# (rows shape, dtype, index): one word; rows under one block; several chunks with a partial last one.
CASES = [
    ((4, 1), torch.int32, [3, 0, 0, 1]),
    ((5, 3, 700), torch.bfloat16, [4, 2]),
    ((3, 2, 2), torch.float16, [1]),
    ((6, 70001), torch.float32, [5, 0, 5, 2]),
    ((2, 8), torch.float32, []),
]


def _rows(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bits (any pattern, NaNs included) viewed as ``dtype``: the checksum reads words, not values."""
    size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    bits = np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)
    return torch.from_numpy(bits).view(dtype).reshape(shape)


def _python_sums(rows: torch.Tensor, index: list[int]) -> list[int]:
    """Plain Python: each row's little-endian 32-bit words summed, modulo 2**32, as a signed int32."""
    out = []
    for r in index:
        data = rows[r].contiguous().view(torch.uint8).numpy().tobytes()
        total = sum(int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)) % 2**32
        out.append(total - 2**32 if total >= 2**31 else total)
    return out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_oracle_is_the_plain_python_sum(case):
    shape, dtype, index = CASES[case]
    rows = _rows(shape, dtype, case)
    if rows[0].numel() * rows.element_size() % 4 == 0 and index:
        assert _word_sums(rows[index]).tolist() == _python_sums(rows, index)


@needs_triton
def test_equals_word_sums_under_the_interpreter(tmp_path):
    arrays = {}
    for k, (shape, dtype, index) in enumerate(CASES):
        rows = _rows(shape, dtype, k)
        arrays[f"rows{k}"] = rows.view(torch.uint8).numpy()
        arrays[f"index{k}"] = np.asarray(index, dtype=np.int64)
        arrays[f"want{k}"] = _word_sums(rows[index]).numpy() if index else np.zeros(0, np.int32)
    np.savez(tmp_path / "cases.npz", **arrays)
    script = f"""
        import numpy as np, torch
        from eplb.kernels import checksum_triton
        data = np.load({str(tmp_path / "cases.npz")!r})
        shapes = {[(c[0], str(c[1]).split(".")[1]) for c in CASES]!r}
        for k, (shape, dtype) in enumerate(shapes):
            rows = torch.from_numpy(data[f"rows{{k}}"]).view(getattr(torch, dtype)).reshape(shape)
            got = checksum_triton.word_sums(rows, torch.from_numpy(data[f"index{{k}}"]))
            assert got.dtype == torch.int32 and np.array_equal(got.numpy(), data[f"want{{k}}"]), k
        print("ran", len(shapes))
        """
    out = run_under_triton_interpreter(script, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"ran {len(CASES)}" in out.stdout, out.stdout


def test_rows_of_odd_bytes_are_refused_by_the_kernel_and_summed_by_the_fallback():
    rows = _rows((3, 3), torch.uint8, 7)  # 3 bytes a row: _word_sums sums bytes
    from_fallback = _slot_sums(rows, torch.tensor([2, 0]), np.array([2, 0]))
    assert from_fallback.tolist() == _word_sums(rows[[2, 0]]).tolist()
    if importlib.util.find_spec("triton") is not None:
        from eplb.kernels import checksum_triton

        assert not checksum_triton.fits(rows)
        with pytest.raises(ValueError, match="whole 32-bit words"):
            checksum_triton.word_sums(rows, torch.tensor([0]))


@needs_gpu("torch")
def test_cuda_equals_word_sums_and_the_senders_use_it(monkeypatch):
    """On CUDA: every case, a few 88 MB DeepSeek-V3-sized rows, and the executor's ``_slot_sums`` (which must
    take the kernel: the per-row fallback is made to fail)."""
    from eplb.kernels import checksum_triton

    cases = [*CASES, ((3, 4096, 7168), torch.bfloat16, [2, 0, 1, 2])]
    for k, (shape, dtype, index) in enumerate(cases):
        rows = _rows(shape, dtype, k).cuda()
        got = checksum_triton.word_sums(rows, torch.tensor(index, dtype=torch.int64, device="cuda"))
        want = _word_sums(rows[index]) if index else torch.zeros(0, dtype=torch.int32, device="cuda")
        assert torch.equal(got, want), k
    rows = _rows((4, 1024, 512), torch.bfloat16, 9).cuda()
    monkeypatch.setattr("eplb.executors.torch._word_sums", None)  # the fallback would call it
    got = _slot_sums(rows, torch.tensor([3, 1], device="cuda"), np.array([3, 1]))
    assert got.tolist() == _python_sums(rows.cpu(), [3, 1])
