"""Elastic placement, ``rebalance_experts(..., active_gpus=mask)`` (issue 19, first slice).

Checked against the plain-Python oracle (``tests/oracle.elastic``: the greedy
policy on a cluster of the live GPUs alone, per node for the hierarchical
policy, scattered back), for its invariants, and bit for bit across numpy,
torch (CPU; CUDA where present) and JAX (XLA, inside a user's ``jit`` with
the mask traced, under ``vmap``), each forced onto the array-API path.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb.backends import _numpy

from . import cases, oracle
from .conftest import needs_gpu

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy


def _check_valid(placement, weight, num_replicas, num_gpus, live):
    """Every invariant of an elastic placement, layer by layer."""
    phy2log, log2phy, logcnt = (np.asarray(a) for a in placement)
    num_layers, num_experts = weight.shape
    per_gpu = num_replicas // num_gpus
    live_slot = np.repeat(np.asarray(live, bool), per_gpu)
    assert (phy2log[:, ~live_slot] == -1).all(), "a dead GPU's slot holds an expert"
    assert (phy2log[:, live_slot] >= 0).all() and (phy2log < num_experts).all()
    assert (logcnt >= 1).all(), "an expert lost its last replica"
    assert (logcnt.sum(axis=1) == live_slot.sum()).all()
    for layer in range(num_layers):
        counts = np.bincount(phy2log[layer][phy2log[layer] >= 0], minlength=num_experts)
        np.testing.assert_array_equal(counts, logcnt[layer])
        for e in range(num_experts):
            slots = log2phy[layer, e]
            held = slots[: logcnt[layer, e]]
            assert (slots[logcnt[layer, e] :] == -1).all()
            assert (held >= 0).all() and live_slot[held].all(), "log2phy points at a dead slot"
            assert (phy2log[layer, held] == e).all()


def _same(a, b):
    for name, x, y in zip(("phy2log", "log2phy", "logcnt"), a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


# ---------------------------------------------------------------- implementations, each forced


def _xp_numpy(w, r, g, n, gpus, mask, hierarchical):
    return _numpy.rebalance(
        np.asarray(w, np.float32),
        r,
        g,
        n,
        gpus,
        impl="xp",
        hierarchical=hierarchical,
        policy="greedy",
        spill=0,
        active_gpus=np.asarray(mask),
    )


def _torch_ops(w, r, g, n, gpus, mask, hierarchical, device="cpu"):
    from eplb.backends import _torch

    out = _torch.rebalance(
        torch.as_tensor(np.array(w), device=device),
        r,
        g,
        n,
        gpus,
        impl="torch",
        hierarchical=hierarchical,
        policy="greedy",
        spill=0,
        active_gpus=torch.as_tensor(mask, device=device),
    )
    assert all(a.device.type == device for a in out)
    return tuple(a.cpu().numpy() for a in out)


def _jax_xla(w, r, g, n, gpus, mask, hierarchical):
    from eplb.backends import _jax

    out = _jax.rebalance(
        jnp.asarray(w, jnp.float32),
        r,
        g,
        n,
        gpus,
        impl="xla",
        hierarchical=hierarchical,
        policy="greedy",
        spill=0,
        active_gpus=jnp.asarray(mask),
    )
    return tuple(np.asarray(a) for a in out)


def _jax_user_jit(w, r, g, n, gpus, mask, hierarchical):
    """Inside the user's jit, the mask traced (so the node fallback is decided per layer on the device)."""

    @jax.jit
    def call(weight, active):
        return tuple(eplb.rebalance_experts(weight, r, g, n, gpus, hierarchical=hierarchical, active_gpus=active))

    return tuple(np.asarray(a) for a in call(jnp.asarray(w, jnp.float32), jnp.asarray(mask)))


def _jax_vmap(w, r, g, n, gpus, mask, hierarchical):
    """A user's vmap over layers (each call sees one layer), mask shared."""

    def one(row, active):
        out = eplb.rebalance_experts(row[None], r, g, n, gpus, hierarchical=hierarchical, active_gpus=active)
        return tuple(a[0] for a in out)

    out = jax.jit(jax.vmap(one, in_axes=(0, None)))(jnp.asarray(w, jnp.float32), jnp.asarray(mask))
    return tuple(np.asarray(a) for a in out)


def _front(kind):
    def run(w, r, g, n, gpus, mask, hierarchical):
        conv = {"numpy": np.asarray, "torch": torch.as_tensor, "jax": lambda a: jnp.asarray(a)}[kind]
        out = eplb.rebalance_experts(conv(w), r, g, n, gpus, hierarchical=hierarchical, active_gpus=conv(mask))
        return tuple(np.asarray(a) for a in out)

    return run


IMPLS = {
    "numpy:xp": _xp_numpy,
    "torch:ops": _torch_ops,
    "jax:xla": _jax_xla,
    "jax:user-jit": _jax_user_jit,
    "jax:vmap": _jax_vmap,
    "numpy": _front("numpy"),
    "torch": _front("torch"),
    "jax": _front("jax"),
}

# (experts, replicas, groups, nodes, gpus, dead GPUs)
CASES = [
    (16, 32, 4, 2, 8, [1, 5]),  # hierarchical, a GPU down per node
    (16, 32, 4, 2, 8, [4, 5, 6, 7]),  # a whole node down: global fallback
    (16, 24, 4, 2, 4, [0]),  # 6 slots per GPU
    (16, 24, 3, 2, 8, [2, 3]),  # global (3 groups on 2 nodes)
    (16, 20, 4, 2, 20, [3, 7, 11, 19]),  # one slot per GPU, exactly E live slots
    (12, 16, 4, 2, 8, [7]),
    (1, 4, 1, 1, 4, [0, 1, 2]),  # one expert, one live GPU
]


def _loads(num_experts, seed, layers=4):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 1000, (layers, num_experts))
    w[1] = 0  # an all-zero layer
    w[2] = 7  # all equal
    return w


