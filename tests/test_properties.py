"""Property tests: any valid config and load gives a well-formed placement.

Configs are drawn from nodes, GPUs per node, slots per GPU, groups per node and
experts per group (hierarchical), or with ``num_groups % num_nodes != 0`` (the
global fallback). Loads are integers (up to 2**31 per layer) or float32, with
all-zero and all-equal rows mixed in. The numpy result is checked for its
invariants; torch ops and JAX must return the very same arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import eplb

from .conftest import Backend, make_runner


class Config(NamedTuple):
    num_experts: int
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @property
    def args(self) -> tuple[int, int, int, int]:
        return self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus

    @property
    def hierarchical(self) -> bool:
        return self.num_groups % self.num_nodes == 0


def _replicas(draw, num_experts: int, num_gpus: int) -> int:
    """A multiple of num_gpus that is >= num_experts: the fewest slots per GPU, or up to 2 more."""
    min_slots = -(-num_experts // num_gpus)
    return num_gpus * draw(st.integers(min_slots, min_slots + 2))


@st.composite
def hierarchical_configs(draw) -> Config:
    num_nodes = draw(st.integers(1, 4))
    num_groups = num_nodes * draw(st.integers(1, 3))
    num_experts = num_groups * draw(st.integers(1, 4))
    num_gpus = num_nodes * draw(st.integers(1, 4))
    return Config(num_experts, _replicas(draw, num_experts, num_gpus), num_groups, num_nodes, num_gpus)


@st.composite
def global_configs(draw) -> Config:
    """num_groups % num_nodes != 0, so the global policy runs; E need not divide into groups."""
    num_nodes = draw(st.integers(2, 4))
    num_groups = num_nodes * draw(st.integers(0, 2)) + draw(st.integers(1, num_nodes - 1))
    num_experts = draw(st.integers(1, 40))
    num_gpus = num_nodes * draw(st.integers(1, 4))
    return Config(num_experts, _replicas(draw, num_experts, num_gpus), num_groups, num_nodes, num_gpus)


configs = st.one_of(hierarchical_configs(), global_configs())


@st.composite
def loads(draw, num_layers: int, num_experts: int, kind: str | None = None) -> np.ndarray:
    """[L, E] loads: int64 (per-layer total <= 2**31) or float32; some rows all zero or all equal."""
    kind = kind or draw(st.sampled_from(["int", "float"]))
    if kind == "int":
        top = draw(st.sampled_from([1, 3, 1000, 2**31 // num_experts]))
        elements = st.integers(0, top)
        dtype = np.int64
    else:
        top = float(np.float32(draw(st.sampled_from([1.0, 1e6, 1e30]))))
        elements = st.floats(0, top, width=32, allow_nan=False, allow_infinity=False)
        dtype = np.float32
    weight = draw(hnp.arrays(dtype, (num_layers, num_experts), elements=elements))
    row_kinds = draw(st.lists(st.sampled_from(["random", "zeros", "equal"]), min_size=num_layers, max_size=num_layers))
    for layer, row_kind in enumerate(row_kinds):
        if row_kind == "zeros":
            weight[layer] = 0
        elif row_kind == "equal":
            weight[layer] = weight[layer, 0]
    return weight


@st.composite
def problems(draw, config_strategy=configs) -> tuple[Config, np.ndarray]:
    config = draw(config_strategy)
    return config, draw(loads(draw(st.integers(1, 3)), config.num_experts))


def check_placement(config: Config, num_layers: int, placement) -> None:
    """Every invariant of a placement, on numpy arrays."""
    phy2log, log2phy, logcnt = placement
    e, r = config.num_experts, config.num_replicas
    assert phy2log.shape == (num_layers, r)
    assert log2phy.shape == (num_layers, e, r - e + 1)
    assert logcnt.shape == (num_layers, e)
    assert (logcnt >= 1).all(), "an expert has no replica"
    assert (logcnt.sum(axis=1) == r).all()
    assert ((phy2log >= 0) & (phy2log < e)).all()
    for layer in range(num_layers):
        np.testing.assert_array_equal(np.bincount(phy2log[layer], minlength=e), logcnt[layer])
        for expert in range(e):
            count = logcnt[layer, expert]
            slots = log2phy[layer, expert]
            assert sorted(slots[:count]) == np.flatnonzero(phy2log[layer] == expert).tolist()
            assert (slots[count:] == -1).all()
    if config.hierarchical:
        check_groups_on_one_node(config, phy2log)


def check_groups_on_one_node(config: Config, phy2log: np.ndarray) -> None:
    """Each group's replicas sit on one node; each node hosts num_groups/N whole groups."""
    slots_per_node = config.num_replicas // config.num_nodes
    group_size = config.num_experts // config.num_groups
    node_of_slot = np.arange(config.num_replicas) // slots_per_node
    for row in phy2log:
        group_of_slot = row // group_size
        for group in range(config.num_groups):
            assert len(set(node_of_slot[group_of_slot == group])) == 1, f"group {group} spans nodes"
        for node in range(config.num_nodes):
            experts = set(row[node_of_slot == node].tolist())
            groups = {x // group_size for x in experts}
            assert len(groups) == config.num_groups // config.num_nodes
            assert len(experts) == len(groups) * group_size, f"node {node} holds a partial group"


def as_numpy(placement) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(a) for a in placement)


