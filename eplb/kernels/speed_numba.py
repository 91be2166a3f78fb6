"""Equals :mod:`eplb.algorithms.speed`'s packing loops bit for bit, compiled with numba: ``gpu_capacity`` on the CPU.

:func:`lpt_pack_speed`, :func:`pair_pack_speed` and :func:`refine_by_swaps_speed`
take the array-API functions' arguments (``xp`` accepted, not used) and return
the same arrays. The numpy adapter plugs them into
:func:`eplb.algorithms.capacity.place_capacity` once the kernels are loaded
(:func:`eplb.backends._numba.ready`); as array operations these loops are most
of a 50-200 ms call.

Row by row, the same choices with the same float32 arithmetic:

- the visiting orders are the array API's stable sorts (numpy's, before the
  loops);
- LPT on time: the key ``fl32(min(load + item, float32 max)) * inverse``, the
  first smallest; pairing: per pack the first heaviest item left, then the
  first heaviest partner with ``fl32(load_x + load_y) * inverse <= budget``,
  else the first lightest;
- swaps: a pack's load is its slots' left-to-right sum; the candidates are
  scanned in the array API's row-major ``(i, b, j)`` order, then the
  exchanges, keeping the first smallest value (strict comparisons); a row
  stops at its first round without a change (every later round would change
  nothing);
- every ``+``, ``-``, ``*`` has two float32 operands (constants are float32:
  numba would widen a Python float, and the expression, to float64), and
  numba compiles without fast-math, so nothing is reassociated or contracted
  into an FMA.

Proved by ``tests/test_kernels_speed_numba.py`` (random and degenerate inputs
against the array-API functions, and ``gpu_capacity=`` end to end through the
numpy adapter against the array-API path).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.refine import IMPROVEMENT
from eplb.kernels._numba_jit import njit

__all__ = ["lpt_pack_speed", "pair_pack_speed", "refine_by_swaps_speed", "warm_up"]

_INF = np.float32(np.inf)
_MOST = np.float32(MAX_LOAD)
_IMPROVE = np.float32(IMPROVEMENT)


def _argsort_desc(x: np.ndarray) -> np.ndarray:
    """:func:`eplb._xp.argsort_desc` on numpy (a stable sort of the negated keys)."""
    return np.argsort(-x, axis=-1, kind="stable")


@njit()
def _lpt(by_step, live, inverse, per_pack, pack_by_step, rank_by_step):  # pragma: no cover (compiled)
    batch, n = by_step.shape
    num_packs = live.shape[1]
    most, inf = _MOST, _INF  # float32 constants (numba freezes globals)
    load = np.zeros(num_packs, np.float32)
    count = np.zeros(num_packs, np.int64)
    for b in range(batch):
        load[:] = np.float32(0.0)
        count[:] = 0
        for t in range(n):
            w = by_step[b, t]
            best = 0
            best_key = inf
            for p in range(num_packs):
                after = load[p] + w
                if after > most:
                    after = most
                key = inf if (count[p] >= per_pack or not live[b, p]) else after * inverse[b, p]
                if p == 0 or key < best_key:
                    best, best_key = p, key
            after = load[best] + w
            load[best] = most if after > most else after
            rank_by_step[b, t] = count[best]
            pack_by_step[b, t] = best
            count[best] += 1


def lpt_pack_speed(
    weight: np.ndarray, live_pack: np.ndarray, inverse: np.ndarray, per_pack: int, *, xp: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`eplb.algorithms.speed.lpt_pack_speed`: ``order``, ``pack_by_step``, ``rank_by_step`` ``[B, n]``
    int64."""
    weight = np.asarray(weight, dtype=np.float32)
    batch, n = weight.shape
    order = _argsort_desc(weight)
    by_step = np.ascontiguousarray(np.take_along_axis(weight, order, axis=-1))
    num_packs = np.shape(live_pack)[-1]
    live = np.ascontiguousarray(np.broadcast_to(live_pack, (batch, num_packs)), dtype=np.bool_)
    inv = np.ascontiguousarray(np.broadcast_to(inverse, (batch, num_packs)), dtype=np.float32)
    pack_by_step = np.empty((batch, n), np.int64)
    rank_by_step = np.empty((batch, n), np.int64)
    _lpt(by_step, live, inv, per_pack, pack_by_step, rank_by_step)
    return order.astype(np.int64, copy=False), pack_by_step, rank_by_step


@njit()
def _pair(item_load, inverse_by_step, pack_order, budget, slot2item):  # pragma: no cover (compiled)
    batch, n = item_load.shape
    num_packs = inverse_by_step.shape[1]
    inf = _INF
    left = np.empty(n, np.float32)
    for b in range(batch):
        left[:] = item_load[b]
        limit = budget[b]
        for t in range(num_packs):
            pack_inverse = inverse_by_step[b, t]
            first = 0
            for i in range(1, n):
                if left[i] > left[first]:
                    first = i
            first_load = item_load[b, first]
            left[first] = -inf
            heaviest, heaviest_fit = 0, -inf
            lightest, lightest_load = 0, inf
            for i in range(n):
                x = left[i]
                within = x >= 0 and (first_load + x) * pack_inverse <= limit
                fit = x if (within or (pack_inverse == inf and x > -inf)) else -inf
                if fit > heaviest_fit:
                    heaviest, heaviest_fit = i, fit
                light = x if x >= 0 else inf
                if light < lightest_load:
                    lightest, lightest_load = i, light
            partner = heaviest if heaviest_fit > -inf else lightest
            left[partner] = -inf
            slot2item[b, pack_order[b, t] * 2] = first
            slot2item[b, pack_order[b, t] * 2 + 1] = partner


