"""Shared checks of placement by time's packing kernels (Triton and numba) against eplb.algorithms.speed.

:func:`check_kernels` runs a kernel module's ``lpt_pack_speed``, ``pair_pack_speed`` and
``refine_by_swaps_speed`` on random and degenerate rows (idle packs holding the phantoms, every pack but one
idle, tied loads and speeds, all-zero rows, one item a pack; starts from LPT, shuffled, and with the heaviest
items on the slowest packs, where whole exchanges win; rounds cut short or run to the end; a limit that stops
rows half-way, at once, or not at all; budgets that every
pair, some pairs or no pair meets) and asserts they equal the array-API functions. The Triton test runs it in a
subprocess under Triton's interpreter (and on CUDA), the numba test in process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from eplb.algorithms import speed

# (rows, packs, items a pack)
SHAPES = [(6, 4, 2), (5, 8, 3), (4, 1, 2), (4, 6, 1), (3, 16, 2), (2, 5, 9)]


def inputs(rows: int, packs: int, per: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Item loads (phantoms -1 after the live items), live packs and their scaled reciprocal speeds."""
    n = packs * per
    capacity = rng.choice([1.0, 0.6, 0.5, 0.3, 0.75], (rows, packs)).astype(np.float32)
    capacity[0] = 1.0  # tied speeds
    live = rng.random((rows, packs)) < 0.8
    live[:, 0] = True
    live[1 % rows, 1:] = False  # every pack but one idle
    inverse = speed.inverse_capacity(np.where(live, capacity, 0).astype(np.float32), xp=np)
    load = (rng.lognormal(0, 1.5, (rows, n)) * rng.choice([1, 1e-3], (rows, n))).astype(np.float32)
    load[2 % rows] = np.float32(1.0)  # ties everywhere
    load[3 % rows] = 0.0
    live_items = live.sum(axis=1) * per
    ids = np.arange(n)
    load = np.where(ids < live_items[:, None], load, np.float32(-1.0))  # phantoms after the live items
    return load, live, inverse


