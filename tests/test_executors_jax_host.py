"""The JAX executor's memoised host work (``eplb.executors.jax``: plans, index arrays, their device copies).

On a mesh of one CPU device, in this process. A repeated call reuses the host work of the first: these tests check
that the reuse never changes a result. Plans of the same shape (every slot moved, the same compiled programs)
alternate and each call moves its own plan's bytes; a plan whose arrays are written in place between calls moves
as it now reads; weights that change between calls (new values, donated buffers, other trailing shapes of the same
bytes) are read afresh; the memoised index arrays deleted on the device are made again; the cache stays bounded
and ``CACHED_PLANS = 0`` turns it off. It also checks that the reuse happens (no index building, no
``device_put``, no new compiled program on a repeated call).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eplb
from eplb.executors import jax as executor

L, S = 3, 8  # layers, slots (one device)


@pytest.fixture
def mesh():
    executor._plans.clear()  # every test starts with no memoised plan
    yield Mesh(np.array(jax.devices()[:1]), ("ep",))
    executor._plans.clear()


def _rotation(shift: int) -> tuple[np.ndarray, np.ndarray]:
    old = np.tile(np.arange(S), (L, 1))
    return old, np.roll(old, shift, axis=1)


def _weights(mesh, phy2log, dtype="float32", tail=(2, 3), scale=1):
    """``[L, S, *tail]``: slot values distinct per (layer, expert), times ``scale``."""
    base = (np.arange(L)[:, None] * 16 + phy2log).astype(np.float32) * scale
    values = base.reshape(*base.shape, *([1] * len(tail))) + np.arange(np.prod(tail)).reshape(tail) / 8
    return jax.device_put(jnp.asarray(values, dtype=dtype), NamedSharding(mesh, PartitionSpec(None, "ep")))


def _equal(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def test_plans_of_one_shape_alternate_and_each_moves_its_own(mesh):
    old, _ = _rotation(0)
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(S) for _ in range(L)])
    targets = [_rotation(1)[1], _rotation(3)[1], shuffled]
    plans = [eplb.plan_transfers(old, new, num_gpus=1) for new in targets]
    before = _weights(mesh, old)
    commit = executor._commit_program(mesh, "ep", False)
    compiled = None
    for round_ in range(3):
        for number in (0, 1, 0, 2, 1):
            got = executor.apply_plan(plans[number], before, mesh, "ep", verify=round_ % 2 == 0)
            assert _equal(got, _weights(mesh, targets[number])), (round_, number)
        assert _equal(before, _weights(mesh, old))  # not donated: the input is intact
        if compiled is None:
            compiled = commit._cache_size()
        assert commit._cache_size() == compiled  # the same programs: nothing traced again
    for number in (2, 0, 2):  # donated, the plans alternating on a fresh copy each
        got = executor.apply_plan(plans[number], _weights(mesh, old), mesh, "ep", donate=True)
        assert _equal(got, _weights(mesh, targets[number])), number


def test_repeated_call_builds_and_puts_nothing(mesh, monkeypatch):
    old, new = _rotation(1)
    plan = eplb.plan_transfers(old, new, num_gpus=1)
    other = eplb.plan_transfers(old, _rotation(2)[1], num_gpus=1)
    built, put = [], []
    real_arrays, real_put = executor._Job._arrays, jax.device_put
    monkeypatch.setattr(executor._Job, "_arrays", lambda self, *a: built.append(1) or real_arrays(self, *a))
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: put.append(1) or real_put(*a, **k))
    before = _weights(mesh, old)

    def counted(call):  # (result, index builds, device_puts) of one call
        start = len(built), len(put)
        result = call()
        return result, len(built) - start[0], len(put) - start[1]

    counts = []
    for p, want in ((plan, new), (plan, new), (other, _rotation(2)[1]), (plan, new), (other, _rotation(2)[1])):
        got, *count = counted(lambda p=p: executor.apply_plan(p, before, mesh, "ep"))
        assert _equal(got, _weights(mesh, want))
        counts.append(tuple(count))
    assert counts == [(1, 1), (0, 0), (1, 1), (0, 0), (0, 0)]
    # begin / finish share the memo of apply_plan (the same options); other layers build their own.
    got, *count = counted(lambda: executor.begin(plan, before, mesh, "ep").finish())
    assert _equal(got, _weights(mesh, new)) and count == [0, 0]
    got, *count = counted(lambda: executor.apply_plan(plan, before, mesh, "ep", layers=[1]))
    assert _equal(got, _weights(mesh, np.r_[old[:1], new[1:2], old[2:]])) and count == [1, 1]


def test_plan_written_in_place_moves_as_it_now_reads(mesh):
    old, first = _rotation(1)
    _, second = _rotation(5)
    plan = eplb.plan_transfers(old, first, num_gpus=1)
    replacement = eplb.plan_transfers(old, second, num_gpus=1)
    assert len(plan) == len(replacement)  # the same shape: only the contents differ
    before = _weights(mesh, old)
    assert _equal(executor.apply_plan(plan, before, mesh, "ep"), _weights(mesh, first))
    for name in ("layer", "expert", "src_gpu", "src_slot", "dst_gpu", "dst_slot", "stage"):
        getattr(plan, name)[:] = getattr(replacement, name)
    assert _equal(executor.apply_plan(plan, before, mesh, "ep"), _weights(mesh, second))
    # Written back to the first plan's rows: its result again (no stale entry of the second).
    original = eplb.plan_transfers(old, first, num_gpus=1)
    for name in ("layer", "expert", "src_gpu", "src_slot", "dst_gpu", "dst_slot", "stage"):
        getattr(plan, name)[:] = getattr(original, name)
    assert _equal(executor.apply_plan(plan, before, mesh, "ep"), _weights(mesh, first))
    # A plan written out of bounds is refused as it would be on a first call (its rows are checked again).
    plan.dst_slot[0] = S
    with pytest.raises(ValueError, match=r"plan\.dst_slot holds"):
        executor.apply_plan(plan, before, mesh, "ep")


def test_weights_that_change_between_calls_are_read_afresh(mesh):
    old, new = _rotation(2)
    plan = eplb.plan_transfers(old, new, num_gpus=1)
    for scale in (1, 3, -2):
        for donate in (False, True):
            got = executor.apply_plan(plan, _weights(mesh, old, scale=scale), mesh, "ep", donate=donate)
            assert _equal(got, _weights(mesh, new, scale=scale)), (scale, donate)
    # Other trailing shapes and pytrees of the same bytes per slot share the memo; each leaf moves its own bytes.
    tree = {"a": _weights(mesh, old, tail=(3, 2)), "b": _weights(mesh, old, "bfloat16", tail=(6,))}
    single = _weights(mesh, old, tail=(9,))  # 36 bytes a slot, as the tree's 24 + 12
    got = executor.apply_plan(plan, tree, mesh, "ep")
    assert _equal(got["a"], _weights(mesh, new, tail=(3, 2)))
    assert _equal(got["b"], _weights(mesh, new, "bfloat16", tail=(6,)))
    assert _equal(executor.apply_plan(plan, single, mesh, "ep"), _weights(mesh, new, tail=(9,)))
    assert _equal(executor.apply_plan(plan, tree["a"], mesh, "ep"), _weights(mesh, new, tail=(3, 2)))


def test_deleted_device_copies_are_made_again(mesh):
    old, new = _rotation(1)
    plan = eplb.plan_transfers(old, new, num_gpus=1)
    before = _weights(mesh, old)
    assert _equal(executor.apply_plan(plan, before, mesh, "ep"), _weights(mesh, new))
    memoised = [
        array
        for entry in executor._plans.values()
        for job in entry.jobs.values()
        for key, value in job.memo.items()
        if key[0] == "device"
        for array in value
        if array is not None
    ]
    assert memoised
    for array in memoised:  # as a caller freeing every live array would
        array.delete()
    assert _equal(executor.apply_plan(plan, before, mesh, "ep"), _weights(mesh, new))


def test_cache_is_bounded_and_can_be_turned_off(mesh, monkeypatch):
    old, _ = _rotation(0)
    before = _weights(mesh, old)
    plans = [(eplb.plan_transfers(old, _rotation(k)[1], num_gpus=1), k) for k in range(1, S)]
    monkeypatch.setattr(executor, "CACHED_PLANS", 3)
    for _ in range(2):
        for plan, k in plans:
            assert _equal(executor.apply_plan(plan, before, mesh, "ep"), _weights(mesh, _rotation(k)[1]))
            assert len(executor._plans) <= 3
    monkeypatch.setattr(executor, "CACHED_PLANS", 0)  # memoised plans are no longer looked up
    built = []
    real_arrays = executor._Job._arrays
    monkeypatch.setattr(executor._Job, "_arrays", lambda self, *a: built.append(1) or real_arrays(self, *a))
    for plan, k in plans[-3:] * 2:  # the three plans memoised last
        assert _equal(executor.apply_plan(plan, before, mesh, "ep"), _weights(mesh, _rotation(k)[1]))
    assert len(built) == 6 and len(executor._plans) == 3
