"""The candidate choice kernels (eplb.kernels.choose_triton) equal the array-API functions bit for bit.

Oracles: :func:`eplb.algorithms.repair.heaviest_gpu` and :func:`eplb.algorithms.stability.choose` (themselves
checked against plain Python below, and through ``previous=`` in ``tests/test_stability.py``). Cases: lognormal
loads over six orders of magnitude, all-tied and all-zero layers, loads whose left-to-right and other-order sums
round apart, limits equal to a candidate's heaviest GPU (the ``<=`` boundary), tied moves, rows with no usable
candidate and rows where only candidates beyond the limit are usable; failed GPUs' ``-1`` slots (the heaviest
GPU against :func:`eplb.algorithms.elastic.live_heaviest_gpu` and plain Python); one expert, one slot per GPU,
a GPU count that is not a power of two, the DeepSeek-V3 shapes. Under Triton's CPU interpreter (a subprocess: the
interpreter is chosen at import) and on CUDA.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from eplb.algorithms.elastic import live_heaviest_gpu
from eplb.algorithms.repair import heaviest_gpu
from eplb.algorithms.stability import choose

from .conftest import needs_gpu, run_kernel_check

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# (num_log, num_phy, num_gpus, num_candidates)
SHAPES = [(8, 12, 4, 5), (16, 16, 16, 4), (1, 4, 2, 3), (12, 36, 3, 5), (256, 288, 32, 6), (256, 288, 144, 5)]

CASES = """
import numpy as np

def placement(rng, rows, num_log, num_phy):
    # Every expert at least once, the rest at random: ids in range, counts in [1, R].
    extra = rng.integers(0, num_log, (rows, num_phy - num_log))
    phy = np.concatenate([np.tile(np.arange(num_log), (rows, 1)), extra], 1)
    phy = np.take_along_axis(phy, rng.permuted(np.tile(np.arange(num_phy), (rows, 1)), axis=1), 1)
    cnt = np.stack([np.bincount(r, minlength=num_log) for r in phy])
    return phy.astype(np.int64), cnt.astype(np.int64)

def loads(rng, rows, num_log):
    w = (rng.lognormal(0, 2.0, (rows, num_log)) * rng.choice([1, 1e-3, 1e3], (rows, num_log))).astype(np.float32)
    w[1] = np.float32(1.0)  # ties everywhere
    w[2] = 0.0  # an all-zero layer
    w[3] = np.float32(2.0) ** rng.integers(-24, 24, num_log)  # sums that round apart in another order
    return w

def cases(num_log, num_phy, num_gpus, num_candidates, seed):
    from eplb.algorithms.repair import gpu_loads
    rng = np.random.default_rng(seed)
    rows = 8
    w = loads(rng, rows, num_log)
    phy, cnt = placement(rng, num_candidates * rows, num_log, num_phy)
    moves = rng.integers(0, 3, (rows, num_candidates)).astype(np.int64)  # many ties
    usable = rng.random((rows, num_candidates)) < 0.7
    usable[4] = False  # nothing usable: candidate 0
    usable[5, 0] = False  # candidate 0 unusable
    peaks = gpu_loads(np.concatenate([w] * num_candidates), phy, cnt, num_gpus, xp=np).max(axis=1)
    peaks = peaks.reshape(num_candidates, rows).T
    limit = peaks[:, min(1, num_candidates - 1)].copy()[:, None]  # the <= boundary
    limit[6] = np.float32(0.0)  # only candidate 0 within the limit
    limit[7] = np.nextafter(peaks[7].max(), np.float32(np.inf))
    usable[6, 0] = False  # only candidates beyond the limit usable: the lightest
    return w, phy, cnt, moves, usable, limit.astype(np.float32)