@pytest.mark.parametrize("case", CASES, ids=[f"{c[:5]}-dead{c[5]}" for c in CASES])
def test_every_implementation_equals_the_oracle(case):
    num_experts, r, g, n, gpus, dead = case
    mask = np.ones(gpus, bool)
    mask[dead] = False
    w = _loads(num_experts, seed=len(dead))
    expected = oracle.elastic(w, r, g, n, gpus, mask)
    hierarchical = g % n == 0
    for name, impl in IMPLS.items():
        got = impl(w, r, g, n, gpus, mask, hierarchical)
        _check_valid(got, w, r, gpus, mask)
        for label, x, y in zip(("phy2log", "log2phy", "logcnt"), got, expected, strict=True):
            assert np.array_equal(x, y), f"{label} of {name} differs from the oracle"


ALL_UP = [CASES[0], CASES[2], CASES[3], CASES[4]]


@pytest.mark.parametrize("case", ALL_UP, ids=[str(c[:5]) for c in ALL_UP])
def test_all_true_is_the_plain_placement(case):
    num_experts, r, g, n, gpus, _ = case
    w = _loads(num_experts, seed=3)
    mask = np.ones(gpus, bool)
    plain = eplb.rebalance_experts(w, r, g, n, gpus)
    for name, impl in IMPLS.items():
        got = impl(w, r, g, n, gpus, mask, g % n == 0)
        for label, x, y in zip(("phy2log", "log2phy", "logcnt"), got, plain, strict=True):
            assert np.array_equal(x, y), f"{label} of {name} with every GPU up differs from the plain placement"


@st.composite
def elastic_calls(draw):
    num_nodes = draw(st.integers(1, 3))
    hierarchical = draw(st.booleans())
    num_groups = num_nodes * draw(st.integers(1, 3)) if hierarchical else num_nodes + 1
    num_experts = num_groups * draw(st.integers(1, 3))
    num_gpus = num_nodes * draw(st.integers(1, 4))
    per_gpu = -(-num_experts // num_gpus) + draw(st.integers(0, 3))
    mask = draw(st.lists(st.booleans(), min_size=num_gpus, max_size=num_gpus))
    if sum(mask) * per_gpu < num_experts:
        mask = [True] * num_gpus
    kind = draw(st.sampled_from(["int", "float", "few"]))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "int":
        w = rng.integers(0, 2**31 // num_experts, (layers, num_experts))
    elif kind == "few":
        w = rng.integers(0, 3, (layers, num_experts))  # many ties
    else:
        w = rng.lognormal(0, 2, (layers, num_experts)).astype(np.float32)
    return w, (num_gpus * per_gpu, num_groups, num_nodes, num_gpus), np.asarray(mask)


@settings(max_examples=60, deadline=None)
@given(elastic_calls())
def test_random_calls_match_the_oracle(call):
    w, config, mask = call
    got = eplb.rebalance_experts(w, *config, active_gpus=mask)
    _check_valid(got, w, config[0], config[3], mask)
    _same(got, oracle.elastic(w, *config, mask))
    # The torch ops path (what CUDA runs) and the numpy path with the fallback decided on the device.
    _same(_torch_ops(w, *config, mask, config[1] % config[2] == 0), got)
    _same(_xp_numpy(w, *config, mask, config[1] % config[2] == 0), got)


@settings(max_examples=15, deadline=None)
@given(elastic_calls())
def test_random_calls_jax_traced_mask(call):
    w, config, mask = call
    if w.dtype.kind == "i":
        w = w.astype(np.int32)
    expected = eplb.rebalance_experts(w, *config, active_gpus=mask)
    _same(_jax_user_jit(w, *config, mask, config[1] % config[2] == 0), expected)


def test_a_new_mask_does_not_recompile():
    w = jnp.asarray(_loads(16, seed=0), jnp.float32)
    call = jax.jit(lambda w, m: eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=m).phy2log)
    for dead in (1, 4, 6):
        mask = np.ones(8, bool)
        mask[dead] = False
        np.testing.assert_array_equal(call(w, jnp.asarray(mask)), oracle.elastic(np.asarray(w), 32, 4, 2, 8, mask)[0])
    assert call._cache_size() == 1


def test_traced_mask_with_too_few_live_slots_gives_an_empty_placement():
    """Unreadable mask, fewer than E live slots: -1 everywhere and logcnt 0, never a plausible placement."""
    w = jnp.asarray(_loads(16, seed=0), jnp.float32)
    mask = np.zeros(8, bool)
    mask[:3] = True  # 3 GPUs x 4 slots = 12 < 16 experts
    call = jax.jit(lambda w, m: tuple(eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=m)))
    phy2log, log2phy, logcnt = (np.asarray(a) for a in call(w, jnp.asarray(mask)))
    assert (phy2log == -1).all() and (log2phy == -1).all() and (logcnt == 0).all()
    _same(_torch_ops(np.asarray(w), 32, 4, 2, 8, mask, True), (phy2log, log2phy, logcnt))


def test_node_down_falls_back_to_the_global_rule():
    w = _loads(16, seed=5)
    mask = np.array([True] * 4 + [False] * 4)
    got = eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=mask)
    _same(got, eplb.rebalance_experts(w, 32, 4, 2, 8, hierarchical=False, active_gpus=mask))
    # One GPU per node down keeps the groups on their nodes.
    mask = np.array([True, True, True, False, True, True, True, False])
    got = eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=mask)
    group_node = np.asarray(got.phy2log) // 4  # group of each slot (4 experts per group)
    for layer in range(w.shape[0]):
        for node in range(2):
            groups = group_node[layer, node * 16 : (node + 1) * 16]
            assert len(set(groups[groups >= 0].tolist())) == 2  # two whole groups per node


