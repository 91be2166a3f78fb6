"""Property tests of the promises beyond the greedy policy, against independent oracles.

- ``policy="refined"``: a valid placement whose heaviest GPU is never heavier
  than greedy's, per layer;
- ``spill=``: exactly the plain-Python spill oracle (``tests/oracle.py``);
- ``previous=``: the same GPU contents as without it (exactly), and with
  ``balance_tolerance`` / ``max_moves`` the bound on the heaviest GPU and on
  the moves; an unchanged load moves nothing.

Loads are scored by a float64 scorer (``oracle.gpu_loads64``: ``math.fsum`` of
``w / count``) and moves by a plain-Python counter (``oracle.moves``), never
by eplb's own ``gpu_loads`` / ``count_moves``. The float32 placement compares
left-to-right float32 sums, so float64 checks allow the rounding of those
sums: ``slack`` below. Configs include one expert, one slot per GPU, and loads
include all-zero layers (see ``tests/test_properties.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import eplb

from . import oracle
from .conftest import Backend, make_runner
from .test_properties import Config, check_placement, configs, hierarchical_configs, loads

ONE_EXPERT = Config(1, 4, 1, 1, 2)
ONE_SLOT_PER_GPU = Config(8, 8, 4, 2, 8)


def slack(config: Config) -> float:
    """Relative float32 rounding of a GPU load: a product per replica, a sum over its slots (both ways)."""
    return oracle.load_slack(config.num_replicas, config.num_gpus)


@st.composite
def problems(draw, config_strategy=configs) -> tuple[Config, np.ndarray]:
    config = draw(config_strategy)
    return config, draw(loads(draw(st.integers(1, 3)), config.num_experts))


# ---------------------------------------------------------------- refined


@settings(max_examples=120, deadline=None)
@given(problem=problems())
@example(problem=(ONE_EXPERT, np.array([[5.0], [0.0]], dtype=np.float32)))
@example(problem=(ONE_SLOT_PER_GPU, np.array([[5, 1, 0, 3, 9, 9, 2, 0], [0] * 8], dtype=np.int64)))
def test_refined_never_heavier_than_greedy(problem):
    config, weight = problem
    refined = tuple(np.asarray(a) for a in eplb.rebalance_experts(weight, *config.args, policy="refined"))
    check_placement(config, len(weight), refined)
    greedy = eplb.rebalance_experts(weight, *config.args).phy2log
    peak_refined = oracle.gpu_loads64(weight, refined[0], config.num_gpus).max(axis=1)
    peak_greedy = oracle.gpu_loads64(weight, greedy, config.num_gpus).max(axis=1)
    assert (peak_refined <= peak_greedy * slack(config)).all()


# ---------------------------------------------------------------- spill


@st.composite
def spill_problems(draw) -> tuple[Config, int, np.ndarray]:
    """Hierarchical configs with redundant slots on every node, and a spill in [1, (R - E) / N]."""
    config = draw(hierarchical_configs())
    extra = draw(st.integers(1, 3))
    replicas = config.num_replicas + extra * config.num_gpus
    config = config._replace(num_replicas=replicas)
    spill = draw(st.integers(1, (replicas - config.num_experts) // config.num_nodes))
    return config, spill, draw(loads(draw(st.integers(1, 3)), config.num_experts))


@settings(max_examples=150, deadline=None)
@given(problem=spill_problems())
@example(problem=(Config(32, 40, 4, 4, 8), 1, np.random.default_rng(0).lognormal(0, 1.5, (4, 32)).astype(np.float32)))
@example(problem=(Config(1, 4, 1, 1, 2), 3, np.array([[3.0], [0.0]], dtype=np.float32)))
def test_spill_equals_oracle(problem):
    """Spilled replicas are dealt by LPT from each node's own load (not by index), exactly as the oracle."""
    config, spill, weight = problem
    got = tuple(np.asarray(a) for a in eplb.rebalance_experts(weight, *config.args, spill=spill))
    want = oracle.rebalance_spill(weight, *config.args, spill)
    for name, g, w in zip(eplb.Placement._fields, got, want, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=name)


@settings(max_examples=60, deadline=None)
@given(problem=spill_problems())
def test_refined_spill_repacks_within_nodes(problem):
    """With the refined packing, swaps only move replicas between GPUs of a node: every node holds exactly
    the oracle's replicas (its home groups and the spilled ones dealt to it), and the counts are the oracle's."""
    config, spill, weight = problem
    got = tuple(np.asarray(a) for a in eplb.rebalance_experts(weight, *config.args, spill=spill, policy="refined"))
    want = oracle.rebalance_spill(weight, *config.args, spill)
    np.testing.assert_array_equal(got[2], want[2])
    nodes = (len(weight), config.num_nodes, -1)
    np.testing.assert_array_equal(np.sort(got[0].reshape(nodes), axis=-1), np.sort(want[0].reshape(nodes), axis=-1))
    for layer in range(len(weight)):
        np.testing.assert_array_equal(np.bincount(got[0][layer], minlength=config.num_experts), got[2][layer])


# ---------------------------------------------------------------- previous= and its knobs


@st.composite
def drift_problems(draw, config_strategy=configs) -> tuple[Config, np.ndarray, np.ndarray]:
    """A config, an old load and a new one (a multiplicative drift of it, or unrelated)."""
    config = draw(config_strategy)
    layers = draw(st.integers(1, 3))
    old = draw(loads(layers, config.num_experts, "float"))
    if draw(st.booleans()):
        factor = np.exp(
            draw(st.floats(0.0, 1.0)) * np.random.default_rng(draw(st.integers(0, 99))).normal(size=old.shape)
        )
        new = (old * factor).astype(np.float32)
    else:
        new = draw(loads(layers, config.num_experts, "float"))
    return config, old, new


