"""GPUs of unequal speed, ``rebalance_experts(..., gpu_capacity=c)`` (issue 19, item 2).

Checked against plain-Python float64 oracles (``tests/oracle.py``: times,
time-balance, the lower bound term by term, the exhaustive optimum of tiny
layers, LPT by time, the pairing by a time budget and the budget replica
counts, the capacity-blind placement on the live GPUs), for its invariants,
and bit for bit across numpy, torch (CPU; CUDA where present) and JAX (XLA
inside a user's ``jit`` with the capacities traced), each forced onto the
array-API path. Kept to about 45 s on a 2-core CPU: the
JAX cases share four shapes (one compile each; capacities are traced).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import eplb
from eplb.algorithms.capacity import BUDGET_SETS, _budget_counts
from eplb.algorithms.speed import SPEED_RANGE, clean_capacity, inverse_capacity, lpt_pack_speed, pair_pack_speed
from eplb.backends import _numpy

from . import oracle
from .conftest import needs_gpu

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

IMPROVEMENT = 1.0 - 2.0**-16


def _check_valid(placement, num_experts, num_replicas, num_gpus, live):
    """Every invariant of a placement on live GPUs, layer by layer (idle GPUs' slots hold -1)."""
    phy2log, log2phy, logcnt = (np.asarray(a) for a in placement)
    live_slot = np.repeat(np.asarray(live, bool), num_replicas // num_gpus)
    assert (phy2log[:, ~live_slot] == -1).all(), "an idle GPU's slot holds an expert"
    assert (phy2log[:, live_slot] >= 0).all() and (phy2log < num_experts).all()
    assert (logcnt >= 1).all(), "an expert has no replica"
    assert (logcnt.sum(axis=1) == live_slot.sum()).all()
    for layer in range(phy2log.shape[0]):
        counts = np.bincount(phy2log[layer][phy2log[layer] >= 0], minlength=num_experts)
        np.testing.assert_array_equal(counts, logcnt[layer])
        for e in range(num_experts):
            held = log2phy[layer, e, : logcnt[layer, e]]
            assert (log2phy[layer, e, logcnt[layer, e] :] == -1).all()
            assert live_slot[held].all() and (phy2log[layer, held] == e).all()
            assert len(set(held.tolist())) == len(held)


def _same(a, b, what=""):
    for name, x, y in zip(("phy2log", "log2phy", "logcnt"), a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{name} {what}")


# ---------------------------------------------------------------- exact reciprocals, LPT by time


EDGES = [1.0, 0.6, 3.0, 2.0**-64, 2.0**-63 * 1.5, 1 - 2**-24, 1 + 2**-23, 2.0**126, 3.0e38, 0.1, 7.0, 1e-12]


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax:jit"])
def test_inverse_capacity_is_the_correctly_rounded_reciprocal(kind):
    """fl32(1 / c) times the largest capacity's power of two, bit for bit, on every backend (no division)."""
    rng = np.random.default_rng(0)
    rows = [
        np.array(EDGES[:9], np.float32),
        np.exp(rng.uniform(-20, 20, 64)).astype(np.float32),
        rng.uniform(0.5, 1.0, 64).astype(np.float32),
        np.array([1.0, 0.0, 2.0**-30, 2.0**-41, 5.0], np.float32),  # 2**-41 x 5 is past SPEED_RANGE: idle
    ]
    for caps in rows:
        caps = clean_capacity(caps, xp=np)
        if kind == "numpy":
            got = inverse_capacity(caps[None], xp=np)[0]
        elif kind == "torch":
            import array_api_compat.torch as txp

            got = inverse_capacity(torch.as_tensor(caps)[None], xp=txp)[0].numpy()
        else:
            got = np.asarray(jax.jit(lambda c: inverse_capacity(c[None], xp=jnp)[0])(jnp.asarray(caps)))
        top = int(np.frexp(np.float64(caps.max()))[1]) - 1
        live = (caps > 0) & (caps >= np.float32(2.0 ** (top - SPEED_RANGE)))
        exact = [
            Fraction(2) ** top / Fraction(float(c)) if up else Fraction(1) for c, up in zip(caps, live, strict=True)
        ]
        want = [_nearest_float32(q) for q in exact]
        np.testing.assert_array_equal(got, np.array(want, np.float32))
        if kind == "numpy":  # the same as numpy's division where 1 / c is a normal float32
            normal = live & (caps < 2.0**126)
            want = (np.float32(1) / caps[normal]) * np.float32(2.0**top)
            np.testing.assert_array_equal(got[normal], want)


def _nearest_float32(q):
    """The float32 nearest the rational ``q`` (ties to even), exactly."""
    guess = np.float32(float(q))
    candidates = [np.nextafter(guess, np.float32(0)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(np.int32)) & 1))


def test_lpt_pack_speed_equals_the_oracle():
    rng = np.random.default_rng(1)
    for trial in range(20):
        packs, per_pack = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        weights = rng.integers(0, 20, (1, packs * per_pack)).astype(np.float32)  # ties and zeros
        live = rng.random(packs) < 0.8
        live[0] = True
        live_items = int(live.sum()) * per_pack
        weights[0, np.argsort(-weights[0], kind="stable")[live_items:]] = -1  # phantoms, as the placement has
        caps = clean_capacity(rng.choice([1.0, 0.5, 0.75, 2.0], packs).astype(np.float32), xp=np)
        inverse = inverse_capacity(caps[None], xp=np)
        order, pack_by_step, rank_by_step = lpt_pack_speed(weights, live[None], inverse, per_pack, xp=np)
        pack_of, rank_of = oracle.lpt_speed(list(weights[0]), list(live), list(inverse[0]), per_pack)
        for step in range(live_items):
            item = order[0, step]
            assert (pack_by_step[0, step], rank_by_step[0, step]) == (pack_of[item], rank_of[item]), trial


def test_pair_pack_speed_equals_the_oracle():
    rng = np.random.default_rng(2)
    for trial in range(40):
        packs = int(rng.integers(1, 7))
        weights = rng.integers(0, 20, (1, 2 * packs)).astype(np.float32)  # ties and zeros
        live = rng.random(packs) < 0.8
        live[0] = True
        live_items = int(live.sum()) * 2
        weights[0, np.argsort(-weights[0], kind="stable")[live_items:]] = -1  # phantoms, as the placement has
        caps = clean_capacity(rng.choice([1.0, 0.5, 0.75, 2.0, 0.6], packs).astype(np.float32), xp=np)
        inverse = inverse_capacity(caps[None], xp=np)
        budget = np.float32(rng.integers(5, 40))
        got = pair_pack_speed(weights, live[None], inverse, np.full((1, 1), budget), xp=np)
        want = oracle.pair_speed(list(weights[0]), list(live), list(inverse[0]), budget)
        assert got[0].tolist() == want, trial


def test_budget_counts_equal_the_oracle():
    rng = np.random.default_rng(3)
    for trial in range(40):
        experts, gpus = int(rng.integers(2, 9)), int(rng.integers(2, 8))
        slots = 2 * gpus
        if slots < experts:
            continue
        weights = (rng.integers(0, 40, (1, experts)) * rng.choice([1, 0.37], experts)).astype(np.float32)
        live = rng.random(gpus) < 0.85
        live[0] = True
        caps = clean_capacity(rng.choice([1.0, 0.6, 0.75, 2.0], gpus).astype(np.float32), xp=np)
        inverse = inverse_capacity(caps[None], xp=np)
        live_slots = np.full((1, 1), 2 * int(live.sum()), np.int32)
        budget = np.float32(rng.uniform(5, 60))
        fastest, slowest = float(inverse[0][live].min()), float(inverse[0][live].max())
        for margin, share in BUDGET_SETS:
            got, valid = _budget_counts(
                weights, inverse, live[None], live_slots, np.full((1, 1), budget), slots, margin, share, xp=np
            )
            want = oracle.budget_counts(
                list(weights[0]), slots, int(live_slots[0, 0]), fastest, slowest, budget, margin, share
            )
            assert bool(valid[0, 0]) == (want is not None), trial
            if want is not None:
                assert got[0].tolist() == want, trial
                assert int(got.sum()) == int(live_slots[0, 0])


# ---------------------------------------------------------------- implementations, each forced


def _numpy_xp(w, r, g, n, gpus, caps, hierarchical):
    return _numpy.rebalance(
        np.asarray(w, np.float32), r, g, n, gpus, impl="xp", hierarchical=hierarchical, gpu_capacity=np.asarray(caps)
    )


def _torch_ops(w, r, g, n, gpus, caps, hierarchical, device="cpu"):
    from eplb.backends import _torch

    out = _torch.rebalance(
        torch.as_tensor(np.asarray(w, np.float32), device=device),
        r,
        g,
        n,
        gpus,
        impl="torch",
        hierarchical=hierarchical,
        gpu_capacity=torch.as_tensor(np.asarray(caps, np.float32), device=device),
    )
    assert all(a.device.type == device for a in out)
    return tuple(a.cpu().numpy() for a in out)


_JITTED = {}


def _jax_user_jit(w, r, g, n, gpus, caps, hierarchical):
    """Inside the user's jit, capacities traced: uniformity and the node fallback are decided on the device."""
    key = (r, g, n, gpus, hierarchical)
    if key not in _JITTED:

        def call(weight, capacity):
            out = eplb.rebalance_experts(weight, r, g, n, gpus, hierarchical=hierarchical, gpu_capacity=capacity)
            return tuple(out)

        _JITTED[key] = jax.jit(call)
    out = _JITTED[key](jnp.asarray(w, jnp.float32), jnp.asarray(caps, jnp.float32))
    return tuple(np.asarray(a) for a in out)


def _front(kind):
    def run(w, r, g, n, gpus, caps, hierarchical):
        conv = {"numpy": np.asarray, "torch": torch.as_tensor}[kind]
        out = eplb.rebalance_experts(conv(w), r, g, n, gpus, hierarchical=hierarchical, gpu_capacity=conv(caps))
        return tuple(np.asarray(a) for a in out)

    return run


IMPLS = {"numpy:xp": _numpy_xp, "torch:ops": _torch_ops, "jax:user-jit": _jax_user_jit, "numpy": _front("numpy")}

# (experts, replicas, groups, nodes, gpus, capacities): four shapes only (one JAX compile each); the
# last two have two slots per GPU, where the budget sets run too.
HIER = (16, 32, 4, 2, 8)
FLAT = (12, 24, 1, 1, 6)
HIER_PAIRS = (16, 24, 4, 2, 12)
FLAT_PAIRS = (12, 16, 1, 1, 8)
CASES = [
    (*HIER, [1, 1, 0.6, 0.6, 1, 1, 0.6, 0.6]),  # half slow, each node alike
    (*HIER, [1, 1, 1, 1, 0.6, 0.6, 0.6, 0.6]),  # a slow node: groups split by node capacity
    (*HIER, [1, 0, 0.5, 1, 1, 1, 0.25, 2]),  # an idle GPU
    (*HIER, [1, 0, 0, 0, 1, 1, 1, 1]),  # node 0 short of slots: the global rule
    (*HIER, [3, 3, 3, 3, 3, 3, 3, 3]),  # all equal: the greedy placement
    (*HIER, [2, 2, 2, 0, 2, 2, 2, 2]),  # equal but one idle: the active_gpus placement
    (*FLAT, [1, 0.6, 1, 0.6, 1, 0.3]),
    (*FLAT, [1, 1, 1, 1, 1, 0.3]),  # one slow GPU
    (*FLAT, [0.6, 1, 1e-3, 1, 0, 0.6]),  # a very slow GPU and an idle one; exactly E live slots
    (*FLAT_PAIRS, [1, 0.6] * 4),  # two slots per GPU: the budget sets win on some layers
    (*FLAT_PAIRS, [1, 0, 0.5, 1, 1, 1, 0.25, 2]),
    (*HIER_PAIRS, [1] * 6 + [0.6] * 6),
    (*HIER_PAIRS, [1, 0, 0.5, 1, 1, 1, 0.25, 2, 1, 1, 0.6, 0.6]),
    (*HIER_PAIRS, [1, 0, 0, 0, 0, 0.6] + [1, 0.6] * 3),  # node 0 short of slots: the global rule
]


def _loads(num_experts, seed, layers=4):
    rng = np.random.default_rng(seed)
    w = rng.lognormal(3, 1.2, (layers, num_experts)).astype(np.float32)
    w[1] = 0  # an all-zero layer
    w[2] = 7  # all equal
    return w


def _live(caps, mask=None):
    live = np.asarray(caps, np.float64) > 0
    return live if mask is None else live & mask


def _max_time(w, phy2log, gpus, caps):
    return oracle.capacity_times64(w, phy2log, gpus, caps).max(axis=1)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[:5]}-{c[5]}" for c in CASES])
def test_every_implementation_agrees_and_keeps_the_promises(case):
    """Bit for bit across implementations; valid; never slower than the capacity-blind placement; equal
    capacities give the greedy (or active_gpus) placement."""
    num_experts, r, g, n, gpus, caps = case
    caps = np.asarray(caps, np.float64)
    w = _loads(num_experts, seed=int(caps.sum() * 10))
    hierarchical = g % n == 0 and n > 1
    results = {name: impl(w, r, g, n, gpus, caps, hierarchical) for name, impl in IMPLS.items()}
    first = results["numpy:xp"]
    for name, got in results.items():
        _same(got, first, f"of {name} vs numpy:xp")
    live = _live(caps)
    _check_valid(first, num_experts, r, gpus, live)
    blind = oracle.elastic(w, r, g if hierarchical else 1, n if hierarchical else 1, gpus, live)
    ours_t, blind_t = _max_time(w, first[0], gpus, caps), _max_time(w, blind[0], gpus, caps)
    assert (ours_t <= blind_t * (1 + 1e-6)).all(), "slower than the capacity-blind placement"
    if len(set(caps[live].tolist())) == 1:
        _same(first, blind, "with equal capacities vs the capacity-blind oracle")
        if live.all():
            _same(first, eplb.rebalance_experts(w, r, g, n, gpus, hierarchical=hierarchical), "vs greedy")
    bound = np.asarray(eplb.metrics.lower_bound(w, r, g, n, gpus, hierarchical=hierarchical, gpu_capacity=caps))
    if hierarchical:
        want = oracle.capacity_node_bound64(w, r, g, n, gpus, caps)
    else:
        want = oracle.capacity_bound64(w, r, gpus, caps)
    if r == 2 * gpus:  # and the pair bound, from the others' value (its bisection's bracket: 2**-16 of it)
        want = oracle.pair_bound64(w, want, gpus, caps)
    np.testing.assert_allclose(bound, want, rtol=1e-4 if r == 2 * gpus else 1e-5)
    assert (bound <= ours_t * (1 + 1e-5)).all(), "the bound exceeds a placement"


HUGE = [CASES[2], CASES[8], CASES[10], CASES[12]]  # a replica's time on the slowest GPU overflows float32


@pytest.mark.parametrize("case", HUGE, ids=[f"{c[:5]}-{c[5]}" for c in HUGE])
def test_loads_near_float32_max_place_as_their_scaled_down_copy(case):
    """Loads as large as the API takes (a layer's sum below float32's largest) whose GPU times overflow float32:
    every implementation gives the placement of the same loads scaled down by a power of two (which scales
    every float32 product, sum and comparison exactly: what the loads ask for), valid, fresh and with previous=.
    (Found by a fuzzer: logcnt disagreed with phy2log, or an index went out of range, before
    fit_loads_to_times.)"""
    num_experts, r, g, n, gpus, caps = case
    caps = np.asarray(caps, np.float64)
    hierarchical = g % n == 0 and n > 1
    small = _loads(num_experts, seed=9)
    top = np.finfo(np.float32).max
    k = int(np.floor(np.log2(top / 2 / small.astype(np.float64).sum(axis=1).max())))
    huge = small * np.float32(2.0**k)  # exact; sums below half of float32's largest
    assert np.isfinite(huge).all() and huge.max() * caps.max() / caps[caps > 0].min() > top  # a time overflows
    want = _numpy_xp(small, r, g, n, gpus, caps, hierarchical)
    _check_valid(want, num_experts, r, gpus, _live(caps))
    for name, impl in IMPLS.items():
        _same(impl(huge, r, g, n, gpus, caps, hierarchical), want, f"of {name}, huge loads")
    previous = _numpy_xp(_loads(num_experts, seed=10), r, g, n, gpus, caps, hierarchical)[0]
    options = {"hierarchical": hierarchical, "gpu_capacity": caps, "previous": previous, "balance_tolerance": 0.01}
    want = eplb.rebalance_experts(small, r, g, n, gpus, **options)
    _check_valid(want, num_experts, r, gpus, _live(caps))
    for impl in ("xp", None):
        got = _numpy.rebalance_stable(huge, previous, r, g, n, gpus, impl=impl, **_stable(options))
        _same(got, want, f"previous=, numpy impl={impl}")
    got = eplb.rebalance_experts(torch.as_tensor(huge), r, g, n, gpus, **options)
    _same(got, want, "previous=, torch")


def _stable(options):
    """rebalance_experts' options as the numpy backend's rebalance_stable takes them."""
    out = {k: v for k, v in options.items() if k not in ("previous", "balance_tolerance")}
    return {**out, "tolerance": options["balance_tolerance"]}


def test_half_slow_beats_the_blind_placement():
    """The point of it: on skewed loads with half the GPUs at 0.6, time-balance well above capacity-blind's."""
    caps = np.array([1, 0.6] * 4)
    w = np.random.default_rng(5).lognormal(3, 1.0, (6, 32)).astype(np.float32)
    ours = eplb.rebalance_experts(w, 64, 1, 1, 8, gpu_capacity=caps).phy2log
    blind = eplb.rebalance_experts(w, 64, 1, 1, 8).phy2log
    assert oracle.capacity_balance64(w, ours, 8, caps).mean() > 0.97
    assert oracle.capacity_balance64(w, blind, 8, caps).mean() < 0.85


def test_equal_capacities_in_any_form_are_the_greedy_placement():
    w = _loads(16, seed=3)
    plain = eplb.rebalance_experts(w, 32, 4, 2, 8)
    for caps in ([2] * 8, np.full(8, 0.3, np.float32), torch.full((8,), 5.0), np.ones(8, np.int64)):
        weight = torch.as_tensor(w) if isinstance(caps, torch.Tensor) else w
        _same(eplb.rebalance_experts(weight, 32, 4, 2, 8, gpu_capacity=caps), plain, f"for {caps}")
    # equal up to float32: read as float32 everywhere
    _same(eplb.rebalance_experts(w, 32, 4, 2, 8, gpu_capacity=np.float64(1) + np.arange(8) * 1e-12), plain)


def test_capacity_zero_is_a_failed_gpu():
    """Capacity 0 == active_gpus False (with or without other capacities), and both together combine."""
    w = _loads(16, seed=4)
    mask = np.array([True, False, True, True, True, True, False, True])
    elastic = eplb.rebalance_experts(w, 32, 4, 2, 8, active_gpus=mask)
    _same(eplb.rebalance_experts(w, 32, 4, 2, 8, gpu_capacity=mask * 1.0), elastic)
    _same(eplb.rebalance_experts(w, 32, 4, 2, 8, gpu_capacity=np.ones(8), active_gpus=mask), elastic)
    caps = np.array([1, 0.5, 1, 0.6, 1, 0.6, 0.5, 1])
    zeroed = eplb.rebalance_experts(w, 32, 4, 2, 8, gpu_capacity=np.where(mask, caps, 0))
    _same(eplb.rebalance_experts(w, 32, 4, 2, 8, gpu_capacity=caps, active_gpus=mask), zeroed)
    both = eplb.rebalance_experts(torch.as_tensor(w), 32, 4, 2, 8, gpu_capacity=caps, active_gpus=torch.as_tensor(mask))
    _same(both, zeroed, "torch")
    _same(_jax_user_jit(w, 32, 4, 2, 8, np.where(mask, caps, 0), True), zeroed, "JAX, traced")


def _drop_idle(placement, idle, per_gpu, width):
    """The placement with the slots of the ``idle`` GPUs removed (they must hold -1); log2phy renumbered and cut
    to ``width`` replicas (the columns past it must be -1: more slots, a wider table)."""
    phy2log, log2phy, logcnt = (np.asarray(a) for a in placement)
    slot_idle = np.repeat(idle, per_gpu)
    assert (phy2log[:, slot_idle] == -1).all(), "an idle GPU holds an expert"
    assert (log2phy[:, :, width:] == -1).all()
    new_index = np.cumsum(~slot_idle) - 1
    renumbered = np.where(log2phy >= 0, new_index[np.maximum(log2phy, 0)], -1)[:, :, :width]
    return phy2log[:, ~slot_idle], renumbered, logcnt


@pytest.mark.parametrize("impl", ["numpy", "numpy:xp", "torch:ops"])
def test_idle_gpus_place_as_absent_ones(impl):
    """Global policy: GPUs of capacity 0, anywhere, change nothing for the live ones: the live GPUs hold what the
    same call without the idle GPUs gives them (two slots per GPU, where the pair and budget sets run, three,
    and one), ``log2phy`` points at the same replicas. One expert, exactly E live slots, an all-zero layer."""
    rng = np.random.default_rng(11)
    for trial in range(36):
        per_gpu = (2, 2, 3)[trial % 3] if trial < 30 else 1
        live_gpus = int(rng.integers(2, 9))
        experts = [1, int(rng.integers(2, per_gpu * live_gpus + 1))][trial % 4 != 0]
        if trial % 5 == 0:
            experts = per_gpu * live_gpus  # every live slot one expert
        caps = rng.choice([0.5, 0.6, 1.0, 2.0], live_gpus)
        idle = np.zeros(live_gpus + int(rng.integers(1, 4)), bool)
        idle[rng.choice(idle.size, idle.size - live_gpus, replace=False)] = True
        with_idle = np.zeros(idle.size)
        with_idle[~idle] = caps
        w = _loads(experts, seed=trial, layers=6) * rng.choice([1, 3], experts).astype(np.float32)
        want = IMPLS[impl](w, per_gpu * live_gpus, 1, 1, live_gpus, caps, False)
        got = IMPLS[impl](w, per_gpu * idle.size, 1, 1, idle.size, with_idle, False)
        live_view = _drop_idle(got, idle, per_gpu, want[1].shape[-1])
        _same(live_view, want, f"trial {trial}: with idle GPUs {np.flatnonzero(idle)}")


def test_idle_gpus_place_as_absent_ones_under_jit():
    """The same under the user's jit (traced capacities; one shape pair, one compile each)."""
    w = _loads(12, seed=5) * np.resize(np.float32([1, 3, 1]), 12)
    caps = np.array([1, 0.6, 0.5, 2, 1, 0.6, 0.6, 1])
    with_idle = np.insert(caps, [1, 6], 0.0)
    idle = with_idle == 0
    want = _jax_user_jit(w, 16, 1, 1, 8, caps, False)
    _same(want, _numpy_xp(w, 16, 1, 1, 8, caps, False), "JAX vs numpy")
    _same(_drop_idle(_jax_user_jit(w, 20, 1, 1, 10, with_idle, False), idle, 2, want[1].shape[-1]), want, "idle")


def test_an_idle_gpu_never_slows_the_live_ones():
    """The fuzzer's case: an idle GPU made the slowest live GPU 1.78x slower (the pair set then searched full
    rows only); times from plain Python."""
    w = np.array([[64, 58, 61, 51, 52]], np.float32)
    caps = np.array([0.5, 2.0, 2.0, 0.5])
    alone = eplb.rebalance_experts(w, 8, 1, 1, 4, gpu_capacity=caps).phy2log
    for at in range(5):
        with_idle = np.insert(caps, at, 0.0)
        got = eplb.rebalance_experts(w, 10, 1, 1, 5, gpu_capacity=with_idle).phy2log
        assert _max_time(w, got, 5, with_idle)[0] == _max_time(w, alone, 4, caps)[0] == 58.0


def test_traced_capacities_never_recompile_nor_fail():
    """A new vector does not recompile; too few live slots give an empty placement; unread NaN, negative and
    infinite capacities read as 0 (idle), as on every backend."""
    w = _loads(12, seed=7)
    _jax_user_jit(w, *FLAT[1:], np.ones(6), False)
    call = _JITTED[(*FLAT[1:], False)]
    size = call._cache_size()
    phy2log, log2phy, logcnt = _jax_user_jit(w, *FLAT[1:], [1.0, 0, 0, 0, 0, 0.5], False)
    assert (phy2log == -1).all() and (log2phy == -1).all() and (logcnt == 0).all()
    caps = np.array([1.0, np.nan, -1.0, np.inf, 1.0, 0.5], np.float32)
    want = eplb.rebalance_experts(w, 24, 1, 1, 6, gpu_capacity=[1.0, 0, 0, 0, 1.0, 0.5])
    _same(_jax_user_jit(w, *FLAT[1:], caps, False), want, "unread bad capacities")
    _same(_torch_ops(w, *FLAT[1:], caps, False), want, "unread bad capacities, torch")
    assert call._cache_size() == size


# ---------------------------------------------------------------- metrics and the bound


def test_metrics_against_the_oracle():
    w = _loads(16, seed=8).astype(np.float64) + 1.0
    caps = np.array([1, 0.6, 1, 0.6, 0, 0.25, 1, 2])
    phy2log = np.asarray(eplb.rebalance_experts(w, 32, 4, 2, 8, gpu_capacity=caps).phy2log)
    times = eplb.metrics.gpu_times(w, phy2log, 8, caps)
    np.testing.assert_allclose(times, oracle.capacity_times64(w, phy2log, 8, caps), rtol=1e-5)
    balance = oracle.capacity_balance64(w, phy2log, 8, caps)
    np.testing.assert_allclose(eplb.metrics.balancedness(w, phy2log, 8, gpu_capacity=caps), balance, rtol=1e-5)
    flat = eplb.metrics.lower_bound(w, 32, 4, 2, 8, hierarchical=False, gpu_capacity=caps)
    np.testing.assert_allclose(flat, oracle.capacity_bound64(w, 32, 8, caps), rtol=1e-5)
    bound = eplb.metrics.lower_bound(w, 32, 4, 2, 8, gpu_capacity=caps)  # hierarchical: groups stay on nodes
    want = oracle.capacity_node_bound64(w, 32, 4, 2, 8, caps)
    np.testing.assert_allclose(bound, want, rtol=1e-5)
    assert (want >= oracle.capacity_bound64(w, 32, 8, caps)).all()
    summary = eplb.metrics.summarize(w, phy2log, 8, bound, gpu_capacity=caps)
    peak = oracle.capacity_times64(w, phy2log, 8, caps).max(axis=1)
    assert summary.balancedness == pytest.approx(balance.mean(), rel=1e-5)
    assert summary.bound_ratio == pytest.approx((want / peak).mean(), rel=1e-5)
    assert summary.imbalance == pytest.approx((1 / balance).mean(), rel=1e-5)
    # torch and JAX inputs give the same figures; an idle GPU holding load takes forever
    got = eplb.metrics.balancedness(torch.as_tensor(w), torch.as_tensor(phy2log), 8, gpu_capacity=torch.as_tensor(caps))
    np.testing.assert_allclose(got.numpy(), balance, rtol=1e-5)
    bound_t = eplb.metrics.lower_bound(torch.as_tensor(w), 32, 4, 2, 8, gpu_capacity=torch.as_tensor(caps))
    np.testing.assert_allclose(bound_t.numpy(), bound, rtol=1e-6)
    got = eplb.metrics.balancedness(jnp.asarray(w), jnp.asarray(phy2log), 8, gpu_capacity=jnp.asarray(caps))
    np.testing.assert_allclose(np.asarray(got), balance, rtol=1e-5)
    blind = np.asarray(eplb.rebalance_experts(w, 32, 4, 2, 8).phy2log)
    assert (np.asarray(eplb.metrics.gpu_times(w, blind, 8, caps))[:, 4] == np.inf).all()
    assert (np.asarray(eplb.metrics.balancedness(w, blind, 8, gpu_capacity=caps)) == 0).all()
    # equal capacities: time balance is the usual balancedness
    np.testing.assert_allclose(
        eplb.metrics.balancedness(w, blind, 8, gpu_capacity=np.full(8, 0.5)), eplb.metrics.balancedness(w, blind, 8)
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 4),  # experts
    st.sampled_from([(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 1)]),  # (slots per GPU, GPUs) before idling
    st.lists(st.sampled_from([0.0, 0.25, 0.6, 1.0, 2.0]), min_size=3, max_size=3),
    st.lists(st.integers(0, 30), min_size=4, max_size=4),
    st.booleans(),
)
def test_tiny_layers_against_the_exhaustive_optimum(num_experts, shape, speeds, loads, tied):
    """The bound never exceeds the best placement; ours is valid, never below it, equal on every backend
    (numpy, torch), and degenerate inputs (one expert, one slot per GPU, zero loads, ties) hold up."""
    per_gpu, gpus = shape
    caps = np.array(speeds[:gpus])
    r = per_gpu * gpus
    assume(r >= num_experts)
    live = _live(caps)
    if live.sum() * per_gpu < num_experts:
        with pytest.raises(ValueError, match="gpu_capacity leaves"):
            eplb.rebalance_experts(np.ones((1, num_experts)), r, 1, 1, gpus, gpu_capacity=caps)
        return
    w = np.array([[7.0] * num_experts if tied else loads[:num_experts]])
    got = eplb.rebalance_experts(w, r, 1, 1, gpus, gpu_capacity=caps)
    _check_valid(got, num_experts, r, gpus, live)
    _same(_torch_ops(w, r, 1, 1, gpus, caps, False), got, "torch")
    best = oracle.best_time64(w[0], r, gpus, caps)
    mine = _max_time(w, np.asarray(got.phy2log), gpus, caps)[0]
    bound = float(np.asarray(eplb.metrics.lower_bound(w, r, 1, 1, gpus, gpu_capacity=caps))[0])
    assert bound <= best * (1 + 1e-6) + 1e-30 and best <= mine * (1 + 1e-6) + 1e-30


