"""Every implementation returns the same placement, bit for bit.

Implementations, each forced (``impl=``) so that two front doors to one kernel
do not count as two: the array-API reference on numpy, the numba kernel,
torch ops (CPU; CUDA), JAX's XLA path, JAX's host callback, the Pallas
kernels under Pallas' interpreter (on the small workloads, the degenerate ones
only: tests/test_pallas*.py run them on the rest), and the Triton kernels under Triton's
interpreter (a subprocess: the interpreter is chosen at import). The front
doors (numpy, torch CPU/CUDA, JAX CPU/GPU, inside a user's ``jit``) run too,
which checks the dispatch. Implementations that do not compute a call (the
numba kernel has no refined policy, no kernel has ``previous=``) are left
out of that comparison, by :meth:`Backend.supports`, never skipped
silently. GPU ones run where there is a GPU. All pairs are compared.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import eplb

from . import cases
from .conftest import ALL_BACKENDS, FRONT_DOORS, Backend, backend_params, make_runner, run_under_triton_interpreter

ROOT = Path(__file__).resolve().parents[1]

# (replicas, groups, nodes, gpus) for E = 16 or 256 experts; one slot per GPU in (16, 4, 2, 16).
SMALL = [(24, 4, 2, 4), (20, 4, 4, 4), (32, 3, 2, 8), (16, 4, 2, 16)]
DEEPSEEK = (288, 8, 4, 32)
DEEPSEEK_GLOBAL = (288, 8, 3, 144)
# The Pallas interpreter takes seconds per shape: it joins at the small shapes (tests/test_pallas*.py
# run it at the DeepSeek shapes).
INTERPRETED_EXPERTS = 16

POLICIES = pytest.mark.parametrize("policy", ["greedy", "refined"])


def implementations(num_experts: int, **call: Any) -> list[Backend]:
    """The available implementations and front doors that compute ``call`` (keywords of rebalance_experts)."""
    if os.environ.get("EPLB_STRICT_SKIPS") == "1":  # CI: every CPU implementation must take part
        missing = [b.value for b in ALL_BACKENDS if not b.gpu and not b.available()]
        assert not missing, f"implementations missing from the cross-backend run: {missing}"
    found = [b for b in ALL_BACKENDS if b.available() and b.supports(**call)]
    if num_experts > INTERPRETED_EXPERTS:
        found = [b for b in found if b is not Backend.JAX_PALLAS]
    return found


def _all_agree(
    weight: np.ndarray, config: tuple[int, ...], leave_out: tuple[Backend, ...] = (), **call: Any
) -> dict[Backend, tuple[np.ndarray, ...]]:
    backends = [b for b in implementations(weight.shape[1], **call) if b not in leave_out]
    assert Backend.NUMPY in backends and Backend.NUMPY_XP in backends
    results = {}
    for b in backends:
        runner = make_runner(b)
        kwargs = dict(call)
        if kwargs.get("previous") is not None:
            kwargs["previous"] = runner.asarray(kwargs["previous"])
        results[b] = runner.rebalance_np(weight, *config, **kwargs)
    for a, b in itertools.combinations(backends, 2):
        for name, x, y in zip(("phy2log", "log2phy", "logcnt"), results[a], results[b], strict=True):
            if not np.array_equal(x, y):
                rows = np.flatnonzero((x != y).reshape(len(x), -1).any(axis=1))
                pytest.fail(f"{name} differs between {a.value} and {b.value} in layers {rows.tolist()}")
    return results


def test_kernels_without_a_call_are_left_out():
    """Which implementations compute which calls (the rest of the suite relies on it)."""
    assert not Backend.NUMPY_NUMBA.supports(policy="refined")
    assert not Backend.JAX_HOST.supports(policy="refined")
    assert Backend.JAX_HOST.supports(policy="refined", previous=np.zeros((1, 4)))
    assert not Backend.JAX_PALLAS.supports(previous=np.zeros((1, 4)))
    assert not Backend.JAX_PALLAS.supports(spill=2)
    assert not Backend.JAX_PALLAS.supports(policy="survivable")
    assert all(b.supports(policy="refined", spill=2, previous=np.zeros((1, 4))) for b in FRONT_DOORS)


# ---------------------------------------------------------------- workloads


def _workloads() -> list[tuple[str, tuple[int, ...], np.ndarray]]:
    """(name, config, loads) of the small comparisons; the Triton interpreter test replays them all.

    Rows are independent layers, so each config's cases share one call (one
    compile per implementation): float32 rows (ties, signed zeros, subnormals
    and loads around 2**-64, lognormal) and integer rows (ties, totals near
    2**31). Degenerate configs: one expert; one slot per GPU.
    """
    out = []
    for config in SMALL:
        tag = "-".join(map(str, config))
        floats = [
            cases.ties(np.random.default_rng(1), 16).astype(np.float32),
            cases.signed_zeros(np.random.default_rng(4), 16),
            cases.tiny_loads(np.random.default_rng(5), 16),
            cases.lognormal_f32(np.random.default_rng(3), 12, 16),
        ]
        ints = [cases.ties(np.random.default_rng(1), 16), cases.random_int(np.random.default_rng(2), 12, 16)]
        out += [(f"float32-{tag}", config, np.concatenate(floats)), (f"int-{tag}", config, np.concatenate(ints))]
    out.append(("one-expert", (4, 1, 1, 2), np.array([[5], [0], [3]], dtype=np.int64)))
    out.append(("one-expert-per-gpu", (4, 2, 2, 4), np.array([[5, 1, 0, 3], [0, 0, 0, 0]], dtype=np.int64)))
    return out


WORKLOADS = _workloads()


def _special_rows(weight: np.ndarray) -> np.ndarray:
    """``weight`` less the last 10 of the 12 random rows that end each float32 and integer workload."""
    return weight[:-10] if len(weight) > 12 else weight


def _distinct_rows_per_config(workloads: list) -> list[tuple[str, tuple[int, ...], np.ndarray]]:
    """(name, config, float32 loads) with the workloads of one config merged, each distinct row once, in order."""
    merged: dict[tuple[int, ...], tuple[str, dict[bytes, np.ndarray]]] = {}
    for name, config, weight in workloads:
        _, rows = merged.setdefault(config, (name.removeprefix("float32-").removeprefix("int-"), {}))
        for row in weight.astype(np.float32):
            rows.setdefault(row.tobytes(), row)
    return [(label, config, np.stack(list(rows.values()))) for config, (label, rows) in merged.items()]


def _left_out(name: str) -> tuple[Backend, ...]:
    """What ``test_workload`` leaves out on workload ``name`` (CI time: these two were most of this module's).

    Every implementation and front door runs on the degenerate workloads (one expert; one slot per GPU). The
    Pallas kernels under their interpreter skip the SMALL configs' workloads: tests/test_pallas.py runs them on
    every SMALL config with the same kinds of rows (ties, signed zeros, tiny loads, integers near 2**31,
    lognormal; both policies), tests/test_pallas_refined.py on the refined policy's cases. A user's jit (a front
    door: the dispatch inside a trace, which the shape does not change) runs on the first SMALL config's.
    """
    if name in ("one-expert", "one-expert-per-gpu"):
        return ()
    first = "-".join(map(str, SMALL[0]))
    return (Backend.JAX_PALLAS,) if name.endswith(f"-{first}") else (Backend.JAX_PALLAS, Backend.JAX_JIT)


@POLICIES
@pytest.mark.parametrize(
    ("config", "weight", "name"), [(*w[1:], w[0]) for w in WORKLOADS], ids=[w[0] for w in WORKLOADS]
)
def test_workload(config, weight, name, policy):
    _all_agree(weight, config, _left_out(name), policy=policy)


MERGED_WORKLOADS = _distinct_rows_per_config(WORKLOADS)


@pytest.mark.parametrize(("name", "config", "weight"), MERGED_WORKLOADS, ids=[w[0] for w in MERGED_WORKLOADS])
def test_survivable_policy(name, config, weight):
    """The survivable policy has no kernel: every front door (JAX on a GPU included, where the default picks
    the Pallas kernels for the other policies) and every implementation that computes it place alike. A config's
    float32 and integer workloads run as one, each distinct row once."""
    results = _all_agree(weight, config, (Backend.JAX_JIT,) if name != "one-expert" else (), policy="survivable")
    assert Backend.JAX_PALLAS not in results and Backend.NUMPY_NUMBA not in results  # no kernel claims it


def test_every_backend_runs_some_workload():
    """The workloads named in ``_left_out`` exist (a renamed one would leave every backend out of them)."""
    names = [name for name, _, _ in WORKLOADS]
    assert {"one-expert", "one-expert-per-gpu"} <= set(names)
    assert sum(Backend.JAX_JIT not in _left_out(name) for name in names) == 4  # the first config's two, 2 more


@POLICIES
@pytest.mark.parametrize("config", SMALL, ids=lambda c: "-".join(map(str, c)))
def test_tiny_loads_read_as_zero(config, policy):
    """Subnormals and loads below 2**-64 count as 0 (XLA flushes subnormals, numpy does not): the reference
    places them as zeros; test_workload holds such rows, so every implementation does."""
    weight = cases.tiny_loads(np.random.default_rng(5), 16)
    flushed = np.where(weight < 2.0**-64, np.float32(0), weight)
    assert np.count_nonzero(flushed) < np.count_nonzero(weight)  # the case holds loads to flush
    reference = make_runner(Backend.NUMPY_XP)
    for got, want in zip(
        reference.rebalance_np(weight, *config, policy=policy),
        reference.rebalance_np(flushed, *config, policy=policy),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


@POLICIES
@pytest.mark.parametrize("config", [DEEPSEEK, DEEPSEEK_GLOBAL], ids=["hierarchical", "global"])
def test_deepseek_shape_mixed(config, policy):
    rng = np.random.default_rng(4)
    weight = np.concatenate(
        [
            cases.random_int(rng, 8, 256).astype(np.float32),
            cases.lognormal_f32(rng, 8, 256),
            cases.ties(rng, 256).astype(np.float32),
        ]
    )
    _all_agree(weight, config, policy=policy)


@POLICIES
@pytest.mark.parametrize("config", [DEEPSEEK, DEEPSEEK_GLOBAL], ids=["hierarchical", "global"])
def test_real_deepseek_loads(config, policy):
    weight = cases.deepseek_v3()
    assert weight is not None, f"real loads expected at {cases.DATA} (set EPLB_DATA_DIR)"
    assert weight.max() < 2**31
    _all_agree(weight, config, policy=policy)


def test_spill():
    """spill= (the array-API path on every framework, refined packing too)."""
    weight = cases.lognormal_f32(np.random.default_rng(6), 12, 32)
    for policy in ("greedy", "refined"):
        _all_agree(weight, (48, 8, 4, 8), policy=policy, spill=2)


# ---------------------------------------------------------------- previous= and its knobs


KNOBS = {
    "relabel": {},
    "tol0": {"balance_tolerance": 0.0},
    "tol0.01": {"balance_tolerance": 0.01},
    "cap3": {"max_moves": 3},
    "tol+cap": {"balance_tolerance": 0.02, "max_moves": 2},
}
PREVIOUS_CASES = [("hier", (24, 4, 2, 4), k) for k in KNOBS] + [
    (name, config, k)
    for name, config in (("global", (32, 1, 1, 8)), ("one-slot", (16, 4, 2, 16)))
    for k in ("relabel", "tol+cap")
]


@pytest.mark.parametrize(
    ("config", "knobs"), [c[1:] for c in PREVIOUS_CASES], ids=[f"{c[0]}-{c[2]}" for c in PREVIOUS_CASES]
)
def test_previous(config, knobs):
    """previous= on every implementation of it (array API on numpy, torch ops, XLA) and every front door."""
    rng = np.random.default_rng(11)
    old = cases.lognormal_f32(rng, 8, 16)
    new = np.concatenate([old * rng.lognormal(0, 0.3, old.shape).astype(np.float32), cases.ties(rng, 16)[[0, 1, 5]]])
    previous = eplb.rebalance_experts(np.concatenate([old, old[:3]]), *config).phy2log
    _all_agree(new, config, previous=previous, **KNOBS[knobs])


def test_previous_near_split():
    """Loads on which the near split's start wins layers (``tests/test_near_split.py``): a second search and
    a group swap between nodes, on every implementation."""
    rng = np.random.default_rng(3)
    old = cases.lognormal_f32(rng, 8, 32)
    new = old * rng.lognormal(0, 0.3, old.shape).astype(np.float32)
    previous = eplb.rebalance_experts(old, 48, 8, 4, 8).phy2log
    for knobs in ({"balance_tolerance": 0.01}, {"balance_tolerance": 0.0, "max_moves": 40}):
        _all_agree(new, (48, 8, 4, 8), previous=previous, **knobs)


def test_previous_with_refined_policy():
    rng = np.random.default_rng(12)
    old, new = cases.lognormal_f32(rng, 6, 16), cases.lognormal_f32(rng, 6, 16)
    previous = eplb.rebalance_experts(old, 24, 4, 2, 4, policy="refined").phy2log
    _all_agree(new, (24, 4, 2, 4), policy="refined", previous=previous, balance_tolerance=0.01)


# ---------------------------------------------------------------- unchecked loads


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -3.0], ids=["nan", "inf", "-inf", "negative"])
@POLICIES
def test_unchecked_bad_loads_read_as_zero(bad, policy):
    """Where loads are not checked (check_values=False here; jit or CUDA for users), NaN, inf and negative
    loads read as 0 on every implementation: the placement is that of the loads with those zeroed."""
    _, config, weight = WORKLOADS[0]  # its shape: the implementations compiled it already
    rng = np.random.default_rng(7)
    weight = weight.copy()
    weight[rng.random(weight.shape) < 0.25] = bad
    weight[-1] = bad  # a whole layer of them
    zeroed = np.where(np.isfinite(weight) & (weight > 0), weight, np.float32(0))
    want = make_runner(Backend.NUMPY_XP).rebalance_np(zeroed, *config, policy=policy)
    for b in implementations(16, policy=policy):
        got = make_runner(b).rebalance_np(weight, *config, policy=policy, check_values=False)
        for name, g, w in zip(eplb.Placement._fields, got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=f"{name} on {b.value}")


@POLICIES
def test_unchecked_overflowing_loads_still_place_every_expert(policy):
    """Finite loads whose layer total overflows float32 (rejected where checked): sums saturate, the result is
    still a valid placement on every implementation (its balance is unspecified)."""
    _, config, weight = WORKLOADS[0]
    weight = np.full(weight.shape, 3e38, dtype=np.float32)
    weight[1, ::3] = 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        for b in implementations(16, policy=policy):
            phy2log, _, logcnt = make_runner(b).rebalance_np(weight, *config, policy=policy, check_values=False)
            for layer in range(len(weight)):
                counts = np.bincount(phy2log[layer], minlength=16)
                np.testing.assert_array_equal(counts, logcnt[layer], err_msg=b.value)
            assert (logcnt >= 1).all(), b.value


# ---------------------------------------------------------------- Triton's interpreter


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_under_interpreter(tmp_path):
    """The Triton greedy kernel on CPU tensors under TRITON_INTERPRET=1, every small workload; the refined kernel
    on the degenerate ones (tests/test_triton_refined.py runs it on the SMALL configs but 24-4-2-4 and on other
    shapes, with ties, signed zeros and tiny loads: here it took half this test's time)."""
    # Every special row (ties, signed zeros, subnormals, one expert), but only the first 2 of the 12 random
    # rows of each workload: the interpreter's time grows with the rows, and test_workload checks them all
    # elsewhere (test_triton.py runs the kernels on random rows under the interpreter too). A config's float32
    # and integer workloads run as one, each distinct float32 row once (the integer ties are the float32 ones).
    small = _distinct_rows_per_config(
        [(name, config, _special_rows(weight)) for name, config, weight in WORKLOADS if weight.shape[1] <= 16]
    )
    policies = {name: ("greedy", "refined") if name.startswith("one-expert") else ("greedy",) for name, _, _ in small}
    expected = {}
    for name, config, weight in small:
        for policy in policies[name]:
            hier = config[1] % config[2] == 0
            placement = eplb.rebalance_experts(weight, *config, policy=policy, hierarchical=hier)
            for field, array in zip(eplb.Placement._fields, placement, strict=True):
                expected[f"{name}|{policy}|{field}"] = array
            expected[f"{name}|{policy}|weight"] = weight.astype(np.float32)
    np.savez(tmp_path / "expected.npz", **expected)
    script = f"""
        import numpy as np, torch
        from eplb.backends._triton import rebalance_greedy_cuda
        from eplb.kernels.refined_triton import rebalance_refined_cuda, kernel_fits
        data = np.load({str(tmp_path / "expected.npz")!r})
        configs = {[(name, config, policies[name]) for name, config, _ in small]!r}
        ran = 0
        for name, config, policies in configs:
            hier = config[1] % config[2] == 0
            for policy in policies:
                weight = torch.tensor(data[f"{{name}}|{{policy}}|weight"])
                if policy == "greedy":
                    got = rebalance_greedy_cuda(weight, *config, hier)
                else:
                    sizes = (config[1], config[2]) if hier else (1, 1)
                    if not kernel_fits(weight.shape[1], config[0], *sizes, config[3]):
                        continue
                    got = rebalance_refined_cuda(weight, *config, hier)
                for field, array in zip(("phy2log", "log2phy", "logcnt"), got):
                    want = data[f"{{name}}|{{policy}}|{{field}}"]
                    assert np.array_equal(array.numpy(), want), (name, policy, field)
                ran += 1
        print("ran", ran)
        """
    out = run_under_triton_interpreter(script, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"ran {sum(map(len, policies.values()))}" in out.stdout, out.stdout
    assert sum(map(len, policies.values())) == len(small) + 2  # the refined kernel on both degenerate workloads


# ---------------------------------------------------------------- the public building blocks


@pytest.mark.parametrize("backend", backend_params(FRONT_DOORS))
def test_building_blocks_read_loads_as_the_policies_do(backend):
    """balanced_packing and replicate_experts read tiny (subnormal) loads as 0, as rebalance_experts does, so
    JAX (which flushes subnormals) returns numpy's packs; checked against the loads with those zeroed."""
    weight = np.array([[1e-45, 0, 3e-45, 2e-45, 0, 1e-44], [1e-44, 1e-45, 2**-64, 0, 7, 3]], dtype=np.float32)
    zeroed = np.where(weight < 2.0**-64, np.float32(0), weight)
    runner = make_runner(backend)
    for block, arg in ((eplb.balanced_packing, 2), (eplb.replicate_experts, 9)):
        for got, want in zip(block(runner.asarray(weight), arg), block(zeroed, arg), strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("backend", backend_params(FRONT_DOORS))
def test_lpt_pack_saturates_an_overflowed_item(backend):
    """lpt_pack with items of +inf (group loads that overflowed float32, possible with unchecked loads) and sums
    past float32's range: every backend visits and packs as plain-Python LPT whose running loads saturate at
    float32 max (no NaN from ``0 * inf`` in the packs that did not take the item), each pack full."""
    from eplb import _xp
    from eplb.algorithms.loads import MAX_LOAD
    from eplb.algorithms.packing import lpt_pack

    most = np.float32(MAX_LOAD)
    weight = np.array(
        [[np.inf, 10, 1, 1, 1, 1], [np.inf, 1, 2, np.inf, 3, 4], [3e38, 3e38, 3e38, 1, 1, 1], [5, 0, 0, 2, 7, 1]],
        dtype=np.float32,
    )
    runner = make_runner(backend)
    arr = runner.asarray(weight)
    for num_packs in (2, 3):
        cap = 6 // num_packs
        with np.errstate(over="ignore", invalid="ignore"):
            order, pack, rank = (np.asarray(a) for a in lpt_pack(arr, num_packs, xp=_xp.array_namespace(arr)))
        for row, w in enumerate(weight):
            loads, counts = [np.float32(0)] * num_packs, [0] * num_packs
            want_order = sorted(range(6), key=lambda i: (-float(w[i]), i))
            assert order[row].tolist() == want_order
            for step, item in enumerate(want_order):
                best = min((p for p in range(num_packs) if counts[p] < cap), key=lambda p: (float(loads[p]), p))
                assert (pack[row, step], rank[row, step]) == (best, counts[best]), (num_packs, row, step)
                with np.errstate(over="ignore"):
                    loads[best] = min(np.float32(loads[best] + w[item]), most)
                counts[best] += 1
            assert counts == [cap] * num_packs