# ---------------------------------------------------------------- numpy invariants


@settings(max_examples=400, deadline=None)
@given(problem=problems())
def test_placement_invariants(problem):
    """Shapes, >= 1 replica each, counts sum to R and match phy2log, log2phy inverts phy2log, groups stay on a node."""
    config, weight = problem
    check_placement(config, len(weight), as_numpy(eplb.rebalance_experts(weight, *config.args)))


@settings(max_examples=150, deadline=None)
@given(problem=problems(hierarchical_configs()))
def test_hierarchical_config_runs_hierarchical(problem):
    """Drawn hierarchical configs keep groups on one node even with hierarchical=True forced."""
    config, weight = problem
    placement = as_numpy(eplb.rebalance_experts(weight, *config.args, hierarchical=True))
    check_placement(config, len(weight), placement)
    np.testing.assert_array_equal(placement[0], eplb.rebalance_experts(weight, *config.args).phy2log)


@settings(max_examples=250, deadline=None)
@given(
    batch=st.integers(1, 3),
    num_packs=st.integers(1, 6),
    per_pack=st.integers(1, 6),
    data=st.data(),
)
def test_balanced_packing_invariants(batch, num_packs, per_pack, data):
    """Each pack gets exactly n/m items, and rank_in_pack is a permutation of 0..n/m-1 inside each pack."""
    weight = data.draw(loads(batch, num_packs * per_pack))
    pack_index, rank_in_pack = as_numpy(eplb.balanced_packing(weight, num_packs))
    assert pack_index.shape == rank_in_pack.shape == weight.shape
    for row in range(batch):
        np.testing.assert_array_equal(np.bincount(pack_index[row], minlength=num_packs), [per_pack] * num_packs)
        for pack in range(num_packs):
            assert sorted(rank_in_pack[row][pack_index[row] == pack]) == list(range(per_pack))


@settings(max_examples=250, deadline=None)
@given(num_experts=st.integers(1, 24), extra=st.integers(0, 24), data=st.data())
def test_replicate_experts_invariants(num_experts, extra, data):
    """Slots 0..E-1 hold experts 0..E-1; counts are >= 1, sum to num_phy and match phy2log and phyrank."""
    num_phy = num_experts + extra
    weight = data.draw(loads(2, num_experts))
    phy2log, phyrank, logcnt = as_numpy(eplb.replicate_experts(weight, num_phy))
    assert phy2log.shape == phyrank.shape == (2, num_phy)
    for row in range(2):
        np.testing.assert_array_equal(phy2log[row, :num_experts], np.arange(num_experts))
        np.testing.assert_array_equal(np.bincount(phy2log[row], minlength=num_experts), logcnt[row])
        for expert in range(num_experts):
            assert sorted(phyrank[row][phy2log[row] == expert]) == list(range(logcnt[row, expert]))


# ---------------------------------------------------------------- backends agree


def assert_same(got, expected) -> None:
    for name, g, e in zip(("phy2log", "log2phy", "logcnt"), got, expected, strict=True):
        np.testing.assert_array_equal(g, e, err_msg=name)


@settings(max_examples=150, deadline=None)
@given(problem=problems())
def test_torch_ops_match_numpy(problem):
    """Forced torch ops on the CPU (the CUDA code path) return numpy's arrays exactly."""
    pytest.importorskip("torch")
    config, weight = problem
    expected = as_numpy(eplb.rebalance_experts(weight, *config.args))
    assert_same(make_runner(Backend.TORCH_OPS).rebalance_np(weight, *config.args), expected)


# Few fixed shapes for JAX: every new (shape, dtype, config) compiles (~2 s).
JAX_CONFIGS = [Config(12, 16, 4, 2, 8), Config(10, 12, 3, 2, 4)]
JAX_LAYERS = 4


@settings(max_examples=24, deadline=None)
@given(config=st.sampled_from(JAX_CONFIGS), kind=st.sampled_from(["int", "float"]), data=st.data())
def test_jax_matches_numpy(config, kind, data):
    """JAX on the CPU (the XLA path, and the default) returns numpy's arrays exactly, for int32 and float32 loads."""
    pytest.importorskip("jax")
    weight = data.draw(loads(JAX_LAYERS, config.num_experts, kind))
    expected = as_numpy(eplb.rebalance_experts(weight, *config.args))
    assert_same(make_runner(Backend.JAX_XLA).rebalance_np(weight, *config.args), expected)
    assert_same(make_runner(Backend.JAX).rebalance_np(weight, *config.args), expected)