KNOBS = st.sampled_from(
    [
        {},
        {"balance_tolerance": 0.0},
        {"balance_tolerance": 0.05},
        {"max_moves": 0},
        {"max_moves": 2},
        {"balance_tolerance": 0.01, "max_moves": 1},
    ]
)


@settings(max_examples=150, deadline=None)
@given(problem=drift_problems(), knobs=KNOBS)
@example(problem=(ONE_EXPERT, np.array([[5.0]], np.float32), np.array([[0.0]], np.float32)), knobs={"max_moves": 0})
@example(
    problem=(ONE_SLOT_PER_GPU, np.arange(16, dtype=np.float32).reshape(2, 8), np.zeros((2, 8), np.float32)),
    knobs={"balance_tolerance": 0.0, "max_moves": 1},
)
def test_previous_keeps_its_promises(problem, knobs):
    config, old_w, new_w = problem
    previous = eplb.rebalance_experts(old_w, *config.args).phy2log
    fresh = eplb.rebalance_experts(new_w, *config.args)
    relabelled = eplb.rebalance_experts(new_w, *config.args, previous=previous)
    result = tuple(np.asarray(a) for a in eplb.rebalance_experts(new_w, *config.args, previous=previous, **knobs))
    check_placement(config, len(new_w), result)
    gpus = config.num_gpus

    # previous= alone: the fresh placement's GPU contents, relabelled; the same loads exactly (fsum).
    np.testing.assert_array_equal(relabelled.logcnt, fresh.logcnt)
    assert gpu_contents(relabelled.phy2log, gpus) == gpu_contents(fresh.phy2log, gpus)
    np.testing.assert_array_equal(
        np.sort(oracle.gpu_loads64(new_w, relabelled.phy2log, gpus)),
        np.sort(oracle.gpu_loads64(new_w, fresh.phy2log, gpus)),
    )
    assert (oracle.moves(previous, relabelled.phy2log, gpus) <= oracle.moves(previous, fresh.phy2log, gpus)).all()

    moved = oracle.moves(previous, result[0], gpus)
    peak = oracle.gpu_loads64(new_w, result[0], gpus).max(axis=1)
    fresh_peak = oracle.gpu_loads64(new_w, fresh.phy2log, gpus).max(axis=1)
    if "max_moves" in knobs:
        assert (moved <= knobs["max_moves"]).all()
    else:
        tolerance = knobs.get("balance_tolerance", 0.0)
        assert (peak <= fresh_peak * (1 + tolerance) * slack(config)).all()
        assert (moved <= oracle.moves(previous, relabelled.phy2log, gpus)).all()
    # torch ops (the CUDA code path) agree, previous= and knobs included.
    if Backend.TORCH_OPS.available():
        runner = make_runner(Backend.TORCH_OPS)
        got = runner.rebalance_np(new_w, *config.args, previous=runner.asarray(previous), **knobs)
        for g, w in zip(got, result, strict=True):
            np.testing.assert_array_equal(g, w)


@settings(max_examples=80, deadline=None)
@given(problem=problems(), knobs=KNOBS)
def test_unchanged_load_moves_nothing(problem, knobs):
    """previous= the placement of the same load: nothing moves, whatever the knobs."""
    config, weight = problem
    first = eplb.rebalance_experts(weight, *config.args)
    again = eplb.rebalance_experts(weight, *config.args, previous=first, **knobs)
    assert (oracle.moves(first.phy2log, again.phy2log, config.num_gpus) == 0).all()


@settings(max_examples=80, deadline=None)
@given(problem=problems(), fill=st.integers(0, 40), knobs=KNOBS)
def test_degenerate_previous(problem, fill, knobs):
    """A previous that is not a placement of the config (one expert everywhere; a global placement under the
    hierarchical policy): a valid result without max_moves; with it, a ValueError naming the rule."""
    config, weight = problem
    candidates = [np.full((len(weight), config.num_replicas), fill % config.num_experts)]
    if config.hierarchical and config.num_nodes > 1:
        candidates.append(eplb.rebalance_experts(weight[::-1].copy(), *config.args, hierarchical=False).phy2log)
    for previous in candidates:
        valid = _is_placement(previous, config)
        if "max_moves" in knobs and not valid:
            with pytest.raises(ValueError, match="previous is not a placement of this configuration"):
                eplb.rebalance_experts(weight, *config.args, previous=previous, **knobs)
            continue
        result = tuple(np.asarray(a) for a in eplb.rebalance_experts(weight, *config.args, previous=previous, **knobs))
        check_placement(config, len(weight), result)
        if "max_moves" in knobs:
            assert (oracle.moves(previous, result[0], config.num_gpus) <= knobs["max_moves"]).all()


def _is_placement(previous: np.ndarray, config: Config) -> bool:
    """Plain check: every expert has a slot, and (hierarchical) each group's slots lie on one node."""
    per_node = config.num_replicas // config.num_nodes
    group_size = config.num_experts // config.num_groups
    for row in previous.tolist():
        if set(row) != set(range(config.num_experts)):
            return False
        if config.hierarchical:
            for g in range(config.num_groups):
                nodes = {slot // per_node for slot, e in enumerate(row) if e // group_size == g}
                if len(nodes) > 1:
                    return False
    return True


def gpu_contents(phy2log: np.ndarray, num_gpus: int) -> list:
    """Per layer: the sorted list of each GPU's sorted experts (GPU and slot labels forgotten)."""
    per_gpu = np.sort(np.asarray(phy2log).reshape(len(phy2log), num_gpus, -1), axis=-1)
    return [sorted(map(tuple, layer.tolist())) for layer in per_gpu]
