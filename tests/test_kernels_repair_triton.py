"""The Triton knobs kernels (eplb.kernels.repair_triton) equal eplb.kernels.repair_numba and the array-API
functions bit for bit.

- under Triton's CPU interpreter (one subprocess: the interpreter is chosen at import), on random small inputs
  (tests/test_kernels_repair.py's generators: hierarchical and global, one expert, one slot per GPU, tied and
  all-zero loads, invalid rows, budgets around the start's moves, limits below and above the peak, short
  max_iters), and stabilize end to end on torch CPU tensors with the kernels plugged in (small configs,
  tolerance and max_moves) against numpy;
- an sm_90 compile without a GPU whose PTX has no fused multiply-add;
- on CUDA: the kernels on the arguments stabilize passes them for the DeepSeek-V3 loads (288 slots on 32
  GPUs in 4 nodes, and on 144 GPUs) against numba, and previous= with balance_tolerance=0.005 and with
  max_moves=16 on torch CUDA tensors (which runs these kernels) without a host sync, equal to numpy.
"""

from __future__ import annotations

import importlib.util
import textwrap

import numpy as np
import pytest

import eplb
from eplb.algorithms.relabel import align_slots, replica_counts
from eplb.algorithms.repair import repair, sticky_pack

from . import cases
from .conftest import interpreter_outputs_equal, needs_gpu

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
CONFIGS = [((288, 8, 4, 32), {}), ((288, 8, 3, 144), {"hierarchical": False})]


def test_fits():
    pytest.importorskip("triton")
    from eplb.kernels.repair_triton import fits

    assert fits(288, 256, 32, 4) and fits(288, 256, 144, 1) and fits(4, 1, 4, 2)
    assert not fits(8192, 256, 64, 1) and not fits(10, 4, 4, 1) and not fits(12, 4, 4, 3)


def _repair_cases(rng: np.random.Generator) -> list[tuple]:
    """tests/test_kernels_repair.py's random repair inputs (every 4th with a short max_iters), then one expert
    and one slot per GPU."""
    from .test_kernels_repair import _loads, _placement, _repair_args

    out = [_repair_args(rng, trial) for trial in range(12)]  # CI time: numba takes them all
    for nodes, gpus, per_gpu, experts in ((1, 1, 1, 1), (1, 4, 1, 1), (2, 4, 3, 1), (2, 8, 1, 8), (4, 8, 1, 5)):
        slots = gpus * per_gpu
        start = _placement(rng, 4, slots, experts, cover=True)
        old = _placement(rng, 4, slots, experts, cover=True)
        weight = _loads(rng, 4, experts)
        cnt = replica_counts(start, experts, xp=np)
        budget = np.array([[0], [1], [100], [3]])
        args = (start, cnt, old, weight, np.zeros((4, 1), np.float32), budget, np.ones((4, 1), bool))
        out.append((*args, gpus, nodes, experts if nodes == 1 else 1, 64))
    return out


def _pack_cases(rng: np.random.Generator) -> list[tuple]:
    """sticky_pack inputs as tests/test_kernels_repair.py draws them (ties, all-zero rows, permuted olds)."""
    from .test_kernels_repair import _loads, _placement

    out = []
    for trial in range(6):  # CI time (test_kernels_repair.py runs numba on many more)
        packs, capacity = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        n = packs * capacity
        experts = int(rng.integers(1, n + 1))
        base = _placement(rng, 5, n, experts, cover=False)
        old = base[:, rng.permutation(n)] if trial % 3 == 0 else _placement(rng, 5, n, experts, cover=False)
        item_load = np.take_along_axis(_loads(rng, 5, experts), base, axis=1)
        total = item_load.sum(axis=1, keepdims=True, dtype=np.float32)
        limit = total * np.array([0.0, 0.2, 0.5, 1.0, 2.0], np.float32)[rng.integers(0, 5, (5, 1))] / packs
        out.append((base, old, item_load, limit.astype(np.float32), packs, experts))
    return out


_SCRIPT = """
import json, numpy as np, torch
from eplb.kernels import repair_triton as rt
data = np.load({path!r})
calls = json.load(open({calls!r}))
T = lambda k: torch.as_tensor(data[k])
out = {{}}
for k, (kind, p) in enumerate(calls):
    a = lambda name: T(f"{{k}}_{{name}}")
    if kind == "repair":
        got = rt.repair(a("start"), a("cnt"), a("old"), a("weight"), a("limit"), a("budget"), a("valid"), *p)
        for name, x in zip(("phy2log", "cnt", "moves"), got):
            out[f"{{k}}_{{name}}"] = x.numpy()
    elif kind == "pack":
        packs, experts = p
        out[f"{{k}}_packed"] = rt.sticky_pack(a("base"), a("old"), a("load"), a("limit"), packs).numpy()
        out[f"{{k}}_aligned"] = rt.align_slots(a("base"), a("old"), packs).numpy()
        out[f"{{k}}_counts"] = rt.replica_counts(a("base"), experts).numpy()
    else:
        import array_api_compat.torch as xpt
        from eplb.algorithms.stability import place_stable
        config, hierarchical, knobs = p
        got = place_stable(
            a("weight"), a("previous"), *config, hierarchical=hierarchical, xp=xpt,
            sticky_pack_fn=rt.sticky_pack, repair_fn=rt.repair, align_slots_fn=rt.align_slots,
            replica_counts_fn=rt.replica_counts, **knobs,
        )
        for name, x in zip(("phy2log", "log2phy", "logcnt"), got):
            out[f"{{k}}_{{name}}"] = x.numpy()
np.savez({result!r}, **out)
print("ran", len(calls))
"""