# ---------------------------------------------------------------- bad input, unsupported combinations


W16 = np.ones((2, 16))


@pytest.mark.parametrize(
    ("caps", "error", "match"),
    [
        ([1.0] * 7, ValueError, r"gpu_capacity must have shape \[num_gpus\] = \[8\], got \[7\]"),
        (np.ones((8, 1)), ValueError, "gpu_capacity must have shape"),
        ([1.0] * 7 + [float("nan")], ValueError, r"gpu_capacity\[7\]=nan"),
        ([1.0] * 7 + [-0.5], ValueError, r"finite numbers >= 0 .*gpu_capacity\[7\]=-0.5"),
        ([1.0] * 7 + [float("inf")], ValueError, r"gpu_capacity\[7\]=inf"),
        ([1.0] * 7 + [1e39], ValueError, "exceeds float32's range"),
        ([1.0] * 7 + [1e-13], ValueError, r"2\*\*-40 times the largest .* pass 0 for an idle GPU"),
        ([1.0] * 7 + [1e-30], ValueError, r"below 2\*\*-64"),
        ([1.0, 0, 0, 0, 0, 0, 0, 1], ValueError, "gpu_capacity leaves 2 of 8 GPUs .* 8 live slots"),
        ([True] * 8, TypeError, "got bools; pass a mask of failed GPUs as active_gpus="),
        (np.ones(8, complex), TypeError, "real numbers"),
        (["fast"] * 8, TypeError, "real numbers"),
        ("fast", TypeError, "real numbers"),
    ],
)
def test_bad_capacities(caps, error, match):
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(W16, 32, 4, 2, 8, gpu_capacity=caps)


