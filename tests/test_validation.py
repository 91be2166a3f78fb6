"""Bad inputs raise the documented exception type, with a message naming the argument.

Rules from ``eplb/_validate.py`` and DESIGN.md "Policy choice and validation".
Dtype and value rules run on each CPU backend where the dtype exists. Value
rules skip ``jax:jit``: the loads of a JAX tracer cannot be read (documented).
The last section checks that valid edge inputs do not raise.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import eplb

from .conftest import CPU_BACKENDS, Backend, backend_params, make_runner

# A valid call: 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs (the golden example).
GOLDEN = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
CONFIG = (16, 4, 2, 8)
COUNT_NAMES = ("num_replicas", "num_groups", "num_nodes", "num_gpus")

# Backends whose loads are concrete, so values can be checked.
VALUE_BACKENDS = backend_params([Backend.NUMPY, Backend.TORCH, Backend.TORCH_OPS, Backend.JAX])
# Backends that exist for a dtype test: one per framework.
FRAMEWORKS = backend_params([Backend.NUMPY, Backend.TORCH, Backend.JAX])


def _call(runner, weight, config=CONFIG, **kwargs):
    """Run ``runner`` on numpy ``weight`` converted to its backend."""
    return runner.rebalance(runner.asarray(np.asarray(weight)), *config, **kwargs)


def _counts(**override):
    """CONFIG as a dict of counts with some replaced."""
    counts = dict(zip(COUNT_NAMES, CONFIG, strict=True))
    counts.update(override)
    return counts


def _assert_valid(placement, num_layers, num_experts, num_replicas):
    """Shapes are right and every layer's replica counts are >= 1 and sum to R."""
    phy2log, log2phy, logcnt = (np.asarray(a) for a in placement)
    assert phy2log.shape == (num_layers, num_replicas)
    assert log2phy.shape == (num_layers, num_experts, num_replicas - num_experts + 1)
    assert logcnt.shape == (num_layers, num_experts)
    assert (logcnt >= 1).all()
    assert (logcnt.sum(axis=1) == num_replicas).all()
    for layer in range(num_layers):
        np.testing.assert_array_equal(np.bincount(phy2log[layer], minlength=num_experts), logcnt[layer])


# ---------------------------------------------------------------- weight shape


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
@pytest.mark.parametrize("shape", [(12,), (1, 2, 12), ()], ids=["1-D", "3-D", "0-D"])
def test_weight_not_2d(backend, shape):
    """A load that is not [layers, experts] is a ValueError naming weight and its shape."""
    runner = make_runner(backend)
    with pytest.raises(ValueError, match=r"weight must be 2-D.*" + re.escape(str(shape))):
        _call(runner, np.ones(shape, dtype=np.float32))


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
@pytest.mark.parametrize("shape", [(0, 12), (2, 0)], ids=["no-layers", "no-experts"])
def test_weight_empty(backend, shape):
    """Zero layers or zero experts is a ValueError naming weight."""
    runner = make_runner(backend)
    with pytest.raises(ValueError, match=r"weight must not be empty"):
        _call(runner, np.zeros(shape, dtype=np.float32))


# ---------------------------------------------------------------- weight dtype


@pytest.mark.parametrize(
    "weight",
    [
        np.array([["a", "b"]]),
        np.array([[1, 2]], dtype=object),
        [["a", "b"]],
        [[1, None]],
        np.array([[1, 2]], dtype="datetime64[s]"),
    ],
    ids=["str", "object", "list-of-str", "list-with-None", "datetime"],
)
def test_weight_not_numeric(weight):
    """Strings, objects and other non-numbers are a TypeError naming weight (numpy and lists)."""
    with pytest.raises(TypeError, match=r"weight must"):
        eplb.rebalance_experts(weight, *CONFIG)


