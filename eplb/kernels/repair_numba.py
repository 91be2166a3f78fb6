"""Equals :func:`eplb.algorithms.repair.sticky_pack` and :func:`~eplb.algorithms.repair.repair` bit for bit (numba).

Proved by ``tests/test_kernels_repair.py``: against the array-API functions on
random inputs (hierarchical and global, 1..4 nodes, 1..4 GPUs per node, 1..5
slots per GPU, one expert, tied and all-zero loads, invalid rows, budgets
around the start's moves, limits below and above its peak, a short
``max_iters``), on the arguments :func:`eplb.algorithms.stability.stabilize`
passes them for real DeepSeek-V3 loads and small configs, and through the
numpy adapter (``previous=`` with ``tolerance`` / ``max_moves``, kernels
against the array-API layer); a test also reads the machine code (float32
only, no FMA). Also here, for the same call: :func:`align_slots`, :func:`replica_counts`
and :func:`count_moves` of :mod:`eplb.algorithms.relabel` (same tests).

The elastic path (``active_gpus`` with ``previous=``,
:func:`eplb.algorithms.elastic.stabilize_elastic`) runs them on placements
whose failed GPUs' slots hold ``-1``, with :func:`sticky_pack`'s
``initial_load`` (``+inf``: a closed pack) and ``reserve``, and relabels
with :func:`relabel_pinned`; ``tests/test_kernels_repair_elastic.py``
proves those equal too (random and degenerate inputs, the arguments of real
DeepSeek-V3 calls, ``rebalance_experts`` end to end). ``-1`` is an empty
slot: never counted as an expert, weighing nothing in :func:`repair`, never
its heavy GPU, swap partner or donor; in :func:`sticky_pack` an item with
no old pack, its load (``-1``) sorting it after every item ``>= 0``.

Row by row, the same choices with the same float32 arithmetic:

- replica loads ``w * fl(1/c)`` (the table of :func:`eplb._xp.reciprocal_table`),
  GPU loads summed left to right from the first slot; every ``+``, ``-`` and
  ``*`` has two float32 operands (the constants below are float32: numba
  would widen a Python float, and the whole expression, to float64), and
  numba compiles without fast-math, so nothing is reassociated or contracted
  into an FMA;
- :func:`sticky_pack`: items by decreasing load (a stable sort: ties by
  index); the k-th copy of an expert to the pack of its k-th old copy if that
  stays within the limit, else to the open pack with the smallest running
  load (first on ties: a tournament tree whose left child wins ties), loads
  saturating at float32 max as in :func:`eplb.algorithms.packing.lpt_pack`;
  with ``reserve`` the stay rule compares the reference's float32 products
  ``((home + item) - limit) * left <= -(free * rem)``; with
  ``initial_load``, once no open pack is left, the first pack with room;
- :func:`repair`: per step the heaviest GPU ``a`` (first on ties), then each
  candidate of the reference in its index order (swaps ``(i, t)`` row-major,
  then replicate-out, replace-in with the coldest, with the hottest expert,
  each by slot ``i`` of ``a``), keeping the best as a running minimum of the
  reference's ``_lexargmin`` order: lowest ``max(new peak, limit)``, then
  fewest added moves, then lowest changed-GPU load; strict comparisons, so
  the first candidate wins ties. Only allowed candidates (inside ``a``'s
  node, the changed GPUs below ``fl(heavy * IMPROVEMENT)``, moves within the
  ``budget``) are evaluated: the others have keys ``inf`` and ``BIG`` there,
  and an allowed candidate's changed-GPU load is finite, so they never win.
  A single-slot change re-sums the GPUs that hold the two experts involved
  (or the slot); every other GPU keeps its slot loads, hence ``loads[g]`` bit
  for bit. An accepted change updates that state in place (the replica
  loads of the experts it touched, their slots, the sums of their GPUs and
  each slot's GPU load without it, each changed GPU's copy counts, which
  slots hold an expert with several replicas; the node's coldest and hottest
  experts are found again after a replica count changed) where the reference
  recomputes it every step: the same products and sums, so the same bits.
  The swaps' changed-GPU loads are computed for every slot of the node in a
  loop without branches, and the slots below the threshold collected without
  a branch per slot (about a quarter pass, in no order a branch predictor
  learns); a candidate whose changed load alone exceeds the best key so far
  is skipped (its key is at least that load). The coldest (hottest)
  expert other than ``e`` is the first extreme of the node's groups unless
  that is ``e``, then the second (loads
  are ``>= 0``, so the reference's ``-1`` filler never wins an argmax). A row
  stops at the first step without a change (``valid`` false, within the
  limit, no allowed candidate) or after ``max_iters`` steps, as
  :func:`eplb._xp.refine_rows` stops it.

Preconditions, as the reference's callers guarantee: loads are float32 as
:func:`eplb.algorithms.loads.clean_loads` leaves them (finite, ``>= 0``; sums
may overflow to ``inf`` and still match), ids in ``[0, E)`` (checked:
``ValueError``, as the kernels index with them unchecked).

The array-API version evaluates every candidate of every row as one batch of
``[B, s, R]`` and ``[B, 3s, R]`` arrays per step (~250 ms at the DeepSeek-V3
shape on numpy); here a step is a few thousand scalar operations (about 7 ms
for all 116 rows there). Compiled on first use, then cached on disk
(:mod:`eplb.kernels._numba_jit`); :func:`warm_up` compiles (or loads) every
kernel here on tiny inputs. This module imports numba.
"""

from __future__ import annotations

import numpy as np

from eplb import _xp
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.refine import IMPROVEMENT
from eplb.kernels._numba_jit import njit
from eplb.kernels._threads import map_rows
from eplb.kernels.greedy_numba import rank_desc
from eplb.kernels.relabel_numba import _max_assignment

__all__ = ["align_slots", "count_moves", "relabel_pinned", "repair", "replica_counts", "sticky_pack", "warm_up"]

_jit = njit()
# Helpers of the hot loops, inlined at numba IR level (a call costs argument marshalling and array reference counting).
_inline = njit(inline="always")

IMPROVEMENT32 = np.float32(IMPROVEMENT)  # 1 - 2**-16, exact in float32
MAX32 = np.float32(MAX_LOAD)
INF32 = np.float32(np.inf)
NEG_INF32 = np.float32(-np.inf)
TOP = 4  # heaviest GPUs kept per step for the single-slot changes


# ---------------------------------------------------------------- sticky_pack