def test_one_slot_per_gpu_takes_items_in_order():
    w = np.array([[5, 1, 9, 3]])
    mask = np.array([True, False, True, True, True, False])
    got = eplb.rebalance_experts(w, 6, 1, 1, 6, active_gpus=mask)
    assert got.phy2log.tolist() == [[0, -1, 1, 2, 3, -1]]
    assert got.logcnt.tolist() == [[1, 1, 1, 1]]


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (np.ones(7, bool), ValueError, r"active_gpus must have shape \[num_gpus\] = \[8\]"),
        (np.ones((2, 8), bool), ValueError, "active_gpus must have shape"),
        (np.ones(8, np.int64), TypeError, "active_gpus must hold bools"),
        ([1, 1, 1, 1, 1, 1, 1, 1], TypeError, "active_gpus must hold bools"),
        (np.array([True, True, True] + [False] * 5), ValueError, "12 live slots .* fewer than the 16 experts"),
    ],
)
def test_bad_masks(mask, error, match):
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(_loads(16, 0), 32, 4, 2, 8, active_gpus=mask)


def test_mask_of_another_framework():
    with pytest.raises(TypeError, match="active_gpus must be a bool array of the loads' framework"):
        eplb.rebalance_experts(jnp.asarray(_loads(16, 0)), 32, 4, 2, 8, active_gpus=torch.ones(8, dtype=torch.bool))
    with pytest.raises(TypeError, match="active_gpus must hold bools"):
        eplb.rebalance_experts(torch.as_tensor(_loads(16, 0)), 32, 4, 2, 8, active_gpus=torch.ones(8))
    # A list of bools is fine, for every framework.
    got = eplb.rebalance_experts(torch.as_tensor(_loads(16, 0)), 32, 4, 2, 8, active_gpus=[True] * 7 + [False])
    assert isinstance(got.phy2log, torch.Tensor)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"policy": "refined"}, "policy='refined'"),
        ({"spill": 2}, "spill=2"),
        ({"max_moves": 3}, "max_moves="),
        ({"previous": np.zeros((4, 32), np.int64), "max_moves": 3, "hierarchical": False}, "max_moves="),
    ],
)
def test_unsupported_combinations(options, match):
    mask = np.ones(8, bool)
    with pytest.raises(ValueError, match=f"active_gpus cannot be combined with {match}"):
        eplb.rebalance_experts(_loads(16, 0), 32, 4, 2, 8, active_gpus=mask, **options)


def test_kernels_reject_the_mask():
    from eplb.backends import _jax

    with pytest.raises(ValueError, match="active_gpus runs on impl='xla'"):
        _jax.rebalance(jnp.ones((1, 16)), 32, 4, 2, 8, impl="pallas", hierarchical=True, active_gpus=jnp.ones(8, bool))


# ---------------------------------------------------------------- metrics and transfers


def test_metrics_count_dead_gpus_out():
    w = _loads(16, seed=0)
    mask = np.ones(8, bool)
    mask[2] = False
    p = eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=mask)
    loads = np.asarray(eplb.metrics.gpu_loads(w, p.phy2log, 8))
    assert (loads[:, 2] == 0).all()
    live = loads[:, mask]
    expected = np.where(live.max(axis=1) > 0, live.mean(axis=1) / np.maximum(live.max(axis=1), 1e-30), 1.0)
    np.testing.assert_allclose(eplb.metrics.balancedness(w, p.phy2log, 8), expected, rtol=1e-6)
    # Without -1 slots the metric is unchanged.
    plain = eplb.rebalance_experts(w, 32, 4, 2, 8)
    full = np.asarray(eplb.metrics.gpu_loads(w, plain.phy2log, 8))
    with np.errstate(invalid="ignore"):
        expected = np.where(full.max(1) > 0, full.mean(1, dtype=np.float32) / full.max(1), 1.0)
    np.testing.assert_array_equal(eplb.metrics.balancedness(w, plain.phy2log, 8), expected.astype(np.float32))


def test_plan_transfers_to_empty_slots():
    """-1 slots of the new placement receive nothing; those of the old one are no source."""
    w = _loads(16, seed=0)
    mask = np.ones(8, bool)
    mask[2] = False
    old = np.asarray(eplb.rebalance_experts(w, 32, 4, 2, 8).phy2log)
    new = np.asarray(eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=mask).phy2log)
    old_live = np.where(np.repeat(mask, 4), old, -1)
    plan = eplb.plan_transfers(old_live, new, num_gpus=8, num_nodes=2, allow_reload=True)
    assert not (plan.dst_gpu == 2).any() and not (plan.src_gpu == 2).any()


@needs_gpu("torch")
def test_torch_cuda_equals_numpy():
    for num_experts, r, g, n, gpus, dead in CASES:
        mask = np.ones(gpus, bool)
        mask[dead] = False
        w = _loads(num_experts, seed=1)
        _same(_torch_ops(w, r, g, n, gpus, mask, g % n == 0, device="cuda"), oracle.elastic(w, r, g, n, gpus, mask))


# ---------------------------------------------------------------- previous= (issue 19, item 1)
#
# Promise, per layer: the heaviest live GPU is at most (1 + balance_tolerance) times that of the fresh
# active_gpus placement (float64 oracle loads, float32 rounding allowed), the replica counts are the fresh
# ones, every invariant above holds, and no more experts move (live slots only, plain-Python counter) than in
# the fresh placement with its live GPUs best permuted among live positions (scipy's assignment solver).


def _check_previous_promise(w, r, gpus, mask, previous, tolerance, got):
    got = tuple(np.asarray(a) for a in got)
    _check_valid(got, w, r, gpus, mask)
    fresh = oracle.elastic(w, r, 1, 1, gpus, mask)  # (replica counts may differ: the local search changes them)
    peak = oracle.gpu_loads64(w, got[0], gpus).max(axis=1)
    fresh_peak = oracle.gpu_loads64(w, fresh[0], gpus).max(axis=1)
    assert (peak <= fresh_peak * (1 + (tolerance or 0.0)) * oracle.load_slack(r, gpus)).all(), (peak, fresh_peak)
    moved = oracle.moves(previous, got[0], gpus)
    assert (moved <= oracle.best_relabel_moves(previous, fresh[0], mask, gpus)).all()
    return moved