@needs_triton
def test_equals_numba_and_the_array_api_under_the_interpreter(tmp_path):
    """repair, sticky_pack, align_slots, replica_counts on random small inputs, and place_stable with the
    kernels on torch CPU tensors, bit for bit (outputs, dtypes)."""
    from eplb.algorithms.stability import place_stable

    rng = np.random.default_rng(5)
    arrays, calls, want = {}, [], {}
    for start, cnt, old, weight, limit, budget, valid, gpus, nodes, group_size, max_iters in _repair_cases(rng):
        k = len(calls)
        for name, x in zip(
            ("start", "cnt", "old", "weight", "limit", "budget", "valid"),
            (start, cnt, old, weight, limit, budget, valid),
            strict=True,
        ):
            arrays[f"{k}_{name}"] = x
        params = (gpus, nodes, group_size, max_iters)
        calls.append(("repair", params))
        got = repair(start, cnt, old, weight, limit, budget, valid, *params[:3], max_iters=max_iters, xp=np)
        want.update({f"{k}_{n}": x for n, x in zip(("phy2log", "cnt", "moves"), got, strict=True)})
    for base, old, item_load, limit, packs, experts in _pack_cases(rng):
        k = len(calls)
        arrays |= {f"{k}_base": base, f"{k}_old": old, f"{k}_load": item_load, f"{k}_limit": limit}
        calls.append(("pack", (packs, experts)))
        want[f"{k}_packed"] = sticky_pack(base, old, item_load, limit, packs, xp=np)
        want[f"{k}_aligned"] = align_slots(base, old, packs, xp=np)
        want[f"{k}_counts"] = replica_counts(base, experts, xp=np)
    for config, hierarchical in (((24, 4, 2, 4), True), ((20, 4, 4, 4), True), ((16, 4, 2, 8), False)):
        knob_sets = ({"tolerance": 0.0}, {"tolerance": 0.05, "max_moves": 3} if hierarchical else {"max_moves": 1})
        for pair, (old_w, new_w) in enumerate(
            (
                (cases.lognormal_f32(rng, 3, 16), cases.lognormal_f32(rng, 3, 16)),
                (cases.ties(rng, 16)[:4].astype(np.float32), cases.ties(rng, 16)[4:8].astype(np.float32)),
            )
        ):
            previous = eplb.rebalance_experts(old_w, *config, hierarchical=hierarchical).phy2log
            # One knob set a pair of loads, in turn (each call takes 1-3 s under the interpreter): every config
            # runs both sets, on lognormal and on tied loads.
            knobs = knob_sets[pair]
            k = len(calls)
            arrays |= {f"{k}_weight": new_w, f"{k}_previous": previous}
            calls.append(("stable", (config, hierarchical, knobs)))
            got = place_stable(new_w, previous, *config, hierarchical=hierarchical, xp=np, **knobs)
            want.update({f"{k}_{n}": x for n, x in zip(("phy2log", "log2phy", "logcnt"), got, strict=True)})
    got = interpreter_outputs_equal(textwrap.dedent(_SCRIPT), arrays, calls, want, tmp_path)
    if importlib.util.find_spec("numba") is not None:  # the numba kernels too (proved equal to the above)
        from eplb.kernels import repair_numba

        for k, (kind, params) in enumerate(calls):
            if kind == "repair":
                a = [arrays[f"{k}_{n}"] for n in ("start", "cnt", "old", "weight", "limit", "budget", "valid")]
                for name, x in zip(("phy2log", "cnt", "moves"), repair_numba.repair(*a, *params), strict=True):
                    np.testing.assert_array_equal(got[f"{k}_{name}"], x)


