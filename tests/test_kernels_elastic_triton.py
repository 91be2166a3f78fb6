"""The Triton kernels on the active_gpus= (+ previous=) path equal the array API bit for bit.

Failed GPUs' slots hold -1 there: eplb.kernels.repair_triton's sticky_pack (initial_load, reserve), repair (-1
slots) and align_slots, and eplb.kernels.relabel_triton.relabel_pinned, against
eplb.algorithms.repair.sticky_pack / repair, eplb.algorithms.relabel.align_slots and
eplb.algorithms.elastic.relabel_pinned; eplb.kernels.replication_triton.replicate_experts against
eplb.algorithms.replication.replicate_experts:

- under Triton's CPU interpreter (one subprocess), on tests/test_kernels_repair_elastic.py's random inputs and
  degenerate ones (one expert, one slot per GPU or pack, every GPU but one failed, every GPU failed, all-zero
  loads; for the replication tied, all-zero and one-hot rows, no extra slot, the DeepSeek-V3 sizes), and
  place_elastic_stable end to end on torch CPU tensors with the kernels plugged in (those five,
  eplb.kernels.choose_triton.heaviest_gpu, eplb.kernels.group_split_triton.sticky_group_split,
  eplb.kernels.polish_triton.polish on polish_live's arguments (the empty slots as one more expert), and the
  sticky packing for the fresh placements too; global and
  hierarchical, a node down, a GPU back from a failure; tolerance None / 0 / 0.05, or 0 alone) against numpy,
  and the fresh place_elastic with the kernels replicating and packing;
- an sm_90 compile without a GPU of the elastic variants, with no fused multiply-add in the PTX;
- on CUDA: each kernel on the arguments place_elastic_stable passes it for the DeepSeek-V3 loads, and
  rebalance_experts(previous=, active_gpus=) on torch CUDA tensors running the kernels, without a host sync,
  equal to numpy.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import eplb
from eplb.algorithms.elastic import relabel_pinned
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.relabel import align_slots, replica_counts
from eplb.algorithms.repair import repair, sticky_pack
from eplb.algorithms.replication import replicate_experts

from . import cases
from .conftest import interpreter_outputs_equal, needs_gpu
from .test_kernels_repair import _loads as _weights
from .test_kernels_repair_elastic import _captured, _dead, _repair_args, _sticky_args

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _sticky_cases(rng: np.random.Generator) -> list[tuple]:
    """(base, old, item_load, limit, packs, initial, reserve): random ones, then one expert, one slot per pack,
    every pack but one failed, all-zero and tied loads, unbounded limits."""
    out = []
    for trial in range(5):  # CI time: the interpreter (numba takes 400 such trials: test_kernels_repair_elastic)
        base, old, item_load, limit, packs, initial = _sticky_args(rng, trial)
        out.append((base, old, item_load, limit, packs, initial, trial % 2 == 1))
    # More items than one tile of the kernel's loops (64): 150 items in 10 packs, 6 of them live.
    n, live = 150, np.isin(np.arange(10), [0, 2, 3, 5, 8, 9])
    base = np.where(np.repeat(~live, 15), -1, rng.integers(0, 40, (3, n)))
    old = np.where(rng.random((3, n)) < 0.3, -1, base[:, rng.permutation(n)])
    item_load = np.where(base >= 0, _weights(rng, 3, 40)[np.arange(3)[:, None], np.maximum(base, 0)], -1)
    limit = np.array([[0.0], [3000.0], [MAX_LOAD]], np.float32)
    initial = np.where(live, 0.0, np.inf).astype(np.float32)[None, :]
    out += [(base, old, item_load.astype(np.float32), limit, 10, initial, reserve) for reserve in (False, True)]
    for packs, capacity, experts in ((1, 1, 1), (4, 1, 1), (3, 4, 1), (5, 3, 7)):
        n = packs * capacity
        for live in ([0], [packs - 1], list(range(0, packs, 2))):
            alive = np.isin(np.arange(packs), live)
            dead_slot = np.repeat(~alive, capacity)
            base = np.where(dead_slot, -1, rng.integers(0, experts, (3, n)))
            old = np.where(dead_slot, -1, np.roll(base, 1, axis=1))
            loads = np.stack([np.zeros(experts), np.full(experts, 3.0), rng.integers(0, 3, experts)]).astype(np.float32)
            item_load = np.where(base >= 0, np.take_along_axis(loads, np.maximum(base, 0), 1), -1).astype(np.float32)
            initial = np.where(alive, 0.0, np.inf).astype(np.float32)[None, :]
            for limit in (0.0, 3.0, MAX_LOAD):
                out.append((base, old, item_load, np.full((3, 1), limit, np.float32), packs, initial, limit == 3.0))
    return out


def _repair_cases(rng: np.random.Generator) -> list[tuple]:
    """(start, cnt, old, weight, limit, budget, valid, gpus, nodes, group_size, max_iters): random ones, then
    one expert, one slot per GPU, every GPU but one failed and every GPU failed, all-zero loads."""
    out = [tuple(_repair_args(rng, trial)) for trial in range(5)]
    for nodes, gpus, per_gpu, experts in ((1, 2, 1, 1), (2, 4, 3, 1), (2, 8, 1, 4), (1, 6, 2, 5)):
        slots = gpus * per_gpu
        for live in ([0], list(range(0, gpus, 2)), []):
            dead_slot = np.repeat(~np.isin(np.arange(gpus), live), per_gpu)
            live_slots = np.flatnonzero(~dead_slot)
            start = np.full((3, slots), -1)
            start[:, live_slots] = rng.integers(0, experts, (3, len(live_slots)))
            if len(live_slots) >= experts:
                start[:, live_slots[:experts]] = np.arange(experts)
            old = np.where(dead_slot, -1, rng.integers(-1, experts, (3, slots)))
            cnt = replica_counts(start, experts, xp=np)
            weight = _weights(rng, 3, experts)
            weight[1] = 0.0
            limit = np.array([[0.0], [0.0], [-1.0]], np.float32)  # (a negative limit is never met)
            budget = np.array([[100], [1], [100]])
            group_size = experts if nodes == 1 else 1
            out.append((start, cnt, old, weight, limit, budget, np.ones((3, 1), bool), gpus, nodes, group_size, 64))
    return out


def _relabel_cases(rng: np.random.Generator) -> list[tuple]:
    """(new, old, live, gpus, nodes): -1 exactly on new's failed GPUs, old's -1 anywhere; one mask per row or
    one for all."""
    out = []
    for trial in range(6):
        nodes, per_node, per_gpu = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 5))
        gpus = nodes * per_node
        slots = gpus * per_gpu
        experts = int(rng.integers(1, slots + 1))
        dead = _dead(rng, 4, gpus)
        new = np.where(np.repeat(dead, per_gpu, axis=1), -1, rng.integers(0, experts, (4, slots)))
        old = new[:, rng.permutation(slots)] if trial % 3 == 0 else rng.integers(0, experts, (4, slots))
        old = np.where(rng.random((4, slots)) < 0.2, -1, old)
        out.append((new, old, ~dead if trial % 2 else ~dead[:1], gpus, nodes))
    return out


def _replicate_cases(rng: np.random.Generator) -> list[tuple]:
    """(weight [B, E] float32, num_phy): lognormal, tied, all-zero and one-hot rows, one expert, no extra slot,
    every extra slot to one expert, the DeepSeek-V3 per-node and global sizes."""
    out = []
    for experts, num_phy in ((1, 1), (1, 5), (4, 4), (5, 13), (16, 36), (64, 72), (256, 288)):
        weight = _weights(rng, 6, experts)
        weight[0] = 0.0
        weight[1] = 3.0
        weight[2] = 0.0
        weight[2, experts // 2] = 1.0
        out.append((weight, num_phy))
    return out


# (experts, slots, groups, nodes, gpus, hierarchical, failed GPUs now, failed GPUs in the previous placement)
_END_TO_END = [
    (16, 32, 1, 1, 8, False, [2, 5], [5]),
    (16, 32, 1, 1, 8, False, [1], [1, 6]),  # GPU 6 is back, empty
    (1, 4, 1, 1, 4, False, [0, 1, 2], []),  # one expert, one live GPU
    (6, 8, 1, 1, 8, False, [0, 7], [3]),  # one slot per GPU
    (16, 24, 4, 2, 4, True, [2, 3], []),  # a node down: the global rule
    (16, 32, 4, 2, 8, True, [6], [1]),
]


def _end_to_end_cases() -> list[tuple]:
    out = []
    for k, (experts, slots, groups, nodes, gpus, hierarchical, dead, was_dead) in enumerate(_END_TO_END):
        rng = np.random.default_rng(k)
        w_old, w_new = (cases.lognormal_f32(rng, 2, experts) for _ in range(2))  # (2 layers: interpreter time)
        sizes = (slots, groups, nodes, gpus)
        was = np.isin(np.arange(gpus), was_dead, invert=True)
        previous = eplb.rebalance_experts(w_old, *sizes, hierarchical=hierarchical, active_gpus=was).phy2log
        mask = np.isin(np.arange(gpus), dead, invert=True)
        # One tolerance a case, in turn (each hierarchical case costs ~13 s under the interpreter, so two: a node
        # down and a GPU down): the exact relabelling alone, the search at 0, the search at 0.05.
        out.append((w_new, np.asarray(previous), mask, sizes, hierarchical, (None, 0.0, 0.05)[k % 3]))
    return out


_SCRIPT = """
import json, numpy as np, torch
import array_api_compat.torch as xpt
from eplb.algorithms.elastic import place_elastic, place_elastic_stable
from eplb.kernels import choose_triton as ct, relabel_triton as rl, repair_triton as rt, replication_triton as rp
from eplb.kernels import group_split_triton as gs, polish_triton as pt
data = np.load({path!r})
calls = json.load(open({calls!r}))
out = {{}}
for k, (kind, p) in enumerate(calls):
    a = lambda name: torch.as_tensor(data[f"{{k}}_{{name}}"])
    if kind == "pack":
        packs, reserve = p
        out[f"{{k}}_packed"] = rt.sticky_pack(
            a("base"), a("old"), a("load"), a("limit"), packs, initial_load=a("initial"), reserve=reserve
        ).numpy()
        out[f"{{k}}_aligned"] = rt.align_slots(a("base"), a("old"), packs).numpy()
    elif kind == "repair":
        got = rt.repair(a("start"), a("cnt"), a("old"), a("weight"), a("limit"), a("budget"), a("valid"), *p)
        for name, x in zip(("phy2log", "cnt", "moves"), got):
            out[f"{{k}}_{{name}}"] = x.numpy()
    elif kind == "relabel":
        gpus, nodes = p
        out[f"{{k}}_relabelled"] = rl.relabel_pinned(a("new"), a("old"), a("live"), gpus, num_nodes=nodes).numpy()
    elif kind == "replicate":
        for name, x in zip(("phy2log", "phyrank", "logcnt"), rp.replicate_experts(a("weight"), p)):
            out[f"{{k}}_{{name}}"] = x.numpy()
    elif kind == "fresh":
        sizes, hierarchical = p
        got = place_elastic(
            a("weight"), *sizes, active_gpus=a("mask"), hierarchical=hierarchical, xp=xpt,
            sticky_pack_fn=rt.sticky_pack, replicate_fn=rp.replicate_experts,
        )
        for name, x in zip(("phy2log", "log2phy", "logcnt"), got):
            out[f"{{k}}_{{name}}"] = x.numpy()
    else:
        sizes, hierarchical, tolerance = p
        got = place_elastic_stable(
            a("weight"), a("previous"), *sizes, active_gpus=a("mask"), hierarchical=hierarchical,
            tolerance=tolerance, xp=xpt, relabel_pinned_fn=rl.relabel_pinned, sticky_pack_fn=rt.sticky_pack,
            repair_fn=rt.repair, align_slots_fn=rt.align_slots, heaviest_gpu_fn=ct.heaviest_gpu,
            replicate_fn=rp.replicate_experts, polish_fn=pt.polish,
            **({{"group_split_fn": gs.sticky_group_split}} if gs.fits(a("weight").shape[1], *sizes[:3]) else {{}}),
        )
        for name, x in zip(("phy2log", "log2phy", "logcnt"), got):
            out[f"{{k}}_{{name}}"] = x.numpy()
