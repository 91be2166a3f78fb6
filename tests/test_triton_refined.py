"""The fused Triton kernels of the refined policy: same placement as the array-API path.

On a GPU they are what torch CUDA inputs use by default for ``policy="refined"``;
here they are compared with torch ops on the same device, and run under
Triton's CPU interpreter (a subprocess, since the interpreter is chosen at
import) against the numpy reference, on loads where every part of the policy
acts: other group splits, capped replication, swaps (stopped early, and cut
by ``num_iters``), ties and ``-0.0``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from . import cases
from .conftest import needs_gpu, run_under_triton_interpreter

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
needs_cuda = needs_gpu("torch")

CUDA_CONFIGS = [(288, 8, 4, 32), (288, 8, 3, 144), (768, 32, 32, 256), (320, 8, 8, 64), (144, 4, 1, 16)]


def _experts(config: tuple[int, ...]) -> int:
    return {288: 256, 320: 256, 144: 128, 768: 512}.get(config[0], 16)


def zipf(rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    """Skewed loads (1/rank, ranks shuffled): swaps and other splits pay off here."""
    ranks = np.stack([rng.permutation(experts) for _ in range(layers)]) + 1
    return (1e5 / ranks).astype(np.float32)


def hot(rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    """Lognormal loads with one expert 20x hotter: replication caps and group splits matter."""
    weight = cases.lognormal_f32(rng, layers, experts, sigma=2.0)
    weight[np.arange(layers), rng.integers(0, experts, layers)] *= 20
    return weight


def interpreter_cases() -> list[tuple[tuple[int, ...], np.ndarray, int | None]]:
    """(config, float32 loads [L, 16], num_iters) for the interpreter run; small, to stay fast.

    The interpreter runs the cut-short case with one program per row (``parallel=False``),
    the others with one program per candidate.
    """
    rng = np.random.default_rng(7)
    ties = cases.ties(rng, 16).astype(np.float32)
    signed_zeros = np.array([[-0.0, 0.0, 3.0, -0.0] * 4], dtype=np.float32)
    return [
        # 8 groups on 2 nodes (35 splits): other splits win; pigeonhole bound active
        ((20, 8, 2, 4), hot(np.random.default_rng(6), 3, 16), None),
        # 5 slots per GPU (not a power of 2), capped replication, swaps, ties, -0.0
        ((40, 4, 2, 8), np.concatenate([ties[[0, 2, 5]], signed_zeros, zipf(rng, 1, 16), hot(rng, 1, 16)]), None),
        # subnormals and loads below 2**-64 (read as 0) next to 2**-64 and normal loads
        ((40, 4, 2, 8), np.concatenate([cases.tiny_loads(rng, 16), zipf(rng, 1, 16)]), None),
        # the same with the swap rounds cut short
        ((40, 4, 2, 8), hot(np.random.default_rng(5), 2, 16), 2),
        # global policy (3 groups on 2 nodes): one row of 32 slots on 8 GPUs
        ((32, 3, 2, 8), np.concatenate([cases.random_int(rng, 2, 16).astype(np.float32), zipf(rng, 2, 16)]), None),
        # one slot per GPU; one group per node, one GPU per node
        ((16, 4, 2, 16), np.concatenate([ties[[2, 3]], zipf(rng, 2, 16)]), None),
        ((20, 4, 4, 4), np.concatenate([ties[[4, 6]], hot(rng, 2, 16)]), None),
    ]


def refined_xp(weight: np.ndarray, config: tuple[int, ...], num_iters: int | None) -> tuple[np.ndarray, ...]:
    """The numpy array-API reference (``num_iters`` passed through), as ``(phy2log, log2phy, logcnt)``."""
    from eplb.algorithms.hierarchy import build_log2phy
    from eplb.algorithms.refined import rebalance_refined

    phy2log, phyrank, logcnt = rebalance_refined(
        weight, *config, hierarchical=config[1] % config[2] == 0, xp=np, num_iters=num_iters
    )
    return phy2log, build_log2phy(phy2log, phyrank, weight.shape[1], xp=np), logcnt


def test_interpreter_cases_exercise_the_policy():
    """The interpreter loads reach every branch: other splits, capped replication, swaps, the iteration cap."""
    from eplb.algorithms import refined
    from eplb.algorithms.hierarchy import greedy_group_split
    from eplb.backends import _numpy

    split_differs = replication_differs = swapped = cut = 0
    for config, weight, num_iters in interpreter_cases():
        hierarchical = config[1] % config[2] == 0
        if hierarchical:
            split, _ = refined.group_split(weight, *config, xp=np)
            split_differs += int((split != greedy_group_split(weight, config[1], config[2], xp=np)).any(1).sum())
        full = refined_xp(weight, config, None)
        swapped += int((refined_xp(weight, config, 0)[0] != full[0]).any(1).sum())
        if num_iters is not None:
            cut += int((refined_xp(weight, config, num_iters)[0] != full[0]).any(1).sum())
        greedy = _numpy.rebalance(weight, *config, hierarchical=hierarchical, impl="xp")  # (no numba compile)
        replication_differs += int((greedy[2] != full[2]).any(1).sum())
    assert split_differs >= 2 and swapped >= 5 and cut >= 1 and replication_differs >= 5, (
        split_differs,
        swapped,
        cut,
        replication_differs,
    )


def _interpreter_too_old() -> bool:
    """Seen on the GPU machine: Triton 3.6's interpreter (numpy 2.5) raises "only 0-dimensional arrays can be
    converted to Python scalars" in the candidates kernel, which compiles and passes on CUDA there."""
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)


