"""The Triton polish kernel (eplb.kernels.polish_triton) equals eplb.algorithms.polish.polish and
eplb.kernels.polish_numba bit for bit.

- under Triton's CPU interpreter (one subprocess: the interpreter is chosen at import), on random small inputs
  (1..4 nodes, 1..4 GPUs per node, 1..5 slots per GPU, lognormal, tied and all-zero loads, limits below, at and
  above the heaviest GPU and among the GPU loads, max_iters 1, 2 and large, int64 and int32 ids), on degenerate
  ones (one expert, one slot per GPU, one GPU per node, no pair, ids of old outside [0, E)), and place_stable
  end to end on torch CPU tensors with the kernel as its polish_fn, against numpy;
- an sm_90 compile without a GPU whose PTX has no fused multiply-add and whose TTIR takes no position out of a
  reordered tile (tests/test_kernels_reshape_order.py's check);
- on CUDA: the kernel on the arguments stabilize passes it for the DeepSeek-V3 loads (288 slots on 32 GPUs in 4
  nodes, and on 144 GPUs) against numba and the array API, and previous= with balance_tolerance=0.005 on torch
  CUDA tensors (which runs the kernel) without a host sync, equal to numpy.
"""

from __future__ import annotations

import importlib.util
import textwrap

import numpy as np
import pytest

import eplb
from eplb.algorithms.polish import polish
from eplb.algorithms.stability import place_stable

from . import cases
from .conftest import interpreter_outputs_equal, needs_gpu, sm90_asm

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
CONFIGS = [((288, 8, 4, 32), {}), ((288, 8, 3, 144), {"hierarchical": False})]
POLISH_ARGS = ("phy2log", "counts", "old", "weight", "limit")


def test_fits():
    pytest.importorskip("triton")
    from eplb.kernels.polish_triton import fits

    assert fits(288, 256, 32, 4) and fits(288, 256, 144, 1) and fits(4, 1, 4, 2) and fits(1, 1, 1, 1)
    assert not fits(8192, 256, 64, 1) and not fits(10, 4, 4, 1) and not fits(12, 4, 4, 3)
    assert not fits(4096, 4096, 4096, 1)  # the copy tables ([GPUs, experts]) would not fit the scratch


def _degenerate_cases() -> list[tuple]:
    """One expert on every slot, one slot per GPU (one GPU per node: no pair), all-zero loads, and ids of old
    outside ``[0, E)`` (no expert: the reference counts none of them)."""
    out = []
    one = np.zeros((1, 8), np.int64)
    out.append((one, np.full((1, 1), 8), one, np.ones((1, 1), np.float32), np.full((1, 1), 4, np.float32), 4, 2, 8))
    cur = np.array([[0, 1, 2, 3, 4, 5]], np.int64)
    old = np.array([[1, 0, 3, 2, 5, 4]], np.int64)
    w = np.array([[3, 3, 2, 2, 1, 1]], np.float32)
    unit = np.ones((1, 6), np.int64)
    out.append((cur, unit, old, w, np.full((1, 1), 3, np.float32), 6, 1, 6))
    out.append((cur, unit, old, np.zeros_like(w), np.zeros((1, 1), np.float32), 6, 3, 6))
    out.append((cur, unit, old, w, np.full((1, 1), 3, np.float32), 3, 3, 6))  # one GPU per node: no pair
    out.append((cur, unit, old, w, np.full((1, 1), 3, np.float32), 6, 1, 0))  # max_iters 0: no step
    strange = np.array([[1, -1, 3, 6, 5, 4]], np.int64)  # -1 and 6 name no expert of 6
    out.append((cur, unit, strange, w, np.full((1, 1), 3, np.float32), 6, 1, 6))
    return out


def _old_ids_valid(case: tuple) -> bool:
    """The numba twin refuses ids of old outside ``[0, E)`` (the kernel and the reference count none)."""
    old, weight = case[2], case[3]
    return bool(old.min() >= 0 and old.max() < weight.shape[1])