@st.composite
def previous_calls(draw):
    num_gpus = draw(st.integers(1, 8))
    w, r, mask, rng = cases.draw_failure(draw, num_gpus)
    (layers, num_experts), per_gpu = w.shape, r // num_gpus
    old_w = rng.lognormal(0, 1, (layers, num_experts)).astype(np.float32)
    # The placement in force: healthy, or elastic with some of today's dead GPUs already down (-1 there).
    old_mask = np.where(rng.random(num_gpus) < 0.5, mask, True)
    if draw(st.booleans()) and old_mask.sum() * per_gpu >= num_experts and not old_mask.all():
        previous = np.asarray(eplb.rebalance_experts(old_w, r, 1, 1, num_gpus, active_gpus=old_mask).phy2log)
    else:
        previous = np.asarray(eplb.rebalance_experts(old_w, r, 1, 1, num_gpus).phy2log)
    tolerance = draw(st.sampled_from([None, 0.0, 0.05, 0.3]))
    return w, r, num_gpus, mask, previous, tolerance


@settings(max_examples=40, deadline=None)
@given(previous_calls())
def test_previous_keeps_its_promises(call):
    w, r, gpus, mask, previous, tolerance = call
    got = eplb.rebalance_experts(
        w, r, 1, 1, gpus, previous=previous, active_gpus=mask, balance_tolerance=tolerance, hierarchical=False
    )
    _check_previous_promise(w, r, gpus, mask, previous, tolerance, got)
    # The torch ops path (what CUDA runs) gives the same placement.
    from eplb.backends import _torch

    ops = _torch.rebalance_stable(
        torch.as_tensor(np.asarray(w, np.float32)),
        torch.as_tensor(previous),
        r,
        1,
        1,
        gpus,
        impl="torch",
        hierarchical=False,
        policy="greedy",
        spill=0,
        tolerance=tolerance,
        max_moves=None,
        active_gpus=torch.as_tensor(mask),
    )
    _same(tuple(a.numpy() for a in ops), got)


# (experts, replicas, gpus, dead GPUs now, GPUs already dead in previous)
PREVIOUS_CASES = [
    (16, 32, 8, [2, 5], []),
    (16, 32, 8, [2, 5], [5]),  # previous already with -1 on GPU 5
    (16, 32, 8, [1], [1, 6]),  # GPU 6 is back
    (1, 4, 4, [0, 1, 2], []),  # one expert, one live GPU
    (6, 8, 8, [0, 7], [3]),  # one slot per GPU
    (12, 24, 4, [3], []),
]


def _previous_case(case, seed=0):
    num_experts, r, gpus, dead, was_dead = case
    rng = np.random.default_rng(seed)
    w = _loads(num_experts, seed=seed)
    old_mask = np.ones(gpus, bool)
    old_mask[was_dead] = False
    previous = eplb.rebalance_experts(rng.permutation(w.T).T.copy(), r, 1, 1, gpus, active_gpus=old_mask).phy2log
    mask = np.ones(gpus, bool)
    mask[dead] = False
    return w, r, gpus, mask, np.asarray(previous)


@functools.cache
def _jax_previous_call(r, gpus, traced_tolerance):
    """A user's jit over loads, previous, mask (and the tolerance), shared by the cases of one shape."""

    def call(weight, old, active, tol):
        tol = tol if traced_tolerance else None
        out = eplb.rebalance_experts(weight, r, 1, 1, gpus, previous=old, active_gpus=active, balance_tolerance=tol)
        return tuple(out)

    return jax.jit(call)


@pytest.mark.parametrize("case", PREVIOUS_CASES, ids=[f"{c[:3]}-dead{c[3]}-was{c[4]}" for c in PREVIOUS_CASES])
def test_previous_every_backend_identical(case):
    """numpy, torch (front and ops), JAX (front; a user's jit with mask and tolerance traced): bit for bit."""
    w, r, gpus, mask, previous = _previous_case(case)
    for tolerance in (None, 0.05):
        expected = eplb.rebalance_experts(
            w, r, 1, 1, gpus, previous=previous, active_gpus=mask, balance_tolerance=tolerance
        )
        _check_previous_promise(w, r, gpus, mask, previous, tolerance, expected)
        got = eplb.rebalance_experts(
            torch.as_tensor(w),
            r,
            1,
            1,
            gpus,
            previous=torch.as_tensor(previous),
            active_gpus=torch.as_tensor(mask),
            balance_tolerance=tolerance,
        )
        _same(tuple(a.numpy() for a in got), expected)
        if tolerance is None:  # the JAX front end (its own jit)
            got = eplb.rebalance_experts(
                jnp.asarray(w), r, 1, 1, gpus, previous=previous, active_gpus=jnp.asarray(mask)
            )
        else:  # a user's jit, tolerance traced
            args = (jnp.asarray(w, jnp.float32), jnp.asarray(previous), jnp.asarray(mask), jnp.float32(tolerance))
            got = _jax_previous_call(r, gpus, True)(*args)
        _same(got, expected)


# XLA compiles a program per shape (about 20 s each on CI's CPU): it runs on every shape but (12, 24, 4), whose
# several slots a GPU (16, 32, 8) covers with more dead GPUs; the host callback runs on all of them.
JAX_IMPL_CASES = [
    (impl, case) for impl in ("xla", "host") for case in PREVIOUS_CASES if impl == "host" or case[:3] != (12, 24, 4)
]


