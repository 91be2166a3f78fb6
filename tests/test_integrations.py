"""The serving-stack adapters: vLLM's and SGLang's EPLB interfaces, backed by eplb (torch CPU).

vLLM and SGLang are not installed: the tests check the interface contracts
(argument order, return order, shapes, dtypes, device, ``-1`` padding, the
old placement), compare with :func:`eplb.rebalance_experts` and the oracle,
and exercise ``register()`` against stand-in module trees in ``sys.modules``
shaped like the stacks' (``vllm.distributed.eplb.policy``,
``sglang.srt.eplb.eplb_algorithms``).
"""

from __future__ import annotations

import abc
import enum
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import eplb
from tests import oracle

torch = pytest.importorskip("torch")

from eplb.integrations import sglang as eplb_sglang  # noqa: E402
from eplb.integrations import vllm as eplb_vllm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
GOLDEN_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
CONFIG = (16, 4, 2, 8)  # replicas, groups, nodes, GPUs


def _loads(seed: int, layers: int = 4, experts: int = 12) -> torch.Tensor:
    """Integer loads without ties (so every implementation of the published greedy policy agrees)."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.arange(1, experts + 1)) * 97 + rng.integers(0, 50, experts) for _ in range(layers)]
    return torch.as_tensor(np.array(rows, dtype=np.int64))


def _vllm_initial_map(layers: int, experts: int, replicas: int) -> torch.Tensor:
    """vLLM's first placement: experts in order, then the redundant slots ``i % E``."""
    row = list(range(experts)) + [i % experts for i in range(replicas - experts)]
    return torch.tensor([row] * layers)