@_jit
def _sticky_pack(
    base: np.ndarray,
    old: np.ndarray,
    item_load: np.ndarray,
    limit: np.ndarray,
    num_packs: int,
    initial: np.ndarray,
    elastic: bool,
    reserve: bool,
    out: np.ndarray,
) -> None:
    batch, n = base.shape
    capacity = n // num_packs
    num_ids = 1
    for b in range(batch):
        for t in range(n):
            num_ids = max(num_ids, base[b, t] + 1, old[b, t] + 1)
    start = np.empty(num_ids + 1, np.int64)  # CSR over experts of the old slots (ids >= 0), in slot order
    slot_of = np.empty(n, np.int64)
    seen = np.empty(num_ids, np.int64)
    affinity = np.empty(n, np.int64)
    order = np.empty(n, np.int64)
    keys = np.empty(n, np.float32)  # the loads >= 0, compacted, for rank_desc
    where = np.empty(n, np.int64)  # their items
    ranked = np.empty(n, np.int64)
    head, src, dst = np.empty(4 * n + 8, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)  # rank_desc's
    # The lightest open pack: a tournament tree over the packs (leaves size .. 2 size - 1, padding +inf);
    # a node holds the winner of its children, the left one on equal loads: np.argmin's first minimum.
    size = 1
    while size < num_packs:
        size *= 2
    open_load = np.full(size, INF32, np.float32)  # +inf once a pack is full, and for a closed pack
    closed = np.zeros(num_packs, np.bool_)
    count = np.empty(num_packs, np.int64)
    tree = np.empty(2 * size, np.int64)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for b in range(batch):
        # affinity[p]: the pack of the old slot holding the same copy (occurrence) of base[p]'s expert, or -1
        # (an empty slot, -1, has none).
        for e in range(num_ids + 1):
            start[e] = 0
        for q in range(n):
            if old[b, q] >= 0:
                start[old[b, q] + 1] += 1
        for e in range(num_ids):
            start[e + 1] += start[e]
            seen[e] = 0
        for q in range(n):
            e = old[b, q]
            if e >= 0:
                slot_of[start[e] + seen[e]] = q
                seen[e] += 1
        for e in range(num_ids):
            seen[e] = 0
        for p in range(n):
            e = base[b, p]
            affinity[p] = -1
            if e >= 0:
                k = seen[e]
                seen[e] += 1
                if start[e] + k < start[e + 1]:
                    affinity[p] = slot_of[start[e] + k] // capacity
        # Items by decreasing load, ties by index (np.argsort(-x, stable)): the loads >= 0 by the greedy
        # kernel's sort (-0 read as +0, equal to it), then the negative ones (empty slots, -1) in the same order.
        num_keys = 0
        for p in range(n):
            x = item_load[b, p]
            if x >= zero:
                keys[num_keys] = x + zero  # -0 + +0 = +0
                where[num_keys] = p
                num_keys += 1
        rank_desc(keys, num_keys, ranked, head, src, dst, False)
        for k in range(num_keys):
            order[k] = where[ranked[k]]
        rest = num_keys
        for p in range(n):
            x = item_load[b, p]
            if not x >= zero:  # insertion after the earlier items of at least its load: stable
                k = rest
                while k > num_keys and item_load[b, order[k - 1]] < x:
                    order[k] = order[k - 1]
                    k -= 1
                order[k] = p
                rest += 1
        for m in range(num_packs):
            closed[m] = elastic and initial[b, m] == INF32
            open_load[m] = INF32 if closed[m] else zero + initial[b, m]
            count[m] = 0
        for m in range(size):
            tree[size + m] = m
        for node in range(size - 1, 0, -1):
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = right if open_load[right] < open_load[left] else left
        lim = limit[b]
        rem = zero  # reserve: the loads >= 0 still to come (left-to-right sum, less each visited one), ...
        left_items = zero  # ... and how many they are
        if reserve:
            for p in range(n):
                x = item_load[b, p]
                x = x if x >= zero else zero
                rem = x if p == 0 else rem + x
                if item_load[b, p] >= zero:
                    left_items = left_items + one
        for step in range(n):
            item = order[step]
            load = item_load[b, item]
            home = affinity[item]
            if reserve:
                rem = rem - (load if load >= zero else zero)
                left_items = left_items - (one if load >= zero else zero)
            stay = False
            if home >= 0:
                home_load = open_load[home]
                if reserve:
                    # Room for the home's other free slots at the mean load of the items to come, products
                    # compared: (home + item - limit) * left <= -(free slots after it) * rem.
                    if home_load < INF32:
                        free = np.float32(capacity - 1 - count[home])
                        stay = (home_load + load - lim) * left_items <= -(free * rem)
                else:
                    # A full home has load +inf, never within a finite limit; count < capacity guards
                    # an infinite limit (overflowing loads, which the public API rejects) from writing out of range.
                    stay = home_load + load <= lim and count[home] < capacity
            pack = home if stay else tree[1]
            if not stay and elastic and open_load[pack] == INF32:
                pack = 0  # every open pack full: the first pack with room (a closed one)
                for m in range(num_packs):
                    if count[m] < capacity:
                        pack = m
                        break
            rank = count[pack]
            count[pack] += 1
            if count[pack] == capacity or closed[pack]:
                open_load[pack] = INF32
            else:
                total = open_load[pack] + load
                open_load[pack] = total if total <= MAX32 else MAX32
            node = (size + pack) // 2
            while node > 0:
                left, right = tree[2 * node], tree[2 * node + 1]
                tree[node] = right if open_load[right] < open_load[left] else left
                node //= 2
            out[b, pack * capacity + rank] = base[b, item]


def sticky_pack(
    base: np.ndarray,
    old: np.ndarray,
    item_load: np.ndarray,
    limit: np.ndarray,
    num_packs: int,
    *,
    initial_load: np.ndarray | None = None,
    reserve: bool = False,
) -> np.ndarray:
    """:func:`eplb.algorithms.repair.sticky_pack` (same arguments but ``xp``): ``base`` repacked near ``old``.

    ``base``, ``old`` ``[B, n]`` integer ids >= 0 (with ``initial_load``:
    >= -1, ``-1`` an empty slot); ``item_load [B, n]``, ``limit [B, 1]`` and
    ``initial_load [B, m]`` (or ``[1, m]``) float32. Returns ``[B, n]`` in
    ``base``'s dtype. Rows are independent: threaded as :func:`repair`'s.
    """
    _check_float32(item_load, limit)
    _check_ids(None, base, old, lowest=0 if initial_load is None else -1)
    batch = base.shape[0]
    if initial_load is None:
        initial = np.zeros((batch, num_packs), np.float32)
    else:
        _check_float32(initial_load)
        initial = np.ascontiguousarray(np.broadcast_to(initial_load, (batch, num_packs)))
    rows = (
        np.ascontiguousarray(base, dtype=np.int64),
        np.ascontiguousarray(old, dtype=np.int64),
        np.ascontiguousarray(item_load),
        np.ascontiguousarray(np.reshape(limit, (-1,))),
        initial,
    )

    def run(part: np.ndarray | None) -> tuple[np.ndarray]:
        mine = rows if part is None else tuple(a[part] for a in rows)
        out = np.empty(mine[0].shape, np.int64)
        _sticky_pack(*mine[:4], num_packs, mine[4], initial_load is not None, bool(reserve), out)
        return (out,)

    (out,) = map_rows(run, batch, MIN_ROWS_PER_THREAD)
    return out.astype(base.dtype, copy=False)