@needs_triton
def test_no_fused_multiply_add_in_an_sm90_compile():
    """The repair and packing kernels compile for H100/H200 without a GPU, and their PTX has no FMA."""
    import triton

    from eplb.kernels import repair_triton as rt

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    meta = rt._meta_repair(288, 256, 32, 4, 32)
    sig = dict.fromkeys(("cur_ptr", "cnt_ptr", "old_ptr", "budget_ptr", "moved_ptr"), "*i64")
    sig |= dict.fromkeys(("w_ptr", "limit_ptr", "recip_ptr", "fs_ptr"), "*fp32")
    sig |= {"valid_ptr": "*i32", "is_ptr": "*i32", "max_iters": "i32"}
    sticky_meta = {"N": 72, "M": 8, "C": 9, "BS": 64, "BT": 64, "P_M": 8, "ELASTIC": False, "RESERVE": False}
    sticky_sig = dict.fromkeys(("base_ptr", "old_ptr", "out_ptr"), "*i64") | {"is_ptr": "*i32"}
    sticky_sig |= dict.fromkeys(("load_ptr", "limit_ptr", "init_ptr", "fs_ptr"), "*fp32")
    for kernel, signature, constants, warps in (
        (rt.repair_kernel, sig, meta, 4),
        (rt.sticky_kernel, sticky_sig, sticky_meta, 1),
    ):
        try:
            source = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)
        except TypeError:
            pytest.skip("this Triton's ahead-of-time compile API differs")
        options = {"num_warps": warps, "enable_fp_fusion": False}
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        assert "add.f32" in ptx or "add.rn.f32" in ptx
        assert "fma." not in ptx


def _deepseek(config: tuple) -> tuple[np.ndarray, np.ndarray]:
    sizes, kw = config
    old_w, new_w = cases.deepseek_v3(), cases.deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {cases.DATA}"
    return new_w, eplb.rebalance_experts(old_w, *sizes, **kw).phy2log


@needs_gpu("torch")
@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
@pytest.mark.parametrize("knobs", [{"tolerance": 0.005}, {"tolerance": 0.0, "max_moves": 16}, {"max_moves": 4}])
def test_cuda_kernels_equal_numba_on_deepseek_v3(config, knobs):
    """Each kernel on CUDA, on the arguments the array-API stabilize passes it for the real loads."""
    import torch

    pytest.importorskip("numba")
    from eplb.kernels import repair_numba
    from eplb.kernels import repair_triton as rt

    from .test_kernels_repair import _captured

    new_w, previous = _deepseek(config)
    calls = _captured(new_w, previous, config[0], **knobs)
    # (the second alignment: the polished placement's slots, eplb.algorithms.polish)
    assert [c[0] for c in calls] == [sticky_pack, align_slots, replica_counts, repair, align_slots]

    def cuda(x):
        return torch.as_tensor(np.ascontiguousarray(x), device="cuda") if isinstance(x, np.ndarray) else x

    for fn, args, kwargs, want in calls:
        kernel = {sticky_pack: rt.sticky_pack, align_slots: rt.align_slots, replica_counts: rt.replica_counts}
        if fn is repair:
            got = rt.repair(*[cuda(a) for a in args], max_iters=kwargs["max_iters"])
            numba = repair_numba.repair(*args, kwargs["max_iters"])
            for g, w, n in zip(got, want, numba, strict=True):
                np.testing.assert_array_equal(g.cpu().numpy(), w)
                np.testing.assert_array_equal(g.cpu().numpy(), n)
        else:
            got = kernel[fn](*[cuda(a) for a in args])
            np.testing.assert_array_equal(got.cpu().numpy(), want)


@needs_gpu("torch")
@pytest.mark.parametrize("config", CONFIGS, ids=["hier", "global"])
@pytest.mark.parametrize("knobs", [{"balance_tolerance": 0.005}, {"max_moves": 16}], ids=["tolerance", "max_moves"])
def test_torch_cuda_knobs_run_the_kernels_without_a_sync(config, knobs, monkeypatch):
    """previous= with a knob on CUDA tensors runs repair_triton's kernels, queues work without a host sync, and
    matches numpy."""
    import torch

    from eplb.kernels import repair_triton

    sizes, kw = config
    new_w, previous = _deepseek(config)
    expected = eplb.rebalance_experts(new_w, *sizes, previous=previous, **kw, **knobs)
    calls = []
    for name in ("sticky_pack", "repair", "align_slots", "replica_counts"):
        kernel = getattr(repair_triton, name)
        monkeypatch.setattr(repair_triton, name, lambda *a, _k=kernel, _n=name, **k: calls.append(_n) or _k(*a, **k))
    weight, on_device = torch.as_tensor(new_w, device="cuda"), torch.as_tensor(previous, device="cuda")
    eplb.rebalance_experts(weight, *sizes, previous=on_device, **kw, **knobs)  # the first call compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        placement = eplb.rebalance_experts(weight, *sizes, previous=on_device, **kw, **knobs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sorted(set(calls)) == ["align_slots", "repair", "replica_counts", "sticky_pack"]
    assert len(calls) == 10  # per call: sticky_pack, align_slots, replica_counts, repair, align_slots (polished)
    for got, want in zip(placement, expected, strict=True):
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), want)