def _check_log2phy(phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
    """``log2phy[l, e, :logcnt]`` lists exactly the slots of ``e``; the rest is ``-1``."""
    layers, experts, _ = log2phy.shape
    for layer in range(layers):
        for expert in range(experts):
            count = int(logcnt[layer, expert])
            slots = log2phy[layer, expert, :count].tolist()
            assert sorted(slots) == [j for j, e in enumerate(phy2log[layer].tolist()) if e == expert]
            assert (log2phy[layer, expert, count:] == -1).all()
    assert int(logcnt.sum(dim=1).min()) == int(logcnt.sum(dim=1).max()) == phy2log.shape[1]


# ---------------------------------------------------------------- vLLM: the current contract (phy2log only)


def test_vllm_golden_example():
    """The published example through vLLM's signature: phy2log only, int64, on the CPU."""
    out = eplb_vllm.rebalance_experts(torch.tensor(GOLDEN), *CONFIG)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.int64 and out.device.type == "cpu"
    assert out.tolist() == GOLDEN_PHY2LOG
    assert eplb_vllm.EplbPolicy.rebalance_experts(torch.tensor(GOLDEN), *CONFIG).tolist() == GOLDEN_PHY2LOG


def test_vllm_call_as_vllm_makes_it():
    """Six positional arguments as eplb_state.rearrange passes them; the old map becomes previous=."""
    window = torch.as_tensor(np.random.default_rng(3).integers(0, 500, (5, 4, 12)), dtype=torch.int32)
    load = window.sum(dim=0)  # vLLM sums its int32 window: int64
    old = _vllm_initial_map(4, 12, 16)
    out = eplb_vllm.EplbPolicy.rebalance_experts(load.cpu(), 16, 4, 2, 8, old.cpu())
    assert out.shape == (4, 16) and out.dtype == torch.int64 and out.device.type == "cpu"
    expected = eplb.rebalance_experts(load, 16, 4, 2, 8, previous=old).phy2log
    assert torch.equal(out, expected)


def test_vllm_old_placement_is_previous():
    """The same load with the placement it produced moves nothing; keep_in_place=False plans afresh."""
    load = _loads(1)
    first = eplb_vllm.rebalance_experts(load, *CONFIG)
    assert torch.equal(eplb_vllm.rebalance_experts(load, *CONFIG, first), first)
    shifted = torch.roll(first, 8, dims=1)  # the same placement with its two nodes swapped
    assert torch.equal(eplb_vllm.rebalance_experts(load, *CONFIG, shifted), shifted)
    fresh = eplb_vllm.rebalance_experts(load, *CONFIG, shifted, keep_in_place=False)
    assert torch.equal(fresh, first)


@pytest.mark.parametrize(
    "old",
    [
        _vllm_initial_map(4, 12, 24),  # another GPU count (elastic EP): another width
        torch.full((4, 16), -1),  # unmapped slots
        torch.zeros(3, 16, dtype=torch.int64),  # another layer count
        torch.zeros(4, 16, dtype=torch.float32),  # not ids
    ],
    ids=["width", "unmapped", "layers", "float"],
)
def test_vllm_unusable_old_placement_is_ignored(old):
    """An old map that is not a placement of this call is ignored, knobs included (no error in the stack)."""
    load = _loads(2)
    plain = eplb.rebalance_experts(load, *CONFIG).phy2log
    assert torch.equal(eplb_vllm.rebalance_experts(load, *CONFIG, old), plain)
    out = eplb_vllm.rebalance_experts(load, *CONFIG, old, balance_tolerance=0.1, max_moves=3)
    assert torch.equal(out, plain)
    assert torch.equal(eplb_vllm.rebalance_experts(load, *CONFIG, None, balance_tolerance=0.1), plain)


def test_vllm_knobs_with_previous():
    """balance_tolerance / max_moves reach eplb with the old placement."""
    load, old = _loads(4), eplb.rebalance_experts(_loads(5), *CONFIG).phy2log
    for knobs in ({"balance_tolerance": 0.05}, {"max_moves": 2}, {"policy": "refined", "balance_tolerance": 0.0}):
        out = eplb_vllm.rebalance_experts(load, *CONFIG, old, **knobs)
        assert torch.equal(out, eplb.rebalance_experts(load, *CONFIG, previous=old, **knobs).phy2log), knobs


def test_vllm_max_moves_left_out_for_a_non_placement():
    """vLLM's initial linear map splits groups over nodes: max_moves is left out with a warning."""
    load, old = _loads(6), _vllm_initial_map(4, 12, 16)
    with pytest.warns(RuntimeWarning, match="max_moves=1 left out"):
        out = eplb_vllm.rebalance_experts(load, *CONFIG, old, max_moves=1, balance_tolerance=0.02)
    expected = eplb.rebalance_experts(load, *CONFIG, previous=old, balance_tolerance=0.02).phy2log
    assert torch.equal(out, expected)


@pytest.mark.parametrize("groups", [0, None, -1])
def test_vllm_no_groups_means_one_group(groups):
    load = _loads(7)
    expected = eplb.rebalance_experts(load, 16, 1, 2, 8).phy2log
    assert torch.equal(eplb_vllm.rebalance_experts(load, 16, groups, 2, 8), expected)


def test_vllm_matches_oracle_and_global_fallback():
    """Hierarchical (groups % nodes == 0) and global (3 groups, 2 nodes) policies as the published algorithm."""
    load = _loads(8)
    for config in [(16, 4, 2, 8), (24, 3, 2, 4), (12, 4, 1, 12)]:
        phy2log, _, _ = oracle.rebalance(load.numpy(), *config)
        assert eplb_vllm.rebalance_experts(load, *config).tolist() == phy2log.tolist(), config


def test_vllm_accepts_numpy_and_floats():
    out = eplb_vllm.rebalance_experts(np.array(GOLDEN, dtype=np.float32), *CONFIG)
    assert isinstance(out, torch.Tensor) and out.tolist() == GOLDEN_PHY2LOG


# ---------------------------------------------------------------- vLLM: the tuple contract (0.10 to 0.18)


def test_vllm_tuple_contract():
    """(phy2log, log2phy, logcnt): int64, log2phy [L, E, R - E + 1] padded with -1, on the weight's device."""
    load = _loads(9)
    phy2log, log2phy, logcnt = eplb_vllm.rebalance_experts_tuple(load, *CONFIG)
    assert phy2log.shape == (4, 16) and log2phy.shape == (4, 12, 16 - 12 + 1) and logcnt.shape == (4, 12)
    for out in (phy2log, log2phy, logcnt):
        assert out.dtype == torch.int64 and out.device == load.device
    _check_log2phy(phy2log, log2phy, logcnt)
    for got, expected in zip((phy2log, log2phy, logcnt), oracle.rebalance(load.numpy(), *CONFIG), strict=True):
        assert got.tolist() == expected.tolist()
    golden = eplb_vllm.EplbTuplePolicy.rebalance_experts(torch.tensor(GOLDEN), *CONFIG)
    assert golden[0].tolist() == GOLDEN_PHY2LOG
    expected = eplb.rebalance_experts(torch.tensor(GOLDEN), *CONFIG)
    assert all(torch.equal(g, e) for g, e in zip(golden, expected, strict=True))


def test_vllm_tuple_with_old_placement():
    load, old = _loads(10), eplb.rebalance_experts(_loads(11), *CONFIG).phy2log
    got = eplb_vllm.rebalance_experts_tuple(load, *CONFIG, old)
    expected = eplb.rebalance_experts(load, *CONFIG, previous=old)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    _check_log2phy(*got)


# ---------------------------------------------------------------- vLLM: options, degenerate inputs


def test_vllm_configure():
    refined = eplb_vllm.EplbPolicy.configure(policy="refined")
    assert issubclass(refined, eplb_vllm.EplbPolicy) and refined.options == {"policy": "refined"}
    assert eplb_vllm.EplbPolicy.options == {}
    load = _loads(12)
    expected = eplb.rebalance_experts(load, *CONFIG, policy="refined").phy2log
    assert torch.equal(refined.rebalance_experts(load, *CONFIG), expected)
    stacked = refined.configure(keep_in_place=False)
    assert stacked.options == {"policy": "refined", "keep_in_place": False}
    with pytest.raises(TypeError, match="unknown option"):
        eplb_vllm.EplbPolicy.configure(polcy="refined")
    with pytest.raises(ValueError, match="policy='best'"):
        eplb_vllm.EplbPolicy.configure(policy="best")


@pytest.mark.parametrize("adapter", ["vllm", "vllm_tuple", "sglang"])
def test_degenerate_inputs(adapter):
    """One slot per GPU and no redundancy (a permutation), and an all-zero layer, through each adapter."""
    loads = torch.tensor([[0] * 8, [5, 1, 7, 3, 0, 2, 9, 4]])

    def run(weight, replicas, groups, nodes, gpus):
        if adapter == "vllm":
            return eplb_vllm.rebalance_experts(weight, replicas, groups, nodes, gpus)
        if adapter == "vllm_tuple":
            return eplb_vllm.rebalance_experts_tuple(weight, replicas, groups, nodes, gpus)[0]
        return eplb_sglang.rebalance_experts(weight[None], replicas, replicas // gpus, groups, nodes, "auto")[0]

    one_per_gpu = run(loads, 8, 4, 2, 8)
    assert all(sorted(row) == list(range(8)) for row in one_per_gpu.tolist())
    assert one_per_gpu.tolist() == eplb.rebalance_experts(loads, 8, 4, 2, 8).phy2log.tolist()
    redundant = run(loads, 16, 4, 2, 8)
    assert redundant.tolist() == eplb.rebalance_experts(loads, 16, 4, 2, 8).phy2log.tolist()
    assert all(set(row) == set(range(8)) for row in redundant.tolist())


# ---------------------------------------------------------------- vLLM: register() against stand-in vLLM trees


def _fake_modules(monkeypatch, names: dict[str, dict]) -> dict[str, types.ModuleType]:
    """Install stand-in modules (packages where they have children) into sys.modules."""
    modules = {}
    for name, attrs in names.items():
        module = types.ModuleType(name)
        if any(other.startswith(name + ".") for other in names):
            module.__path__ = []  # a package
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
        modules[name] = module
    return modules


def _fake_vllm(monkeypatch, returns_tuple: bool, as_string: bool = False, registry_in_state_only: bool = False):
    """vLLM's policy package; the abstract method's return annotation says which contract (as vLLM's does)."""
    result = tuple[torch.Tensor, torch.Tensor, torch.Tensor] if returns_tuple else torch.Tensor
    if as_string:  # as under `from __future__ import annotations`
        result = "tuple[torch.Tensor, torch.Tensor, torch.Tensor]" if returns_tuple else "torch.Tensor"

    class AbstractEplbPolicy(abc.ABC):
        @classmethod
        @abc.abstractmethod
        def rebalance_experts(cls, weight, num_replicas, num_groups, num_nodes, num_ranks):
            raise NotImplementedError

    AbstractEplbPolicy.rebalance_experts.__func__.__annotations__["return"] = result

    class DefaultEplbPolicy(AbstractEplbPolicy):
        @classmethod
        def rebalance_experts(cls, *args):
            raise AssertionError("vLLM's own policy should not run")

    registry = {"default": DefaultEplbPolicy}
    policy_package = {"AbstractEplbPolicy": AbstractEplbPolicy}
    if not registry_in_state_only:
        policy_package["EPLB_POLICIES"] = registry
    return _fake_modules(
        monkeypatch,
        {
            "vllm": {},
            "vllm.distributed": {},
            "vllm.distributed.eplb": {},
            "vllm.distributed.eplb.policy": policy_package,
            "vllm.distributed.eplb.eplb_state": {"EPLB_POLICIES": registry},
        },
    )


@pytest.mark.parametrize("as_string", [False, True], ids=["annotation", "string_annotation"])
def test_vllm_register_current(monkeypatch, as_string):
    modules = _fake_vllm(monkeypatch, returns_tuple=False, as_string=as_string)
    policy = eplb_vllm.register()
    registry = modules["vllm.distributed.eplb.policy"].EPLB_POLICIES
    assert registry["default"] is policy
    assert modules["vllm.distributed.eplb.eplb_state"].EPLB_POLICIES["default"] is policy
    assert issubclass(policy, modules["vllm.distributed.eplb.policy"].AbstractEplbPolicy)
    assert issubclass(policy, eplb_vllm.EplbPolicy) and not issubclass(policy, eplb_vllm.EplbTuplePolicy)
    # What eplb_state does: EPLB_POLICIES[config.policy].rebalance_experts(6 positional arguments).
    out = registry["default"].rebalance_experts(torch.tensor(GOLDEN), *CONFIG, _vllm_initial_map(2, 12, 16))
    assert out.device.type == "cpu" and out.dtype == torch.int64 and out.shape == (2, 16)
    refined = eplb_vllm.register("default", policy="refined", balance_tolerance=0.01)
    assert registry["default"] is refined and refined.options == {"policy": "refined", "balance_tolerance": 0.01}


@pytest.mark.parametrize("as_string", [False, True], ids=["annotation", "string_annotation"])
def test_vllm_register_tuple_contract(monkeypatch, as_string):
    modules = _fake_vllm(monkeypatch, returns_tuple=True, as_string=as_string)
    policy = eplb_vllm.register()
    assert issubclass(policy, eplb_vllm.EplbTuplePolicy)
    assert modules["vllm.distributed.eplb.policy"].EPLB_POLICIES["default"] is policy
    phy2log, log2phy, logcnt = policy.rebalance_experts(torch.tensor(GOLDEN), *CONFIG)
    assert phy2log.tolist() == GOLDEN_PHY2LOG and log2phy.shape == (2, 12, 5)
    _check_log2phy(phy2log, log2phy, logcnt)
    assert issubclass(eplb_vllm.register(tuple_contract=False), eplb_vllm.EplbPolicy)


def test_vllm_register_finds_the_registry_in_eplb_state(monkeypatch):
    """EPLB_POLICIES only where eplb_state looks it up: registered there."""
    modules = _fake_vllm(monkeypatch, returns_tuple=False, registry_in_state_only=True)
    policy = eplb_vllm.register()
    assert modules["vllm.distributed.eplb.eplb_state"].EPLB_POLICIES["default"] is policy
    assert not hasattr(modules["vllm.distributed.eplb.policy"], "EPLB_POLICIES")


def test_vllm_register_before_the_registry(monkeypatch):
    """vLLM 0.10 to 0.12: eplb_state's module-level rebalance_experts (5 arguments, a tuple) is replaced."""

    def published(weight, num_replicas, num_groups, num_nodes, num_gpus):
        raise AssertionError("vLLM's own function should not run")

    modules = _fake_modules(
        monkeypatch,
        {
            "vllm": {},
            "vllm.distributed": {},
            "vllm.distributed.eplb": {},
            "vllm.distributed.eplb.eplb_state": {"rebalance_experts": published},
        },
    )
    installed = eplb_vllm.register(policy="greedy")
    state = modules["vllm.distributed.eplb.eplb_state"]
    assert state.rebalance_experts is installed
    phy2log, log2phy, logcnt = state.rebalance_experts(torch.tensor(GOLDEN), *CONFIG)
    assert phy2log.tolist() == GOLDEN_PHY2LOG
    _check_log2phy(phy2log, log2phy, logcnt)


def test_vllm_register_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="needs vLLM"):
        eplb_vllm.register()
    with pytest.raises(TypeError, match="unknown option"):
        eplb_vllm.register(tolerance=0.1)


def test_vllm_plugin(monkeypatch):
    modules = _fake_vllm(monkeypatch, returns_tuple=False)
    registry = modules["vllm.distributed.eplb.policy"].EPLB_POLICIES
    default = registry["default"]
    monkeypatch.delenv(eplb_vllm.PLUGIN_ENV, raising=False)
    eplb_vllm.plugin()
    assert registry["default"] is default  # installed but not asked for: vLLM unchanged
    monkeypatch.setenv(eplb_vllm.PLUGIN_ENV, "refined")
    eplb_vllm.plugin()
    assert registry["default"].options == {"policy": "refined"}


# ---------------------------------------------------------------- SGLang


class EplbAlgorithm(enum.Enum):
    """SGLang's enum (its member names are what the adapter reads)."""

    deepseek = enum.auto()
    deepseek_hierarchical = enum.auto()
    deepseek_vec = enum.auto()
    deepseek_vec_hierarchical = enum.auto()
    elasticity_aware = enum.auto()


def _sglang_call(fn, tokens, algorithm, num_groups=4, replicas=16, gpus=8, nodes=2):
    """As ExpertLocationMetadata.init_by_eplb calls it: keyword arguments."""
    return fn(
        tokens_per_expert=tokens,
        num_physical_experts=replicas,
        num_local_physical_experts=replicas // gpus,
        num_groups=num_groups,
        num_nodes=nodes,
        algorithm=algorithm,
    )


def test_sglang_golden_example():
    """[steps, layers, E] counts summed over steps; int64 CPU; log2phy as wide as the largest replica count."""
    golden = torch.tensor(GOLDEN)
    steps = torch.stack([golden // 2, golden - golden // 2])  # two steps summing to the example
    for algorithm in ("auto", EplbAlgorithm.deepseek_hierarchical, "deepseek_vec_hierarchical"):
        phy2log, log2phy, logcnt = _sglang_call(eplb_sglang.rebalance_experts, steps, algorithm)
        assert phy2log.tolist() == GOLDEN_PHY2LOG
        for out in (phy2log, log2phy, logcnt):
            assert out.dtype == torch.int64 and out.device.type == "cpu"
        assert log2phy.shape == (2, 12, int(logcnt.max())) == (2, 12, 2)
        _check_log2phy(phy2log, log2phy, logcnt)
        # SGLang's _init_raw pads log2phy to R with -1: the result is eplb's table, padded.
        padded = torch.nn.functional.pad(log2phy, (0, 16 - log2phy.shape[-1]), value=-1)
        full = eplb.rebalance_experts(golden, *CONFIG).log2phy
        assert torch.equal(padded[..., : full.shape[-1]], full) and (padded[..., full.shape[-1] :] == -1).all()


def test_sglang_algorithms_choose_the_policy():
    tokens = _loads(13)[None]
    weight = tokens[0]
    glob = eplb.rebalance_experts(weight, *CONFIG, hierarchical=False)
    hier = eplb.rebalance_experts(weight, *CONFIG, hierarchical=True)
    cases = {
        EplbAlgorithm.deepseek: glob,
        EplbAlgorithm.deepseek_vec: glob,
        EplbAlgorithm.deepseek_hierarchical: hier,
        EplbAlgorithm.deepseek_vec_hierarchical: hier,
    }
    for algorithm, expected in cases.items():
        phy2log, _, logcnt = _sglang_call(eplb_sglang.rebalance_experts, tokens, algorithm)
        assert torch.equal(phy2log, expected.phy2log) and torch.equal(logcnt, expected.logcnt), algorithm
    assert _sglang_call(eplb_sglang.rebalance_experts, tokens, EplbAlgorithm.deepseek)[0].tolist() == (
        oracle.rebalance(weight.numpy(), 16, 1, 1, 8)[0].tolist()
    )


def test_sglang_without_groups():
    """num_groups=None: auto and deepseek plan globally; a hierarchical algorithm is refused."""
    tokens = _loads(14)[None]
    expected = eplb.rebalance_experts(tokens[0], 16, 1, 1, 8).phy2log
    for algorithm in ("auto", EplbAlgorithm.deepseek):
        assert torch.equal(_sglang_call(eplb_sglang.rebalance_experts, tokens, algorithm, num_groups=None)[0], expected)
    with pytest.raises(ValueError, match="needs num_groups"):
        _sglang_call(eplb_sglang.rebalance_experts, tokens, EplbAlgorithm.deepseek_hierarchical, num_groups=None)
    with pytest.raises(NotImplementedError, match="elasticity_aware"):
        _sglang_call(eplb_sglang.rebalance_experts, tokens, EplbAlgorithm.elasticity_aware)
    with pytest.raises(ValueError, match="multiple of num_local_physical_experts"):
        eplb_sglang.rebalance_experts(tokens, 16, 3, 4, 2, "deepseek")


def test_sglang_options_and_previous():
    tokens, old = _loads(15)[None], eplb.rebalance_experts(_loads(16), *CONFIG).phy2log
    phy2log, _, _ = eplb_sglang.rebalance_experts(tokens, 16, 2, 4, 2, "auto", previous=old, balance_tolerance=0.05)
    expected = eplb.rebalance_experts(tokens[0], *CONFIG, hierarchical=True, previous=old, balance_tolerance=0.05)
    assert torch.equal(phy2log, expected.phy2log)
    refined, _, _ = eplb_sglang.rebalance_experts(tokens, 16, 2, 4, 2, "auto", policy="refined")
    assert torch.equal(refined, eplb.rebalance_experts(tokens[0], *CONFIG, policy="refined").phy2log)
    ignored, _, _ = eplb_sglang.rebalance_experts(tokens, 16, 2, 4, 2, "auto", previous=old[:, :8], max_moves=1)
    assert torch.equal(ignored, eplb.rebalance_experts(tokens[0], *CONFIG).phy2log)


def _fake_sglang(monkeypatch, current=None):
    calls = []

    def rebalance_experts(
        tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups, num_nodes, algorithm, **kw
    ):
        calls.append((algorithm, kw))
        return "sglang's own"

    metadata = types.SimpleNamespace(physical_to_logical_map_cpu=current)
    modules = _fake_modules(
        monkeypatch,
        {
            "sglang": {},
            "sglang.srt": {},
            "sglang.srt.eplb": {},
            "sglang.srt.eplb.eplb_algorithms": {"rebalance_experts": rebalance_experts, "EplbAlgorithm": EplbAlgorithm},
            "sglang.srt.eplb.expert_location": {
                "get_global_expert_location_metadata": lambda: metadata if current is not None else None
            },
        },
    )
    return modules["sglang.srt.eplb.eplb_algorithms"], rebalance_experts, calls


def test_sglang_register(monkeypatch):
    module, original, calls = _fake_sglang(monkeypatch)
    installed = eplb_sglang.register()
    assert module.rebalance_experts is installed
    tokens = torch.tensor(GOLDEN)[None]
    phy2log, log2phy, logcnt = _sglang_call(module.rebalance_experts, tokens, EplbAlgorithm.deepseek_hierarchical)
    assert phy2log.tolist() == GOLDEN_PHY2LOG and not calls
    assert log2phy.shape == (2, 12, int(logcnt.max()))
    # Algorithms eplb does not run, and arguments it does not know (a fork's), go to SGLang's function.
    assert _sglang_call(module.rebalance_experts, tokens, EplbAlgorithm.elasticity_aware) == "sglang's own"
    assert module.rebalance_experts(tokens, 16, 2, 4, 2, EplbAlgorithm.deepseek, broken_ranks=None) == "sglang's own"
    assert [c[0] for c in calls] == [EplbAlgorithm.elasticity_aware, EplbAlgorithm.deepseek]
    again = eplb_sglang.register(policy="refined")  # re-registering wraps SGLang's function, not ours
    assert again.__eplb_original__ is original
    refined = _sglang_call(module.rebalance_experts, tokens, "auto")[0]
    assert torch.equal(refined, eplb.rebalance_experts(tokens[0], *CONFIG, policy="refined").phy2log)
    with pytest.raises(TypeError, match="eplb-algorithm"):
        eplb_sglang.register(hierarchical=True)


def test_sglang_register_keep_in_place(monkeypatch):
    """keep_in_place=True passes SGLang's current placement as previous=: an unchanged load moves nothing."""
    tokens = _loads(17)[None]
    current = torch.roll(eplb.rebalance_experts(tokens[0], *CONFIG).phy2log, 8, dims=1)
    module, _, _ = _fake_sglang(monkeypatch, current=current)
    eplb_sglang.register(keep_in_place=True)
    assert torch.equal(_sglang_call(module.rebalance_experts, tokens, "auto")[0], current)
    eplb_sglang.register()  # SGLang's behaviour: a fresh placement
    assert not torch.equal(_sglang_call(module.rebalance_experts, tokens, "auto")[0], current)


def test_sglang_register_without_sglang(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError, match="needs SGLang"):
        eplb_sglang.register()


# ---------------------------------------------------------------- imports


def test_adapters_import_no_framework():
    """Importing the adapters loads neither torch nor the stacks; ``import eplb`` does not load them."""
    code = (
        "import sys, eplb; assert 'eplb.integrations' not in sys.modules; "
        "import eplb.integrations.vllm, eplb.integrations.sglang; "
        "print(sorted(m for m in ('torch', 'jax', 'vllm', 'sglang') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_no_warning_on_plain_calls():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eplb_vllm.rebalance_experts(torch.tensor(GOLDEN), *CONFIG, _vllm_initial_map(2, 12, 16))
        eplb_sglang.rebalance_experts(torch.tensor(GOLDEN)[None], 16, 2, 4, 2, "auto")


def test_sglang_plugin(monkeypatch):
    module, original, _ = _fake_sglang(monkeypatch)
    monkeypatch.delenv(eplb_sglang.PLUGIN_ENV, raising=False)
    eplb_sglang.plugin()
    assert module.rebalance_experts is original  # installed but not asked for: SGLang unchanged
    monkeypatch.setenv(eplb_sglang.PLUGIN_ENV, "greedy")
    eplb_sglang.plugin()
    assert module.rebalance_experts.__eplb_original__ is original
    phy2log = _sglang_call(module.rebalance_experts, torch.tensor(GOLDEN)[None], "auto")[0]
    assert phy2log.tolist() == GOLDEN_PHY2LOG
