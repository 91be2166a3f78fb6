"""Equals :func:`eplb.algorithms.pairs.pair_counts` bit for bit, compiled with numba: the refined policy on the CPU.

:func:`pair_counts` takes the array-API function's arguments (``xp`` accepted,
not used) and returns the same counts. The numpy adapter plugs it into the
refined policy (:func:`eplb.algorithms.pairs.pair_stage`) once the kernels
are loaded (:func:`eplb.backends._numba.ready`): as array operations the
search costs about 70 ms at 288 slots over 144 GPUs, three times the rest of
the refined call.

Row by row, the same choices with the same float32 arithmetic:

- replica loads ``w * fl(1/c)`` from the same reciprocal table; a pair's
  load is one float32 sum, the heavier item first; a row folds the items
  its counts make (its live slots, fewer than ``num_slots`` where it has
  idle GPUs);
- the fold's order is the array API's stable descending sort of the items
  (experts in index order, each expert's replicas in a run), so experts are
  ranked by replica load, equal loads by index; the heaviest pair is the
  first largest in fold order;
- donors: the array API's stable ascending sort of ``w * fl(1/(c - 1))``
  over experts of two or more replicas, the first :data:`DONORS`;
- candidates in the same order (donor, then heavy before light), the first
  smallest heaviest pair (strict comparisons), taken where it is below the
  current one times ``IMPROVEMENT`` (a float32 product); a row stops at its
  first round without a move (every later round would change nothing).

Instead of sorting each candidate's items, a candidate re-inserts the two
experts whose replica load changed into the current ranking (same order:
load descending, then index) and expands the runs: the same ranked items.

Proved by ``tests/test_pairs.py`` (random, tied and degenerate rows against
the array-API function, and the refined policy end to end through the numpy
adapter against the array-API path).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb import _xp
from eplb.algorithms.pairs import DONORS
from eplb.algorithms.refine import IMPROVEMENT
from eplb.kernels._numba_jit import njit

__all__ = ["DONORS", "pair_counts", "warm_up"]

_INF = np.float32(np.inf)
_IMPROVE = np.float32(IMPROVEMENT)


@njit()
def _before(load_a, id_a, load_b, id_b):  # pragma: no cover (compiled)
    """Expert a ranks before expert b: heavier replicas first, equal loads by index."""
    return load_a > load_b or (load_a == load_b and id_a < id_b)


@njit()
def _heaviest(ranked, live):  # pragma: no cover (compiled)
    """First heaviest fold pair of the first ``live`` ranked items: its index and load."""
    best, top = -_INF, 0
    for j in range(live // 2):
        value = ranked[j] + ranked[live - 1 - j]
        if value > best:
            best, top = value, j
    return top, best


@njit()
def _expand(order, replica, count, n, ranked, owner):  # pragma: no cover (compiled)
    """The ranked items of experts ``order[:n]`` (each ``count`` times at load ``replica``)."""
    p = 0
    for i in range(n):
        e = order[i]
        for _ in range(count[e]):
            ranked[p] = replica[e]
            owner[p] = e
            p += 1


@njit()
def _search(load, count, reciprocal, num_slots, num_iters, donors):  # pragma: no cover (compiled)
    batch, n = load.shape
    improve, inf = _IMPROVE, _INF
    out = count.copy()
    replica = np.empty(n, np.float32)
    ranked = np.empty(num_slots, np.float32)
    owner = np.empty(num_slots, np.int64)
    merged = np.empty(n, np.int64)
    cost = np.empty(n, np.float32)
    trial = np.empty(n, np.float32)
    for b in range(batch):
        cnt = out[b]
        w = load[b]
        live = 0  # the row's live slots: its counts' sum (a move keeps it)
        for e in range(n):
            live += cnt[e]
        for _ in range(num_iters):
            for e in range(n):
                replica[e] = w[e] * reciprocal[cnt[e]]
            order = np.argsort(-replica, kind="mergesort")  # stable: load descending, then index
            _expand(order, replica, cnt, n, ranked, owner)
            top, current = _heaviest(ranked, live)
            heavy, light = owner[top], owner[live - 1 - top]
            for e in range(n):
                cost[e] = w[e] * reciprocal[cnt[e] - 1] if cnt[e] >= 2 else inf
            donor_order = np.argsort(cost, kind="mergesort")
            best, best_d, best_t = inf, -1, -1
            for i in range(min(donors, n)):
                d = donor_order[i]
                if cnt[d] < 2:
                    continue
                for t in (heavy, light):
                    if t == d:
                        continue
                    # The two experts' new replica loads, re-inserted into the ranking.
                    for e in range(n):
                        trial[e] = replica[e]
                    trial[d] = w[d] * reciprocal[cnt[d] - 1]
                    trial[t] = w[t] * reciprocal[cnt[t] + 1]
                    first, second = (d, t) if _before(trial[d], d, trial[t], t) else (t, d)
                    k = 0
                    for i2 in range(n):
                        e = order[i2]
                        if e == d or e == t:  # noqa: SIM109 (numba: no tuple membership)
                            continue
                        if first >= 0 and _before(trial[first], first, trial[e], e):
                            merged[k] = first
                            k += 1
                            first, second = second, -1
                            if first >= 0 and _before(trial[first], first, trial[e], e):
                                merged[k] = first
                                k += 1
                                first = -1
                        merged[k] = e
                        k += 1
                    while first >= 0:
                        merged[k] = first
                        k += 1
                        first, second = second, -1
                    cnt[d] -= 1
                    cnt[t] += 1
                    _expand(merged, trial, cnt, n, ranked, owner)
                    cnt[d] += 1
                    cnt[t] -= 1
                    _, value = _heaviest(ranked, live)
                    if value < best:
                        best, best_d, best_t = value, d, t
            if not best < current * improve:
                break
            cnt[best_d] -= 1
            cnt[best_t] += 1
    return out


def pair_counts(load: Any, count: Any, num_slots: int, num_iters: int, *, xp: Any = None) -> np.ndarray:
    """:func:`eplb.algorithms.pairs.pair_counts` on numpy rows (same counts, same dtype as ``count``)."""
    del xp
    load = np.ascontiguousarray(load, dtype=np.float32)
    count = np.asarray(count)
    batch, n = load.shape
    if batch == 0 or num_slots == n:
        return count
    start = np.ascontiguousarray(count, dtype=np.int64)
    live = start.sum(axis=1)
    if start.min() < 1 or (live > num_slots).any():  # the kernel indexes by these counts
        raise ValueError(f"count must hold counts >= 1 summing to at most num_slots={num_slots} in every row")
    reciprocal = np.asarray(_xp.reciprocal_table(num_slots - n + 1, xp=np))
    found = _search(load, start, reciprocal, num_slots, num_iters, DONORS)
    return found.astype(count.dtype, copy=False)


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel on a tiny row."""
    pair_counts(np.array([[3.0, 1.0, 2.0]], np.float32), np.array([[2, 1, 1]], np.int64), 4, 2)