def pair_pack_speed(
    item_load: np.ndarray, live_pack: np.ndarray, inverse: np.ndarray, budget: np.ndarray, *, xp: Any = None
) -> np.ndarray:
    """:func:`eplb.algorithms.speed.pair_pack_speed`: ``slot2item [B, 2m]`` int64."""
    item_load = np.ascontiguousarray(item_load, dtype=np.float32)
    batch, n = item_load.shape
    num_packs = np.shape(live_pack)[-1]
    live = np.broadcast_to(live_pack, (batch, num_packs))
    inv = np.broadcast_to(np.asarray(inverse, dtype=np.float32), (batch, num_packs))
    pack_order = _argsort_desc(np.where(live, -inv, -_INF))  # fastest first, idle last
    inverse_by_step = np.ascontiguousarray(np.take_along_axis(np.where(live, inv, _INF), pack_order, axis=-1))
    limit = np.ascontiguousarray(np.broadcast_to(np.asarray(budget, dtype=np.float32), (batch, 1))[:, 0])
    slot2item = np.empty((batch, n), np.int64)
    _pair(item_load, inverse_by_step, np.ascontiguousarray(pack_order, dtype=np.int64), limit, slot2item)
    return slot2item


@njit()
def _swaps(item_load, slot2item, inverse, live, limit, num_iters, per_pack):  # pragma: no cover (compiled)
    batch, n = slot2item.shape
    num_packs = inverse.shape[1]
    improve, inf = _IMPROVE, _INF
    width = per_pack * num_packs * per_pack
    slot_load = np.empty(n, np.float32)
    loads = np.empty(num_packs, np.float32)
    for b in range(batch):
        for s in range(n):
            slot_load[s] = item_load[b, slot2item[b, s]]
        for _ in range(num_iters):
            for p in range(num_packs):
                total = slot_load[p * per_pack]
                for k in range(1, per_pack):
                    total = total + slot_load[p * per_pack + k]
                loads[p] = total
            heavy, heavy_time = 0, -inf
            for p in range(num_packs):
                time = loads[p] * inverse[b, p] if live[b, p] else -inf
                if time > heavy_time:
                    heavy, heavy_time = p, time
            heavy_load = loads[heavy]
            heavy_inverse = inverse[b, heavy]
            if not heavy_time > limit[b]:
                break  # within the limit: the search stops (no change now, none later)
            best, best_value = 0, inf
            for i in range(per_pack):
                out_i = slot_load[heavy * per_pack + i]
                for q in range(num_packs):
                    partner_load = inf if (q == heavy or not live[b, q]) else loads[q]
                    for j in range(per_pack):
                        in_j = slot_load[q * per_pack + j]
                        new_heavy = ((heavy_load - out_i) + in_j) * heavy_inverse
                        new_other = ((partner_load - in_j) + out_i) * inverse[b, q]
                        value = new_heavy if new_heavy >= new_other else new_other
                        if value < best_value:
                            best, best_value = i * num_packs * per_pack + q * per_pack + j, value
            for q in range(num_packs):
                if q == heavy or not live[b, q]:
                    continue
                one, two = loads[q] * heavy_inverse, heavy_load * inverse[b, q]
                value = one if one >= two else two
                if value < best_value:
                    best, best_value = width + q, value
            if not best_value < (heavy_load * heavy_inverse) * improve:
                break  # no change now, none in any later round
            if best < width:
                give = heavy * per_pack + best // (num_packs * per_pack)
                take = (best // per_pack) % num_packs * per_pack + best % per_pack
                slot2item[b, give], slot2item[b, take] = slot2item[b, take], slot2item[b, give]
                slot_load[give], slot_load[take] = slot_load[take], slot_load[give]
            else:
                partner = best - width
                for k in range(per_pack):
                    x, y = heavy * per_pack + k, partner * per_pack + k
                    slot2item[b, x], slot2item[b, y] = slot2item[b, y], slot2item[b, x]
                    slot_load[x], slot_load[y] = slot_load[y], slot_load[x]


def refine_by_swaps_speed(
    item_load: np.ndarray,
    slot2item: np.ndarray,
    inverse: np.ndarray,
    live_pack: np.ndarray,
    num_iters: int,
    *,
    limit: Any = None,
    xp: Any = None,
) -> np.ndarray:
    """:func:`eplb.algorithms.speed.refine_by_swaps_speed`: ``slot2item [B, n]`` (its dtype); ``limit [B, 1]``
    (optional) as there."""
    dtype = np.asarray(slot2item).dtype
    out = np.array(slot2item, dtype=np.int64, copy=True)
    batch = out.shape[0]
    num_packs = np.shape(inverse)[-1]
    inv = np.ascontiguousarray(np.broadcast_to(np.asarray(inverse, dtype=np.float32), (batch, num_packs)))
    live = np.ascontiguousarray(np.broadcast_to(live_pack, (batch, num_packs)), dtype=np.bool_)
    loads = np.ascontiguousarray(item_load, dtype=np.float32)
    bound = np.full(batch, -np.inf, np.float32) if limit is None else np.asarray(limit, np.float32)
    bound = np.ascontiguousarray(np.broadcast_to(bound.reshape(-1), (batch,)))
    _swaps(loads, out, inv, live, bound, num_iters, out.shape[1] // num_packs)
    return out.astype(dtype, copy=False)


def warm_up() -> None:
    """Compile (or load) each kernel once on a tiny input."""
    live = np.ones((1, 2), dtype=np.bool_)
    inverse = np.ones((1, 2), dtype=np.float32)
    load = np.array([[3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    order = lpt_pack_speed(load, live, inverse, 2)[0]
    pair_pack_speed(load, live, inverse, np.ones((1, 1), np.float32))
    refine_by_swaps_speed(load, order, inverse, live, 2)