def failed(rng, phy, num_log, num_gpus):
    # Whole GPUs emptied (-1): none, some, or all but one; counts of the live slots (some experts at 0).
    rows, num_phy = phy.shape
    dead = rng.random((rows, num_gpus)) < rng.choice([0.0, 0.3, 0.7], (rows, 1))
    dead[-1] = True
    dead[-1, 0] = False
    phy = np.where(np.repeat(dead, num_phy // num_gpus, axis=1), -1, phy)
    cnt = np.stack([np.bincount(r[r >= 0], minlength=num_log) for r in phy])
    return phy, cnt.astype(np.int64)
"""

CHECK = (
    CASES
    + """
import torch
from eplb.algorithms.elastic import live_heaviest_gpu
from eplb.algorithms.repair import heaviest_gpu
from eplb.algorithms.stability import choose
from eplb.kernels import choose_triton

def check(device):
    for seed, (num_log, num_phy, num_gpus, num_candidates) in enumerate(SHAPES):
        assert choose_triton.fits(num_phy, num_log, num_gpus)
        w, phy, cnt, moves, usable, limit = cases(num_log, num_phy, num_gpus, num_candidates, seed)
        t = lambda x: torch.as_tensor(x, device=device)
        rows = w.shape[0]
        want = heaviest_gpu(w, phy[:rows], cnt[:rows], num_gpus, xp=np)
        got = choose_triton.heaviest_gpu(t(w), t(phy[:rows]), t(cnt[:rows]), num_gpus)
        assert got.shape == (rows, 1) and got.dtype == torch.float32
        np.testing.assert_array_equal(got.cpu().numpy(), want)
        dead_phy, dead_cnt = failed(np.random.default_rng(seed), phy[:rows], num_log, num_gpus)
        want = live_heaviest_gpu(w, dead_phy, dead_cnt, num_gpus, xp=np)
        got = choose_triton.heaviest_gpu(t(w), t(dead_phy), t(dead_cnt), num_gpus)
        np.testing.assert_array_equal(got.cpu().numpy(), want)
        want_phy, want_cnt = choose(w, phy, cnt, moves, usable, limit, num_gpus, xp=np)
        got_phy, got_cnt = choose_triton.choose(t(w), t(phy), t(cnt), t(moves), t(usable), t(limit), num_gpus)
        np.testing.assert_array_equal(got_phy.cpu().numpy(), want_phy)
        np.testing.assert_array_equal(got_cnt.cpu().numpy(), want_cnt)
"""
)


def _choose_oracle(w, phy, cnt, moves, usable, limit, num_gpus):
    """Plain Python: replica loads w * fl(1/c) in float32, GPU loads left to right, the rule of the docstring."""
    rows, num_choices = moves.shape
    per_gpu = phy.shape[1] // num_gpus
    picked = []
    for b in range(rows):
        peaks = []
        for c in range(num_choices):
            row, load = c * rows + b, []
            for g in range(num_gpus):
                total = np.float32(0.0)
                for k in range(per_gpu):
                    e = int(phy[row, g * per_gpu + k])
                    reciprocal = np.float32(1.0) / np.float32(cnt[row, e])
                    term = np.float32(w[b, e]) * reciprocal
                    total = term if k == 0 else np.float32(total + term)
                load.append(float(total))
            peaks.append(max(load))
        within = [c for c in range(num_choices) if usable[b, c] and (c == 0 or peaks[c] <= float(limit[b, 0]))]
        live = [c for c in range(num_choices) if usable[b, c]]
        if within:
            picked.append(min(within, key=lambda c: (int(moves[b, c]), c)))
        elif live:
            picked.append(min(live, key=lambda c: (peaks[c], c)))
        else:
            picked.append(0)
    return picked


def test_choose_equals_plain_python():
    namespace: dict = {}
    exec(CASES, namespace)
    for seed, (num_log, num_phy, num_gpus, num_candidates) in enumerate(SHAPES[:4]):
        w, phy, cnt, moves, usable, limit = namespace["cases"](num_log, num_phy, num_gpus, num_candidates, seed)
        got_phy, got_cnt = choose(w, phy, cnt, moves, usable, limit, num_gpus, xp=np)
        rows = w.shape[0]
        picked = _choose_oracle(w, phy, cnt, moves, usable, limit, num_gpus)
        assert len(set(picked)) > 1  # the cases exercise more than one branch
        for b, c in enumerate(picked):
            np.testing.assert_array_equal(got_phy[b], phy[c * rows + b])
            np.testing.assert_array_equal(got_cnt[b], cnt[c * rows + b])
        peaks = heaviest_gpu(w, phy[:rows], cnt[:rows], num_gpus, xp=np)[:, 0]
        per_gpu = num_phy // num_gpus
        for b in range(rows):
            want = max(
                float(sum(float(w[b, e]) / float(cnt[b, e]) for e in phy[b, g * per_gpu : (g + 1) * per_gpu]))
                for g in range(num_gpus)
            )
            assert abs(float(peaks[b]) - want) <= 1e-5 * max(want, 1e-30)
        # Failed GPUs' slots (-1) weigh nothing: float32 left-to-right sums over the held slots, plain Python.
        dead_phy, dead_cnt = namespace["failed"](np.random.default_rng(seed), phy[:rows], num_log, num_gpus)
        peaks = live_heaviest_gpu(w, dead_phy, dead_cnt, num_gpus, xp=np)[:, 0]
        for b in range(rows):
            loads = []
            for g in range(num_gpus):
                total = np.float32(0.0)
                for k, e in enumerate(dead_phy[b, g * per_gpu : (g + 1) * per_gpu].tolist()):
                    term = (
                        np.float32(0.0)
                        if e < 0
                        else np.float32(w[b, e]) * (np.float32(1.0) / np.float32(dead_cnt[b, e]))
                    )
                    total = term if k == 0 else np.float32(total + term)
                loads.append(float(total))
            assert float(peaks[b]) == max(loads)


def test_fits():
    pytest.importorskip("triton")
    from eplb.kernels import choose_triton

    assert choose_triton.fits(288, 256, 32)
    assert choose_triton.fits(288, 256, 144)
    assert not choose_triton.fits(288, 256, 5)  # slots not a multiple of the GPUs
    assert not choose_triton.fits(130, 2, 2)  # 65 slots a GPU


@needs_triton
def test_interpreter_equals_the_array_api_functions():
    run_kernel_check(CHECK, SHAPES, "cpu")


@needs_gpu("torch")
def test_cuda_equals_the_array_api_functions():
    run_kernel_check(CHECK, SHAPES, "cuda")