def test_weight_unknown_type():
    """An object that is no array at all is a TypeError naming weight."""
    with pytest.raises(TypeError, match=r"weight must be a numpy array"):
        eplb.rebalance_experts({"experts": 12}, *CONFIG)


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_weight_bool(backend):
    """Boolean loads are a TypeError naming weight, on every framework."""
    runner = make_runner(backend)
    with pytest.raises(TypeError, match=r"weight must hold numbers.*bool"):
        _call(runner, np.ones((2, 12), dtype=bool))


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_weight_complex(backend):
    """Complex loads are a TypeError naming weight, on every framework."""
    runner = make_runner(backend)
    with pytest.raises(TypeError, match=r"weight must be real.*complex"):
        _call(runner, np.ones((2, 12), dtype=np.complex64))


def test_weight_torch_float8_named():
    """float8 torch loads are accepted and planned as their float32 values."""
    torch = pytest.importorskip("torch")
    weight = torch.tensor(GOLDEN, dtype=torch.float32).to(torch.float8_e4m3fn)
    got = eplb.rebalance_experts(weight, *CONFIG)
    want = eplb.rebalance_experts(weight.float(), *CONFIG)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_weight_ragged_list_named():
    """A ragged nested list is rejected with an error naming weight."""
    with pytest.raises(ValueError, match=r"weight"):
        eplb.rebalance_experts([[1, 2, 3, 4], [1, 2]], 4, 1, 1, 1)


# ---------------------------------------------------------------- weight values


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (-1.0, r"weight must be non-negative"),
        (np.nan, r"weight must not contain NaN"),
        (np.inf, r"weight must be finite"),
    ],
    ids=["negative", "nan", "inf"],
)
def test_weight_bad_float_value(backend, bad, message):
    """A negative, NaN or +inf load is a ValueError naming weight."""
    weight = np.array(GOLDEN, dtype=np.float32)
    weight[1, 5] = bad
    with pytest.raises(ValueError, match=message):
        _call(make_runner(backend), weight)


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_weight_negative_int(backend):
    """A negative integer load is a ValueError naming weight."""
    weight = np.array(GOLDEN, dtype=np.int32)
    weight[0, 0] = -3
    with pytest.raises(ValueError, match=r"weight must be non-negative"):
        _call(make_runner(backend), weight)


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
def test_weight_layer_sum_overflows_float32(backend):
    """Finite float32 loads whose layer total exceeds float32 max are a ValueError naming weight."""
    weight = np.ones((2, 12), dtype=np.float32)
    weight[1, :2] = 3e38
    with pytest.raises(ValueError, match=r"weight per layer must sum to at most float32 max"):
        _call(make_runner(backend), weight)


@pytest.mark.parametrize("backend", backend_params([Backend.NUMPY, Backend.TORCH]))
def test_weight_float64_beyond_float32(backend):
    """A float64 load above float32 max is a ValueError naming weight (JAX holds no float64)."""
    weight = np.ones((1, 12))
    weight[0, 3] = 1e39
    with pytest.raises(ValueError, match=r"weight per layer must sum"):
        _call(make_runner(backend), weight)


@pytest.mark.parametrize("backend", FRAMEWORKS)
def test_check_values_false_skips_value_check(backend):
    """check_values=False accepts a negative load that the default rejects."""
    weight = np.array(GOLDEN, dtype=np.float32)
    weight[0, 4] = -5.0
    runner = make_runner(backend)
    with pytest.raises(ValueError, match="weight"):
        _call(runner, weight)
    placement = eplb.rebalance_experts(runner.asarray(weight), *CONFIG, check_values=False)
    _assert_valid(placement, 2, 12, 16)


def test_check_values_false_keeps_dtype_check():
    """check_values=False skips only the value check: a bool load is still a TypeError."""
    with pytest.raises(TypeError, match=r"weight"):
        eplb.rebalance_experts(np.ones((2, 12), dtype=bool), *CONFIG, check_values=False)


# ---------------------------------------------------------------- sizes


