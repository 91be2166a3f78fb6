"""A lower bound at two slots per GPU: Hall's condition on the pairs, relaxed over replica counts.

With two slots per GPU every live GPU holds a *pair* of replicas, and the
other bounds (:mod:`eplb.algorithms.bounds`: total over capacity, the best
largest replica, the pigeonhole bound) ignore what its partner adds: on the
DeepSeek-V3 loads at 288 slots on 144 GPUs they sit up to 7% below the best
placement (``docs/benchmarks.md``, the exact check). This bound proves times
unreachable by counting pairs.

For thresholds ``lo`` and ``hi`` weigh a replica of load ``x``
``phi(x) = [x >= lo] + [x > hi]``. Two replicas share a GPU of room ``r``
(capacity times the time ``T``) only if their loads sum to at most ``r``, so
the GPU holds weight at most ``Phi(r)``: 4 if ``r >= 2 max(lo, hi)``, 3 if
``r >= lo + hi``, 2 if ``r >= max(lo, hi)`` or ``r >= 2 m``, 1 if ``r >= m``,
else 0, with ``m = min(lo, max(hi, 0))``. A placement reaching ``T`` thus has
``sum over replicas phi <= sum over live GPUs Phi``. Its counts ``c_e`` fill
the ``S`` live slots exactly, so for any ``lambda`` the left side equals
``sum_e c_e (phi(w_e / c_e) + lambda) - lambda S``, which is at least the
same sum with each expert's count chosen on its own to make it least (``1 <=
c <= S - E + 1``, ``w_e / c`` at most the fastest GPU's room). Where that
least value exceeds ``sum Phi``, no placement reaches ``T``.

With ``hi = c_k T - lo`` (a GPU of capacity ``c_k`` cannot hold a replica
above ``hi`` beside one of ``lo`` or more) and ``lambda = 1`` this is Hall's
condition for pairing replicas: the ones above ``hi`` need partners below
``lo``, one each. The thresholds tried: ``lo = T * 2**(-1 - 6 j / 23)`` for
``j < PARTNER_GRID`` and ``lo`` just above the room of each of three live
capacities (the slowest, the median, the fastest: replicas that only faster
GPUs can hold), each with ``hi = c_k T - lo`` for the same three ``c_k``;
``lambda`` in :data:`MULTIPLIERS`. Per expert the least
count cost is at the start of one of its three ``phi`` levels (the fewest
replicas that fit, the fewest of load at most ``hi``, the fewest below
``lo``). Bisection on ``T`` (:data:`BISECTION_STEPS`) between the other
bounds' value ``B`` and ``SPAN * B`` keeps the largest ``T`` proven
unreachable; the check need not be monotone in ``T``, as every ``T`` it
rejects is a bound.

Floats: capacities are scaled by the fastest and loads by ``B`` times it (so
times are in units of ``B``); counts come
from float32 divisions, so a count may be off by one where a replica's load
is within a few units in the last place of a threshold. Every room is
widened by :data:`SLACK` (``2**-16``, far above that rounding), so a float32
run proves only what exact arithmetic proves. Backends may differ by the
last bisection step (divisions round differently on XLA GPU); the bound
holds on each.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.speed import capacity_live

__all__ = ["BISECTION_STEPS", "MULTIPLIERS", "PARTNER_GRID", "SLACK", "SPAN", "pair_bound"]

#: Partner thresholds ``lo = T * 2**(-1 - 6 j / (PARTNER_GRID - 1))``: from half the time down to ``T / 128``.
PARTNER_GRID = 24
_PARTNER_FRACTIONS = [2.0 ** (-1 - 6 * j / (PARTNER_GRID - 1)) for j in range(PARTNER_GRID)]
#: Lagrange multipliers on the slot count (1: Hall's condition; 3/4 lets splits weigh less).
MULTIPLIERS = (0.75, 1.0)
#: Bisection steps on ``T`` in ``[B, SPAN * B]``: a bracket of ``2**-16`` of ``B`` (on the DeepSeek-V3 loads the
#: bound reaches at most 1.15 ``B``).
BISECTION_STEPS = 16
SPAN = 2.0
#: The count standing for "not possible" (costs above any GPU weight: ``4 G < 2**20``).
UNUSABLE = 2.0**20
#: Relative widening of every room, against the rounding of float32 loads and counts.
SLACK = 2.0**-16


def _hi_capacities(capacity: Any, live: Any, *, xp: Any) -> Any:
    """``[1, 3]``: the slowest, the median and the fastest live capacity (of ``capacity [1, G]``, scaled)."""
    ordered = xp.sort(xp.where(live, capacity, xp.inf), axis=-1)
    num_live = xp.sum(xp.astype(live, xp.int32), axis=-1, keepdims=True)  # [1, 1]
    zero = xp.zeros_like(num_live)
    index = xp.concat([zero, (num_live - 1) // 2, num_live - 1], axis=-1)
    index_dtype = xp.arange(1, device=_xp.device(capacity)).dtype
    return _xp.take_along(ordered, xp.astype(xp.clip(index, 0, capacity.shape[-1] - 1), index_dtype), xp=xp)


def _gpu_weight(room: Any, lo: Any, hi: Any, *, xp: Any) -> Any:
    """``Phi``: the most ``phi`` weight two replicas on a GPU of ``room`` can carry (broadcast shapes)."""
    top, low = xp.maximum(lo, hi), xp.minimum(lo, xp.maximum(hi, 0.0))
    level = xp.where(room >= low, 1.0, 0.0)
    level = xp.where((room >= top) | (room >= 2 * low), 2.0, level)
    level = xp.where(room >= lo + hi, 3.0, level)
    return xp.where(room >= 2 * top, 4.0, level)


def _unreachable(
    time: Any, load: Any, capacity: Any, live: Any, hi_capacity: Any, fraction: Any, live_slots: Any,
    max_count: Any, *, xp: Any,
) -> Any:  # fmt: skip
    """bool ``[L]``: the relaxation proves no placement reaches ``time [L]`` (scaled loads ``load [L, E]``,
    capacities ``capacity [1, G]`` with the fastest live one 1, ``hi_capacity [1, K]``, the partner thresholds'
    ``fraction [M]`` of the time)."""
    wide = (time * (1 + SLACK))[:, None]  # [L, 1]
    fit = xp.maximum(xp.ceil(load / wide), 1.0)  # [L, E]: fewest replicas that fit the fastest GPU
    misfit = xp.any(fit > max_count, axis=-1) | (xp.sum(fit, axis=-1) > live_slots)
    lo = time[:, None] * fraction  # [L, M]
    lo = xp.concat([lo, hi_capacity * (time * (1 + 2 * SLACK))[:, None]], axis=-1)  # and just above a class's room
    hi = hi_capacity[:, None, :] * (time * (1 + 2 * SLACK))[:, None, None] - lo[:, :, None]  # [L, M, K]
    load4, fit4, lo4, hi4 = load[:, None, None, :], fit[:, None, None, :], lo[:, :, None, None], hi[..., None]
    over = max_count + 1.0
    # Fewest replicas of load at most hi, and below lo: products with reciprocals (a count off by one at a
    # threshold is covered by SLACK). hi <= 0: none, zero loads too (Phi counts any replica >= max(hi, 0)).
    positive = hi4 > 0
    inverse_hi = 1.0 / xp.where(positive, hi4, 1.0)
    at_most_hi = xp.where(positive, xp.ceil(xp.minimum(load4 * inverse_hi, over)), over)
    at_most_hi = xp.maximum(at_most_hi, fit4)  # [L, M, K, E]
    below_lo = xp.maximum(xp.floor(xp.minimum(load4 * (1.0 / lo4), over)) + 1.0, fit4)  # [L, M, 1, E]
    # phi's level at each level's first count: c < below_lo adds 1, c < at_most_hi adds 1.
    level_fit = xp.astype(fit4 < below_lo, load.dtype) + xp.astype(fit4 < at_most_hi, load.dtype)
    level_hi = xp.astype(at_most_hi < below_lo, load.dtype)
    level_lo = xp.astype(below_lo < at_most_hi, load.dtype)
    # A count past the slots: a cost no GPU weight reaches (finite: inf times a level 0 would be NaN).
    usable_hi = xp.where(at_most_hi <= max_count, at_most_hi, UNUSABLE)
    usable_lo = xp.where(below_lo <= max_count, below_lo, UNUSABLE)
    room = capacity[:, None, None, :] * wide[:, :, None, None]  # [L, 1, 1, G]
    available = xp.sum(xp.where(live[:, None, None, :], _gpu_weight(room, lo4, hi4, xp=xp), 0.0), axis=-1)
    proven = misfit
    for multiplier in MULTIPLIERS:
        cost = xp.minimum(
            xp.minimum(fit4 * (level_fit + multiplier), usable_hi * (level_hi + multiplier)),
            usable_lo * (level_lo + multiplier),
        )
        needed = xp.sum(cost, axis=-1) - multiplier * live_slots  # [L, M, K]
        proven = proven | xp.any(xp.reshape(needed > available, (needed.shape[0], -1)), axis=-1)
    return proven


def pair_bound(weight: Any, start: Any, num_gpus: int, capacity: Any = None, *, xp: Any) -> Any:
    """``[L]`` float32: a bound on the slowest GPU's time (``load / capacity``; equal speeds: the heaviest GPU's
    load) of any placement with two slots on every live GPU, at least ``start [L]``.

    ``weight [L, E]`` float32, clean (>= 0); ``start``: a valid bound (the
    other bounds' largest, ``B``); ``capacity [1, num_gpus]`` float32 as
    :func:`eplb.algorithms.speed.clean_capacity` reads it (idle GPUs: 0), at
    least ``E / 2`` live GPUs, or ``None`` for equal speeds (one ``hi`` then).
    Module docstring: the relaxation and its thresholds.
    """
    num_experts = weight.shape[1]
    device = _xp.device(weight)
    if capacity is None:
        capacity = xp.ones((1, num_gpus), dtype=weight.dtype, device=device)
        live = capacity > 0
        hi_capacity = capacity[:, :1]
    else:
        hi_capacity = None
        live = capacity_live(capacity, xp=xp)
        capacity = xp.where(live, capacity, xp.zeros_like(capacity))
    fastest = xp.max(capacity, axis=-1, keepdims=True)  # [1, 1]
    capacity = capacity / fastest
    hi_capacity = hi_capacity if hi_capacity is not None else _hi_capacities(capacity, live, xp=xp)
    live_slots = 2.0 * xp.sum(xp.astype(live, weight.dtype), axis=-1)  # [1]
    max_count = live_slots - num_experts + 1
    # Time in units of B: loads over B times the fastest capacity (a GPU's time is load / capacity).
    scale = xp.where(start > 0, start, xp.ones_like(start))
    load = weight / (scale[:, None] * fastest)
    fraction = xp.astype(_xp.constant(_PARTNER_FRACTIONS, xp=xp, device=device), weight.dtype)  # once, not per step
    low = xp.ones_like(start)
    high = xp.full_like(start, SPAN)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        proven = _unreachable(middle, load, capacity, live, hi_capacity, fraction, live_slots, max_count, xp=xp)
        low, high = xp.where(proven, middle, low), xp.where(proven, high, middle)
    return xp.where(start > 0, xp.maximum(start, low * start), start)