@pytest.mark.parametrize(
    ("impl", "case"), JAX_IMPL_CASES, ids=[f"{i}-{c[:3]}-dead{c[3]}-was{c[4]}" for i, c in JAX_IMPL_CASES]
)
def test_previous_jax_each_implementation_equals_numpy(impl, case):
    """JAX with previous= and active_gpus, each implementation forced: XLA (the array API under jit + vmap, what
    a GPU runs) and the host callback into the numpy adapter's compiled kernels (the CPU default)."""
    from eplb.backends import _jax

    w, r, gpus, mask, previous = _previous_case(case, seed=3)
    for tolerance in (None, 0.0, 0.05):
        expected = eplb.rebalance_experts(
            w, r, 1, 1, gpus, previous=previous, active_gpus=mask, balance_tolerance=tolerance
        )
        got = _jax.rebalance_stable(
            jnp.asarray(w, jnp.float32), jnp.asarray(previous), r, 1, 1, gpus, impl=impl, hierarchical=False,
            policy="greedy", spill=0, tolerance=tolerance, max_moves=None, active_gpus=jnp.asarray(mask),
        )  # fmt: skip
        _same(tuple(np.asarray(a) for a in got), expected)


def test_previous_jax_host_under_vmap_takes_each_mask_and_tolerance():
    """A user's vmap over calls with their own loads, masks and tolerances: the host callback folds the batch
    into one numpy call per element, each equal to the unbatched numpy call."""
    w, r, gpus, _, previous = _previous_case(PREVIOUS_CASES[0], seed=4)
    rng = np.random.default_rng(4)
    weights = np.stack([w, rng.permutation(w.T).T, w * np.float32(2.0)])
    masks = np.ones((3, gpus), bool)
    masks[0, [2, 5]] = False
    masks[1, 1] = False
    tolerances = np.array([0.0, 0.05, -1.0], np.float32)  # a negative traced tolerance counts as 0

    def call(weight, active, tol):
        return tuple(eplb.rebalance_experts(weight, r, 1, 1, gpus, previous=previous, active_gpus=active,
                                            balance_tolerance=tol))  # fmt: skip

    got = jax.jit(jax.vmap(call))(jnp.asarray(weights), jnp.asarray(masks), jnp.asarray(tolerances))
    for k in range(3):
        expected = eplb.rebalance_experts(
            weights[k], r, 1, 1, gpus, previous=previous, active_gpus=masks[k],
            balance_tolerance=max(float(tolerances[k]), 0.0),
        )  # fmt: skip
        _same(tuple(np.asarray(a[k]) for a in got), expected)


def test_previous_moves_less_than_the_fresh_placement():
    """A GPU down on a 16-GPU cluster: the sticky placement keeps most experts where they are."""
    rng = np.random.default_rng(7)
    w = rng.lognormal(0, 1, (4, 64)).astype(np.float32)
    previous = np.asarray(eplb.rebalance_experts(w, 128, 1, 1, 16).phy2log)
    mask = np.ones(16, bool)
    mask[9] = False
    got = eplb.rebalance_experts(w, 128, 1, 1, 16, previous=previous, active_gpus=mask)
    moved = _check_previous_promise(w, 128, 16, mask, previous, None, got)
    fresh = eplb.rebalance_experts(w, 128, 1, 1, 16, active_gpus=mask).phy2log
    assert moved.sum() < oracle.moves(previous, fresh, 16).sum()
    assert moved.sum() <= oracle.best_relabel_moves(previous, fresh, mask, 16).sum()


def test_previous_with_all_gpus_up_keeps_the_promise():
    """A mask with every GPU up still runs the elastic rule with previous= (a traced mask could not tell)."""
    w, r, gpus, _, previous = _previous_case(PREVIOUS_CASES[2])
    mask = np.ones(gpus, bool)
    got = eplb.rebalance_experts(w, r, 1, 1, gpus, previous=previous, active_gpus=mask)
    _check_previous_promise(w, r, gpus, mask, previous, None, got)


def test_previous_traced_mask_with_too_few_live_slots_gives_an_empty_placement():
    w = jnp.asarray(_loads(16, seed=0), jnp.float32)
    mask = np.zeros(8, bool)
    mask[:3] = True
    previous = jnp.asarray(eplb.rebalance_experts(np.asarray(w), 32, 1, 1, 8).phy2log)
    call = jax.jit(lambda w, p, m: tuple(eplb.rebalance_experts(w, 32, 1, 1, 8, previous=p, active_gpus=m)))
    phy2log, log2phy, logcnt = (np.asarray(a) for a in call(w, previous, jnp.asarray(mask)))
    assert (phy2log == -1).all() and (log2phy == -1).all() and (logcnt == 0).all()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_moves": 2}, ValueError, "max_moves="),
        ({"previous": np.full((4, 32), -2)}, ValueError, r"expert ids in \[0, 16\) or -1"),
    ],
)
def test_previous_unsupported(options, error, match):
    w = _loads(16, 0)
    options = {"previous": np.zeros((4, 32), np.int64), "hierarchical": False, **options}
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=np.ones(8, bool), **options)
    with pytest.raises(ValueError, match="only apply with previous="):
        eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=np.ones(8, bool), balance_tolerance=0.1)


