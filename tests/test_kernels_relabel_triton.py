"""The Triton relabelling (eplb.kernels.relabel_triton) equals eplb.algorithms.relabel.relabel bit for bit.

- under Triton's CPU interpreter (one subprocess: the interpreter is chosen at import), on the random,
  permuted, one-expert, one-slot-per-GPU and tied placements of tests/test_kernels_relabel.py (hierarchical
  and global; layers of one shape batched into one launch) and on real-shaped ones (288 slots on 32 GPUs in
  4 nodes, and on 144 GPUs), against the array-API function on numpy, which tests/test_kernels_relabel.py
  proves equal to eplb.kernels.relabel_numba; its slot-order log2phy against build_log2phy(occurrence(...));
- on CUDA, against numpy on the DeepSeek-V3 shapes (hierarchical and global), and previous= on torch CUDA
  tensors (which runs these kernels) without a host sync, equal to numpy.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import eplb
from eplb.algorithms.hierarchy import build_log2phy
from eplb.algorithms.relabel import occurrence, relabel

from . import cases
from .conftest import needs_gpu, run_under_triton_interpreter

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _batched_random_cases() -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """tests/test_kernels_relabel.py's random cases: one layer of every other one (the interpreter takes
    ~0.1 s a layer; trials 0 mod 4 are permuted, 0 mod 14 one-expert), those of each (slots, GPUs, nodes) in
    one batch."""
    from .test_kernels_relabel import _random_cases

    groups = defaultdict(list)
    for trial, (new, old, gpus, nodes, _) in enumerate(_random_cases(np.random.default_rng(0))):
        if trial % 2:
            continue
        layer = slice(trial // 2 % len(new), trial // 2 % len(new) + 1)
        groups[new.shape[1], gpus, nodes].append((new[layer], old[layer]))
    return [
        (np.concatenate([n for n, _ in pairs]), np.concatenate([o for _, o in pairs]), gpus, nodes)
        for (_, gpus, nodes), pairs in sorted(groups.items())
    ]


def _real_cases() -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """Placements of two different DeepSeek-V3 load files: hierarchical 288/32/4 (two layers), global 288/144
    (one: the interpreter takes seconds a layer), and the first against itself reversed in layer order."""
    old_w, new_w = cases.deepseek_v3()[8:10], cases.deepseek_v3("prefill_in2048.json")[8:10]
    out = []
    for config, kw, nodes in (((288, 8, 4, 32), {}, 4), ((288, 8, 3, 144), {"hierarchical": False}, 1)):
        old = eplb.rebalance_experts(old_w, *config, **kw).phy2log
        new = eplb.rebalance_experts(new_w, *config, **kw).phy2log
        out.append((new, old, config[3], nodes) if nodes > 1 else (new[:1], old[:1], config[3], nodes))
    out.append((out[0][0], out[0][0][::-1].copy(), 32, 4))
    return out


def test_fits():
    from eplb.kernels.relabel_triton import fits  # (no compile: importing triton is enough)

    assert fits(288, 32, 4) and fits(288, 144, 1) and fits(16, 16, 2)
    assert not fits(4096, 2048, 1) and not fits(10, 4, 1)


@needs_triton
def test_equals_the_array_api_relabelling_under_the_interpreter(tmp_path):
    """Every layer of every case, and the slot-order log2phy of the real-shaped ones, bit for bit."""
    assert cases.deepseek_v3() is not None, f"real loads expected at {cases.DATA}"
    arrays = {}
    sizes = []
    for k, (new, old, gpus, nodes) in enumerate(_batched_random_cases() + _real_cases()):
        arrays[f"new{k}"], arrays[f"old{k}"] = new, old
        arrays[f"want{k}"] = relabel(new, old, gpus, nodes, xp=np)
        sizes.append((gpus, nodes))
        if new.shape[1] == 288:
            arrays[f"log2phy{k}"] = build_log2phy(new, occurrence(new, xp=np), 256, xp=np)
    np.savez(tmp_path / "cases.npz", **arrays)
    script = f"""
        import numpy as np, torch
        from eplb.kernels import relabel_triton
        data = np.load({str(tmp_path / "cases.npz")!r})
        ran = 0
        for k, (gpus, nodes) in enumerate({sizes!r}):
            new, old = torch.tensor(data[f"new{{k}}"]), torch.tensor(data[f"old{{k}}"])
            got = relabel_triton.relabel(new, old, gpus, nodes).numpy()
            assert np.array_equal(got, data[f"want{{k}}"]), (k, gpus, nodes)
            ran += 1
            if f"log2phy{{k}}" in data:
                got = relabel_triton.log2phy_in_slot_order(new, 256).numpy()
                assert np.array_equal(got, data[f"log2phy{{k}}"]), ("log2phy", k)
                ran += 1
        print("ran", ran)
        """
    out = run_under_triton_interpreter(script, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"ran {len(sizes) + 3}" in out.stdout, out.stdout


@needs_gpu("torch")
@pytest.mark.parametrize(
    "config", [((288, 8, 4, 32), {}, 4), ((288, 8, 3, 144), {"hierarchical": False}, 1)], ids=["hier", "global"]
)
def test_cuda_equals_numpy_on_deepseek_shapes(config):
    """The compiled kernels on CUDA: every layer of the real loads, relabelled against another file's placement,
    itself, and itself reversed in layer order."""
    import torch

    from eplb.kernels import relabel_triton

    (sizes, kw, nodes), gpus = config, config[0][3]
    assert cases.deepseek_v3() is not None, f"real loads expected at {cases.DATA}"
    old = eplb.rebalance_experts(cases.deepseek_v3(), *sizes, **kw).phy2log
    new = eplb.rebalance_experts(cases.deepseek_v3("prefill_in2048.json"), *sizes, **kw).phy2log
    for a, b in ((new, old), (old, old), (new, new[::-1].copy())):
        got = relabel_triton.relabel(torch.as_tensor(a, device="cuda"), torch.as_tensor(b, device="cuda"), gpus, nodes)
        np.testing.assert_array_equal(got.cpu().numpy(), relabel(a, b, gpus, nodes, xp=np))
    got = relabel_triton.log2phy_in_slot_order(torch.as_tensor(new, device="cuda"), 256)
    np.testing.assert_array_equal(got.cpu().numpy(), build_log2phy(new, occurrence(new, xp=np), 256, xp=np))


@needs_gpu("torch")
@pytest.mark.parametrize(
    "config", [((288, 8, 4, 32), {}), ((288, 8, 3, 144), {"hierarchical": False})], ids=["hier", "global"]
)
def test_torch_cuda_previous_runs_the_kernel_without_a_sync(config, monkeypatch):
    """previous= on CUDA tensors runs relabel_triton, queues work without a host sync, and matches numpy."""
    import torch

    from eplb.kernels import relabel_triton

    sizes, kw = config
    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    previous = eplb.rebalance_experts(old_w, *sizes, **kw).phy2log
    expected = eplb.rebalance_experts(new_w, *sizes, previous=previous, **kw)
    calls = []
    kernel = relabel_triton.relabel
    monkeypatch.setattr(relabel_triton, "relabel", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    weight, on_device = torch.as_tensor(new_w, device="cuda"), torch.as_tensor(previous, device="cuda")
    eplb.rebalance_experts(weight, *sizes, previous=on_device, **kw)  # the first call compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        placement = eplb.rebalance_experts(weight, *sizes, previous=on_device, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 2
    for got, want in zip(placement, expected, strict=True):
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), want)