def check_kernels(st: Any, put: Callable[[np.ndarray], Any], get: Callable[[Any], np.ndarray], shapes=SHAPES) -> None:
    """``st``'s three kernels equal the array-API functions; ``put`` converts inputs, ``get`` outputs."""
    stopped_early = 0
    for shape_id, (rows, packs, per) in enumerate(shapes):
        rng = np.random.default_rng(shape_id)
        load, live, inverse = inputs(rows, packs, per, rng)
        n = packs * per
        # LPT on time over the live items (the steps past them are unspecified: compared on live items only).
        live_items = live.sum(axis=1) * per
        weight = np.where(load >= 0, load, np.float32(0)).astype(np.float32)
        want = speed.lpt_pack_speed(weight, live, inverse, per, xp=np)
        got = [get(x) for x in st.lpt_pack_speed(put(weight), put(live), put(inverse), per)]
        np.testing.assert_array_equal(got[0], want[0])
        for g, w in zip(got[1:], want[1:], strict=True):
            step = np.arange(n) < live_items[:, None]
            np.testing.assert_array_equal(np.where(step, g, 0), np.where(step, w, 0))
        # Swaps and exchanges out of the slowest pack, from the LPT's placement and from a shuffled one.
        slot_order = np.argsort(~np.repeat(live, per, axis=1), axis=1, kind="stable")
        lpt = np.empty((rows, n), np.int64)
        step = np.arange(n) < live_items[:, None]
        slot = np.where(step, want[1] * per + want[2], slot_order)
        np.put_along_axis(lpt, slot, want[0], axis=1)
        shuffled = np.stack([np.concatenate([rng.permutation(k), np.arange(k, n)]) for k in live_items])
        shuffled = np.take_along_axis(shuffled, np.argsort(slot_order, axis=1), axis=1)  # live items, live slots
        # The heaviest items on the slowest packs: whole exchanges beat every swap there.
        speed_order = np.argsort(np.where(live, -inverse, np.inf), axis=1, kind="stable")  # slowest live first
        slots_slow_first = (speed_order[:, :, None] * per + np.arange(per)).reshape(rows, n)
        heavy_first = np.argsort(-load, axis=1, kind="stable")  # live items (>= 0) before the phantoms
        adverse = np.empty((rows, n), np.int64)
        np.put_along_axis(adverse, slots_slow_first, heavy_first, axis=1)
        exchanged = 0
        for start in (lpt, shuffled, adverse):
            for iters in (1, 2, 200):
                want_s = speed.refine_by_swaps_speed(load, start, inverse, live, iters, xp=np)
                got_s = get(st.refine_by_swaps_speed(put(load), put(start), put(inverse), put(live), iters))
                np.testing.assert_array_equal(got_s, want_s, err_msg=str((shape_id, iters)))
                if iters == 1 and per > 1:  # one round: an exchange moves every slot of two packs
                    moved = (want_s != start).reshape(rows, packs, per).all(axis=2).sum(axis=1)
                    exchanged += int(np.sum(moved >= 2))

        # With a limit a row stops once its slowest time is within it: half-way between the start's time and
        # the full search's, at the start's (no change), per row mixed with no limit (-inf).
        full = speed.refine_by_swaps_speed(load, shuffled, inverse, live, 200, xp=np)
        times = [np.max(speed.pack_times(np.take_along_axis(load, p, axis=1), inverse, live, xp=np), axis=1)
                 for p in (shuffled, full)]  # fmt: skip
        half = ((times[0] + times[1]) * np.float32(0.5)).astype(np.float32)
        mixed = np.where(np.arange(rows) % 2 == 0, half, np.float32(-np.inf)).astype(np.float32)
        args = (put(load), put(shuffled), put(inverse), put(live), 200)
        for limit in (half[:, None], times[0][:, None], mixed[:, None]):
            want_l = speed.refine_by_swaps_speed(load, shuffled, inverse, live, 200, limit=limit, xp=np)
            got_l = get(st.refine_by_swaps_speed(*args, limit=put(limit)))
            np.testing.assert_array_equal(got_l, want_l, err_msg=str((shape_id, "limit")))
            stopped_early += int(np.sum(np.any(want_l != full, axis=1)))
        if per > 1 and packs > 1:  # a slow pack full of heavy items beside fast light ones: an exchange wins
            slow = np.ones((1, packs), np.float32)
            slow[0, 0] = 0.25
            heavy = np.ones((1, n), np.float32)
            heavy[0, :per] = 10.0
            args = (heavy, np.arange(n)[None], speed.inverse_capacity(slow, xp=np), np.ones((1, packs), bool), 1)
            want_s = speed.refine_by_swaps_speed(*args, xp=np)
            got_s = get(st.refine_by_swaps_speed(*(put(a) for a in args[:4]), 1))
            np.testing.assert_array_equal(got_s, want_s)
            exchanged += int(np.all(want_s[0, :per] >= per))
        assert per == 1 or packs == 1 or exchanged > 0, "no exchange exercised"
        if per != 2:
            continue
        # Pairs under a time budget: generous, middling, impossible.
        times = np.max(speed.pack_times(np.take_along_axis(load, lpt, axis=1), inverse, live, xp=np), axis=1)
        for scale in (np.float32(4.0), np.float32(1.0), np.float32(0.25), np.float32(0.0)):
            budget = (times * scale).astype(np.float32)[:, None]
            want_p = speed.pair_pack_speed(load, live, inverse, budget, xp=np)
            got_p = get(st.pair_pack_speed(put(load), put(live), put(inverse), put(budget)))
            np.testing.assert_array_equal(got_p, want_p, err_msg=str((shape_id, scale)))
    assert stopped_early > 0, "no limit stopped a search"