def test_readable_capacities_are_checked_whatever_the_mask():
    """Host capacities are checked even where the mask is traced (only the live-slot count needs both)."""
    call = jax.jit(
        lambda x, m: eplb.rebalance_experts(x, 32, 4, 2, 8, gpu_capacity=[1.0] * 7 + [np.nan], active_gpus=m)
    )
    with pytest.raises(ValueError, match=r"gpu_capacity\[7\]=nan"):
        call(jnp.ones((2, 16)), jnp.ones(8, bool))
    mask = np.array([True] * 7 + [False])
    with pytest.raises(ValueError, match="gpu_capacity leaves 1 of 8 GPUs"):  # counted after the mask
        eplb.rebalance_experts(W16, 32, 4, 2, 8, gpu_capacity=[1.0] + [0] * 6 + [1.0], active_gpus=mask)


def test_capacities_of_another_framework():
    with pytest.raises(TypeError, match=r"gpu_capacity must be an array of the loads' framework \(numpy\)"):
        eplb.rebalance_experts(W16, 32, 4, 2, 8, gpu_capacity=torch.ones(8))
    with pytest.raises(TypeError, match=r"loads' framework \(torch\)"):
        eplb.rebalance_experts(torch.ones(2, 16), 32, 4, 2, 8, gpu_capacity=jnp.ones(8))
    # a numpy array or list works with every framework
    got = eplb.rebalance_experts(torch.ones(2, 16), 32, 4, 2, 8, gpu_capacity=[1, 0.5] * 4)
    _same(got, eplb.rebalance_experts(W16, 32, 4, 2, 8, gpu_capacity=[1, 0.5] * 4))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"policy": "refined"}, "policy='refined'"),
        ({"spill": 1}, "spill=1"),
        ({"previous": np.zeros((2, 32), np.int64), "max_moves": 3}, "max_moves="),
    ],
)
def test_unsupported_combinations(options, match):
    with pytest.raises(ValueError, match=f"gpu_capacity cannot be combined with {match}"):
        eplb.rebalance_experts(W16, 32, 4, 2, 8, gpu_capacity=[1, 0.5] * 4, **options)


