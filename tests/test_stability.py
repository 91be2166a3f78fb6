"""Migration-aware rebalancing: ``rebalance_experts(..., previous=...)`` and its knobs.

- the assignment solver is exact (against brute force), ties included;
- relabelling keeps the balance (same multiset of GPU loads), keeps the most
  experts in place (brute force on small configs), and moves nothing on an
  unchanged load, on every backend;
- ``balance_tolerance`` bounds the heaviest GPU per layer and cuts moves on a
  drifting load; ``max_moves`` bounds the moves per layer;
- every backend returns the same placement with ``previous=``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import eplb
from eplb.algorithms.assignment import max_assignment
from eplb.algorithms.relabel import relabel

from . import cases, oracle
from .conftest import ALL_BACKENDS, FRONT_DOORS, Backend, backend_params, make_runner, needs_gpu

# (replicas, groups, nodes, gpus) for E = 16 experts; the first is the cross-backend config.
CONFIG = (24, 4, 2, 4)
SMALL = [CONFIG, (32, 3, 2, 8), (16, 4, 2, 16), (16, 2, 1, 1), (20, 4, 4, 4)]
EXPERTS = 16
LAYERS = 12


def drifting(rng: np.random.Generator, layers: int, experts: int, windows: int, drift: float = 0.03) -> list:
    """Integer loads per window: each expert's load drifts by ``drift`` (lognormal) per window,
    and every fourth window a few experts shift by up to ~3x."""
    base = rng.lognormal(0.0, 1.0, (layers, experts))
    out = []
    for t in range(windows):
        base = base * np.exp(rng.normal(0.0, drift, base.shape))
        if t % 4 == 3:
            rows = np.arange(layers)[:, None]
            base[rows, rng.integers(0, experts, (layers, 2))] *= rng.lognormal(0.0, 0.7, (layers, 2))
        out.append(np.round(base * 1000).astype(np.int64))
    return out


def gpu_multisets(phy2log: np.ndarray, num_gpus: int) -> list:
    """Per layer: the sorted list of each GPU's sorted experts (GPU and slot labels forgotten)."""
    per_gpu = np.sort(phy2log.reshape(len(phy2log), num_gpus, -1), axis=-1)
    return [sorted(map(tuple, layer.tolist())) for layer in per_gpu]