@needs_triton
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is not None and _interpreter_too_old(),
    reason="Triton < 3.7's CPU interpreter cannot run these kernels; the CUDA tests here compile them instead",
)
def test_kernels_under_triton_interpreter():
    """Every interpreter case through Triton's CPU interpreter equals the numpy reference bit for bit."""
    script = """
        import numpy as np, torch
        from eplb.kernels.refined_triton import rebalance_refined_cuda
        from tests.test_triton_refined import interpreter_cases, refined_xp
        for config, weight, num_iters in interpreter_cases():
            want = refined_xp(weight, config, num_iters)
            hierarchical = config[1] % config[2] == 0
            w = torch.tensor(weight)
            got = rebalance_refined_cuda(w, *config, hierarchical, num_iters=num_iters, parallel=num_iters is None)
            for a, b in zip(want, got):
                assert b.dtype == torch.int64
                assert np.array_equal(a, b.numpy()), (config, num_iters, a, b.numpy())
        print("interpreter ok")
        """
    out = run_under_triton_interpreter(script, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "interpreter ok" in out.stdout


# (experts, replicas, groups, nodes, gpus) compiled ahead of time for an H100 (sm_90) without a GPU:
# the interpreter accepts code that the compiler rejects (e.g. a variable changing shape in a branch).
COMPILE_CONFIGS = [(256, 288, 8, 4, 32), (16, 20, 4, 4, 4)]


@needs_triton
def test_kernels_compile_for_sm90():
    import triton

    from eplb.algorithms.bounds import group_assignments
    from eplb.algorithms.refined import default_iterations
    from eplb.kernels import refined_triton as k

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")

    def compile_(fn, pointers, meta, num_warps=1):
        signature = {**pointers, **dict.fromkeys(meta, "constexpr")}
        options = {"num_warps": num_warps, "enable_fp_fusion": False}
        try:
            source = ASTSource(fn, signature, constexprs=dict(meta))
        except TypeError:
            pytest.skip("this Triton's ahead-of-time compile API differs")
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]

    p2 = k._pow2
    f32, i32, i64 = "*fp32", "*i32", "*i64"
    for experts, replicas, groups, nodes, gpus in COMPILE_CONFIGS:
        slots, per_node, local = replicas // nodes, gpus // nodes, experts // nodes
        names = ["weight", "mlog2log", "recip", "scratch", "phy2mlog", "phyrank", "mlogcnt", "pphy2phy", "node_max"]
        pointers = dict(zip([f"{n}_ptr" for n in names], [f32, i64, f32, i32, i64, i64, i64, i64, f32], strict=True))
        iters = default_iterations(slots, per_node) if per_node > 1 else 0
        for per_program in (1, 4):
            meta = {"E": experts, "NODES": nodes, "S": slots, "M": per_node, "ITERS": iters}
            meta |= {"PER_PROGRAM": per_program, "P_EN": p2(local), "P_S": p2(slots), "P_M": p2(per_node)}
            meta |= {"P_K": p2(slots // per_node)}
            compile_(k.candidates_kernel, pointers, meta, k.default_num_warps(replicas, nodes, gpus))
        names = ["weight", "recip", "mlog2log", "phy2mlog", "phyrank", "mlogcnt", "pphy2phy", "node_max"]
        names += ["greedy_phy2log", "greedy_log2phy", "greedy_logcnt"]
        pointers = {f"{n}_ptr": (f32 if n in ("weight", "recip", "node_max") else i64) for n in names}
        pointers |= {"phy2log_out": i64, "phyrank_out": i64, "logcnt_out": i64}
        for greedy in (False, True):
            meta = {"E": experts, "R": replicas, "NODES": nodes, "GPUS": gpus, "C": 4, "GREEDY": greedy}
            meta |= {"MAXCNT": replicas - experts + 1, "P_R": p2(replicas), "P_E": p2(experts)}
            meta |= {"P_N": p2(nodes), "P_G": p2(gpus)}
            compile_(k.final_kernel, pointers, meta, 4)
        if groups == nodes:
            continue
        num_sets = len({node for split in group_assignments(groups, nodes) for node in split})
        pointers = {"weight_ptr": f32, "recip_ptr": f32, "sets_ptr": i32, "bounds_ptr": f32, "greedy_ptr": i32}
        for bounds in (False, True):
            meta = {"E": experts, "GROUPS": groups, "NODES": nodes, "S": slots, "M": per_node}
            meta |= {"NSETS": num_sets if bounds else 0, "BOUNDS": bounds, "P_G": p2(groups), "P_N": p2(nodes)}
            meta |= {"P_GPN": p2(groups // nodes), "P_EN": p2(local)}
            compile_(k.split_bounds_kernel, pointers, meta)
        pointers = {"bounds_ptr": f32, "which_ptr": i32, "table_ptr": i32, "greedy_ptr": i32, "out_ptr": i64}
        splits = len(group_assignments(groups, nodes))
        meta = {"GROUPS": groups, "NODES": nodes, "NSETS": num_sets, "NSPLITS": splits}
        meta |= {"P_A": p2(splits), "P_N": p2(nodes), "P_G": p2(groups)}
        compile_(k.split_choice_kernel, pointers, meta)


def _cuda_workload(config: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(sum(config))
    experts = _experts(config)
    rows = [
        cases.ties(rng, experts).astype(np.float32),
        cases.random_int(rng, 4, experts).astype(np.float32),
        cases.lognormal_f32(rng, 4, experts),
        zipf(rng, 4, experts),
        hot(rng, 4, experts),
    ]
    return np.concatenate(rows)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("config", CUDA_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_kernel_path_equals_torch_ops_on_cuda(config):
    import torch

    import eplb
    from eplb.backends import _torch

    weight = _cuda_workload(config)
    hierarchical = config[1] % config[2] == 0
    w = torch.as_tensor(weight, device="cuda")
    kernel = _torch.rebalance(w, *config, hierarchical=hierarchical, policy="refined", impl="triton")
    default = eplb.rebalance_experts(w, *config, policy="refined")  # the kernel path by default
    ops = _torch.rebalance(w, *config, hierarchical=hierarchical, policy="refined", impl="torch")
    reference = eplb.rebalance_experts(weight, *config, policy="refined")
    for a, b, c, d in zip(kernel, default, ops, reference, strict=True):
        assert a.device.type == "cuda" and a.dtype == torch.int64
        assert torch.equal(a, c) and torch.equal(b, c)
        np.testing.assert_array_equal(a.cpu().numpy(), d)


@needs_cuda
@needs_triton
def test_kernel_path_never_syncs():
    import torch

    import eplb
    from eplb.kernels import refined_triton

    config = (288, 8, 4, 32)
    weight = torch.as_tensor(hot(np.random.default_rng(3), 58, 256), device="cuda")
    refined_triton.rebalance_refined_cuda(weight, *config, True)  # first call builds the split tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        placement = refined_triton.rebalance_refined_cuda(weight, *config, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = eplb.rebalance_experts(weight.cpu().numpy(), *config, policy="refined")
    for got, want in zip(placement, expected, strict=True):
        np.testing.assert_array_equal(got.cpu().numpy(), want)


@needs_cuda
@needs_triton
def test_impl_triton_refuses_what_it_does_not_cover():
    import torch

    from eplb.backends import _torch

    weight = torch.ones((2, 16), device="cuda")
    with pytest.raises(ValueError, match="impl='triton'"):
        _torch.rebalance(weight, 24, 4, 2, 4, hierarchical=True, policy="refined", spill=2, impl="triton")
    with pytest.raises(ValueError, match="impl='triton'"):
        _torch.rebalance(weight.cpu(), 24, 4, 2, 4, hierarchical=True, policy="refined", impl="triton")