@pytest.mark.parametrize(
    "gpus",
    [
        {"active_gpus": np.ones(8, bool)},
        {"active_gpus": np.arange(8) != 2},
        {"gpu_capacity": np.array([1.0, 0.6] * 4)},
        {"gpu_capacity": np.full(8, 2.0)},
    ],
    ids=["all up", "one down", "unequal speeds", "equal speeds"],
)
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_previous_empty_slots_fill_whole_gpus(gpus, framework):
    """-1 in previous marks the slots of a GPU that was down, all of them: a GPU holding both -1 and experts is a
    ValueError naming previous on every path (the numba search refused it with a message about its own
    arguments, the array-API one took it), and whole empty GPUs are taken under every mask and speed vector,
    equal speeds included (they were refused there, though unequal ones took them; found by a fuzzer)."""
    convert = np.asarray if framework == "numpy" else pytest.importorskip("torch").as_tensor
    w = _loads(16, 3)
    whole = eplb.rebalance_experts(_loads(16, 4), 32, 4, 2, 8, hierarchical=False).phy2log.copy()
    whole[:, 8:12] = -1  # GPU 2 was down
    partial = whole.copy()
    partial[1, 8:10] = whole[1, 0:2]  # GPU 2 of layer 1: half empty
    kwargs = {k: convert(v) for k, v in gpus.items()}
    with pytest.raises(ValueError, match=r"previous: -1 .* whole GPUs .* layer 1, GPU 2"):
        eplb.rebalance_experts(convert(w), 32, 4, 2, 8, hierarchical=False, previous=convert(partial), **kwargs)
    got = eplb.rebalance_experts(convert(w), 32, 4, 2, 8, hierarchical=False, previous=convert(whole), **kwargs)
    phy2log, logcnt = np.asarray(got.phy2log), np.asarray(got.logcnt)
    for row, counts in zip(phy2log.tolist(), logcnt.tolist(), strict=True):  # valid: every expert placed
        assert [row.count(e) for e in range(16)] == counts and min(counts) >= 1
    if "gpu_capacity" in gpus:  # any speeds, equal included: the capacity rule, as where they are not read
        want = _numpy.rebalance_stable(
            np.asarray(w, np.float32), whole, 32, 4, 2, 8, impl="xp", hierarchical=False,
            gpu_capacity=gpus["gpu_capacity"].astype(np.float32), tolerance=None,
        )  # fmt: skip
        np.testing.assert_array_equal(phy2log, np.asarray(want[0]))