def test_kernels_reject_capacities():
    from eplb.backends import _jax

    with pytest.raises(ValueError, match="gpu_capacity runs on impl='xla'"):
        _jax.rebalance(jnp.ones((1, 16)), 32, 4, 2, 8, impl="pallas", hierarchical=True, gpu_capacity=jnp.ones(8))
    with pytest.raises(ValueError, match="compiled kernel runs the plain greedy policy only"):
        _numpy.rebalance(W16.astype(np.float32), 32, 4, 2, 8, impl="numba", hierarchical=True, gpu_capacity=np.ones(8))


# ---------------------------------------------------------------- GPUs


GPU_CASES = [*CASES, (*FLAT, [1, 0.7, 0.9, 0.6, 1, 0.3])]


def _skewed(num_experts, seed):
    """Skewed float32 loads with many distinct replica loads (so a division anywhere would likely show)."""
    rng = np.random.default_rng(seed)
    return (rng.lognormal(5, 2, (6, num_experts)) * 3.7).astype(np.float32)


@needs_gpu("torch")
def test_torch_cuda_equals_numpy():
    for case in GPU_CASES:
        num_experts, r, g, n, gpus, caps = case
        hierarchical = g % n == 0 and n > 1
        for w in (_loads(num_experts, seed=9), _skewed(num_experts, seed=10)):
            want = _numpy_xp(w, r, g, n, gpus, caps, hierarchical)
            _same(_torch_ops(w, r, g, n, gpus, caps, hierarchical, device="cuda"), want, f"torch CUDA {case}")


@needs_gpu("jax")
def test_jax_gpu_equals_numpy():
    """XLA on a GPU divides float32 inexactly: the placement must not notice (capacities traced)."""
    for case in GPU_CASES:
        num_experts, r, g, n, gpus, caps = case
        hierarchical = g % n == 0 and n > 1
        for w in (_loads(num_experts, seed=9), _skewed(num_experts, seed=10)):
            want = _numpy_xp(w, r, g, n, gpus, caps, hierarchical)
            with jax.default_device(jax.devices("gpu")[0]):
                got = _jax_user_jit(w, r, g, n, gpus, caps, hierarchical)
            _same(got, want, f"JAX GPU {case}")
        rng = np.random.default_rng(11)
        caps = rng.uniform(0.01, 3, 256).astype(np.float32)
        with jax.default_device(jax.devices("gpu")[0]):
            got = jax.jit(lambda c: inverse_capacity(c[None], xp=jnp)[0])(jnp.asarray(caps))
        np.testing.assert_array_equal(np.asarray(got), inverse_capacity(caps[None], xp=np)[0])
