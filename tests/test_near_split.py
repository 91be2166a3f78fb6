"""The near split's start of ``previous=`` with knobs (``eplb.algorithms.stability.near_split``).

Oracles in plain Python: which node holds each group, the best single swap
of two groups between nodes (integer loads, so float32 sums are exact), the
moves (``tests/oracle.moves``) and float64 GPU loads.
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb
from eplb.algorithms.hierarchy import node_groups
from eplb.algorithms.policies import place
from eplb.algorithms.stability import _other_groups, near_split, stabilize
from tests import cases, oracle

# (16, 4, 2, 16): one slot a GPU; (16, 8, 2, 4): no spare slot (R = E)
CONFIGS = [(24, 4, 2, 4), (48, 8, 4, 8), (32, 4, 4, 8), (16, 4, 2, 16), (16, 8, 2, 4)]


def _groups_by_node(row: list[int], num_log: int, num_groups: int, num_nodes: int) -> list[set[int]]:
    per_node, size = len(row) // num_nodes, num_log // num_groups
    return [{e // size for e in row[n * per_node : (n + 1) * per_node] if e >= 0} for n in range(num_nodes)]


def _best_swap_max(loads: list[int], node_of: list[int], num_nodes: int) -> int:
    """The heaviest node (integer loads) after the best single swap of two groups on different nodes, or
    before any swap where none lowers it."""

    def heaviest(assign: list[int]) -> int:
        return max(sum(x for x, n in zip(loads, assign, strict=True) if n == node) for node in range(num_nodes))

    best = heaviest(node_of)
    for g1 in range(len(loads)):
        for g2 in range(g1 + 1, len(loads)):
            if node_of[g1] != node_of[g2]:
                swapped = list(node_of)
                swapped[g1], swapped[g2] = swapped[g2], swapped[g1]
                best = min(best, heaviest(swapped))
    return best


@pytest.mark.parametrize("config", CONFIGS, ids=["-".join(map(str, c)) for c in CONFIGS])
def test_near_split_keeps_old_groups_but_one_swap(config):
    num_phy, num_groups, num_nodes, num_gpus = config
    num_log = 16
    rng = np.random.default_rng(sum(config))
    old_w = cases.random_int(rng, 6, num_log, total=2**20).astype(np.float32)
    new_w = np.concatenate(
        [cases.random_int(rng, 5, num_log, total=2**20), np.zeros((1, num_log), np.int64)]  # an all-zero layer
    ).astype(np.float32)
    old = eplb.rebalance_experts(old_w, *config).phy2log
    phy2log, logcnt = near_split(new_w, old, num_phy, num_groups, num_nodes, num_gpus, xp=np)
    size = num_log // num_groups
    for layer in range(len(new_w)):
        row = phy2log[layer].tolist()
        # A valid placement: every expert placed, logcnt its replica count, each group on one node.
        assert sorted(set(row)) == list(range(num_log))
        assert logcnt[layer].tolist() == [row.count(e) for e in range(num_log)]
        new_sets = _groups_by_node(row, num_log, num_groups, num_nodes)
        assert all(len(s) == num_groups // num_nodes for s in new_sets)
        assert set().union(*new_sets) == set(range(num_groups))
        # The old split, at most one pair of groups swapped, and the swap is the best one.
        old_sets = _groups_by_node(old[layer].tolist(), num_log, num_groups, num_nodes)
        moved = sum(len(a - b) for a, b in zip(old_sets, new_sets, strict=True))
        assert moved in (0, 2)
        loads = [int(new_w[layer, g * size : (g + 1) * size].sum()) for g in range(num_groups)]
        node_of = [next(n for n, s in enumerate(old_sets) if g in s) for g in range(num_groups)]
        new_node_of = [next(n for n, s in enumerate(new_sets) if g in s) for g in range(num_groups)]
        got = max(sum(x for x, n in zip(loads, new_node_of, strict=True) if n == node) for node in range(num_nodes))
        assert got == _best_swap_max(loads, node_of, num_nodes)


def test_near_split_from_an_old_placement_without_whole_groups():
    """A global-policy ``previous`` (groups across nodes) is no split to start from: a valid placement still."""
    rng = np.random.default_rng(8)
    weight = cases.lognormal_f32(rng, 4, 16)
    old = eplb.rebalance_experts(weight, 24, 1, 1, 4).phy2log
    phy2log, logcnt = near_split(weight, old, 24, 4, 2, 4, xp=np)
    for layer, row in enumerate(phy2log.tolist()):
        assert sorted(set(row)) == list(range(16))
        assert logcnt[layer].tolist() == [row.count(e) for e in range(16)]
        assert all(len(s) == 2 for s in _groups_by_node(row, 16, 4, 2))


def test_node_groups_and_other_groups_against_sets():
    rng = np.random.default_rng(5)
    for config in CONFIGS:
        num_phy, num_groups, num_nodes, num_gpus = config
        weights = cases.lognormal_f32(rng, 8, 16)
        a = eplb.rebalance_experts(weights, *config).phy2log
        b = eplb.rebalance_experts(weights[::-1].copy(), *config).phy2log
        holes = a.copy()
        holes[:, : num_phy // num_gpus] = -1  # a failed GPU's slots hold nothing
        present = node_groups(holes, 16, num_groups, num_nodes, xp=np)
        for layer in range(8):
            want = _groups_by_node(holes[layer].tolist(), 16, num_groups, num_nodes)
            got = [set(np.flatnonzero(present[layer, n]).tolist()) for n in range(num_nodes)]
            assert got == want
        other = _other_groups(a, b, 16, num_groups, num_nodes, xp=np)
        for layer in range(8):
            sets_a = _groups_by_node(a[layer].tolist(), 16, num_groups, num_nodes)
            sets_b = _groups_by_node(b[layer].tolist(), 16, num_groups, num_nodes)
            assert bool(other[layer, 0]) == (sets_a != sets_b)


@pytest.mark.parametrize("knobs", [{"tolerance": 0.0}, {"tolerance": 0.01}, {"tolerance": 0.02, "max_moves": 6}])
def test_the_near_start_never_adds_moves(knobs):
    """Per layer, the near split's start only replaces a candidate by one with fewer moves within the same
    limit: never more moves than without it, the heaviest GPU within the limit (float64), and on these
    drifting loads it saves moves somewhere (so the start is exercised)."""
    rng = np.random.default_rng(3)
    num_log, config = 32, (48, 8, 4, 8)
    _, num_groups, num_nodes, num_gpus = config
    old_w = cases.lognormal_f32(rng, 12, num_log)
    new_w = np.concatenate(
        [old_w * rng.lognormal(0, 0.3, old_w.shape).astype(np.float32), np.zeros((1, num_log), np.float32)]
    )
    old = eplb.rebalance_experts(np.concatenate([old_w, old_w[:1]]), *config).phy2log
    fresh, _, logcnt = place(new_w, *config, hierarchical=True, xp=np)
    near = near_split(new_w, old, *config, xp=np)
    args = (new_w, fresh, logcnt, old, num_groups, num_nodes, num_gpus)
    without, _ = stabilize(*args, tolerance=knobs["tolerance"], max_moves=knobs.get("max_moves"), xp=np)
    with_near, _ = stabilize(*args, tolerance=knobs["tolerance"], max_moves=knobs.get("max_moves"), near=near, xp=np)
    moves_without, moves_with = oracle.moves(old, without, num_gpus), oracle.moves(old, with_near, num_gpus)
    assert np.all(moves_with <= moves_without)
    limit = oracle.gpu_loads64(new_w, fresh, num_gpus).max(axis=1) * (1 + knobs["tolerance"])
    peak = oracle.gpu_loads64(new_w, with_near, num_gpus).max(axis=1)
    within = peak <= limit * (1 + 1e-6)
    if "max_moves" in knobs:
        within |= moves_with <= knobs["max_moves"]
    assert np.all(within)


def test_previous_with_knobs_uses_the_near_start():
    """The public call, hierarchical with knobs: fewer moves than the same call's candidates without the near
    start on these loads (``test_cross_backend`` checks the backends agree on them)."""
    rng = np.random.default_rng(3)
    old_w = cases.lognormal_f32(rng, 8, 32)
    new_w = old_w * rng.lognormal(0, 0.3, old_w.shape).astype(np.float32)
    config = (48, 8, 4, 8)
    old = eplb.rebalance_experts(old_w, *config).phy2log
    got = eplb.rebalance_experts(new_w, *config, previous=old, balance_tolerance=0.01).phy2log
    fresh, _, logcnt = place(new_w, *config, hierarchical=True, xp=np)
    without, _ = stabilize(new_w, fresh, logcnt, old, 8, 4, 8, tolerance=0.01, max_moves=None, xp=np)
    assert oracle.moves(old, got, 8).sum() < oracle.moves(old, without, 8).sum()


def test_sum_in_pairs_against_python():
    """``(x0 + x1) + (x2 + x3)`` level by level in float32, an odd one out joining the next level last; lengths
    1 to 9, signed zeros and values whose order of summation shows."""
    from eplb.algorithms.packing import sum_in_pairs

    rng = np.random.default_rng(4)
    for n in range(1, 10):
        x = (rng.lognormal(0, 8, (5, n)) * rng.choice([-1, 1], (5, n))).astype(np.float32)
        x[0] = -0.0
        got = sum_in_pairs(x, xp=np)
        for row, value in zip(x.tolist(), got.tolist(), strict=True):
            level = [np.float32(v) for v in row]
            while len(level) > 1:
                pairs = [np.float32(level[k] + level[k + 1]) for k in range(0, len(level) - 1, 2)]
                level = pairs + level[len(level) // 2 * 2 :]
            assert np.float32(value).tobytes() == level[0].tobytes()


def test_iota_is_an_arange_and_cached_on_cuda():
    """``_xp.iota``: ``arange`` everywhere; on a CUDA device one tensor per (n, dtype, device), reused."""
    from eplb import _xp

    assert np.array_equal(_xp.iota(5, dtype=np.int64, device=None, xp=np), np.arange(5))
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xpt

    cpu = _xp.iota(4, dtype=torch.int32, device=torch.device("cpu"), xp=xpt)
    assert cpu.dtype == torch.int32 and cpu.tolist() == [0, 1, 2, 3]
    assert _xp.iota(4, dtype=torch.int32, device=torch.device("cpu"), xp=xpt) is not cpu  # fresh on the CPU
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        first = _xp.iota(7, dtype=torch.int64, device=cuda, xp=xpt)
        assert first.tolist() == list(range(7)) and first.device.type == "cuda"
        assert _xp.iota(7, dtype=torch.int64, device=cuda, xp=xpt) is first
        assert _xp.iota(7, dtype=torch.int32, device=cuda, xp=xpt).dtype == torch.int32


def test_covers_groups_against_sets():
    """``covers_groups``: every expert has a slot and each group's slots lie on one node (plain Python sets);
    placements that keep groups on nodes, ones that do not, failed GPUs' ``-1`` slots, an expert with none."""
    from eplb.algorithms.hierarchy import covers_groups
    from eplb.algorithms.relabel import replica_counts

    rng = np.random.default_rng(9)
    for config in CONFIGS:
        num_phy, num_groups, num_nodes, num_gpus = config
        hier = eplb.rebalance_experts(cases.lognormal_f32(rng, 4, 16), *config).phy2log
        flat = eplb.rebalance_experts(cases.lognormal_f32(rng, 4, 16), num_phy, 1, 1, num_gpus).phy2log
        holes = hier.copy()
        holes[:, : num_phy // num_gpus] = -1
        for phy2log in (hier, flat, holes):
            got = covers_groups(phy2log, replica_counts(phy2log, 16, xp=np), num_groups, num_nodes, xp=np)
            per_node, size = num_phy // num_nodes, 16 // num_groups
            for layer, row in enumerate(phy2log.tolist()):
                every = set(range(16)) <= set(row)
                nodes_of = [
                    {j // per_node for j, e in enumerate(row) if e >= 0 and e // size == g} for g in range(num_groups)
                ]
                assert bool(got[layer, 0]) == (every and all(len(n) <= 1 for n in nodes_of))