def test_fewer_replicas_than_experts():
    """num_replicas < experts is a ValueError naming num_replicas and the expert count."""
    with pytest.raises(ValueError, match=r"num_replicas=8 must be >= the number of experts 12"):
        eplb.rebalance_experts(GOLDEN, 8, 4, 2, 8)


def test_replicas_not_multiple_of_gpus():
    """num_replicas % num_gpus != 0 is a ValueError naming both."""
    with pytest.raises(ValueError, match=r"num_replicas=18 must be a multiple of num_gpus=8"):
        eplb.rebalance_experts(GOLDEN, 18, 4, 2, 8)


def test_gpus_not_multiple_of_nodes():
    """num_gpus % num_nodes != 0 is a ValueError naming both, whatever the policy."""
    with pytest.raises(ValueError, match=r"num_gpus=8 must be a multiple of num_nodes=3"):
        eplb.rebalance_experts(GOLDEN, 16, 4, 3, 8)  # 4 % 3 != 0: global policy, still checked


def test_experts_not_multiple_of_groups_hierarchical():
    """E % num_groups != 0 is a ValueError naming num_groups when the hierarchical policy runs."""
    with pytest.raises(ValueError, match=r"experts 12 must be a multiple of num_groups=5"):
        eplb.rebalance_experts(GOLDEN, 16, 5, 1, 8)  # 5 % 1 == 0: hierarchical


@pytest.mark.parametrize("hierarchical", [None, False], ids=["published-rule", "forced-off"])
def test_experts_not_multiple_of_groups_global_is_fine(hierarchical):
    """E % num_groups != 0 is no error under the global policy (num_groups is then unused)."""
    weight = np.arange(10).reshape(1, 10)
    placement = eplb.rebalance_experts(weight, 12, 3, 2, 4, hierarchical=hierarchical)  # 3 % 2 != 0
    _assert_valid(placement, 1, 10, 12)


def test_forced_hierarchical_needs_groups_multiple_of_nodes():
    """hierarchical=True with num_groups % num_nodes != 0 is a ValueError naming both."""
    with pytest.raises(ValueError, match=r"num_groups=3 must be a multiple of num_nodes=2"):
        eplb.rebalance_experts(np.ones((1, 12)), 16, 3, 2, 8, hierarchical=True)


@pytest.mark.parametrize("name", COUNT_NAMES)
@pytest.mark.parametrize("value", [0, -1])
def test_count_not_positive(name, value):
    """A count of 0 or -1 is a ValueError naming the count and its value."""
    with pytest.raises(ValueError, match=rf"{name}={value} must be positive"):
        eplb.rebalance_experts(GOLDEN, **_counts(**{name: value}))


@pytest.mark.parametrize("name", COUNT_NAMES)
@pytest.mark.parametrize("value", [2.0, "4", True, None], ids=["float", "str", "bool", "None"])
def test_count_not_int(name, value):
    """A count that is not an int (float, str, bool, None) is a TypeError naming the count."""
    with pytest.raises(TypeError, match=rf"{name} must be an int"):
        eplb.rebalance_experts(GOLDEN, **_counts(**{name: value}))


@pytest.mark.parametrize("value", [1, 0, "yes"])
def test_hierarchical_not_bool(value):
    """hierarchical must be True, False or None: anything else is a TypeError naming it."""
    with pytest.raises(TypeError, match=r"hierarchical must be True, False or None"):
        eplb.rebalance_experts(GOLDEN, *CONFIG, hierarchical=value)