def test_previous_then_plan_transfers():
    """The plan from the placement in force (failed GPUs' slots -1) to the new one: live slots only; an expert
    that only failed GPUs held is a reload (allow_reload=True) or a ValueError."""
    w = _loads(16, seed=2)
    r, gpus = 32, 8
    previous = np.asarray(eplb.rebalance_experts(w, r, 1, 1, gpus).phy2log)
    mask = np.ones(gpus, bool)
    mask[[3, 4]] = False
    new = np.asarray(eplb.rebalance_experts(w, r, 1, 1, gpus, previous=previous, active_gpus=mask).phy2log)
    old = np.where(np.repeat(mask, r // gpus), previous, -1)
    lost = [(layer, e) for layer in range(len(w)) for e in range(16) if e not in old[layer].tolist()]
    if lost:
        with pytest.raises(ValueError, match="allow_reload=True"):
            eplb.plan_transfers(old, new, num_gpus=gpus)
    plan = eplb.plan_transfers(old, new, num_gpus=gpus, allow_reload=True)
    rows = oracle.plan_transfers_reference(old.tolist(), new.tolist(), gpus, 1, allow_reload=True)
    assert [(r_[0], r_[1], r_[4], r_[5], r_[6]) for r_ in rows] == list(
        zip(*(getattr(plan, c).tolist() for c in ("layer", "expert", "dst_gpu", "dst_slot", "stage")), strict=True)
    )
    assert not np.isin(plan.dst_gpu, [3, 4]).any() and not np.isin(plan.src_gpu, [3, 4]).any()
    assert plan.reloads.sum() == len({(layer, g, e) for layer, e in lost for g in range(gpus)
                                      if e in new[layer, g * 4 : (g + 1) * 4].tolist()})  # fmt: skip
    moved = oracle.moves(old, new, gpus)
    assert (plan.remote_copies + plan.reloads <= moved).all()


@needs_gpu("torch")
def test_previous_torch_cuda_equals_numpy():
    for case in PREVIOUS_CASES:
        w, r, gpus, mask, previous = _previous_case(case)
        for tolerance in (None, 0.05):
            expected = eplb.rebalance_experts(
                w, r, 1, 1, gpus, previous=previous, active_gpus=mask, balance_tolerance=tolerance
            )
            got = eplb.rebalance_experts(
                torch.as_tensor(w, device="cuda"),
                r,
                1,
                1,
                gpus,
                previous=torch.as_tensor(previous, device="cuda"),
                active_gpus=torch.as_tensor(mask, device="cuda"),
                balance_tolerance=tolerance,
            )
            assert all(a.device.type == "cuda" for a in got)
            _same(tuple(a.cpu().numpy() for a in got), expected)


@needs_gpu("jax")
def test_previous_jax_gpu_equals_numpy():
    for case in PREVIOUS_CASES:
        w, r, gpus, mask, previous = _previous_case(case)
        expected = eplb.rebalance_experts(w, r, 1, 1, gpus, previous=previous, active_gpus=mask, balance_tolerance=0.05)
        args = (jnp.asarray(w, jnp.float32), jnp.asarray(previous), jnp.asarray(mask), jnp.float32(0.05))
        _same(_jax_previous_call(r, gpus, True)(*args), expected)


@pytest.mark.parametrize("dead", [[5], [0, 6], [1, 2, 3]])
def test_previous_hierarchical_keeps_groups_on_nodes(dead):
    """Hierarchical policy with previous=: where every node can still hold its groups, each group's slots stay
    on one node, the heaviest live GPU is within fl32(1 + t) of the fresh elastic placement's (float64 oracle),
    and no more experts move than in that placement with its live GPUs best permuted within nodes (scipy's
    assignment solver per node); where a node cannot, the global rule (the same as hierarchical=False).
    numpy, torch and JAX (traced mask) place alike."""
    w = _loads(16, seed=len(dead))
    r, groups, nodes, gpus = 48, 4, 2, 8  # 6 slots per GPU; a node of 4 GPUs needs 8 slots for its 8 experts
    previous = np.asarray(eplb.rebalance_experts(w * 0.7 + 1, r, groups, nodes, gpus).phy2log)
    mask = np.ones(gpus, bool)
    mask[dead] = False
    fallback = any(mask[n * 4 : (n + 1) * 4].sum() * 6 < 8 for n in range(nodes))
    for t in (0.0, 0.05):
        got = eplb.rebalance_experts(
            w, r, groups, nodes, gpus, previous=previous, active_gpus=mask, balance_tolerance=t
        )
        fresh = eplb.rebalance_experts(w, r, groups, nodes, gpus, active_gpus=mask)
        phy2log = np.asarray(got.phy2log)
        counts = np.stack([np.bincount(row[row >= 0], minlength=16) for row in phy2log])
        np.testing.assert_array_equal(np.asarray(got.logcnt), counts)  # the counts of the placement returned
        assert ((phy2log == -1) == np.repeat(~mask, 6)[None, :]).all()
        peak = oracle.gpu_loads64(w, phy2log, gpus).max(axis=1)
        fresh_peak = oracle.gpu_loads64(w, np.asarray(fresh.phy2log), gpus).max(axis=1)
        assert (peak <= fresh_peak * float(np.float32(1 + np.float32(t))) * (1 + 1e-6)).all()
        if fallback:
            flat = eplb.rebalance_experts(w, r, groups, nodes, gpus, previous=previous, active_gpus=mask,
                                          balance_tolerance=t, hierarchical=False)  # fmt: skip
            np.testing.assert_array_equal(phy2log, np.asarray(flat.phy2log))
            continue
        node_of_slot = np.arange(r) // (r // nodes)
        for layer in range(len(w)):
            for g in range(groups):
                held = phy2log[layer] // 4 == g
                assert len(set(node_of_slot[held & (phy2log[layer] >= 0)].tolist())) == 1
        moved = oracle.moves(previous, phy2log, gpus)
        fresh_phy = np.asarray(fresh.phy2log)
        best = sum(
            oracle.best_relabel_moves(previous[:, n * 24 : (n + 1) * 24], fresh_phy[:, n * 24 : (n + 1) * 24],
                                      mask[n * 4 : (n + 1) * 4], 4)
            for n in range(nodes)
        )  # fmt: skip
        assert (moved <= best).all()
    torch = pytest.importorskip("torch")
    got_t = eplb.rebalance_experts(torch.as_tensor(w), r, groups, nodes, gpus, previous=torch.as_tensor(previous),
                                   active_gpus=torch.as_tensor(mask), balance_tolerance=0.05)  # fmt: skip
    np.testing.assert_array_equal(got_t.phy2log.numpy(), phy2log)
    jax = pytest.importorskip("jax")
    call = jax.jit(lambda w_, p, m: tuple(eplb.rebalance_experts(w_, r, groups, nodes, gpus, previous=p, active_gpus=m,
                                                                 balance_tolerance=0.05)))  # fmt: skip
    got_j = call(jax.numpy.asarray(w, jax.numpy.float32), jax.numpy.asarray(previous), jax.numpy.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got_j[0]), phy2log)


def _sticky_split_oracle(w, previous, mask, r, groups, nodes, gpus):
    """Plain Python: each group's node in previous, then best swaps (float32 arithmetic as documented)."""
    f32 = np.float32
    gsize, per_node, per_gpu = w.shape[1] // groups, r // nodes, r // gpus
    slots = [sum(mask[n * (gpus // nodes) : (n + 1) * (gpus // nodes)]) * per_gpu for n in range(nodes)]
    inv = [f32(1) / f32(s) if s else f32(0) for s in slots]
    out = []
    for row, prev in zip(w, previous, strict=True):
        loads = []
        for g in range(groups):
            level = [f32(x) for x in row[g * gsize : (g + 1) * gsize]]
            while len(level) > 1:  # pairwise: (x0 + x1) + (x2 + x3), an odd one out joins the next level last
                level = [f32(level[k] + level[k + 1]) for k in range(0, len(level) - 1, 2)] + level[
                    len(level) // 2 * 2 :
                ]
            loads.append(level[0])
        assign = [min(j // per_node for j, e in enumerate(prev) if e >= 0 and e // gsize == g) for g in range(groups)]
        for _ in range(groups):
            node_load = []
            for n in range(nodes):
                total = f32(0)
                for g in range(groups):
                    total = f32(total + (loads[g] if assign[g] == n else f32(0)))
                node_load.append(total)
            scaled = [f32(node_load[n] * inv[n]) for n in range(nodes)]
            current = max(scaled)
            best = None
            for g1 in range(groups):
                for g2 in range(g1 + 1, groups):
                    a, b = assign[g1], assign[g2]
                    if a == b:
                        continue
                    new_a = f32(f32(node_load[a] - loads[g1]) + loads[g2])
                    new_b = f32(f32(node_load[b] - loads[g2]) + loads[g1])
                    others = max([scaled[n] for n in range(nodes) if n not in (a, b)], default=-np.inf)
                    after = max(others, f32(new_a * inv[a]), f32(new_b * inv[b]))
                    if after < f32(current * f32(1.0 - 2.0**-16)) and (best is None or after < best[0]):
                        best = (after, g1, g2)
            if best is None:
                break
            _, g1, g2 = best
            assign[g1], assign[g2] = assign[g2], assign[g1]
        out.append(sorted(range(groups), key=lambda g: (assign[g], g)))
    return np.array(out)


@pytest.mark.parametrize("dead", [[5], [0, 1], [6]])
def test_sticky_group_split_equals_the_oracle(dead):
    from eplb.algorithms.elastic import sticky_group_split

    w = _loads(16, seed=len(dead) + 7).astype(np.float32) + 1
    r, groups, nodes, gpus = 48, 4, 2, 8
    previous = np.asarray(eplb.rebalance_experts(w[::-1].copy(), r, groups, nodes, gpus).phy2log)
    mask = np.ones(gpus, bool)
    mask[dead] = False
    split, valid = sticky_group_split(w, previous, mask, r, groups, nodes, gpus, xp=np)
    assert valid.all()
    np.testing.assert_array_equal(split, _sticky_split_oracle(w, previous, mask, r, groups, nodes, gpus))
    bad = previous.copy()
    bad[:, 0] = bad[:, r // 2]  # a group on both nodes: no start
    assert not sticky_group_split(w, bad, mask, r, groups, nodes, gpus, xp=np)[1].any()


def test_reserve_repacking_is_float32_on_numpy_too():
    """A case hypothesis found: numpy's where of two Python floats made the reserve rule's item count float64,
    so a product at exactly the bound (-45 against -45) rounded otherwise than on torch."""
    w = np.array([[2, 1, 2, 1, 1, 2, 2, 2, 1, 1, 1, 2]])
    mask = np.array([True, True, False, True, True, True, True, True])
    previous = np.array(
        [[4, 3, 7, 9, 4, 3, 8, 6, 11, 0, 1, 6, 11, 0, 7, 5, 11, 2, 1, 10, 11, 3, 1, 10, 11, 3, 1, 10, 0, 0, 1, 5]]
    )
    want = eplb.rebalance_experts(w, 32, 1, 1, 8, previous=previous, active_gpus=mask, balance_tolerance=0.05)
    from eplb.backends import _torch

    got = _torch.rebalance_stable(  # the torch ops path (what CUDA runs)
        torch.as_tensor(w.astype(np.float32)), torch.as_tensor(previous), 32, 1, 1, 8, impl="torch",
        hierarchical=False, policy="greedy", spill=0, tolerance=0.05, max_moves=None,
        active_gpus=torch.as_tensor(mask),
    )  # fmt: skip
    _same(tuple(a.numpy() for a in got), want)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 10),
    st.integers(0, 2),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["float", "int", "zero"]),
)
def test_repair_leaves_failed_gpus_empty(num_gpus, num_experts, extra, seed, kind):
    """eplb.algorithms.repair.repair with -1 slots (failed GPUs): they stay -1, the counts follow the slots and
    every expert keeps a replica, the heaviest live GPU (float64 oracle) never rises, the moves it reports are
    the plain counter's, and torch ops give the same result as numpy."""
    from eplb.algorithms.repair import repair

    rng = np.random.default_rng(seed)
    per_gpu = max(1, -(-num_experts // num_gpus)) + extra
    r = num_gpus * per_gpu
    mask = rng.random(num_gpus) < 0.7
    mask[rng.integers(num_gpus)] = True
    if mask.sum() * per_gpu < num_experts:
        mask[:] = True
    w = {"float": rng.lognormal(0, 2, (2, num_experts)), "int": rng.integers(0, 50, (2, num_experts)),
         "zero": np.zeros((2, num_experts))}[kind].astype(np.float32)  # fmt: skip
    start = np.asarray(eplb.rebalance_experts(w, r, 1, 1, num_gpus, active_gpus=mask).phy2log)
    other = rng.lognormal(0, 1, (2, num_experts)).astype(np.float32)
    old = np.asarray(eplb.rebalance_experts(other, r, 1, 1, num_gpus, active_gpus=mask).phy2log)
    cnt = np.stack([np.bincount(row[row >= 0], minlength=num_experts) for row in start])
    args = (np.zeros((2, 1), np.float32), np.full((2, 1), r), np.ones((2, 1), bool), num_gpus, 1, num_experts)
    got, got_cnt, got_moves = (np.asarray(a) for a in repair(start, cnt, old, w, *args, max_iters=3 * r, xp=np))
    dead = np.repeat(~mask, per_gpu)
    assert (got[:, dead] == -1).all() and (got[:, ~dead] >= 0).all()
    for row, counts in zip(got, got_cnt, strict=True):
        np.testing.assert_array_equal(np.bincount(row[row >= 0], minlength=num_experts), counts)
    assert (got_cnt >= 1).all()
    peak, start_peak = oracle.gpu_loads64(w, got, num_gpus).max(1), oracle.gpu_loads64(w, start, num_gpus).max(1)
    assert (peak <= start_peak * (1 + 1e-6)).all(), (peak, start_peak)
    np.testing.assert_array_equal(got_moves[:, 0], oracle.moves(old, got, num_gpus))
    from eplb._xp import array_namespace

    tensors = (torch.as_tensor(a) for a in (start, cnt, old, w, *args[:3]))
    ops = repair(*tensors, *args[3:], max_iters=3 * r, xp=array_namespace(torch.zeros(1)))
    for a, b in zip(ops, (got, got_cnt, got_moves), strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_previous_within_the_limit_moves_nothing_with_every_gpu_live():
    """``active_gpus`` all live: a layer whose previous placement is already within the limit on the new loads
    (float64, with a margin) keeps it, moving no expert (the previous placement is a start of the search)."""
    from tests import oracle

    rng = np.random.default_rng(21)
    r, groups, nodes, gpus = 48, 4, 2, 8
    for hierarchical in (False, True):
        old_w = rng.lognormal(0, 1.0, (12, 16)).astype(np.float32)
        new_w = (old_w * rng.lognormal(0, 0.02, old_w.shape)).astype(np.float32)
        previous = np.asarray(eplb.rebalance_experts(old_w, r, groups, nodes, gpus, hierarchical=hierarchical).phy2log)
        fresh = np.asarray(eplb.rebalance_experts(new_w, r, groups, nodes, gpus, hierarchical=hierarchical).phy2log)
        limit = oracle.gpu_loads64(new_w, fresh, gpus).max(axis=1) * 1.05
        within = oracle.gpu_loads64(new_w, previous, gpus).max(axis=1) < limit * (1 - 1e-4)
        assert within.sum() >= 6
        got = eplb.rebalance_experts(
            new_w, r, groups, nodes, gpus, hierarchical=hierarchical, previous=previous,
            active_gpus=np.ones(gpus, bool), balance_tolerance=0.05,
        )  # fmt: skip
        moves = oracle.moves(previous, np.asarray(got.phy2log), gpus)
        assert (moves[within] == 0).all()