@_jit
def _count_moves_rows(new: np.ndarray, old: np.ndarray, per_gpu: int, num_ids: int, out: np.ndarray) -> None:
    count = np.zeros(num_ids, np.int64)
    for b in range(new.shape[0]):
        out[b] = _count_moves(new[b], old[b], per_gpu, count)


def count_moves(new: np.ndarray, old: np.ndarray, num_gpus: int) -> np.ndarray:
    """:func:`eplb.algorithms.relabel.count_moves` (same arguments but ``xp``): ``[B]`` in ``new``'s dtype.

    The ``(expert, GPU)`` pairs of ``new [B, R]`` that ``old [B, R]`` lacks,
    as multisets per GPU; ids ``>= -1`` (``-1`` an empty slot, matched like
    any id; lower ids raise ``ValueError``). numpy's reductions over the few
    slots of a GPU cost about 1 ms on DeepSeek-V3's 58 layers; this about
    0.2 ms, its wrapper included.
    """
    _check_ids(None, new, old, lowest=-1)
    new, old = np.ascontiguousarray(new, dtype=np.int64), np.ascontiguousarray(old, dtype=np.int64)
    num_ids = 1 + max(int(new.max(initial=-1)), int(old.max(initial=-1)))
    out = np.empty(new.shape[0], np.int64)
    _count_moves_rows(new, old, new.shape[1] // num_gpus, num_ids, out)
    return out.astype(new.dtype, copy=False)


# ---------------------------------------------------------------- repair


@_inline
def _count_moves(new: np.ndarray, old: np.ndarray, per_gpu: int, count: np.ndarray) -> int:
    """:func:`eplb.algorithms.relabel.count_moves` of one row, ids in ``[-1, len(count))``: pairs of ``new``
    absent from ``old``, per GPU. Old's copies are counted per expert (``count``: zeros, zeros again on return;
    ``-1`` apart), and each of new's copies is kept while old has one left."""
    num_phy = new.shape[0]
    kept = 0
    for lo in range(0, num_phy, per_gpu):
        empty = 0  # old's -1 slots on this GPU
        for r in range(lo, lo + per_gpu):
            if old[r] >= 0:
                count[old[r]] += 1
            else:
                empty += 1
        for q in range(lo, lo + per_gpu):
            e = new[q]
            if e >= 0:
                if count[e] > 0:
                    kept += 1
                    count[e] -= 1
            elif empty > 0:
                kept += 1
                empty -= 1
        for r in range(lo, lo + per_gpu):
            if old[r] >= 0:
                count[old[r]] = 0
    return num_phy - kept


@_inline
def _copies(row: np.ndarray, lo: int, size: int, e: int) -> int:
    """Copies of ``e`` in ``row[lo : lo + size]``."""
    c = 0
    for k in range(lo, lo + size):
        if row[k] == e:
            c += 1
    return c


@_inline
def _new_slot_load(
    cur: np.ndarray,
    slot_load: np.ndarray,
    t: int,
    slot: int,
    expert: int,
    gone: int,
    load_in: np.float32,
    load_gone: np.float32,
) -> np.float32:
    """Slot ``t``'s load after ``cur[slot] = expert``: ``expert``'s and ``gone``'s replicas take their new loads."""
    e = cur[t]
    kept = load_gone if e == gone else slot_load[t]
    return load_in if (t == slot) | (e == expert) else kept


@_inline
def _rewrite(
    cur: np.ndarray,
    cnt: np.ndarray,
    old: np.ndarray,
    weight: np.ndarray,
    recip: np.ndarray,
    slot_load: np.ndarray,
    loads: np.ndarray,
    top: np.ndarray,
    num_top: int,
    head: np.ndarray,
    slots_of: np.ndarray,
    mark: np.ndarray,
    affected: np.ndarray,
    stamp: int,
    threshold: np.float32,
    slot: int,
    expert: int,
) -> tuple:
    """The reference's ``_rewrite`` of one change ``cur[slot] = expert``: (new heaviest GPU load, change in moves).

    The new loads of the replaced expert's and of ``expert``'s replicas
    change the sums of the GPUs holding them (and of the slot's GPU), which
    are summed again, left to right; every other GPU keeps every slot load
    (same expert, same count: the same product), so its sum is ``loads[g]``
    bit for bit, and the heaviest of them is the first unchanged GPU of
    ``top[:num_top]`` (the heaviest GPUs, heaviest first), else found by a
    scan. The heaviest GPU is a maximum (no NaN): the order in which GPUs
    are visited does not change it. A change whose new heaviest GPU is at
    least ``threshold`` is not allowed, whatever its moves: then that load,
    or any other at least ``threshold``, is returned as soon as it is known.
    ``head``/``slots_of``: the slots of each expert in ``cur`` (CSR);
    ``mark``: scratch over GPUs, ``stamp`` a value it does not hold;
    ``affected``: scratch over GPUs.
    """
    num_gpus = loads.shape[0]
    per_gpu = cur.shape[0] // num_gpus
    gone = cur[slot]
    num_affected = 0
    if expert != gone:  # else the same slots and counts: the same sums
        g = slot // per_gpu
        mark[g] = stamp
        affected[0] = g
        num_affected = 1
        for k in range(head[expert], head[expert + 1]):
            g = slots_of[k] // per_gpu
            if mark[g] != stamp:
                mark[g] = stamp
                affected[num_affected] = g
                num_affected += 1
        for k in range(head[gone], head[gone + 1]):
            g = slots_of[k] // per_gpu
            if mark[g] != stamp:
                mark[g] = stamp
                affected[num_affected] = g
                num_affected += 1
    peak = NEG_INF32
    found = False
    for k in range(num_top):
        if mark[top[k]] != stamp:
            peak = loads[top[k]]
            found = True
            break
    if not found:
        for g in range(num_gpus):
            if mark[g] != stamp and loads[g] > peak:
                peak = loads[g]
    if peak >= threshold:
        return peak, 0
    if num_affected > 0:
        load_in = weight[expert] * recip[cnt[expert] + 1]
        load_gone = weight[gone] * recip[cnt[gone] - 1]
        for k in range(num_affected):
            lo = affected[k] * per_gpu
            # Left to right from the first slot, each slot's new load chosen without a branch.
            total = _new_slot_load(cur, slot_load, lo, slot, expert, gone, load_in, load_gone)
            for t in range(lo + 1, lo + per_gpu):
                total = total + _new_slot_load(cur, slot_load, t, slot, expert, gone, load_in, load_gone)
            if total >= threshold:
                return total, 0
            if total > peak:
                peak = total
    lo = (slot // per_gpu) * per_gpu
    added = 1 if _copies(cur, lo, per_gpu, expert) >= _copies(old, lo, per_gpu, expert) else 0
    removed = 1 if _copies(cur, lo, per_gpu, gone) > _copies(old, lo, per_gpu, gone) else 0
    return peak, added - removed


@_inline
def _better(
    key: np.float32, moves: int, second: np.float32, bkey: np.float32, bmoves: int, bsecond: np.float32
) -> bool:
    """``_lexargmin``'s order: lower ``key``, then fewer ``moves``, then lower ``second`` (the earlier wins ties)."""
    if key < bkey:
        return True
    if key != bkey:
        return False
    if moves < bmoves:
        return True
    return moves == bmoves and second < bsecond


@_inline
def _extremes(values: np.ndarray, here: np.ndarray, group_size: int, largest: bool) -> tuple:
    """The first and the second (first but the first) lowest (``largest``: highest) of ``values`` over the experts
    of the groups marked in ``here``; -1 where there is none.

    The coldest (hottest) expert other than ``e`` is the first unless that is ``e``, then the second: the
    reference's argmin (argmax) over the allowed experts.
    """
    first = -1
    second = -1
    for k in range(here.shape[0]):  # the experts of the marked groups, in index order
        if not here[k]:
            continue
        for f in range(k * group_size, (k + 1) * group_size):
            v = values[f]
            if first < 0 or (v > values[first] if largest else v < values[first]):
                first, second = f, first
            elif second < 0 or (v > values[second] if largest else v < values[second]):
                second = f
    return first, second


@_inline
def _gpu_sum(slot_load: np.ndarray, lo: int, per_gpu: int) -> np.float32:
    """A GPU's load: its slot loads summed left to right from ``slot_load[lo]`` (the reference's order)."""
    total = slot_load[lo]
    for t in range(lo + 1, lo + per_gpu):
        total = total + slot_load[t]
    return total


@_inline
def _own_copies(
    cur: np.ndarray,
    old: np.ndarray,
    lo: int,
    per_gpu: int,
    own_now: np.ndarray,
    own_old: np.ndarray,
    count_now: np.ndarray,
    count_old: np.ndarray,
) -> None:
    """Per slot ``t`` of the GPU at ``lo``: copies of ``cur[t]`` on that GPU now and in ``old`` (0 for ``-1``).

    ``count_now``, ``count_old``: zeros over experts, zeros again on return (a count per expert: a pass over the
    GPU's slots, not one per slot).
    """
    for t in range(lo, lo + per_gpu):
        if cur[t] >= 0:
            count_now[cur[t]] += 1
        if old[t] >= 0:
            count_old[old[t]] += 1
    for t in range(lo, lo + per_gpu):
        e = cur[t]
        own_now[t] = count_now[e] if e >= 0 else 0
        own_old[t] = count_old[e] if e >= 0 else 0
    for t in range(lo, lo + per_gpu):
        if cur[t] >= 0:
            count_now[cur[t]] = 0
        if old[t] >= 0:
            count_old[old[t]] = 0


@_inline
def _room(loads: np.ndarray, slot_load: np.ndarray, g: int, per_gpu: int, room: np.ndarray) -> None:
    """``room[t] = loads[g] - slot_load[t]`` for the slots of GPU ``g``: its load without each of them."""
    for t in range(g * per_gpu, (g + 1) * per_gpu):
        room[t] = loads[g] - slot_load[t]


@_inline
def _donors(cur: np.ndarray, cnt: np.ndarray, donor: np.ndarray) -> None:
    """``donor[t]`` per slot: slot ``t`` holds an expert with several replicas (``-1``: none)."""
    for t in range(cur.shape[0]):
        donor[t] = cur[t] >= 0 and cnt[cur[t]] >= 2


@_inline
def _csr(row: np.ndarray, scratch: np.ndarray, head: np.ndarray, slots_of: np.ndarray, where: np.ndarray) -> None:
    """The slots of each expert of ``row`` (``-1`` left out), in slot order: ``slots_of[head[e]:head[e + 1]]``;
    ``where[t]``: the index of slot ``t`` in ``slots_of`` (unset for ``-1`` slots).

    ``scratch`` (zeros over experts) is zeros again on return.
    """
    for e in range(head.shape[0]):
        head[e] = 0
    for t in range(row.shape[0]):
        if row[t] >= 0:
            head[row[t] + 1] += 1
    for e in range(head.shape[0] - 1):
        head[e + 1] += head[e]
    for t in range(row.shape[0]):
        e = row[t]
        if e >= 0:
            slots_of[head[e] + scratch[e]] = t
            where[t] = head[e] + scratch[e]
            scratch[e] += 1
    for t in range(row.shape[0]):
        if row[t] >= 0:
            scratch[row[t]] = 0


@_jit
def _repair(
    start: np.ndarray,
    start_cnt: np.ndarray,
    old: np.ndarray,
    weight: np.ndarray,
    limit: np.ndarray,
    budget: np.ndarray,
    valid: np.ndarray,
    recip: np.ndarray,
    num_gpus: int,
    num_nodes: int,
    group_size: int,
    max_iters: int,
    out: np.ndarray,
    out_cnt: np.ndarray,
    out_moved: np.ndarray,
) -> None:
    batch, num_phy = start.shape
    num_log = weight.shape[1]
    per_gpu = num_phy // num_gpus
    per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    num_groups = num_log // group_size
    per_replica = np.empty(num_log, np.float32)
    extra = np.empty(num_log, np.float32)  # with one more replica
    slot_load = np.empty(num_phy, np.float32)
    loads = np.empty(num_gpus, np.float32)
    out_e = np.empty(per_gpu, np.int64)
    out_x = np.empty(per_gpu, np.float32)
    now_a_e = np.empty(per_gpu, np.int64)  # copies of each expert of the heavy GPU a there, now and in old
    was_a_e = np.empty(per_gpu, np.int64)
    own_now = np.empty(num_phy, np.int64)  # copies of each slot's expert on its own GPU, now and in old
    own_old = np.empty(num_phy, np.int64)
    now_b_e = np.empty((per_gpu, gpus_per_node), np.int64)  # copies of a's experts on each GPU of the node
    was_b_e = np.empty((per_gpu, gpus_per_node), np.int64)
    count_now = np.zeros(num_log, np.int64)  # per-expert counters, back to zero after each use
    count_old = np.zeros(num_log, np.int64)
    head = np.empty(num_log + 1, np.int64)  # CSR: the slots of each expert
    slots_of = np.empty(num_phy, np.int64)
    where = np.empty(num_phy, np.int64)  # the index of each slot in slots_of
    old_head = np.empty(num_log + 1, np.int64)  # ... in old (fixed per row)
    old_slots = np.empty(num_phy, np.int64)
    mark = np.full(num_gpus, -1, np.int64)
    stamp = 0
    zero = np.float32(0.0)
    affected = np.empty(num_gpus, np.int64)
    room = np.empty(num_phy, np.float32)  # each slot's GPU load without it: loads[g] - slot_load[t]
    donor = np.empty(num_phy, np.bool_)  # whether each slot holds an expert with several replicas
    swap_changed = np.empty(per_node, np.float32)
    passing = np.empty(per_node, np.int64)
    heaviest = np.empty(TOP, np.int64)  # the heaviest GPUs, heaviest first
    # Per node: the coldest and hottest experts of the groups on it (first and second, see _extremes), valid
    # until a replica count changes (a swap keeps every expert on its node and every count).
    extremes = np.empty((num_nodes, 4), np.int64)
    extremes_known = np.zeros(num_nodes, np.bool_)
    donors = np.empty(per_node, np.int64)  # the node's slots that hold an expert with several replicas
    gpu_of = np.empty(num_phy, np.int64)  # each slot's GPU (a table: no division in the step)
    for t in range(num_phy):
        gpu_of[t] = t // per_gpu
    here = np.empty(num_groups, np.bool_)
    group_of = np.empty(num_log, np.int64)  # each expert's group (a table: no division in the step)
    for e in range(num_log):
        group_of[e] = e // group_size
    for b in range(batch):
        cur = out[b]
        cnt = out_cnt[b]
        cur[:] = start[b]
        cnt[:] = start_cnt[b]
        old_b = old[b]
        w = weight[b]
        lim = limit[b]
        cap = budget[b]
        moved = _count_moves(cur, old_b, per_gpu, count_old)
        out_moved[b] = moved
        if not valid[b]:
            continue
        # The state a step reads, kept up to date after each change (the reference recomputes it every step:
        # the same products and left-to-right sums, so the same bits): replica loads with the current and with
        # one more replica, slot loads, GPU loads, each slot's copies on its GPU; old's CSR never changes.
        for e in range(num_log):
            per_replica[e] = w[e] * recip[cnt[e]]
            extra[e] = w[e] * recip[cnt[e] + 1]
        for t in range(num_phy):
            slot_load[t] = per_replica[cur[t]] if cur[t] >= 0 else zero  # an empty slot weighs nothing
        for g in range(num_gpus):
            loads[g] = _gpu_sum(slot_load, g * per_gpu, per_gpu)
            _room(loads, slot_load, g, per_gpu, room)
            _own_copies(cur, old_b, g * per_gpu, per_gpu, own_now, own_old, count_now, count_old)
        _donors(cur, cnt, donor)
        extremes_known[:] = False
        _csr(old_b, count_now, old_head, old_slots, where)
        listed = False  # whether head / slots_of list cur's slots (a swap keeps them listed, see below)
        for _ in range(max_iters):
            # One pass: the heaviest live GPU, first on ties (a failed GPU's slots are all -1), and the TOP
            # heaviest GPUs, heaviest first, first on ties (a strict comparison: a later GPU goes after an equal).
            heavy = -1
            num_top = 0
            for g in range(num_gpus):
                load_g = loads[g]
                if cur[g * per_gpu] >= 0 and (heavy < 0 or load_g > loads[heavy]):
                    heavy = g
                if num_top < TOP or load_g > loads[heaviest[num_top - 1]]:
                    k = min(num_top, TOP - 1)
                    while k > 0 and loads[heaviest[k - 1]] < load_g:
                        heaviest[k] = heaviest[k - 1]
                        k -= 1
                    heaviest[k] = g
                    num_top = min(num_top + 1, TOP)
            if heavy < 0:  # no live GPU: nothing to do
                break
            heavy_load = loads[heavy]
            if not heavy_load > lim:
                break
            threshold = heavy_load * IMPROVEMENT32
            if not listed:  # the slots of each expert now (any order within an expert: only sets are read)
                _csr(cur, count_now, head, slots_of, where)
                listed = True
            a0 = heavy * per_gpu
            node = heavy // gpus_per_node
            n0 = node * per_node
            g0 = node * gpus_per_node
            # Counters over experts: -1 (an empty slot, of cur on a failed GPU or of old anywhere) is none.
            for i in range(per_gpu):
                out_e[i] = cur[a0 + i]
                out_x[i] = slot_load[a0 + i]
                count_now[cur[a0 + i]] += 1
                if old_b[a0 + i] >= 0:
                    count_old[old_b[a0 + i]] += 1
            for i in range(per_gpu):
                now_a_e[i] = count_now[out_e[i]]
                was_a_e[i] = count_old[out_e[i]]
            # (count_now and count_old keep a's copies until the swap partners below have read them.)
            # Copies of each expert of a on each GPU of the node, now and in old: from the CSRs (most are 0).
            now_b_e[:, :] = 0
            was_b_e[:, :] = 0
            for i in range(per_gpu):
                e = out_e[i]
                for k in range(head[e], head[e + 1]):
                    v = slots_of[k] // per_gpu - g0
                    if 0 <= v < gpus_per_node:
                        now_b_e[i, v] += 1
                for k in range(old_head[e], old_head[e + 1]):
                    v = old_slots[k] // per_gpu - g0
                    if 0 <= v < gpus_per_node:
                        was_b_e[i, v] += 1
            # The heaviest GPU but a and g (-inf if none) is the reference's top of the others (the first of the
            # heaviest), or for g = top the second: the heaviest of the others but top, ties included. Both are
            # among the TOP heaviest (a is one of them, or lighter than all), in that order.
            top = 0
            top_load = NEG_INF32
            second = NEG_INF32
            has_top = False
            for k in range(num_top):
                g = heaviest[k]
                if g == heavy:
                    continue
                if not has_top:
                    top, top_load, has_top = g, loads[g], True
                else:
                    second = loads[g]
                    break
            # The best allowed candidate so far, candidates visited in the reference's index order.
            has_best = False
            best_key = INF32
            best_moves = 0
            best_second = INF32
            best_swap = True  # swap slot best_i of a with best_t; else cur[best_t] = best_e
            best_i = 0
            best_t = 0
            best_e = 0
            # Swaps: slot i of the heavy GPU <-> slot t of another GPU of its node (2 moves at most), t in slot
            # order. The changed GPUs' loads of every slot of the node first, in a loop without branches
            # (vectorised: room[t] is kept up to date, see below); then, in slot order, the few below the
            # threshold that are partners (off the heavy GPU, on a live one), key = max(max(changed, rest), limit)
            # = max(changed, max(rest, limit)).
            floor_top = second if second >= lim else lim  # max(rest, limit): rest the heaviest GPU but a and g
            floor_other = top_load if top_load >= lim else lim
            for i in range(per_gpu):
                e = out_e[i]
                x = out_x[i]
                less_a = heavy_load - x
                moves_i = -1 if now_a_e[i] > was_a_e[i] else 0
                for u in range(per_node):
                    new_a = less_a + slot_load[n0 + u]
                    new_b = room[n0 + u] + x
                    swap_changed[u] = new_a if new_a >= new_b else new_b
                # The slots below the threshold, in order, without a branch per slot (about a quarter pass, at
                # random: a branch would be mispredicted often).
                num_pass = 0
                for u in range(per_node):
                    passing[num_pass] = u
                    num_pass += swap_changed[u] < threshold
                for k in range(num_pass):
                    u = passing[k]
                    changed = swap_changed[u]
                    if has_best and changed > best_key:  # its key is at least changed: never better
                        continue
                    t = n0 + u
                    f = cur[t]
                    if f < 0 or f == e or a0 <= t < a0 + per_gpu:  # a failed GPU's slot, e itself, the heavy GPU
                        continue
                    g = gpu_of[t]
                    onto_a = 1 if count_now[f] >= count_old[f] else 0  # f's copy on a would be a new pair
                    off_b = 1 if own_now[t] > own_old[t] else 0  # t gives up one of f's extra copies on its GPU
                    v = g - g0
                    moves = moves_i + (onto_a - off_b) + (1 if now_b_e[i, v] >= was_b_e[i, v] else 0)
                    if moved + moves > cap:
                        continue
                    floor = floor_top if g == top else floor_other
                    key = changed if changed >= floor else floor
                    if not has_best or _better(key, moves, changed, best_key, best_moves, best_second):
                        has_best = True
                        best_key, best_moves, best_second = key, moves, changed
                        best_swap, best_i, best_t = True, i, t
            for i in range(per_gpu):
                count_now[cur[a0 + i]] = 0
                if old_b[a0 + i] >= 0:
                    count_old[old_b[a0 + i]] = 0
            # Replicate out: expert e of a takes the slot of a multi-replica expert of the node where the
            # change leaves that slot's GPU lightest (first on ties).
            num_donors = 0
            for t in range(n0, n0 + per_node):  # a failed GPU's slot gives no expert (not a donor)
                if donor[t]:
                    donors[num_donors] = t
                    num_donors += 1
            for i in range(per_gpu):
                e = out_e[i]
                grown = extra[e]
                target = 0
                guess = INF32
                found = False
                for k in range(num_donors):
                    t = donors[k]
                    if cur[t] == e:
                        continue
                    found = True
                    value = room[t] + grown
                    if value < guess:
                        target, guess = t, value
                if not found:
                    continue
                stamp += 1
                peak, moves = _rewrite(
                    cur,
                    cnt,
                    old_b,
                    w,
                    recip,
                    slot_load,
                    loads,
                    heaviest,
                    num_top,
                    head,
                    slots_of,
                    mark,
                    affected,
                    stamp,
                    threshold,
                    target,
                    e,
                )
                if not peak < threshold or moved + moves > cap:
                    continue
                key = peak if peak >= lim else lim
                if not has_best or _better(key, moves, peak, best_key, best_moves, best_second):
                    has_best = True
                    best_key, best_moves, best_second = key, moves, peak
                    best_swap, best_t, best_e = False, target, e
            # Replace in: a slot of a whose expert has several replicas gets the coldest expert (lightest
            # extra replica), then the hottest (heaviest replicas), of the groups present on the node.
            if not extremes_known[node]:
                for k in range(num_groups):
                    here[k] = False
                for u in range(per_node):
                    if cur[n0 + u] >= 0:
                        here[group_of[cur[n0 + u]]] = True
                extremes[node, 0], extremes[node, 1] = _extremes(extra, here, group_size, False)
                extremes[node, 2], extremes[node, 3] = _extremes(per_replica, here, group_size, True)
                extremes_known[node] = True
            cold1, cold2, hot1, hot2 = extremes[node, 0], extremes[node, 1], extremes[node, 2], extremes[node, 3]
            for hot in range(2):
                for i in range(per_gpu):
                    e = out_e[i]
                    if cnt[e] < 2:
                        continue
                    if hot == 0:
                        pick = cold1 if cold1 != e else cold2
                    else:
                        pick = hot1 if hot1 != e else hot2
                        if pick == (cold1 if cold1 != e else cold2):
                            continue  # the same change as the coldest, at a later index: never better
                    if pick < 0:  # no other expert of those groups
                        continue
                    stamp += 1
                    peak, moves = _rewrite(
                        cur,
                        cnt,
                        old_b,
                        w,
                        recip,
                        slot_load,
                        loads,
                        heaviest,
                        num_top,
                        head,
                        slots_of,
                        mark,
                        affected,
                        stamp,
                        threshold,
                        a0 + i,
                        pick,
                    )
                    if not peak < threshold or moved + moves > cap:
                        continue
                    key = peak if peak >= lim else lim
                    if not has_best or _better(key, moves, peak, best_key, best_moves, best_second):
                        has_best = True
                        best_key, best_moves, best_second = key, moves, peak
                        best_swap, best_t, best_e = False, a0 + i, pick
            if not has_best:
                break
            if best_swap:  # same replicas, same counts: two slot loads trade places, two GPUs change
                give = a0 + best_i
                cur[give], cur[best_t] = cur[best_t], cur[give]
                slot_load[give], slot_load[best_t] = slot_load[best_t], slot_load[give]
                # The two experts trade slots: each one's entry for its old slot names the other slot.
                slots_of[where[give]], slots_of[where[best_t]] = best_t, give
                where[give], where[best_t] = where[best_t], where[give]
                donor[give], donor[best_t] = donor[best_t], donor[give]
                for g in (heavy, best_t // per_gpu):
                    loads[g] = _gpu_sum(slot_load, g * per_gpu, per_gpu)
                    _room(loads, slot_load, g, per_gpu, room)
                    _own_copies(cur, old_b, g * per_gpu, per_gpu, own_now, own_old, count_now, count_old)
            else:  # every replica of the two experts changes load: their GPUs are summed again
                gone = cur[best_t]
                cur[best_t] = best_e
                cnt[best_e] += 1
                cnt[gone] -= 1
                for e in (best_e, gone):
                    per_replica[e] = w[e] * recip[cnt[e]]
                    extra[e] = w[e] * recip[cnt[e] + 1]
                stamp += 1
                g = best_t // per_gpu
                mark[g] = stamp
                affected[0] = g
                num_affected = 1
                slot_load[best_t] = per_replica[best_e]
                for e in (best_e, gone):  # the CSR is of cur before the change: best_t is listed under gone
                    for k in range(head[e], head[e + 1]):
                        t = slots_of[k]
                        if t == best_t:
                            continue
                        slot_load[t] = per_replica[e]
                        donor[t] = cnt[e] >= 2
                        g = t // per_gpu
                        if mark[g] != stamp:
                            mark[g] = stamp
                            affected[num_affected] = g
                            num_affected += 1
                for k in range(num_affected):
                    g = affected[k]
                    loads[g] = _gpu_sum(slot_load, g * per_gpu, per_gpu)
                    _room(loads, slot_load, g, per_gpu, room)
                g = best_t // per_gpu
                _own_copies(cur, old_b, g * per_gpu, per_gpu, own_now, own_old, count_now, count_old)
                # (best_t stays a donor: it held an expert with several replicas, a donor's or one of a's whose count
                # is at least 2, and now holds best_e, which has at least 2.)
                extremes_known[:] = False
                listed = False  # the counts changed: listed again next step
            moved += best_moves
        out_moved[b] = moved


def repair(
    start: np.ndarray,
    start_cnt: np.ndarray,
    old: np.ndarray,
    weight: np.ndarray,
    limit: np.ndarray,
    budget: np.ndarray,
    valid: np.ndarray,
    num_gpus: int,
    num_nodes: int,
    group_size: int,
    max_iters: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`eplb.algorithms.repair.repair` (same arguments but ``xp``): local search toward ``limit``.

    ``start``, ``old`` ``[B, R]`` and ``start_cnt [B, E]`` integer;
    ``weight [B, E]`` and ``limit [B, 1]`` float32; ``budget [B, 1]``
    integer; ``valid [B, 1]`` bool. Returns ``phy2log [B, R]`` (``start``'s
    dtype), replica counts ``[B, E]`` (``start_cnt``'s) and moves ``[B, 1]``
    (int64). ``-1`` is an empty slot: in ``start`` the slots of a failed
    GPU, all of them (they weigh nothing, take no expert and give none, as
    in the reference); in ``old`` anywhere. Other ids outside ``[0, E)``, or
    ``-1`` on part of a GPU of ``start``, raise ``ValueError`` (the
    reference cannot gather their loads either; the kernel does not check
    bounds).

    Rows are independent: a batch of at least ``2 * MIN_ROWS_PER_THREAD``
    rows runs on up to :data:`eplb.kernels._threads.THREADS` threads, rows
    dealt round-robin (:func:`eplb.kernels._threads.map_rows`); each row's
    result is the one-thread result.
    """
    _check_float32(weight, limit)
    _check_ids(weight.shape[1], start, old, lowest=-1)
    _check_empty_gpus(start, num_gpus)
    batch, num_phy = start.shape
    recip = np.asarray(_xp.reciprocal_table(num_phy + 1, xp=np), dtype=np.float32)
    rows = (
        np.ascontiguousarray(start, dtype=np.int64),
        np.ascontiguousarray(start_cnt, dtype=np.int64),
        np.ascontiguousarray(old, dtype=np.int64),
        np.ascontiguousarray(weight),
        np.ascontiguousarray(np.reshape(limit, (-1,))),
        np.ascontiguousarray(np.reshape(budget, (-1,)), dtype=np.int64),
        np.ascontiguousarray(np.reshape(valid, (-1,)), dtype=np.bool_),
    )
    sizes = (num_gpus, num_nodes, group_size, max_iters)

    def run(part: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mine = rows if part is None else tuple(a[part] for a in rows)
        out = np.empty(mine[0].shape, np.int64), np.empty(mine[1].shape, np.int64), np.empty(len(mine[0]), np.int64)
        _repair(*mine, recip, *sizes, *out)
        return out

    out, out_cnt, out_moved = map_rows(run, batch, MIN_ROWS_PER_THREAD)
    return out.astype(start.dtype, copy=False), out_cnt.astype(start_cnt.dtype, copy=False), out_moved[:, None]


# repair's rows run on up to eplb.kernels._threads.THREADS threads, at least MIN_ROWS_PER_THREAD rows each (fewer:
# one thread, as splitting costs more than it saves). On the 2-core dev machine two threads take the 144-GPU
# balance_tolerance call of a prefill/decode change from 53 to 33 ms; similar loads gain little.
MIN_ROWS_PER_THREAD = 16


@_jit
def _align_all(new: np.ndarray, old: np.ndarray, per_gpu: int, out: np.ndarray) -> None:
    """Per GPU: the k-th copy of an expert goes to the slot of its k-th old copy there, if any; the other
    entries fill the remaining slots in their order (``relabel_numba._align_slots``, without views)."""
    match = np.empty(per_gpu, np.int64)  # old slot of each new entry, -1 if none
    taken = np.empty(per_gpu, np.bool_)
    for b in range(new.shape[0]):
        for lo in range(0, new.shape[1], per_gpu):
            for r in range(per_gpu):
                taken[r] = False
            for q in range(per_gpu):
                e = new[b, lo + q]
                k = 0  # occurrence of this copy
                for r in range(q):
                    if new[b, lo + r] == e:
                        k += 1
                match[q] = -1
                for r in range(per_gpu):
                    if old[b, lo + r] == e:
                        if k == 0:
                            match[q] = r
                            taken[r] = True
                            break
                        k -= 1
            r = 0
            for q in range(per_gpu):
                if match[q] >= 0:
                    out[b, lo + match[q]] = new[b, lo + q]
                else:
                    while taken[r]:
                        r += 1
                    out[b, lo + r] = new[b, lo + q]
                    r += 1


def align_slots(new: np.ndarray, old: np.ndarray, num_gpus: int) -> np.ndarray:
    """:func:`eplb.algorithms.relabel.align_slots` (same arguments but ``xp``): each GPU's slots of ``new [B, R]``
    reordered so that experts it keeps sit in their old slots."""
    out = np.empty(new.shape, np.int64)
    _align_all(
        np.ascontiguousarray(new, dtype=np.int64),
        np.ascontiguousarray(old, dtype=np.int64),
        new.shape[1] // num_gpus,
        out,
    )
    return out.astype(new.dtype, copy=False)


@_jit
def _relabel_pinned(
    new: np.ndarray, old: np.ndarray, live: np.ndarray, num_gpus: int, num_nodes: int, out: np.ndarray
) -> None:
    batch, num_phy = new.shape
    per_gpu = num_phy // num_gpus
    gpus_per_node = num_gpus // num_nodes
    profit = np.empty((num_gpus, num_gpus), np.int64)
    col_of_row = np.empty(num_gpus, np.int64)
    work = np.empty(9 * (num_gpus + 1), np.int64)
    earlier = np.empty(per_gpu, np.int64)
    moved = np.empty((1, num_phy), np.int64)
    for b in range(batch):
        for i in range(num_gpus):
            lo = i * per_gpu
            for q in range(per_gpu):  # occurrence of each entry on new GPU i
                k = 0
                for r in range(lo, lo + q):
                    if new[b, r] == new[b, lo + q]:
                        k += 1
                earlier[q] = k
            for j in range(num_gpus):
                # gpu_overlap: the k-th copy of a value (-1 included) on new GPU i is kept on old GPU j iff j
                # holds more than k copies; plus R + 1 where the pair is allowed.
                kept = 0
                for q in range(per_gpu):
                    e = new[b, lo + q]
                    have = 0
                    for r in range(j * per_gpu, (j + 1) * per_gpu):
                        if old[b, r] == e:
                            have += 1
                    if have > earlier[q]:
                        kept += 1
                allowed = live[b, i] == live[b, j] and i // gpus_per_node == j // gpus_per_node
                profit[i, j] = kept + (num_phy + 1 if allowed else 0)
        _max_assignment(profit, col_of_row, work)
        for i in range(num_gpus):  # new GPU i to old position col_of_row[i]
            c = col_of_row[i]
            for t in range(per_gpu):
                moved[0, c * per_gpu + t] = new[b, i * per_gpu + t]
        _align_all(moved, old[b : b + 1], per_gpu, out[b : b + 1])


def relabel_pinned(new: np.ndarray, old: np.ndarray, live_gpu: np.ndarray, num_gpus: int, num_nodes: int) -> np.ndarray:
    """:func:`eplb.algorithms.elastic.relabel_pinned` (same arguments but ``xp``): ``new [B, R]`` relabelled to
    ``old [B, R]``, live GPUs onto live positions (and, with ``num_nodes > 1``, within nodes).

    ``new`` and ``old`` hold ids >= -1 (any integers: only compared);
    ``live_gpu`` ``[B, G]`` (or ``[1, G]``), bool or integer classes (a GPU
    goes onto a position of its own class). The overlap counts
    compared as the reference's :func:`eplb.algorithms.relabel.gpu_overlap`,
    the assignment by :mod:`eplb.kernels.relabel_numba`'s Hungarian
    algorithm (the reference's, step for step), the slots by
    :func:`align_slots`. Returns ``[B, R]`` in ``new``'s dtype.
    """
    batch = new.shape[0]
    # Bool (live or not) or integer classes: only compared for equality, so both read as int64.
    live = np.ascontiguousarray(np.broadcast_to(np.asarray(live_gpu).astype(np.int64), (batch, num_gpus)))
    out = np.empty(new.shape, np.int64)
    _relabel_pinned(
        np.ascontiguousarray(new, dtype=np.int64),
        np.ascontiguousarray(old, dtype=np.int64),
        live,
        num_gpus,
        num_nodes,
        out,
    )
    return out.astype(new.dtype, copy=False)


@_jit
def _replica_counts(phy2log: np.ndarray, out: np.ndarray) -> None:
    num_log = out.shape[1]
    out[:] = 0
    for b in range(phy2log.shape[0]):
        for t in range(phy2log.shape[1]):
            e = phy2log[b, t]
            if 0 <= e < num_log:  # the reference counts matches with 0..E-1 only
                out[b, e] += 1


def replica_counts(phy2log: np.ndarray, num_log: int) -> np.ndarray:
    """:func:`eplb.algorithms.relabel.replica_counts` (same arguments but ``xp``): ``[B, E]`` slots per expert."""
    out = np.empty((phy2log.shape[0], num_log), np.int64)
    _replica_counts(np.ascontiguousarray(phy2log, dtype=np.int64), out)
    return out.astype(phy2log.dtype, copy=False)


def _check_ids(num_log: int | None, *arrays: np.ndarray, lowest: int = 0) -> None:
    """Expert ids in ``[lowest, num_log)`` (``num_log`` None: ``>= lowest``; ``lowest`` -1: ``-1`` an empty
    slot): the kernels index with them unchecked."""
    for a in arrays:
        if a.size and (a.min() < lowest or (num_log is not None and a.max() >= num_log)):
            what = f"[{lowest}, {num_log})" if lowest == 0 else f"[0, {num_log}) or -1"
            raise ValueError(f"expert ids in {what} expected, got values from {a.min()} to {a.max()}")


def _check_empty_gpus(start: np.ndarray, num_gpus: int) -> None:
    """``-1`` slots of ``start [B, R]`` fill whole GPUs (a failed GPU), as :func:`repair`'s reference assumes."""
    if start.size == 0 or start.min() >= 0:  # no empty slot (every GPU up): one pass, not four
        return
    empty = np.reshape(start < 0, (start.shape[0], num_gpus, -1))
    if np.any(empty.any(axis=-1) != empty.all(axis=-1)):
        raise ValueError("-1 slots of start must fill whole GPUs (a failed GPU's slots)")


def _check_float32(*arrays: np.ndarray) -> None:
    """The kernels compute in float32, as the reference does on float32 inputs."""
    for a in arrays:
        if np.asarray(a).dtype != np.float32:
            raise TypeError(f"float32 loads expected (the arithmetic is float32), got {np.asarray(a).dtype}")


def warm_up() -> None:
    """Run each kernel once on a tiny input, so that numba compiles (or loads from its cache) what eplb uses."""
    phy2log = np.arange(8, dtype=np.int64).reshape(1, 8) % 4
    old = phy2log[:, ::-1].copy()
    weight = np.ones((1, 4), np.float32)
    counts = replica_counts(phy2log, 4)
    limit = np.zeros((1, 1), np.float32)
    sticky_pack(phy2log, old, np.ones((1, 8), np.float32), limit, 2)
    count_moves(phy2log, old, 4)
    align_slots(phy2log, old, 4)
    relabel_pinned(phy2log, old, np.ones((1, 4), bool), 4, 2)
    repair(phy2log, counts, old, weight, limit, np.ones((1, 1), np.int64), np.ones((1, 1), bool), 4, 2, 2, 4)