@pytest.mark.parametrize("value", ["no", "", 0, 1, np.array(True), [True]], ids=["no", "empty", "0", "1", "0d", "list"])
@pytest.mark.parametrize("entry", ["rebalance_experts", "balanced_packing", "replicate_experts"])
def test_check_values_not_bool(entry, value):
    """check_values is True, False or None: a truthy string ("no") must not silently mean True."""
    call = {
        "rebalance_experts": lambda **kw: eplb.rebalance_experts(GOLDEN, *CONFIG, **kw),
        "balanced_packing": lambda **kw: eplb.balanced_packing(GOLDEN, 2, **kw),
        "replicate_experts": lambda **kw: eplb.replicate_experts(GOLDEN, 16, **kw),
    }[entry]
    with pytest.raises(TypeError, match=r"check_values must be True, False or None"):
        call(check_values=value)


def test_numpy_scalars_count_as_their_python_type():
    """One rule for numpy scalars: np.bool_ is a bool (hierarchical, check_values) as np.int64 is an int."""
    expected = eplb.rebalance_experts(GOLDEN, *CONFIG, hierarchical=False)
    got = eplb.rebalance_experts(GOLDEN, *CONFIG, hierarchical=np.False_, check_values=np.True_)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)
    with pytest.raises(ValueError, match="must not contain NaN"):
        eplb.rebalance_experts(np.full((1, 12), np.nan), *CONFIG, check_values=np.True_)
    negative = np.array(GOLDEN) * np.array([[1] * 11 + [-1]] * 2)
    eplb.rebalance_experts(negative, *CONFIG, check_values=np.False_)  # not checked: read as 0, no error


def test_numpy_integer_counts_accepted():
    """numpy integers are valid counts and give the same placement as Python ints."""
    expected = eplb.rebalance_experts(GOLDEN, *CONFIG)
    got = eplb.rebalance_experts(GOLDEN, *(np.int64(c) for c in CONFIG))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)


# ---------------------------------------------------------------- building blocks


def test_balanced_packing_items_not_multiple_of_packs():
    """balanced_packing with n % num_packs != 0 is a ValueError naming num_packs."""
    with pytest.raises(ValueError, match=r"multiple of num_packs=3"):
        eplb.balanced_packing(np.ones((2, 8)), 3)


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)])
def test_balanced_packing_bad_num_packs(value, error):
    """A non-positive or non-int num_packs is rejected, naming num_packs."""
    with pytest.raises(error, match=r"num_packs"):
        eplb.balanced_packing(np.ones((2, 8)), value)


def test_balanced_packing_checks_weight():
    """balanced_packing checks the load's shape and values like rebalance_experts."""
    with pytest.raises(ValueError, match=r"weight must be 2-D"):
        eplb.balanced_packing(np.ones(8), 2)
    with pytest.raises(ValueError, match=r"weight must be non-negative"):
        eplb.balanced_packing(np.array([[1.0, -1.0]]), 2)


def test_replicate_experts_too_few_slots():
    """replicate_experts with num_phy < experts is a ValueError naming num_phy."""
    with pytest.raises(ValueError, match=r"num_phy=3 must be >= the number of experts 4"):
        eplb.replicate_experts(np.ones((2, 4)), 3)


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (5.0, TypeError)])
def test_replicate_experts_bad_num_phy(value, error):
    """A non-positive or non-int num_phy is rejected, naming num_phy."""
    with pytest.raises(error, match=r"num_phy"):
        eplb.replicate_experts(np.ones((2, 4)), value)


def test_replicate_experts_checks_weight():
    """replicate_experts checks the load's values like rebalance_experts."""
    with pytest.raises(ValueError, match=r"weight must not contain NaN"):
        eplb.replicate_experts(np.array([[1.0, np.nan]]), 3)


# ---------------------------------------------------------------- valid edges


def _golden_placement():
    return tuple(np.asarray(a) for a in eplb.rebalance_experts(np.array(GOLDEN), *CONFIG))


