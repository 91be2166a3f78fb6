"""A changed GPU count (issue 19, item 3): ``previous=`` from a placement on another number of GPUs.

Checked against independent oracles: validity (every expert on a live slot, the right size), the balance
promise against the fresh greedy placement of the new size (float64 GPU loads), and the moves against the
fresh placement with its GPUs best permuted (scipy's assignment solver over the padded placements).
"""

from __future__ import annotations

import numpy as np
import pytest

import eplb

from . import oracle


def _pad(phy2log: np.ndarray, slots: int) -> np.ndarray:
    out = np.full((phy2log.shape[0], slots), -1, dtype=np.int64)
    out[:, : phy2log.shape[1]] = phy2log
    return out


@pytest.mark.parametrize(("before", "after"), [(4, 3), (3, 4), (6, 4), (2, 5), (1, 3), (3, 1)])
@pytest.mark.parametrize("per_gpu", [1, 3])
def test_scale_keeps_experts_and_balance(before, after, per_gpu):
    rng = np.random.default_rng(before * 10 + after + per_gpu)
    experts = min(before, after) * per_gpu
    weight = rng.lognormal(0.0, 1.0, (4, experts))
    weight[-1] = 0.0  # an all-zero layer
    old = np.asarray(eplb.rebalance_experts(weight, before * per_gpu, 1, 1, before).phy2log)
    drifted = weight * rng.uniform(0.5, 1.5, weight.shape)
    new = eplb.rebalance_experts(drifted, after * per_gpu, 1, 1, after, previous=old)
    phy2log = np.asarray(new.phy2log)
    assert phy2log.shape == (4, after * per_gpu)
    for row, count in zip(phy2log, np.asarray(new.logcnt), strict=True):
        assert set(row.tolist()) == set(range(experts))  # every expert, no empty slot left on a live GPU
        np.testing.assert_array_equal(np.bincount(row, minlength=experts), count)
    fresh = np.asarray(eplb.rebalance_experts(drifted, after * per_gpu, 1, 1, after).phy2log)
    peak = oracle.gpu_loads64(drifted, phy2log, after).max(axis=1)
    assert (peak <= oracle.gpu_loads64(drifted, fresh, after).max(axis=1) * (1 + 1e-6)).all()
    total = max(before, after)
    padded_old, padded_new, padded_fresh = (_pad(p, total * per_gpu) for p in (old, phy2log, fresh))
    live = [g < after for g in range(total)]
    moved = oracle.moves(padded_old, padded_new, total)
    assert (moved <= oracle.best_relabel_moves(padded_old, padded_fresh, live, total)).all()
    plan = eplb.plan_transfers(old, phy2log, num_gpus=after)  # the moves across the two sizes
    assert plan.num_gpus == total and (plan.remote_copies <= moved).all()


def test_scale_is_the_same_on_every_backend():
    rng = np.random.default_rng(5)
    weight = rng.lognormal(0.0, 1.0, (3, 12)).astype(np.float32)
    old = np.asarray(eplb.rebalance_experts(weight, 16, 1, 1, 4).phy2log)
    want = eplb.rebalance_experts(weight[::-1].copy(), 12, 1, 1, 3, previous=old, balance_tolerance=0.05)
    torch = pytest.importorskip("torch")
    got = eplb.rebalance_experts(torch.as_tensor(weight[::-1].copy()), 12, 1, 1, 3, previous=torch.as_tensor(old),
                                 balance_tolerance=0.05)  # fmt: skip
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    jax = pytest.importorskip("jax")
    placed = jax.jit(lambda w, p: eplb.rebalance_experts(w, 12, 1, 1, 3, previous=p, balance_tolerance=0.05))(
        jax.numpy.asarray(weight[::-1].copy()), jax.numpy.asarray(old)
    )
    for a, b in zip(placed, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_scale_down_with_a_failed_gpu_and_errors():
    rng = np.random.default_rng(1)
    weight = rng.lognormal(0.0, 1.0, (2, 4))
    old = np.asarray(eplb.rebalance_experts(weight, 8, 1, 1, 4).phy2log)
    new = eplb.rebalance_experts(weight, 6, 1, 1, 3, previous=old, active_gpus=[True, False, True])
    assert (np.asarray(new.phy2log)[:, 2:4] == -1).all() and np.asarray(new.logcnt).min() >= 1
    with pytest.raises(ValueError, match=r"same slots per GPU \(2 = num_replicas / num_gpus\)"):
        eplb.rebalance_experts(weight, 6, 1, 1, 3, previous=old[:, :7])
    with pytest.raises(ValueError, match=r"4 -> 3\) .*not with the hierarchical policy"):
        eplb.rebalance_experts(weight, 6, 2, 1, 3, previous=old, hierarchical=True)
    with pytest.raises(ValueError, match="not with max_moves="):
        eplb.rebalance_experts(weight, 6, 1, 1, 3, previous=old, max_moves=2)
    with pytest.raises(ValueError, match=r"active_gpus must have shape \[num_gpus\] = \[3\]"):
        eplb.rebalance_experts(weight, 6, 1, 1, 3, previous=old, active_gpus=[True] * 4)
