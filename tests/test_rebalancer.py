"""eplb.Rebalancer: the loop's promises, against independent oracles, and the same decisions on every backend.

- the first step plans fresh; later steps never make a layer heavier on the load it planned from, change
  only layers whose predicted gain reaches min_gain, and stay within their budget (float64 scorer and
  plain-Python move counter of tests/oracle.py);
- the history is the documented one (halving every half_life windows, or the sum of the last window
  windows), recomputed in float64;
- numpy, torch and JAX take the same decisions, bit for bit;
- bad options are clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb

from . import cases, oracle
from .conftest import FRONT_DOORS, Backend, backend_params, make_runner, needs_gpu

CONFIG = (80, 8, 2, 8)  # 64 experts


def windows(seed: int = 0, count: int = 12, drift: float = 0.08) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.2, (6, 64))
    out = []
    for t in range(count):
        base = base * np.exp(rng.normal(0.0, drift, base.shape))
        if t == count // 2:
            base = base[:, rng.permutation(64)]  # a sudden shift
        out.append(np.round(base * 1000).astype(np.int64))
    return out


def noisy_windows(count: int, seed: int = 5) -> list[np.ndarray]:
    """Independent lognormal windows: each predicts the next one badly."""
    rng = np.random.default_rng(seed)
    return [np.round(rng.lognormal(0.0, 1.5, (6, 64)) * 100).astype(np.int64) for _ in range(count)]


def history64(loads: list[np.ndarray], half_life: int) -> np.ndarray:
    """The planning load, float64: each window added, the total halved after every half_life-th window."""
    total = np.zeros(loads[0].shape)
    for t, load in enumerate(loads, start=1):
        total = total + load
        if t % half_life == 0:
            total = total / 2
    return total


def test_promises_on_a_drifting_trace():
    rebalancer = eplb.Rebalancer(*CONFIG, min_gain=0.01, max_layers=4, max_experts=200, half_life=2)
    recorded = []
    first = None
    for t, load in enumerate(windows()):
        rebalancer.record(load)
        recorded.append(load)
        if t % 3 != 2:
            continue
        before = None if rebalancer.placement is None else np.asarray(rebalancer.placement.phy2log)
        decision = rebalancer.step()
        after = np.asarray(decision.placement.phy2log)
        np.testing.assert_array_equal(after, np.asarray(rebalancer.placement.phy2log))
        if before is None:  # the first step plans fresh, on the history
            first = after
            np.testing.assert_array_equal(decision.layers, np.arange(6))
            continue
        history = history64(recorded, 2)
        peak_before = oracle.gpu_loads64(history, before, 8).max(axis=1)
        peak_after = oracle.gpu_loads64(history, after, 8).max(axis=1)
        moved = oracle.moves(before, after, 8)
        changed = np.flatnonzero(moved > 0)
        assert set(changed.tolist()) <= set(decision.layers.tolist())
        assert len(decision.layers) <= 4 and moved.sum() <= 200
        slack = 1 + 40 * 2.0**-24  # float32 rounding of the history and the sums that decided
        assert (peak_after <= peak_before * slack).all(), "a layer got heavier on its planning load"
        assert (peak_after[changed] <= peak_before[changed] * (1 - 0.01) * slack).all(), "a change below min_gain"
        np.testing.assert_array_equal(decision.moves, moved)
        assert decision.plan.num_layers == 6 and set(np.unique(decision.plan.layer).tolist()) <= set(changed.tolist())
        for layer in range(6):
            if layer not in changed:
                np.testing.assert_array_equal(after[layer], before[layer])
    assert first is not None


@pytest.mark.parametrize(("window", "count"), [(2, 5), (4, 7), (5, 12), (8, 11)])
def test_window_history_and_initial_placement(window, count):
    """The planning load is the sum of the last ``window`` windows (fewer while fewer were recorded): exact
    float32 sums of these integer loads. (A ring that kept about half of them once passed a test of 2.)"""
    loads = windows(1, count=count)
    initial = eplb.rebalance_experts(loads[0], *CONFIG).phy2log
    rebalancer = eplb.Rebalancer(*CONFIG, window=window, initial=initial, min_gain=0.0, long_window=0)
    for load in loads:
        rebalancer.record(load)
    decision = rebalancer.step()
    history = np.sum(loads[-window:], axis=0).astype(np.float32)  # below 2**24: exact in float32
    candidate = eplb.rebalance_experts(history, *CONFIG, previous=initial, balance_tolerance=0.025)
    assert len(decision.layers) > 0
    for layer in decision.layers.tolist():
        np.testing.assert_array_equal(decision.placement.phy2log[layer], candidate.phy2log[layer])
    # ... and the layers it left alone gain less than nothing on that load (float64 oracle)
    peak_now = oracle.gpu_loads64(history, np.asarray(initial), 8).max(axis=1)
    peak_new = oracle.gpu_loads64(history, np.asarray(candidate.phy2log), 8).max(axis=1)
    kept = np.setdiff1d(np.arange(6), decision.layers)
    assert (peak_new[kept] >= peak_now[kept] * (1 - 1e-6)).all()
    check = eplb.Placement(*(np.asarray(a) for a in decision.placement))
    for layer in range(6):
        counts = np.bincount(check.phy2log[layer], minlength=64)
        np.testing.assert_array_equal(counts, check.logcnt[layer])


def phase_windows(count: int, seed: int = 11) -> list[np.ndarray]:
    """Two load patterns taking turns every 2 windows (prefill and decode phases), with noise: integers."""
    rng = np.random.default_rng(seed)
    patterns = rng.lognormal(0.0, 1.3, (2, 6, 64))
    return [
        np.round(patterns[(t // 2) % 2] * rng.lognormal(0.0, 0.1, (6, 64)) * 500).astype(np.int64) for t in range(count)
    ]


@pytest.mark.parametrize("caps", [None, np.array([1, 0.6, 1, 0.6, 1, 0.6, 1, 0.5])])
def test_the_mix_candidate_is_taken_by_its_rule(caps):
    """Per layer the step's candidate is the plan for the mix (the history plus the sum of the last
    ``long_window`` windows times ``2**-(ceil(log2 long_window) + 1)``) where its heaviest GPU on the history is
    within ``(1 + tolerance)`` of the plain candidate's and it is lighter on that sum; else the plain one. The
    two plans from rebalance_experts, the rule scored in float64 (layers within float32 rounding of a
    threshold are not judged). With speeds, heaviest means slowest (load / capacity)."""
    loads = phase_windows(11)
    initial = eplb.rebalance_experts(loads[0], *CONFIG).phy2log
    tolerance = 0.05
    speeds = {} if caps is None else {"gpu_capacity": caps}
    rebalancer = eplb.Rebalancer(
        *CONFIG, initial=initial, min_gain=0.0, balance_tolerance=tolerance, long_window=4, **speeds
    )
    history = np.zeros(loads[0].shape, np.float32)
    for load in loads:
        rebalancer.record(load)
        history = ((history + load.astype(np.float32)) * np.float32(0.5)).astype(np.float32)  # half_life=1
    decision = rebalancer.step()
    total = np.zeros(loads[0].shape, np.float32)
    for load in loads[-4:]:
        total = (total + load.astype(np.float32)).astype(np.float32)
    plain = eplb.rebalance_experts(history, *CONFIG, previous=initial, balance_tolerance=tolerance, **speeds).phy2log
    mixed = (history + total * np.float32(2.0**-3)).astype(np.float32)
    mix = eplb.rebalance_experts(mixed, *CONFIG, previous=initial, balance_tolerance=tolerance, **speeds).phy2log

    def slowest(load, placement):
        if caps is None:
            return oracle.gpu_loads64(load, np.asarray(placement), 8).max(axis=1)
        return oracle.capacity_times64(load, np.asarray(placement), 8, caps).max(axis=1)

    peak = {
        (load, name): slowest(value, placement)
        for load, value in (("now", history), ("long", total))
        for name, placement in (("plain", plain), ("mix", mix))
    }
    near = 1e-5
    took = {"plain": 0, "mix": 0}
    for layer in decision.layers.tolist():
        within = peak["now", "mix"][layer] / peak["now", "plain"][layer] - (1 + tolerance)
        lighter = peak["long", "mix"][layer] / peak["long", "plain"][layer] - 1
        if abs(within) < near or abs(lighter) < near or np.array_equal(plain[layer], mix[layer]):
            continue
        name = "mix" if within < 0 and lighter < 0 else "plain"
        np.testing.assert_array_equal(decision.placement.phy2log[layer], {"plain": plain, "mix": mix}[name][layer])
        took[name] += 1
    assert took["mix"] > 0, took  # the case exercises the rule


@pytest.mark.parametrize("backend", backend_params([*FRONT_DOORS, Backend.TORCH_CUDA, Backend.JAX_GPU]))
def test_same_decisions_on_every_backend(backend):
    runner = make_runner(backend)
    reference = eplb.Rebalancer(*CONFIG, min_gain=0.005)
    other = eplb.Rebalancer(*CONFIG, min_gain=0.005)
    tolerances = []
    for t, load in enumerate(windows(2) + noisy_windows(9)):  # drift, then noise: "auto" tolerance above its floor
        reference.record(load)
        other.record(runner.asarray(load))
        if t % 3 == 2:
            want, got = reference.step(), other.step()
            assert got.tolerance == want.tolerance
            tolerances.append(want.tolerance)
            np.testing.assert_array_equal(got.layers, want.layers)
            np.testing.assert_array_equal(got.gain, want.gain)
            for a, b in zip(got.placement, want.placement, strict=True):
                np.testing.assert_array_equal(np.asarray(a.cpu() if hasattr(a, "cpu") else a), b)
    assert max(tolerances) > 0.025


@needs_gpu("torch")
@pytest.mark.parametrize("gpus", ["all up", "one down", "speeds"])
def test_torch_cuda_steps_replay_cuda_graphs_with_numpys_decisions(gpus):
    """On torch CUDA each step's candidate, and the fresh plan the "auto" regret scores, are GraphedPlanner
    replays (cuda_graphs, the default): the same decisions as numpy and as eager CUDA calls, step by step (the GPUs
    down or the speeds passed as host arrays, the planner's per-call tensors made from them); one capture per kind
    of call, none after the second step."""
    import torch

    vectors = {
        "all up": {},
        "one down": {"active_gpus": np.arange(8) != 3},
        "speeds": {"gpu_capacity": np.array([1, 0.6, 1, 0.6, 1, 0.6, 1, 0.5])},
    }[gpus]
    reference = eplb.Rebalancer(*CONFIG, min_gain=0.005, **vectors)
    graphed = eplb.Rebalancer(*CONFIG, min_gain=0.005, **vectors)
    eager = eplb.Rebalancer(*CONFIG, min_gain=0.005, cuda_graphs=False, **vectors)
    captures = []
    for t, load in enumerate(windows(7, count=12)):
        on_gpu = torch.as_tensor(load, device="cuda")
        reference.record(load)
        graphed.record(on_gpu)
        eager.record(on_gpu)
        if t % 3 == 2:
            want = reference.step()
            for got in (graphed.step(), eager.step()):
                assert got.tolerance == want.tolerance
                np.testing.assert_array_equal(got.layers, want.layers)
                np.testing.assert_array_equal(got.gain, want.gain)
                for a, b in zip(got.placement, want.placement, strict=True):
                    assert a.device.type == "cuda"
                    np.testing.assert_array_equal(a.cpu().numpy(), b)
            captures.append(graphed._planner.captures)
    assert eager._planner is None
    assert captures[0] == 0  # the first step plans fresh (eagerly)
    # Later steps replay two graphs: the candidate's, and the fresh plan the regret scores (captured at the second).
    assert captures[1] == 2 and captures[-1] == 2, captures


def test_records_a_load_tracker():
    tracker = eplb.LoadTracker(num_layers=2, num_experts=16, window=4)
    tracker.record_counts(np.arange(32).reshape(2, 16) % 5 + 1)
    tracker.step()
    rebalancer = eplb.Rebalancer(24, 4, 2, 4)
    rebalancer.record(tracker)
    decision = rebalancer.step()
    np.testing.assert_array_equal(
        decision.placement.phy2log, eplb.rebalance_experts(tracker.load(), 24, 4, 2, 4).phy2log
    )


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"half_life": 0}, ValueError, "half_life"),
        ({"window": 1.5}, TypeError, "window"),
        ({"min_gain": -0.1}, ValueError, "min_gain"),
        ({"balance_tolerance": float("nan")}, ValueError, "balance_tolerance"),
        ({"balance_tolerance": "adaptive"}, ValueError, "balance_tolerance"),
        ({"max_bytes": 10}, ValueError, "max_bytes needs bytes_per_expert"),
        ({"max_layers": True}, TypeError, "max_layers"),
        ({"cuda_graphs": 1}, TypeError, "cuda_graphs"),
        ({"long_window": -1}, ValueError, "long_window"),
        ({"long_window": 2.0}, TypeError, "long_window"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        eplb.Rebalancer(*CONFIG, **options)


def test_step_before_record_and_shape_changes():
    rebalancer = eplb.Rebalancer(*CONFIG)
    with pytest.raises(ValueError, match="record"):
        rebalancer.step()
    rebalancer.record(cases.lognormal_f32(np.random.default_rng(3), 6, 64))
    with pytest.raises(ValueError, match="expected"):
        rebalancer.record(np.ones((5, 64)))


def balancedness64(history: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> float:
    """Mean over loaded layers of mean / max GPU load, float64 (the oracle's scorer)."""
    loads = oracle.gpu_loads64(history, np.asarray(phy2log), num_gpus)
    peak = loads.max(axis=1)
    return float((loads.mean(axis=1)[peak > 0] / peak[peak > 0]).mean())


def test_auto_tolerance_stays_at_its_floor_on_predictable_traffic():
    load = windows(4, count=1)[0]
    rebalancer = eplb.Rebalancer(*CONFIG)
    tolerances = []
    for t in range(9):
        rebalancer.record(load)  # the same window again and again: arrived exactly as planned
        if t % 3 == 2:
            tolerances.append(rebalancer.step().tolerance)
    assert tolerances == [0.025, 0.025, 0.025]
    fixed = eplb.Rebalancer(*CONFIG, balance_tolerance=0.07)
    for noisy in noisy_windows(6):
        fixed.record(noisy)
        assert fixed.step().tolerance == 0.07  # a number is used as it is


def test_auto_tolerance_with_an_initial_placement_uses_a_fresh_plans_balance():
    """With ``initial=`` the planned balance is unknown: the first step takes a fresh plan's balance on the
    history (float64 here, from eplb's fresh placement) against the windows that arrived under the initial one."""
    loads = noisy_windows(4)
    initial = eplb.rebalance_experts(loads[0], *CONFIG)
    rebalancer = eplb.Rebalancer(*CONFIG, initial=initial)
    for load in loads[1:]:
        rebalancer.record(load)
    decision = rebalancer.step()
    history = history64(loads[1:], 1)
    planned = balancedness64(
        history, np.asarray(eplb.rebalance_experts(history.astype(np.float32), *CONFIG).phy2log), 8
    )
    arrived = np.mean([balancedness64(w, np.asarray(initial.phy2log), 8) for w in loads[1:]])
    want = min(0.2, max(0.025, 0.1 * (planned / arrived - 1)))
    assert decision.tolerance == pytest.approx(want, rel=1e-4) and decision.tolerance > 0.025


def drifting_windows(count: int, seed: int = 6, drift: float = 0.15) -> list[np.ndarray]:
    """A lognormal random walk, no shift: each window predicts the next one well."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 1.2, (6, 64))
    out = []
    for _ in range(count):
        base = base * np.exp(rng.normal(0.0, drift, base.shape))
        out.append(np.round(base * 1000).astype(np.int64))
    return out


def alternating_windows(count: int, seed: int = 7) -> list[np.ndarray]:
    """Two fixed load patterns in turn, two windows each, with a little noise: the latest windows mislead."""
    rng = np.random.default_rng(seed)
    phases = [rng.lognormal(0.0, 1.2, (6, 64)) for _ in range(2)]
    return [
        np.round(phases[t // 2 % 2] * np.exp(rng.normal(0.0, 0.05, (6, 64))) * 1000).astype(np.int64)
        for t in range(count)
    ]


@pytest.mark.parametrize("traffic", ["noisy", "drifting", "alternating"])
def test_auto_tolerance_follows_the_arrived_balance_and_the_regret(traffic):
    """Each step's tolerance, recomputed here in float64 from the placements and windows: ``t = clip(0.1 *
    (planned / arrived - 1), 0.025, 0.2)`` (planned: the placement in force on the history it was planned from;
    arrived: the windows since, under it), lowered by the regret (``fresh``: the same windows under eplb's fresh
    plan on the last step's history; ``ratio = (fresh / arrived - 1) / last tolerance``; ``m``: its running mean,
    ``0.75 m + 0.25 ratio``; ``c = clip(m, -1, 1)``; tolerance ``max(0.025 - 0.01 c, t (1 - c))`` where ``c >= 0``,
    ``max(t, 0.025 (1 - 3 c))`` where ``c < 0``), then at most the ceiling ``u`` (0.2 at first; ``u = max(0.002, 0.7
    min(u, last tolerance))`` where ``planned / arrived > 1.4`` and ``fresh > arrived``, else ``min(0.2, 1.25 u)``).
    Independent noisy windows arrive less balanced than planned (the tolerance rises), yet the fresh plan still
    serves them better (10 slots a GPU): the ceiling cuts the tolerance below the rule's own value; on a random
    walk the fresh plan keeps its edge on the windows that come (the tolerance falls below 0.025); on alternating
    phases a fresh plan on the latest windows serves the next ones worse than the placement in force (a negative
    regret: the tolerance rises above 0.025)."""
    loads = {
        "noisy": noisy_windows(24, seed=6),
        "drifting": drifting_windows(24),
        "alternating": alternating_windows(24),
    }[traffic]
    rebalancer = eplb.Rebalancer(*CONFIG)
    recorded, since, planned, placement, reference, seen = [], [], None, None, None, []
    regret, last, raised, ceiling, capped = None, 0.025, False, 0.2, False
    for t, load in enumerate(loads):
        rebalancer.record(load)
        recorded.append(load)
        since.append(load)
        if t % 3 != 2:
            continue
        decision = rebalancer.step()
        if planned is None:
            assert decision.tolerance == 0.025
        else:
            arrived = np.mean([balancedness64(w, placement, 8) for w in since])
            want = min(0.2, max(0.025, 0.1 * (planned / arrived - 1)))
            fresh = np.mean([balancedness64(w, reference, 8) for w in since])
            ratio = (fresh / arrived - 1) / last
            regret = ratio if regret is None else 0.75 * regret + 0.25 * ratio
            cost = min(max(regret, -1.0), 1.0)
            base = want
            want = max(0.025 - 0.01 * cost, want * (1 - cost)) if cost >= 0 else max(want, 0.025 * (1 - 3 * cost))
            raised |= cost < 0 and want > base * 1.01
            if planned / arrived > 1.4 and fresh > arrived:
                ceiling = max(0.002, 0.7 * min(ceiling, last))
            else:
                ceiling = min(0.2, 1.25 * ceiling)
            capped |= ceiling < want * 0.99
            want = min(want, ceiling)
            assert decision.tolerance == pytest.approx(want, rel=1e-4, abs=1e-7)
            seen.append(decision.tolerance)
        last = decision.tolerance
        history = history64(recorded, 1)
        placement = np.asarray(decision.placement.phy2log)
        planned = balancedness64(history, placement, 8)
        reference = np.asarray(eplb.rebalance_experts(history.astype(np.float32), *CONFIG).phy2log)
        since = []
    if traffic == "drifting":
        assert min(seen) < 0.0225  # the tolerance cost balance on the windows that came: it fell
    else:
        assert max(seen) > 0.025  # less balanced than planned (noisy), or fresh plans served worse (alternating)
    if traffic == "alternating":
        assert raised  # a negative regret raised the tolerance above the rule's own value
    assert capped == (traffic == "noisy")  # the ceiling acts on noisy traffic only (there: the fresh plan's edge)


# ---------------------------------------------------------------- failed and slower GPUs


def _valid_on(placement, live_gpus: np.ndarray, num_experts: int = 64) -> None:
    """No expert on a GPU down; every expert has a replica on a GPU up; counts match."""
    phy2log, _, logcnt = (np.asarray(a) for a in placement)
    live_slot = np.repeat(live_gpus, phy2log.shape[1] // len(live_gpus))
    assert (phy2log[:, ~live_slot] == -1).all(), "an expert on a GPU down"
    for layer in range(phy2log.shape[0]):
        counts = np.bincount(phy2log[layer][phy2log[layer] >= 0], minlength=num_experts)
        np.testing.assert_array_equal(counts, logcnt[layer])
        assert (counts >= 1).all(), "an expert lost"


def test_a_gpu_fails_then_comes_back():
    """A GPU goes down mid-run: the next step changes every layer that held an expert there, whatever the
    budget, and the plan reloads what has no surviving copy; it comes back: the GPU gets experts again."""
    loads = windows(3, count=9)
    rebalancer = eplb.Rebalancer(*CONFIG, max_layers=1)
    for load in loads[:3]:
        rebalancer.record(load)
    first = rebalancer.step()
    down = np.ones(8, dtype=bool)
    down[5] = False
    rebalancer.set_gpus(active_gpus=down)
    for load in loads[3:6]:
        rebalancer.record(load)
    decision = rebalancer.step()
    held = (np.asarray(first.placement.phy2log).reshape(6, 8, 10)[:, 5] >= 0).any(axis=-1)
    np.testing.assert_array_equal(decision.layers, np.flatnonzero(held))  # every such layer (budget: 1 layer)
    assert len(decision.layers) > 1
    _valid_on(decision.placement, down)
    assert (decision.gain[decision.layers] == 1.0).all()
    assert decision.tolerance == 0.025  # windows under the broken placement were not scored ("auto": its floor)
    rebalancer.set_gpus()  # back up
    for load in loads[6:]:
        rebalancer.record(load)
    back = rebalancer.step()
    assert len(back.layers) == 1  # the budget holds again
    assert (np.asarray(back.placement.phy2log)[back.layers].reshape(-1, 8, 10)[:, 5] >= 0).all()


@pytest.mark.parametrize("backend", backend_params([Backend.NUMPY, Backend.TORCH]))
def test_unequal_speeds_same_decisions_and_gain_by_time(backend):
    """With gpu_capacity: gains are 1 - slowest time of the candidate / of the placement in force (float64
    oracle on the float64 GPU loads), placements valid, decisions identical on numpy and torch. (JAX: the
    decisions are host code on rebalance_experts and metrics.gpu_loads, each identical on JAX in their own
    tests; a JAX run here compiles the by-time graphs for minutes of CI.)"""
    caps = np.array([1, 0.6, 1, 0.6, 1, 0.6, 1, 0.5])
    runner = make_runner(backend)
    reference = eplb.Rebalancer(*CONFIG, gpu_capacity=caps, min_gain=0.005, long_window=0)  # the plain candidate
    other = eplb.Rebalancer(*CONFIG, gpu_capacity=caps, min_gain=0.005, long_window=0)
    for t, load in enumerate(windows(4, count=9)):
        reference.record(load)
        other.record(runner.asarray(load))
        if t % 3 == 2:
            before = reference.placement
            want, got = reference.step(), other.step()
            np.testing.assert_array_equal(got.layers, want.layers)
            np.testing.assert_array_equal(got.gain, want.gain)
            for a, b in zip(got.placement, want.placement, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            _valid_on(want.placement, np.ones(8, dtype=bool))
            if before is None:
                continue
            history = np.asarray(reference._history, dtype=np.float64)  # the float32 history, read exactly
            candidate = eplb.rebalance_experts(
                history.astype(np.float32), *CONFIG, gpu_capacity=caps, previous=np.asarray(before.phy2log),
                balance_tolerance=want.tolerance,
            )  # fmt: skip
            now = oracle.capacity_times64(history, np.asarray(before.phy2log), 8, caps).max(axis=1)
            new = oracle.capacity_times64(history, candidate.phy2log, 8, caps).max(axis=1)
            expect = np.where(new < now, 1 - new / now, 0.0)
            np.testing.assert_allclose(want.gain, expect, atol=1e-5)
            assert (want.gain[want.layers] >= 0.005).all()


def test_an_initial_placement_on_a_gpu_now_down():
    """Constructed after a failure with the placement from before it: the first step re-homes every layer."""
    loads = windows(6, count=3)
    before = eplb.rebalance_experts(loads[0], *CONFIG).phy2log
    up = np.ones(8, dtype=bool)
    up[0] = False
    rebalancer = eplb.Rebalancer(*CONFIG, initial=before, active_gpus=up, max_experts=1)
    for load in loads[1:]:
        rebalancer.record(load)
    decision = rebalancer.step()
    np.testing.assert_array_equal(decision.layers, np.arange(6))
    _valid_on(decision.placement, up)
    assert decision.tolerance == 0.025


@pytest.mark.parametrize(
    ("config", "experts"),
    [((2, 1, 1, 2), 1), ((8, 1, 1, 8), 8), ((12, 2, 2, 4), 8)],
    ids=["one-expert", "one-slot", "hier"],
)
@pytest.mark.parametrize("traffic", ["zeros", "some-zero-windows"])
def test_auto_tolerance_on_degenerate_inputs(config, experts, traffic):
    """One expert, one slot per GPU, all-zero windows: the "auto" rule (regret and ceiling included) stays finite
    and within [0.002, 0.2], numpy and torch decide alike, and every placement holds each expert at least once."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    on_numpy, on_torch = eplb.Rebalancer(*config), eplb.Rebalancer(*config)
    for t in range(15):
        zero = traffic == "zeros" or t % 3 == 1
        load = np.zeros((3, experts), np.int64) if zero else rng.integers(0, 50, (3, experts))
        on_numpy.record(load)
        on_torch.record(torch.as_tensor(load))
        if t % 3 == 2:
            want, got = on_numpy.step(), on_torch.step()
            assert got.tolerance == want.tolerance and 0.002 <= want.tolerance <= 0.2
            np.testing.assert_array_equal(np.asarray(got.placement.phy2log), np.asarray(want.placement.phy2log))
            for row in np.asarray(want.placement.phy2log):
                assert set(row.tolist()) == set(range(experts))