np.savez({result!r}, **out)
print("ran", len(calls))
"""


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the reference's products near MAX_LOAD
def test_equal_the_array_api_under_the_interpreter(tmp_path):
    from eplb.algorithms.elastic import place_elastic, place_elastic_stable

    rng = np.random.default_rng(21)
    arrays, calls, want = {}, [], {}

    def add(kind: str, params: tuple, inputs: dict) -> int:
        k = len(calls)
        arrays.update({f"{k}_{name}": x for name, x in inputs.items()})
        calls.append((kind, params))
        return k

    for base, old, item_load, limit, packs, initial, reserve in _sticky_cases(rng):
        inputs = {"base": base, "old": old, "load": item_load, "limit": limit, "initial": initial}
        k = add("pack", (packs, reserve), inputs)
        want[f"{k}_packed"] = sticky_pack(
            base, old, item_load, limit, packs, initial_load=initial, reserve=reserve, xp=np
        )
        want[f"{k}_aligned"] = align_slots(base, old, packs, xp=np)
    for *args, gpus, nodes, group_size, max_iters in _repair_cases(rng):
        names = ("start", "cnt", "old", "weight", "limit", "budget", "valid")
        k = add("repair", (gpus, nodes, group_size, max_iters), dict(zip(names, args, strict=True)))
        got = repair(*args, gpus, nodes, group_size, max_iters=max_iters, xp=np)
        want.update({f"{k}_{n}": x for n, x in zip(("phy2log", "cnt", "moves"), got, strict=True)})
    for new, old, live, gpus, nodes in _relabel_cases(rng):
        k = add("relabel", (gpus, nodes), {"new": new, "old": old, "live": live})
        want[f"{k}_relabelled"] = relabel_pinned(new, old, live, gpus, num_nodes=nodes, xp=np)
    for weight, num_phy in _replicate_cases(rng):
        k = add("replicate", num_phy, {"weight": weight})
        got = replicate_experts(weight, num_phy, xp=np)
        want.update({f"{k}_{n}": x for n, x in zip(("phy2log", "phyrank", "logcnt"), got, strict=True)})
    for weight, previous, mask, sizes, hierarchical, tolerance in _end_to_end_cases():
        # The fresh placement, its replicas packed by the sticky kernel.
        k = add("fresh", (sizes, hierarchical), {"weight": weight, "mask": mask})
        got = place_elastic(weight, *sizes, active_gpus=mask, hierarchical=hierarchical, xp=np)
        want.update({f"{k}_{n}": x for n, x in zip(("phy2log", "log2phy", "logcnt"), got, strict=True)})
        k = add("stable", (sizes, hierarchical, tolerance), {"weight": weight, "previous": previous, "mask": mask})
        got = place_elastic_stable(
            weight, previous, *sizes, active_gpus=mask, hierarchical=hierarchical, tolerance=tolerance, xp=np
        )
        want.update({f"{k}_{n}": x for n, x in zip(("phy2log", "log2phy", "logcnt"), got, strict=True)})
    interpreter_outputs_equal(_SCRIPT, arrays, calls, want, tmp_path)
    # The cases exercise what the kernels learnt: rows with failed GPUs that the search changed.
    searched = 0
    for k, (kind, _) in enumerate(calls):
        if kind == "repair":
            start = arrays[f"{k}_start"]
            searched += int(np.sum(np.any(want[f"{k}_phy2log"] != start, axis=1) & np.any(start < 0, axis=1)))
    assert searched >= 5


def test_no_fused_multiply_add_in_an_sm90_compile_of_the_elastic_variants():
    """sticky_kernel with ELASTIC (and RESERVE), relabel_kernel with PINNED and replicate_kernel compile for
    H100/H200 without a GPU; no FMA in the packing's and the replication's PTX."""
    import triton

    from eplb.kernels import relabel_triton as rl
    from eplb.kernels import repair_triton as rt
    from eplb.kernels import replication_triton as rp

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    sticky = {"N": 72, "M": 8, "C": 9, "BS": 64, "BT": 64, "P_M": 8, "ELASTIC": True, "RESERVE": True}
    sticky_sig = dict.fromkeys(("base_ptr", "old_ptr", "out_ptr"), "*i64") | {"is_ptr": "*i32"}
    sticky_sig |= dict.fromkeys(("load_ptr", "limit_ptr", "init_ptr", "fs_ptr"), "*fp32")
    relabel = {**rl._meta(288, 32, 4), "PINNED": True}
    replicate = {"E": 256, "R": 288, "P_E": 256}
    replicate_sig = dict.fromkeys(("w_ptr", "recip_ptr"), "*fp32") | dict.fromkeys(
        ("phy_ptr", "rank_ptr", "cnt_ptr"), "*i64"
    )
    relabel_sig = dict.fromkeys(("new_ptr", "old_ptr", "out_ptr", "scratch_ptr"), "*i64") | {"live_ptr": "*i32"}
    for kernel, signature, constants, fma_free in (
        (rt.sticky_kernel, sticky_sig, sticky, True),
        (rt.sticky_kernel, sticky_sig, {**sticky, "RESERVE": False}, True),
        (rl.relabel_kernel, relabel_sig, relabel, False),  # integers only
        (rp.replicate_kernel, replicate_sig, replicate, True),
    ):
        try:
            source = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)
        except TypeError:
            pytest.skip("this Triton's ahead-of-time compile API differs")
        options = {"num_warps": 4, "enable_fp_fusion": False}
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        if fma_free:
            assert "fma." not in ptx


@needs_gpu("torch")
@pytest.mark.parametrize(("config", "dead"), cases.ELASTIC_GPU_CASES, ids=cases.ELASTIC_GPU_IDS)
def test_cuda_kernels_equal_the_array_api_on_deepseek_v3(config, dead):
    """Each kernel on CUDA, on the arguments place_elastic_stable passes it for the real loads."""
    import torch

    from eplb.kernels import relabel_triton as rl
    from eplb.kernels import repair_triton as rt

    weight, previous, mask = cases.deepseek_elastic(config, dead)
    calls = _captured(weight, previous, config[0], config[1], mask, 0.05)

    def cuda(x):
        return torch.as_tensor(np.ascontiguousarray(x), device="cuda") if isinstance(x, np.ndarray) else x

    kernel = {sticky_pack: rt.sticky_pack, align_slots: rt.align_slots, relabel_pinned: rl.relabel_pinned}
    for fn, args, kwargs, want in calls:
        kwargs = {k: cuda(v) for k, v in kwargs.items() if k != "xp"}
        got = (rt.repair if fn is repair else kernel[fn])(*[cuda(a) for a in args], **kwargs)
        for g, w in zip(got if fn is repair else (got,), want if fn is repair else (want,), strict=True):
            np.testing.assert_array_equal(g.cpu().numpy(), w)


@needs_gpu("torch")
@pytest.mark.parametrize(("config", "dead"), cases.ELASTIC_GPU_CASES, ids=cases.ELASTIC_GPU_IDS)
@pytest.mark.parametrize("tolerance", [None, 0.005])
def test_torch_cuda_elastic_previous_runs_the_kernels_without_a_sync(config, dead, tolerance, monkeypatch):
    import torch

    from eplb.kernels import choose_triton, polish_triton, relabel_triton, repair_triton, replication_triton

    (sizes, hierarchical) = config
    weight, previous, mask = cases.deepseek_elastic(config, dead)
    kw = {"hierarchical": hierarchical, "active_gpus": mask, "balance_tolerance": tolerance}
    expected = eplb.rebalance_experts(weight, *sizes, previous=previous, **kw)
    calls = []
    kernels = [(relabel_triton, "relabel_pinned"), (repair_triton, "repair"), (repair_triton, "sticky_pack")]
    kernels += [(repair_triton, "align_slots"), (choose_triton, "heaviest_gpu"), (polish_triton, "polish")]
    for module, name in [*kernels, (replication_triton, "replicate_experts")]:
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **k: calls.append(_n) or _k(*a, **k))
    on_device = {"previous": torch.as_tensor(previous, device="cuda")}
    kw["active_gpus"] = torch.as_tensor(mask, device="cuda")
    w = torch.as_tensor(weight, device="cuda")
    eplb.rebalance_experts(w, *sizes, **on_device, **kw)  # the first call compiles
    torch.cuda.synchronize()
    calls.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        placement = eplb.rebalance_experts(w, *sizes, **on_device, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(calls) == {
        "relabel_pinned", "repair", "sticky_pack", "align_slots", "heaviest_gpu", "replicate_experts", "polish"
    }  # fmt: skip
    for got, want in zip(placement, expected, strict=True):
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), want)