_SCRIPT = """
import json, numpy as np, torch
from eplb.kernels import polish_triton as pt
data = np.load({path!r})
calls = json.load(open({calls!r}))
out = {{}}
for k, (kind, p) in enumerate(calls):
    a = lambda name: torch.as_tensor(data[f"{{k}}_{{name}}"])
    if kind == "polish":
        args = [a(name) for name in ("phy2log", "counts", "old", "weight", "limit")]
        out[f"{{k}}_phy2log"] = pt.polish(*args, *p).numpy()
    else:
        import array_api_compat.torch as xpt
        from eplb.algorithms.stability import place_stable
        config, hierarchical, knobs = p
        got = place_stable(
            a("weight"), a("previous"), *config, hierarchical=hierarchical, xp=xpt, polish_fn=pt.polish, **knobs
        )
        for name, x in zip(("phy2log", "log2phy", "logcnt"), got):
            out[f"{{k}}_{{name}}"] = x.numpy()
np.savez({result!r}, **out)
print("ran", len(calls))
"""


def _place_stable_swapping(weight: np.ndarray, previous: np.ndarray, config: tuple, hierarchical: bool, knobs: dict):
    """place_stable on numpy, and whether its polish swapped slots."""
    swapped = []

    def record(phy2log, *args, **kwargs):
        out = polish(phy2log, *args, **kwargs)
        swapped.append(bool((out != phy2log).any()))
        return out

    placement = place_stable(weight, previous, *config, hierarchical=hierarchical, xp=np, polish_fn=record, **knobs)
    return placement, swapped == [True]


def _stable_cases(rng: np.random.Generator) -> list[tuple]:
    """``(weight, previous, config, hierarchical, knobs, placement)``: place_stable on numpy for small configs,
    each on the first drifted load (previous: the old load's placement) where the polish swaps slots."""
    out = []
    for config, hierarchical, knobs in (
        ((32, 8, 2, 4), True, {"tolerance": 0.05}),
        ((24, 4, 2, 4), True, {"tolerance": 0.1}),
        ((40, 4, 2, 8), False, {"tolerance": 0.05, "max_moves": 6}),
    ):
        for _ in range(60):
            old_w = cases.lognormal_f32(rng, 3, 16)
            new_w = (old_w * rng.lognormal(0.0, 0.5, old_w.shape)).astype(np.float32)
            previous = eplb.rebalance_experts(old_w, *config, hierarchical=hierarchical).phy2log
            placement, swapped = _place_stable_swapping(new_w, previous, config, hierarchical, knobs)
            if swapped:
                out.append((new_w, previous, config, hierarchical, knobs, placement))
                break
        else:
            raise AssertionError(f"no load where the polish swaps slots for {config}, {knobs}")
    return out


@needs_triton
def test_equals_the_array_api_and_numba_under_the_interpreter(tmp_path):
    """polish on random and degenerate inputs, and place_stable with the kernel on torch CPU tensors, bit for
    bit (outputs, dtypes)."""
    rng = np.random.default_rng(11)
    polish_cases = [cases.polish_case(rng) for _ in range(80)] + _degenerate_cases()
    arrays, calls, want = {}, [], {}
    changed = 0
    for case in polish_cases:
        k = len(calls)
        arrays |= {f"{k}_{name}": x for name, x in zip(POLISH_ARGS, case[:5], strict=True)}
        calls.append(("polish", [int(p) for p in case[5:]]))
        want[f"{k}_phy2log"] = polish(*case, xp=np)
        changed += int((want[f"{k}_phy2log"] != case[0]).any())
    assert changed >= len(polish_cases) // 3, changed  # most cases swap: the comparison is not vacuous
    for new_w, previous, config, hierarchical, knobs, got in _stable_cases(rng):
        k = len(calls)
        arrays |= {f"{k}_weight": new_w, f"{k}_previous": previous}
        calls.append(("stable", (config, hierarchical, knobs)))
        want.update({f"{k}_{n}": x for n, x in zip(("phy2log", "log2phy", "logcnt"), got, strict=True)})
    got = interpreter_outputs_equal(textwrap.dedent(_SCRIPT), arrays, calls, want, tmp_path)
    if importlib.util.find_spec("numba") is not None:  # the numba twin too (proved equal to the reference)
        from eplb.kernels import polish_numba

        for k, case in enumerate(polish_cases):
            if _old_ids_valid(case):
                np.testing.assert_array_equal(got[f"{k}_phy2log"], polish_numba.polish(*case), err_msg=str(k))


