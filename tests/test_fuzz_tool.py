"""The cross-backend fuzz (``benchmarks/fuzz_backends.py``): a fixed draw agrees, and a wrong front door is caught.

The fuzz is a tool run for minutes on a CPU or a GPU machine; here a few cases of one seed run through torch and
JAX on the CPU (the cross-backend suite is the test of record), and a front door that returns a changed
placement must make it fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz_backends


def test_first_difference_sees_values_shapes_and_kinds():
    names = ("a", "b")
    same = (np.arange(3), np.zeros((2, 2)))
    assert fuzz_backends.first_difference(same, (np.arange(3), np.zeros((2, 2))), names) is None
    assert fuzz_backends.first_difference(same, (np.arange(3), np.ones((2, 2))), names).startswith("b")
    assert fuzz_backends.first_difference(same, (np.arange(4), np.zeros((2, 2))), names).startswith("a")
    assert fuzz_backends.first_difference(same, (np.arange(3.0), np.zeros((2, 2))), names).startswith("a")


def test_a_fixed_draw_agrees_on_the_cpu(capsys):
    assert fuzz_backends.main(["--cases", "6", "--seed", "3", "--rebalancer", "0.3"]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    # This seed's draw holds plain calls, a jitted one, a Rebalancer sequence and a call numpy refuses (which
    # torch and JAX must refuse too).
    assert all(f'"{key}"' in summary for key in ("compared", "jax-jit", "rebalancer compared", "refused"))
    assert "mismatch" not in summary


def test_a_wrong_front_door_fails_the_run(monkeypatch, capsys):
    real = fuzz_backends.Fronts.calls

    def calls(self, rng):
        fronts = real(self, rng)
        right = fronts["torch"]

        def wrong(weight, sizes, options):  # torch's placement with its last slot's expert changed
            phy2log, log2phy, logcnt = right(weight, sizes, options)
            phy2log = phy2log.clone()
            phy2log[0, -1] = (phy2log[0, -1] + 1) % weight.shape[1] if weight.shape[1] > 1 else -1
            return phy2log, log2phy, logcnt

        return {**fronts, "torch": wrong}

    monkeypatch.setattr(fuzz_backends.Fronts, "calls", calls)
    assert fuzz_backends.main(["--cases", "2", "--seed", "2", "--rebalancer", "0"]) == 1
    assert "MISMATCH torch" in capsys.readouterr().out


def test_the_promise_checks_catch_broken_placements():
    """``broken_promises`` (the fuzz's float64 oracle) passes numpy's placements and names each broken rule."""
    import eplb

    rng = np.random.default_rng(0)
    weight = rng.lognormal(0, 1, (2, 16)).astype(np.float32)
    sizes = (24, 4, 2, 4)
    before = np.asarray(eplb.rebalance_experts(rng.lognormal(0, 1, (2, 16)), *sizes).phy2log)
    check = fuzz_backends.broken_promises

    fresh = [np.asarray(a) for a in eplb.rebalance_experts(weight, *sizes)]
    assert check(weight, sizes, {}, fresh) == []
    wrong = [a.copy() for a in fresh]
    wrong[2][0, 0] += 1  # logcnt no longer the replica count
    assert "logcnt" in check(weight, sizes, {}, wrong)[0]

    options = {"previous": before, "active_gpus": np.array([True, True, False, True])}
    placed = [np.asarray(a) for a in eplb.rebalance_experts(weight, *sizes, **options)]
    assert check(weight, sizes, options, placed) == []
    assert "dead GPU" in check(weight, sizes, options, fresh)[0]  # the fresh placement uses GPU 2

    options = {"previous": before}
    kept = [np.asarray(a) for a in eplb.rebalance_experts(weight, *sizes, **options)]
    assert check(weight, sizes, options, kept) == []
    assert check(weight, sizes, options, [before, *kept[1:]]) != []  # another placement's GPU contents

    options = {"previous": before, "max_moves": 1}
    capped = [np.asarray(a) for a in eplb.rebalance_experts(weight, *sizes, **options)]
    assert check(weight, sizes, options, capped) == []
    assert any("max_moves" in b for b in check(weight, sizes, options, fresh))

    options = {"previous": before, "balance_tolerance": 0.0}
    tight = [np.asarray(a) for a in eplb.rebalance_experts(weight, *sizes, **options)]
    assert check(weight, sizes, options, tight) == []
    kept_as_before = eplb.rebalance_experts(weight, *sizes, previous=before, max_moves=0)
    assert any("balance_tolerance" in b for b in check(weight, sizes, options, [np.asarray(a) for a in kept_as_before]))

    capacity = np.array([1.0, 1.0, 0.3, 0.3], dtype=np.float32)
    options = {"gpu_capacity": capacity}
    timed = [np.asarray(a) for a in eplb.rebalance_experts(weight, *sizes, **options)]
    assert check(weight, sizes, options, timed) == []
    backwards = eplb.rebalance_experts(weight, *sizes, gpu_capacity=capacity[::-1].copy())  # slow GPUs loaded
    assert any("capacity-blind" in b for b in check(weight, sizes, options, [np.asarray(a) for a in backwards]))


def test_the_rebalancer_checks_catch_broken_decisions():
    """``broken_decisions`` passes a Rebalancer's decisions and catches a wrong move count, a budget overrun and
    an expert left on a GPU down."""
    rng = np.random.default_rng(1)
    sizes = (24, 4, 2, 4)
    options = {"min_gain": 0.0, "balance_tolerance": 0.0}
    events = [("record", rng.lognormal(0, 1, (3, 16)).astype(np.float32)), ("step",)]
    events += [("record", rng.lognormal(0, 1, (3, 16)).astype(np.float32)), ("step",)]
    decisions = fuzz_backends.run_rebalancer(sizes, options, events, lambda x: x)
    check = fuzz_backends.broken_decisions
    assert check(sizes, options, decisions) == []
    (first, gpus), (second, _) = decisions
    assert len(second.layers) >= 2  # this draw changes layers at the second step
    miscounted = second._replace(moves=second.moves + 1)
    assert any("moves" in b for b in check(sizes, options, [(first, gpus), (miscounted, None)]))
    assert any("max_layers" in b for b in check(sizes, {**options, "max_layers": 1}, decisions))
    down = {"active_gpus": np.array([True, False, True, True])}
    assert any("GPUs down" in b for b in check(sizes, options, [(first, down)]))