def peak_load(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Heaviest GPU per layer, float64 and exact (the independent scorer of tests/oracle.py)."""
    return oracle.gpu_loads64(weight, phy2log, num_gpus).max(axis=-1)


def check_valid(placement: eplb.Placement, num_experts: int) -> None:
    """Every expert has a replica; logcnt and log2phy agree with phy2log."""
    phy2log, log2phy, logcnt = (np.asarray(a) for a in placement)
    for layer in range(len(phy2log)):
        counts = np.bincount(phy2log[layer], minlength=num_experts)
        np.testing.assert_array_equal(counts, logcnt[layer])
        assert counts.min() >= 1
        for e in range(num_experts):
            slots = log2phy[layer, e]
            assert (slots[counts[e] :] == -1).all()
            assert sorted(slots[: counts[e]].tolist()) == np.flatnonzero(phy2log[layer] == e).tolist()


def brute_force_kept(new: np.ndarray, old: np.ndarray, num_gpus: int, num_nodes: int) -> int:
    """Most (expert, GPU) pairs kept over every node and within-node GPU relabelling (one layer)."""
    g = num_gpus // num_nodes
    hist_new = np.stack([np.bincount(gpu, minlength=64) for gpu in new.reshape(num_gpus, -1)])
    hist_old = np.stack([np.bincount(gpu, minlength=64) for gpu in old.reshape(num_gpus, -1)])
    kept = np.minimum(hist_new[:, None, :], hist_old[None, :, :]).sum(axis=-1)  # [G new, G old]
    perms = np.array(list(itertools.permutations(range(g))))
    rows = np.arange(g)
    # best[a, b]: new node a on old node b, its GPUs matched as well as possible.
    best = np.array(
        [
            [kept[a * g : (a + 1) * g, b * g : (b + 1) * g][rows, perms].sum(axis=1).max() for b in range(num_nodes)]
            for a in range(num_nodes)
        ]
    )
    return max(best[np.arange(num_nodes), list(p)].sum() for p in itertools.permutations(range(num_nodes)))


# ---------------------------------------------------------------- the assignment solver


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_max_assignment_is_optimal(n):
    """The Hungarian solver returns a permutation of maximum total profit, ties and zeros included."""
    rng = np.random.default_rng(n)
    profit = rng.integers(0, 4, (60, n, n))
    profit[:10] = 0  # all tied
    profit[10:20] = rng.integers(0, 2, (10, n, n))  # mostly tied
    col = max_assignment(profit, xp=np)
    assert (np.sort(col, axis=-1) == np.arange(n)).all()
    got = np.take_along_axis(profit, col[:, :, None], axis=2).sum(axis=(1, 2))
    best = [max(sum(p[i, c] for i, c in enumerate(perm)) for perm in itertools.permutations(range(n))) for p in profit]
    np.testing.assert_array_equal(got, best)


def test_max_assignment_same_on_torch_ops():
    """torch ops (the CUDA code path) solve to the same permutation as numpy, ties included."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as txp

    profit = np.random.default_rng(7).integers(0, 3, (40, 7, 7))
    np.testing.assert_array_equal(
        max_assignment(torch.as_tensor(profit), xp=txp).numpy(), max_assignment(profit, xp=np)
    )


# ---------------------------------------------------------------- relabelling


@pytest.mark.parametrize("config", SMALL, ids=lambda c: "-".join(map(str, c)))
def test_relabel_keeps_balance_and_most_experts(config):
    """Same GPU contents up to labels (so the same GPU loads), and as many kept pairs as brute force finds."""
    replicas, groups, nodes, gpus = config
    hierarchical = groups % nodes == 0
    old_w, new_w = drifting(np.random.default_rng(1), 8, EXPERTS, 2, drift=0.3)
    old = eplb.rebalance_experts(old_w, *config).phy2log
    fresh = eplb.rebalance_experts(new_w, *config)
    stable = eplb.rebalance_experts(new_w, *config, previous=old)
    check_valid(stable, EXPERTS)
    assert gpu_multisets(stable.phy2log, gpus) == gpu_multisets(fresh.phy2log, gpus)
    np.testing.assert_array_equal(stable.logcnt, fresh.logcnt)
    # The same loads, exactly: each GPU's load summed exactly (math.fsum) in float64, GPU labels forgotten.
    np.testing.assert_array_equal(
        np.sort(oracle.gpu_loads64(new_w, stable.phy2log, gpus)),
        np.sort(oracle.gpu_loads64(new_w, fresh.phy2log, gpus)),
    )
    moved = oracle.moves(old, stable.phy2log, gpus)
    for layer in range(len(old)):
        best = brute_force_kept(fresh.phy2log[layer], old[layer], gpus, nodes if hierarchical else 1)
        assert replicas - moved[layer] == best
    assert (moved <= oracle.moves(old, fresh.phy2log, gpus)).all()


def test_relabel_undoes_a_permutation():
    """A placement whose nodes, GPUs and slots were shuffled comes back exactly."""
    rng = np.random.default_rng(2)
    weight = cases.lognormal_f32(rng, 6, 256)
    fresh = eplb.rebalance_experts(weight, 288, 8, 4, 32).phy2log
    nodes, gpus_per_node, per_gpu = 4, 8, 9
    for layer in range(len(fresh)):
        shuffled = fresh[layer].reshape(nodes, gpus_per_node, per_gpu)[rng.permutation(nodes)]
        shuffled = np.stack([node[rng.permutation(gpus_per_node)] for node in shuffled])
        shuffled = np.stack([[gpu[rng.permutation(per_gpu)] for gpu in node] for node in shuffled])
        old = shuffled.reshape(1, -1)
        np.testing.assert_array_equal(relabel(fresh[layer : layer + 1], old, 32, 4, xp=np), old)


@pytest.mark.parametrize("policy", ["greedy", "refined"])
def test_unchanged_load_moves_nothing_in_a_chain(policy):
    """Same load again: nothing moves, with and without the knobs, then again from a stable result."""
    weight = cases.lognormal_f32(np.random.default_rng(3), 8, 256)
    first = eplb.rebalance_experts(weight, 288, 8, 4, 32, policy=policy)
    for options in ({}, {"balance_tolerance": 0.0}, {"balance_tolerance": 0.02}, {"max_moves": 4}):
        again = eplb.rebalance_experts(weight, 288, 8, 4, 32, policy=policy, previous=first, **options)
        np.testing.assert_array_equal(again.phy2log, first.phy2log)
    # A stable chain after a drift: the next call on the same load keeps the stable result.
    drifted = weight * np.random.default_rng(4).lognormal(0.0, 0.05, weight.shape).astype(np.float32)
    for options in ({}, {"balance_tolerance": 0.0}, {"balance_tolerance": 0.01}):
        stable = eplb.rebalance_experts(drifted, 288, 8, 4, 32, policy=policy, previous=first, **options).phy2log
        again = eplb.rebalance_experts(drifted, 288, 8, 4, 32, policy=policy, previous=stable, **options).phy2log
        np.testing.assert_array_equal(again, stable)


def test_spill_placements_relabel():
    """With spill (groups may spill to other nodes), previous= relabels nodes and GPUs and keeps the balance."""
    old_w, new_w = drifting(np.random.default_rng(13), 6, 32, 2, drift=0.3)
    config = (48, 8, 4, 8)
    old = eplb.rebalance_experts(old_w, *config, spill=2).phy2log
    fresh = eplb.rebalance_experts(new_w, *config, spill=2).phy2log
    stable = eplb.rebalance_experts(new_w, *config, spill=2, previous=old).phy2log
    assert gpu_multisets(stable, 8) == gpu_multisets(fresh, 8)
    node_sets = lambda p: [sorted(sorted(n) for n in layer.reshape(4, -1).tolist()) for layer in p]  # noqa: E731
    assert node_sets(stable) == node_sets(fresh)  # nodes move whole
    assert (oracle.moves(old, stable, 8) <= oracle.moves(old, fresh, 8)).all()
    with pytest.raises(ValueError, match="cannot be combined with spill=2"):
        eplb.rebalance_experts(new_w, *config, spill=2, previous=old, balance_tolerance=0.01)


def test_placement_accepted_as_previous():
    weight = cases.lognormal_f32(np.random.default_rng(14), 3, EXPERTS)
    first = eplb.rebalance_experts(weight, *CONFIG)
    np.testing.assert_array_equal(eplb.rebalance_experts(weight, *CONFIG, previous=first).phy2log, first.phy2log)


@pytest.mark.parametrize("runner", backend_params(ALL_BACKENDS), indirect=True)
def test_unchanged_load_moves_nothing(runner):
    """Every implementation of previous= and every front door: the placement of the same load comes back exactly."""
    if not runner.backend.supports(previous=True):
        assert runner.backend is Backend.JAX_PALLAS  # the Pallas kernels have no previous=
        return
    weight = np.concatenate(
        [cases.ties(np.random.default_rng(4), EXPERTS), cases.lognormal_f32(np.random.default_rng(5), 3, EXPERTS)]
    )[:LAYERS]
    expected = eplb.rebalance_experts(weight, *CONFIG)
    got = runner.rebalance_np(weight, *CONFIG, previous=runner.asarray(expected.phy2log))
    np.testing.assert_array_equal(got[0], expected.phy2log)
    np.testing.assert_array_equal(got[2], expected.logcnt)


@pytest.mark.parametrize("knobs", [{"balance_tolerance": 0.1}, {"max_moves": 1}, {"max_moves": 0}])
@pytest.mark.parametrize("runner", backend_params(ALL_BACKENDS), indirect=True)
def test_knobs_with_one_expert_on_every_slot(runner, knobs):
    """One expert holds every slot: the repair prices a replica more (count R + 1), which indexed past its
    table (IndexError on numpy/torch, a silent clamp on JAX)."""
    if not runner.backend.supports(previous=True):
        return
    weight = np.array([[5.0], [3.0], [0.0]], dtype=np.float32)
    previous = eplb.rebalance_experts(weight, 4, 1, 1, 2).phy2log
    got = runner.rebalance_np(weight, 4, 1, 1, 2, previous=runner.asarray(previous), **knobs)
    np.testing.assert_array_equal(got[0], np.zeros((3, 4)))
    np.testing.assert_array_equal(got[2], np.full((3, 1), 4))


# ---------------------------------------------------------------- the knobs


def chain(windows: list, config: tuple, *, oblivious: bool = False, **options) -> tuple[int, list]:
    """Moves summed over a chain of rebalances (each given the previous result), and the results."""
    placement = eplb.rebalance_experts(windows[0], *config).phy2log
    total, results = 0, []
    for weight in windows[1:]:
        stable = {} if oblivious else {"previous": placement, **options}
        result = eplb.rebalance_experts(weight, *config, **stable)
        total += int(oracle.moves(placement, result.phy2log, config[3]).sum())
        placement = result.phy2log
        results.append(result)
    return total, results


@pytest.mark.parametrize("config", [(40, 4, 2, 8), (40, 1, 1, 8)], ids=["hierarchical", "global"])
def test_tolerance_trades_balance_for_moves(config):
    """On a drifting load: the heaviest GPU stays within (1 + tolerance) of fresh's per layer, and
    the moves fall far below an oblivious rebalance's (the design target is 10%)."""
    windows = drifting(np.random.default_rng(6), 8, 32, 9, drift=0.02)
    oblivious, _ = chain(windows, config, oblivious=True)
    moves = {}
    for tolerance in (0.0, 0.005, 0.05):
        moves[tolerance], results = chain(windows, config, balance_tolerance=tolerance)
        for weight, result in zip(windows[1:], results, strict=True):
            check_valid(result, 32)
            fresh_peak = peak_load(weight, eplb.rebalance_experts(weight, *config).phy2log, config[3])
            # float32 sums of 5 slots decide in the library: allow their rounding (a few ulps) in float64.
            limit = fresh_peak * (1 + tolerance) * (1 + 16 * 2.0**-24)
            assert (peak_load(weight, result.phy2log, config[3]) <= limit).all()
    assert moves[0.005] <= 0.2 * oblivious
    assert moves[0.05] <= moves[0.005] <= moves[0.0]


def sticky_without_limit(fresh: list, old: list, weight: list, num_gpus: int) -> list:
    """Plain Python: ``fresh``'s replicas (load ``w / count``) heaviest first, each to the GPU that
    held its expert's copy of the same rank in ``old`` (slot order) while that GPU has a free slot,
    else to the lightest GPU with one (lowest index on ties). Returns the experts per GPU."""
    per_gpu = len(fresh) // num_gpus
    count = {e: fresh.count(e) for e in fresh}
    homes: dict = {}
    for slot, e in enumerate(old):
        homes.setdefault(e, []).append(slot // per_gpu)
    items = sorted(
        ((weight[e] / count[e], e, k) for e in count for k in range(count[e])), key=lambda t: (-t[0], t[1], t[2])
    )
    packs: list = [[] for _ in range(num_gpus)]
    load = [0.0] * num_gpus
    for x, e, k in items:
        home = homes.get(e, [])
        if k < len(home) and len(packs[home[k]]) < per_gpu:
            gpu = home[k]
        else:
            gpu = min((g for g in range(num_gpus) if len(packs[g]) < per_gpu), key=lambda g: (load[g], g))
        packs[gpu].append(e)
        load[gpu] += x
    return packs


@pytest.mark.parametrize("config", [(40, 1, 1, 8), (48, 1, 1, 8), (36, 1, 1, 12), (32, 1, 1, 32)])
def test_tolerance_never_moves_more_than_staying_home(config):
    """With a tolerance, no layer moves more experts than keeping every fresh replica on its old GPU
    where that GPU has room (a plain-Python repacking), whenever that repacking is itself within the
    limit (float64, with a margin for the library's float32 sums). Fast drift, where the old
    placement alone rarely gets there; all-zero and one-expert-heavy layers included."""
    rng = np.random.default_rng(11)
    windows = drifting(rng, 8, 32, 6, drift=0.1)
    for weight in windows:
        weight[0] = 0
        weight[1, 1:] = 0
    checked = 0
    tolerance = 0.005
    placement = eplb.rebalance_experts(windows[0], *config).phy2log
    for weight in windows[1:]:
        result = eplb.rebalance_experts(weight, *config, previous=placement, balance_tolerance=tolerance).phy2log
        fresh = eplb.rebalance_experts(weight, *config).phy2log
        limit = peak_load(weight, fresh, config[3]) * (1 + tolerance)
        got = oracle.moves(placement, result, config[3])
        for layer in range(weight.shape[0]):
            packs = sticky_without_limit(
                fresh[layer].tolist(), placement[layer].tolist(), weight[layer].astype(float).tolist(), config[3]
            )
            stay = np.array([[e for pack in packs for e in pack]])
            if peak_load(weight[layer : layer + 1], stay, config[3])[0] <= limit[layer] * (1 - 1e-5):
                checked += 1
                assert got[layer] <= oracle.moves(placement[layer : layer + 1], stay, config[3])[0], layer
        placement = result
    assert checked >= 10


def test_max_moves_caps_moves():
    """max_moves bounds the moves of every layer; max_moves=0 keeps the previous placement."""
    old_w, new_w = drifting(np.random.default_rng(8), 8, EXPERTS, 2, drift=0.4)
    old = eplb.rebalance_experts(old_w, *CONFIG).phy2log
    for cap in (0, 1, 3, 6):
        result = eplb.rebalance_experts(new_w, *CONFIG, previous=old, max_moves=cap)
        check_valid(result, EXPERTS)
        assert (oracle.moves(old, result.phy2log, CONFIG[3]) <= cap).all()
    np.testing.assert_array_equal(eplb.rebalance_experts(new_w, *CONFIG, previous=old, max_moves=0).phy2log, old)


def test_hierarchical_results_keep_groups_on_nodes():
    """With the hierarchical policy every group's replicas stay on one node, knobs included."""
    windows = drifting(np.random.default_rng(9), 8, 32, 4, drift=0.2)
    replicas, groups, nodes, _ = config = (48, 8, 4, 8)
    for options in ({}, {"balance_tolerance": 0.01}, {"max_moves": 5}):
        _, results = chain(windows, config, **options)
        for result in results:
            node_of_slot = np.arange(replicas) // (replicas // nodes)
            group = result.phy2log // (32 // groups)
            for layer in range(len(group)):
                for g in range(groups):
                    assert len(set(node_of_slot[group[layer] == g].tolist())) == 1


def test_invalid_previous_falls_back_to_relabelling():
    """A previous placement missing an expert is not repaired: balance_tolerance gives the relabelled placement."""
    old_w, new_w = drifting(np.random.default_rng(10), 4, EXPERTS, 2)
    old = eplb.rebalance_experts(old_w, *CONFIG).phy2log.copy()
    old[:, old[0] == 3] = 4  # expert 3 gone
    plain = eplb.rebalance_experts(new_w, *CONFIG, previous=old)
    tolerant = eplb.rebalance_experts(new_w, *CONFIG, previous=old, balance_tolerance=0.5)
    check_valid(tolerant, EXPERTS)
    assert (oracle.moves(old, tolerant.phy2log, 4) <= oracle.moves(old, plain.phy2log, 4)).all()


def _global_previous() -> tuple[np.ndarray, np.ndarray]:
    """The issue's repro: loads [2, 64], and their placement by the global policy (groups span nodes)."""
    weight = np.random.default_rng(0).lognormal(0.0, 1.0, (2, 64)).astype(np.float32)
    return weight, eplb.rebalance_experts(weight, 80, 8, 2, 8, hierarchical=False).phy2log


@pytest.mark.parametrize("backend", backend_params(FRONT_DOORS))
def test_max_moves_needs_a_placement_of_the_config(backend):
    """max_moves is "at most" only from a placement of this config: a global placement under the hierarchical
    policy (or one missing an expert) is refused where the ids are read, instead of silently moving 50+."""
    weight, previous = _global_previous()
    runner = make_runner(backend)
    with pytest.raises(ValueError, match=r"group \d+ spans nodes"):
        runner.rebalance(runner.asarray(weight), 80, 8, 2, 8, previous=runner.asarray(previous), max_moves=0)
    missing = eplb.rebalance_experts(weight, 80, 8, 2, 8).phy2log.copy()
    missing[missing == 5] = 4
    with pytest.raises(ValueError, match="has no slot for expert 5"):
        runner.rebalance(runner.asarray(weight), 80, 8, 2, 8, previous=runner.asarray(missing), max_moves=3)
    # previous= alone and balance_tolerance= relabel from any previous.
    for knobs in ({}, {"balance_tolerance": 0.01}):
        check_valid(eplb.rebalance_experts(weight, 80, 8, 2, 8, previous=previous, **knobs), 64)


def test_max_moves_with_unread_ids_falls_back_to_relabelling():
    """Inside jax.jit the ids cannot be read: an invalid previous gives the relabelled placement (documented)."""
    jax = pytest.importorskip("jax")
    weight, previous = _global_previous()
    relabelled = eplb.rebalance_experts(weight, 80, 8, 2, 8, previous=previous).phy2log
    jitted = jax.jit(lambda w, p: eplb.rebalance_experts(w, 80, 8, 2, 8, previous=p, max_moves=0).phy2log)
    np.testing.assert_array_equal(np.asarray(jitted(weight, previous.astype(np.int32))), relabelled)
    unchecked = eplb.rebalance_experts(weight, 80, 8, 2, 8, previous=previous, max_moves=0, check_values=False)
    np.testing.assert_array_equal(unchecked.phy2log, relabelled)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"previous": np.zeros((1, 24), dtype=np.int64)}, ValueError, r"previous must have shape .*\[2, 24\]"),
        ({"previous": np.zeros((2, 24))}, TypeError, "previous must hold integer expert ids"),
        ({"previous": np.full((2, 24), 16)}, ValueError, r"previous must hold expert ids in \[0, 16\)"),
        ({"previous": np.full((2, 24), -1)}, ValueError, "previous must hold expert ids"),
        ({"previous": [[0] * 24, [0] * 23]}, ValueError, "previous must be a rectangular"),
        ({"balance_tolerance": 0.1}, ValueError, "only apply with previous="),
        ({"max_moves": 3}, ValueError, "only apply with previous="),
        ({"previous": np.zeros((2, 24), dtype=int), "balance_tolerance": -0.1}, ValueError, "balance_tolerance"),
        ({"previous": np.zeros((2, 24), dtype=int), "balance_tolerance": True}, TypeError, "balance_tolerance"),
        ({"previous": np.zeros((2, 24), dtype=int), "max_moves": 1.5}, TypeError, "max_moves"),
        ({"previous": np.zeros((2, 24), dtype=int), "max_moves": -1}, ValueError, "max_moves=-1"),
    ],
)
def test_validation(options, error, match):
    weight = np.arange(32).reshape(2, 16)
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(weight, *CONFIG, **options)