@needs_triton
@pytest.mark.parametrize("shape", [(288, 256, 32, 4), (288, 256, 144, 1)], ids=["hier", "global"])
def test_no_fused_multiply_add_nor_reordered_position_in_ansm90_asm(shape):
    """The kernel compiles for H100/H200 without a GPU at the DeepSeek-V3 sizes: its PTX multiplies and adds
    float32 but has no FMA, and no argmin/argmax reads a tile the compiler may reorder."""
    from eplb.kernels import polish_triton as pt

    from .test_kernels_reshape_order import positions_of_reordered_tiles

    signature = dict.fromkeys(("cur_ptr", "cnt_ptr", "old_ptr"), "*i64")
    signature |= dict.fromkeys(("w_ptr", "limit_ptr", "recip_ptr", "fs_ptr"), "*fp32")
    signature |= {"is_ptr": "*i32", "max_iters": "i32"}
    asm = sm90_asm(pt.polish_kernel, signature, pt._meta(*shape))
    ptx = asm["ptx"]
    assert "mul.f32" in ptx or "mul.rn.f32" in ptx
    assert "add.f32" in ptx or "add.rn.f32" in ptx
    assert "fma." not in ptx
    assert "tt.reduce" in asm["ttir"]
    assert positions_of_reordered_tiles(asm["ttir"]) == []


@needs_gpu("torch")
@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
@pytest.mark.parametrize("knobs", [{"tolerance": 0.005}, {"max_moves": 16}], ids=["tolerance", "max_moves"])
def test_cuda_kernel_equals_numba_on_deepseek_v3(config, knobs):
    """The kernel on CUDA, on the arguments the array-API stabilize passes it for the real loads."""
    import torch

    pytest.importorskip("numba")
    from eplb.kernels import polish_numba
    from eplb.kernels import polish_triton as pt

    new_w, previous = cases.polish_deepseek(config)
    args, want = cases.captured_polish(new_w, previous, config, **knobs)
    assert (want != args[0]).any()  # the polish swaps slots here: the comparison is not vacuous
    on_device = [torch.as_tensor(np.ascontiguousarray(a), device="cuda") for a in args[:5]]
    got = pt.polish(*on_device, *args[5:])
    assert got.device.type == "cuda" and got.dtype == on_device[0].dtype
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    np.testing.assert_array_equal(got.cpu().numpy(), polish_numba.polish(*args))


@needs_gpu("torch")
@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
def test_torch_cuda_previous_runs_the_kernel_without_a_sync(config, monkeypatch):
    """previous= with balance_tolerance=0.005 on CUDA tensors runs the polish kernel (once a call), queues its
    work without a host sync, and matches numpy."""
    import torch

    from eplb.kernels import polish_triton

    sizes, kw = config
    new_w, previous = cases.polish_deepseek(config)
    expected = eplb.rebalance_experts(new_w, *sizes, previous=previous, balance_tolerance=0.005, **kw)
    calls = []
    kernel = polish_triton.polish
    monkeypatch.setattr(polish_triton, "polish", lambda *a, **k: calls.append(a[0].device) or kernel(*a, **k))
    weight, on_device = torch.as_tensor(new_w, device="cuda"), torch.as_tensor(previous, device="cuda")
    eplb.rebalance_experts(weight, *sizes, previous=on_device, balance_tolerance=0.005, **kw)  # the first compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        placement = eplb.rebalance_experts(weight, *sizes, previous=on_device, balance_tolerance=0.005, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 2 and all(device.type == "cuda" for device in calls)
    for got, want in zip(placement, expected, strict=True):
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), want)