@pytest.mark.parametrize("dtype", ["int32", "uint8", "float16"])
def test_small_dtypes_numpy(dtype):
    """int32, uint8 and float16 numpy loads are accepted and give the int64 golden placement."""
    placement = eplb.rebalance_experts(np.array(GOLDEN, dtype=dtype), *CONFIG)
    for got, expected in zip(placement, _golden_placement(), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int32", "uint8", "int8"])
def test_small_dtypes_torch(dtype):
    """Half, bfloat16 and small-integer torch loads are accepted (values <= 255 are exact in each)."""
    torch = pytest.importorskip("torch")
    weight = torch.tensor([[min(v, 127) for v in row] for row in GOLDEN], dtype=getattr(torch, dtype))
    placement = eplb.rebalance_experts(weight, *CONFIG)
    expected = eplb.rebalance_experts(weight.float().numpy(), *CONFIG)
    for got, exp in zip(placement, expected, strict=True):
        np.testing.assert_array_equal(got.numpy(), exp)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int32", "uint8"])
def test_small_dtypes_jax(dtype):
    """Half, bfloat16 and small-integer JAX loads are accepted."""
    jnp = pytest.importorskip("jax.numpy")
    weight = jnp.asarray(np.array([[min(v, 127) for v in row] for row in GOLDEN]), dtype=getattr(jnp, dtype))
    placement = eplb.rebalance_experts(weight, *CONFIG)
    expected = eplb.rebalance_experts(np.asarray(weight.astype(jnp.float32)), *CONFIG)
    for got, exp in zip(placement, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got), exp)


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
def test_all_zero_layers(backend):
    """All-zero layers are valid (no division by zero) and still give every expert a replica."""
    placement = make_runner(backend).rebalance_np(np.zeros((3, 12), dtype=np.int32), *CONFIG)
    _assert_valid(placement, 3, 12, 16)


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
def test_single_layer(backend):
    """One layer is valid and gives the golden example's first row."""
    phy2log, _, _ = make_runner(backend).rebalance_np(np.array(GOLDEN[:1]), *CONFIG)
    np.testing.assert_array_equal(phy2log, [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]])


@pytest.mark.parametrize("backend", backend_params(CPU_BACKENDS))
@pytest.mark.parametrize("config", [(12, 4, 2, 12), (12, 3, 2, 12)], ids=["hierarchical", "global"])
def test_one_expert_per_gpu(backend, config):
    """R == E == num_gpus: every expert gets exactly one slot, log2phy has one column."""
    phy2log, log2phy, logcnt = make_runner(backend).rebalance_np(np.array(GOLDEN), *config)
    assert (logcnt == 1).all()
    assert log2phy.shape == (2, 12, 1)
    for layer in range(2):
        assert sorted(phy2log[layer]) == list(range(12))
        np.testing.assert_array_equal(phy2log[layer][log2phy[layer, :, 0]], np.arange(12))


@pytest.mark.parametrize("backend", backend_params([Backend.NUMPY, Backend.TORCH, Backend.JAX]))
def test_layer_sum_at_float32_max(backend):
    """A layer totalling exactly float32 max is still valid (the rule is 'at most')."""
    weight = np.zeros((2, 12), dtype=np.float32)
    weight[0, 7] = np.finfo(np.float32).max
    weight[1] = np.arange(12)
    placement = make_runner(backend).rebalance_np(weight, *CONFIG)
    _assert_valid(placement, 2, 12, 16)
    assert placement[2][0, 7] == 3  # both spare slots of its node go to the one loaded expert


def test_remembered_settings_still_reject_a_bool_count():
    """Valid settings are remembered per type: True is not taken for a remembered 1."""
    weight = np.ones((1, 4))
    eplb.rebalance_experts(weight, 4, 1, 1, 1)
    eplb.rebalance_experts(weight, 4, 1, 1, 1)  # the remembered path
    with pytest.raises(TypeError, match="num_groups"):
        eplb.rebalance_experts(weight, 4, True, 1, 1)
    with pytest.raises(ValueError, match="num_replicas"):
        eplb.rebalance_experts(np.ones((1, 8)), 4, 1, 1, 1)  # same sizes, more experts than slots