@pytest.mark.parametrize("backend", backend_params([Backend.TORCH, Backend.JAX]))
def test_previous_from_another_framework(backend):
    """A numpy previous (or a list) works with torch and JAX loads (converted to the load's kind and device)."""
    weight = cases.lognormal_f32(np.random.default_rng(12), 2, EXPERTS)
    previous = eplb.rebalance_experts(weight[::-1].copy(), *CONFIG).phy2log
    expected = eplb.rebalance_experts(weight, *CONFIG, previous=previous).phy2log
    runner = make_runner(backend)
    for given in (previous, previous.tolist()):
        np.testing.assert_array_equal(runner.rebalance_np(weight, *CONFIG, previous=given)[0], expected)


@needs_gpu("torch")
@pytest.mark.parametrize("options", [{}, {"balance_tolerance": 0.005}, {"max_moves": 4}], ids=["relabel", "tol", "cap"])
def test_torch_cuda_previous_never_syncs(options):
    """previous= and the knobs on CUDA tensors queue work without a host sync, and match numpy."""
    import torch

    old_w, new_w = drifting(np.random.default_rng(15), 12, 256, 2)
    config = (288, 8, 4, 32)
    previous = eplb.rebalance_experts(old_w, *config).phy2log
    expected = eplb.rebalance_experts(new_w, *config, previous=previous, **options)
    weight = torch.as_tensor(new_w, device="cuda")
    on_device = torch.as_tensor(previous, device="cuda")
    eplb.rebalance_experts(weight, *config, previous=on_device, **options)  # first call may build constant tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        placement = eplb.rebalance_experts(weight, *config, previous=on_device, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(placement, expected, strict=True):
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_jax_knobs_are_traced_values():
    """On JAX the knobs may be (traced) arrays: one compile serves every value, inside the user's jit, and the
    placement equals numpy's with the same Python value, on the host-callback and the XLA paths."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from eplb.backends import _jax

    old_w, new_w = drifting(np.random.default_rng(16), 6, 32, 2, drift=0.3)
    config = (48, 8, 4, 8)
    previous = eplb.rebalance_experts(old_w, *config).phy2log
    w, p = jnp.asarray(new_w.astype(np.int32)), jnp.asarray(previous.astype(np.int32))
    plan = jax.jit(
        lambda w, p, t, k: tuple(eplb.rebalance_experts(w, *config, previous=p, balance_tolerance=t, max_moves=k))
    )
    for tolerance, cap in ((0.0, 2), (0.005, 5), (0.05, 48), (-1.0, 0), (float("nan"), 3)):
        safe = 0.0 if not tolerance >= 0 else tolerance  # a negative or NaN traced value counts as 0
        want = eplb.rebalance_experts(new_w, *config, previous=previous, balance_tolerance=safe, max_moves=cap)
        got = plan(w, p, jnp.float32(tolerance), jnp.int32(cap))
        for name, g, e in zip(eplb.Placement._fields, got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), e, err_msg=f"{name}, tolerance {tolerance}, cap {cap}")
        xla = _jax.rebalance_stable(
            w,
            p,
            *config,
            hierarchical=True,
            policy="greedy",
            spill=0,
            impl="xla",
            tolerance=jnp.float32(tolerance),
            max_moves=jnp.int32(cap),
        )
        for g, e in zip(xla, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), e)
    assert plan._cache_size() == 1  # one compile for every value


def test_jax_array_knobs_need_jax_loads():
    jnp = pytest.importorskip("jax.numpy")
    weight = cases.lognormal_f32(np.random.default_rng(17), 2, EXPERTS)
    previous = eplb.rebalance_experts(weight, *CONFIG).phy2log
    with pytest.raises(TypeError, match="balance_tolerance as a JAX array needs JAX loads"):
        eplb.rebalance_experts(weight, *CONFIG, previous=previous, balance_tolerance=jnp.float32(0.1))
    with pytest.raises(ValueError, match="must be 0-d"):
        eplb.rebalance_experts(jnp.asarray(weight), *CONFIG, previous=previous, max_moves=jnp.zeros(2, jnp.int32))
    with pytest.raises(TypeError, match="max_moves must be an int"):
        eplb.rebalance_experts(jnp.asarray(weight), *CONFIG, previous=previous, max_moves=jnp.float32(2))
