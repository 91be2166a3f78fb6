"""Local search toward a load limit with few moves, and a repacking that prefers old GPUs.

Both serve :func:`eplb.algorithms.stability.stabilize`: start from the old
placement (or a :func:`sticky_pack` of the fresh replicas) and change as few
``(expert, GPU)`` pairs as possible until the heaviest GPU is within a limit.
float32 loads are compared after left-to-right sums and products only (no
division); ties go to the first index; batched over a leading axis.
Compiled equivalents (numpy inputs): :mod:`eplb.kernels.repair_numba`.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.assignment import BIG
from eplb.algorithms.loads import MAX_LOAD
from eplb.algorithms.packing import slots_by_pack, sum_left_to_right
from eplb.algorithms.refine import IMPROVEMENT
from eplb.algorithms.relabel import _count, _first, _ids, count_moves, occurrence
from eplb.algorithms.replication import replica_load

__all__ = ["gpu_loads", "heaviest_gpu", "repair", "sticky_pack"]


def gpu_loads(weight: Any, phy2log: Any, logcnt: Any, num_gpus: int, *, xp: Any) -> Any:
    """``[B, G]`` float32 GPU loads: replica load ``w * fl(1/c)``, summed left to right over each GPU's slots."""
    reciprocal = _xp.reciprocal_table(phy2log.shape[1], xp=xp, device=_xp.device(weight))
    slot_load = _xp.take_along(replica_load(weight, logcnt, reciprocal, xp=xp), phy2log, xp=xp)
    batch, num_phy = phy2log.shape
    return sum_left_to_right(xp.reshape(slot_load, (batch, num_gpus, num_phy // num_gpus)), xp=xp)


def heaviest_gpu(weight: Any, phy2log: Any, logcnt: Any, num_gpus: int, *, xp: Any) -> Any:
    """``[B, 1]`` float32: the heaviest of :func:`gpu_loads` (a max is exact in any order)."""
    return xp.max(gpu_loads(weight, phy2log, logcnt, num_gpus, xp=xp), axis=-1, keepdims=True)


def sticky_pack(
    base: Any,
    old: Any,
    item_load: Any,
    limit: Any,
    num_packs: int,
    *,
    initial_load: Any = None,
    reserve: bool = False,
    xp: Any,
) -> Any:
    """Repack the items of ``base [B, n]`` (experts, one per slot) so they stay near ``old [B, n]``.

    LPT with affinity: items heaviest first (``item_load [B, n]`` float32,
    ties by index); the k-th copy of an expert prefers the pack that held the
    k-th old copy, if that pack has room and stays within ``limit [B, 1]``;
    otherwise it goes to the open pack with the smallest load (first on
    ties). Returns the experts slot by slot, pack ``p`` owning slots
    ``p*k .. p*k + k - 1``.

    ``initial_load [B, m]`` (optional; float32): the packs' starting loads,
    ``+inf`` for a pack that takes no item while another pack is open (a
    failed GPU: it stays ``+inf``). With it, items ``-1`` of ``base`` (empty
    slots) have no old pack, and once every open pack is full the remaining
    items (callers give them load ``-1``, so they come last) fill the first
    packs with room, in order. Without it, the behaviour above, unchanged.

    ``reserve`` (optional): an item stays home only if the home pack also
    keeps room for its other free slots at the mean load of the items still
    to come (``rem`` over ``left`` items), i.e. ``(home + item - limit) *
    left <= -(free slots after it) * rem``: products compared, no division
    (``rem`` is the left-to-right sum of the non-negative item loads, less
    each visited one). Fewer items stay, the packs end nearer the limit.
    """
    batch, n = base.shape
    capacity = n // num_packs
    dtype = base.dtype
    match = (base[:, :, None] == old[:, None, :]) & (
        occurrence(base, xp=xp)[:, :, None] == occurrence(old, xp=xp)[:, None, :]
    )
    if initial_load is not None:
        match = match & (base >= 0)[:, :, None]  # an empty slot is no expert: no old pack
    affinity = xp.where(xp.any(match, axis=-1), _first(match, dtype, xp=xp) // capacity, -1)
    order = _xp.argsort_desc(item_load, xp=xp)
    steps = xp.stack(
        [_xp.take_along(item_load, order, xp=xp), xp.astype(_xp.take_along(affinity, order, xp=xp), xp.float32)],
        axis=-1,
    )
    pack_ids = _ids(num_packs, base, xp=xp)
    most = xp.full((1, 1), MAX_LOAD, dtype=item_load.dtype, device=_xp.device(base))  # as lpt_pack's

    def visit(carry: Any, step: Any) -> tuple[Any, Any]:
        open_load, count = carry[:2]  # float32 [B, m]; +inf once a pack is full
        load = step[:, 0:1]
        home = xp.astype(step[:, 1:2], dtype)
        home_ok = home >= 0
        home = xp.where(home_ok, home, 0)
        home_load = _xp.take_along(open_load, home, xp=xp)
        if reserve:
            # float32 throughout (numpy's where of two Python floats is float64: the products below would
            # round differently there than on torch and JAX)
            rem, left = carry[2] - xp.where(load >= 0, load, 0.0), carry[3] - xp.astype(load >= 0, load.dtype)
            free = (capacity - 1) - _xp.take_along(count, home, xp=xp)  # the home's slots after this item
            open_home = home_load < xp.inf
            over = (xp.where(open_home, home_load, 0.0) + load - limit) * left
            stay = home_ok & open_home & (over <= -(free * rem))
        else:
            # A full home has load +inf, never within a finite limit; the count guards an infinite one (a fresh
            # peak near float32's largest times 1 + tolerance) from filling a pack past its capacity.
            stay = home_ok & (home_load + load <= limit) & (_xp.take_along(count, home, xp=xp) < capacity)
        lightest = xp.reshape(xp.astype(xp.argmin(open_load, axis=-1), dtype), (batch, 1))
        if closed is not None:  # every open pack full: the first pack with room (a closed one)
            room = xp.reshape(_first(count < capacity, dtype, xp=xp), (batch, 1))
            lightest = xp.where(xp.any(open_load < xp.inf, axis=-1, keepdims=True), lightest, room)
        pack = xp.where(stay, home, lightest)
        rank = _xp.take_along(count, pack, xp=xp)
        chosen = pack_ids == pack
        count = count + chosen
        full = count == capacity if closed is None else (count == capacity) | closed
        open_load = xp.where(full, xp.inf, xp.minimum(open_load + chosen * load, most))  # as lpt_pack
        carry = (open_load, count) if not reserve else (open_load, count, rem, left)
        return carry, (pack[:, 0], rank[:, 0])

    zeros = xp.zeros((batch, num_packs), dtype=item_load.dtype, device=_xp.device(base))
    closed = None if initial_load is None else xp.broadcast_to(initial_load == xp.inf, (batch, num_packs))
    start = zeros if initial_load is None else xp.where(closed, xp.inf, zeros + initial_load)
    init = (start, zeros)
    if reserve:
        positive = xp.where(item_load >= 0, item_load, 0.0)  # (not maximum(x, 0.0): a host scalar copy on torch)
        total = xp.reshape(sum_left_to_right(positive, xp=xp), (batch, 1))
        live = xp.sum(xp.where(item_load >= 0, 1.0, 0.0), axis=-1, keepdims=True)  # exact (integers)
        init = (start, zeros, total, xp.astype(live, item_load.dtype))
    _, (pack_by_step, rank_by_step) = _xp.scan(visit, init, xp.permute_dims(steps, (1, 0, 2)), xp=xp)
    pack_by_step = xp.astype(xp.permute_dims(pack_by_step, (1, 0)), dtype)
    rank_by_step = xp.astype(xp.permute_dims(rank_by_step, (1, 0)), dtype)
    slot2item = slots_by_pack(order, pack_by_step, rank_by_step, capacity, xp=xp)
    return _xp.take_along(base, slot2item, xp=xp)


def _lexargmin(ok: Any, primary: Any, moves: Any, secondary: Any, *, xp: Any) -> Any:
    """``[B, 1]``: among ``ok`` candidates, least ``primary``, then ``moves``, then ``secondary``, then index."""
    key = xp.where(ok, primary, xp.inf)
    best = ok & (key == xp.min(key, axis=-1, keepdims=True))
    fewest = xp.where(best, moves, BIG)
    best = best & (fewest == xp.min(fewest, axis=-1, keepdims=True))
    last = xp.where(best, secondary, xp.inf)
    return xp.reshape(xp.astype(xp.argmin(last, axis=-1), moves.dtype), (ok.shape[0], 1))


def _rewrite(cur: Any, cnt: Any, old: Any, weight: Any, slot: Any, expert: Any, num_gpus: int, *, xp: Any) -> tuple:
    """Evaluate ``k`` single-slot changes ``cur[slot] = expert`` (``[b, k]`` each) exactly.

    Returns the new heaviest GPU load ``[b, k]``, the change in moves
    ``[b, k]`` and the new replica counts ``[b, k, E]``.
    """
    b, num_phy = cur.shape
    k, num_log = slot.shape[1], weight.shape[1]
    per_gpu, dtype = num_phy // num_gpus, cur.dtype
    experts = _ids(num_log, cur, xp=xp)
    gone = _xp.take_along(cur, slot, xp=xp)
    counts = cnt[:, None, :] + xp.astype(experts == expert[:, :, None], dtype)
    counts = counts - xp.astype(experts == gone[:, :, None], dtype)  # [b, k, E]
    trial = xp.where(_ids(num_phy, cur, xp=xp) == slot[:, :, None], expert[:, :, None], cur[:, None, :])
    # A candidate may add a replica to an expert that holds every slot (then unused): counts reach R + 1.
    reciprocal = _xp.reciprocal_table(num_phy + 1, xp=xp, device=_xp.device(weight))
    per_replica = xp.reshape(replica_load(weight[:, None, :], counts, reciprocal, xp=xp), (b * k, num_log))
    flat_trial = xp.reshape(trial, (b * k, num_phy))
    loads = _xp.take_along(per_replica, xp.where(flat_trial >= 0, flat_trial, 0), xp=xp)
    loads = xp.where(flat_trial >= 0, loads, xp.zeros_like(loads))  # an empty slot (-1) weighs nothing
    peak = xp.max(sum_left_to_right(xp.reshape(loads, (b * k, num_gpus, per_gpu)), xp=xp), axis=-1)
    # Copies of the new and the replaced expert on the slot's GPU, now and before.
    gpu_slots = xp.reshape((slot // per_gpu)[:, :, None] * per_gpu + _ids(per_gpu, cur, xp=xp), (b, k * per_gpu))
    now = xp.reshape(_xp.take_along(cur, gpu_slots, xp=xp), (b, k, per_gpu))
    was = xp.reshape(_xp.take_along(old, gpu_slots, xp=xp), (b, k, per_gpu))
    added = xp.where(
        _count(now == expert[:, :, None], dtype, -1, xp=xp) >= _count(was == expert[:, :, None], dtype, -1, xp=xp), 1, 0
    )
    removed = xp.where(
        _count(now == gone[:, :, None], dtype, -1, xp=xp) > _count(was == gone[:, :, None], dtype, -1, xp=xp), 1, 0
    )
    return xp.reshape(peak, (b, k)), added - removed, counts


def repair(
    start: Any,
    start_cnt: Any,
    old: Any,
    weight: Any,
    limit: Any,
    budget: Any,
    valid: Any,
    num_gpus: int,
    num_nodes: int,
    group_size: int,
    max_iters: int,
    *,
    xp: Any,
) -> tuple[Any, Any]:
    """Local search from ``start [B, R]`` until the heaviest GPU is within ``limit [B, 1]``.

    Each step looks at the heaviest GPU ``a`` (first on ties) and at three
    kinds of change, all inside ``a``'s node when ``num_nodes > 1`` (experts
    of groups of ``group_size`` stay on their node):

    - *swap* slot ``i`` of ``a`` with slot ``j`` of another GPU (2 moves;
      only the two GPUs change, so every pair is evaluated exactly);
    - *replicate out*: an expert of ``a`` takes over the slot of an expert
      with several replicas, on the GPU that the change leaves lightest
      (1 move; its replicas, ``a``'s included, get lighter);
    - *replace in*: a slot of ``a`` whose expert has several replicas gets
      another expert, the one whose extra replica would be lightest or the
      one with the heaviest replicas (1 move).

    The step taken lowers ``a``'s load by the ``IMPROVEMENT`` margin without
    raising the max load, and keeps the moves (pairs absent from ``old``)
    within ``budget [B, 1]``; among those, the lowest
    ``max(new max load, limit)``, then the fewest added moves, then the
    lowest load of the changed GPUs, then the first candidate. Rows with
    ``valid`` false, within the limit, or with no such step stay as they are.

    Slots holding ``-1`` in ``start`` (the slots of failed GPUs, ``-1`` in
    ``old`` too) stay empty: they weigh nothing, take no expert and give
    none. Without them the search is the one above, unchanged (the numba
    twin takes both; the Triton and Pallas twins only placements without
    ``-1``).

    ``start_cnt [B, E]`` is the replica count of ``start``. Returns
    ``phy2log [B, R]``, its replica counts ``[B, E]`` and its moves ``[B, 1]``.
    """
    batch, num_phy = start.shape
    num_log = weight.shape[1]
    per_gpu, per_node, gpus_per_node = num_phy // num_gpus, num_phy // num_nodes, num_gpus // num_nodes
    dtype = start.dtype
    slot_ids = _ids(num_phy, start, xp=xp)
    gpu_of_slot, node_of_slot = slot_ids // per_gpu, slot_ids // per_node
    in_gpu, gpu_ids, expert_ids = _ids(per_gpu, start, xp=xp), _ids(num_gpus, start, xp=xp), _ids(num_log, start, xp=xp)
    groups = _ids(num_log // group_size, start, xp=xp)
    # Candidates price one more replica (``cnt + 1``), up to R + 1 when one expert holds every slot.
    reciprocal = _xp.reciprocal_table(num_phy + 1, xp=xp, device=_xp.device(weight))
    width = per_gpu * num_phy

    def step(rows: tuple) -> tuple[tuple, Any]:
        cur, cnt, moved, old, weight, limit, budget, valid = rows
        b = cur.shape[0]
        per_replica = replica_load(weight, cnt, reciprocal, xp=xp)  # [b, E]
        live = cur >= 0  # [b, R] false: a slot of a failed GPU (-1), never read, written or counted
        held = xp.where(live, cur, xp.zeros_like(cur))
        slot_load = xp.where(live, _xp.take_along(per_replica, held, xp=xp), xp.zeros_like(per_replica[:, :1]))
        loads = sum_left_to_right(xp.reshape(slot_load, (b, num_gpus, per_gpu)), xp=xp)  # [b, G]
        live_gpu = xp.reshape(live, (b, num_gpus, per_gpu))[..., 0]  # a GPU is failed as a whole
        pick = xp.where(live_gpu, loads, -xp.inf)  # a failed GPU is never the heavy one (ties at 0 included)
        heavy = xp.reshape(xp.astype(xp.argmax(pick, axis=-1), dtype), (b, 1))
        heavy_load = _xp.take_along(loads, heavy, xp=xp)  # [b, 1]
        a_slots = heavy * per_gpu + in_gpu  # [b, s]
        out_e = _xp.take_along(cur, a_slots, xp=xp)  # experts on the heavy GPU
        active = valid & (heavy_load > limit) & (out_e[:, :1] >= 0)  # (no live GPU at all: nothing to do)
        out_e = xp.where(out_e >= 0, out_e, xp.zeros_like(out_e))
        out_x = _xp.take_along(slot_load, a_slots, xp=xp)
        old_a = _xp.take_along(old, a_slots, xp=xp)
        cur3, old3 = xp.reshape(cur, (b, num_gpus, per_gpu)), xp.reshape(old, (b, num_gpus, per_gpu))
        local = (node_of_slot == heavy // gpus_per_node)[:, None, :]  # [b, 1, R]
        differ = cur[:, None, :] != out_e[:, :, None]  # [b, s, R]

        # Swaps: slot i of the heavy GPU <-> slot j elsewhere. A change adds a move when it puts a
        # copy on a GPU that has at least as many as before, and removes one when it takes an extra
        # copy away.
        now_a_e = _count(out_e[:, :, None] == out_e[:, None, :], dtype, -1, xp=xp)  # [b, s]
        was_a_e = _count(out_e[:, :, None] == old_a[:, None, :], dtype, -1, xp=xp)
        now_a_f = _count(cur[:, :, None] == out_e[:, None, :], dtype, -1, xp=xp)  # [b, R]
        was_a_f = _count(cur[:, :, None] == old_a[:, None, :], dtype, -1, xp=xp)
        now_b_f = xp.reshape(_count(cur3[..., :, None] == cur3[..., None, :], dtype, -1, xp=xp), (b, num_phy))
        was_b_f = xp.reshape(_count(cur3[..., :, None] == old3[..., None, :], dtype, -1, xp=xp), (b, num_phy))
        spread = (b, per_gpu, num_gpus, per_gpu)
        now_b_e = _count(out_e[:, :, None, None] == cur3[:, None, :, :], dtype, -1, xp=xp)  # [b, s, G]
        was_b_e = _count(out_e[:, :, None, None] == old3[:, None, :, :], dtype, -1, xp=xp)
        now_b_e = xp.reshape(xp.broadcast_to(now_b_e[..., None], spread), (b, per_gpu, num_phy))
        was_b_e = xp.reshape(xp.broadcast_to(was_b_e[..., None], spread), (b, per_gpu, num_phy))
        swap_moves = (
            xp.where(now_a_e > was_a_e, -1, 0)[:, :, None]
            + xp.where(now_a_f >= was_a_f, 1, 0)[:, None, :]
            + xp.where(now_b_f > was_b_f, -1, 0)[:, None, :]
            + xp.where(now_b_e >= was_b_e, 1, 0)
        )  # [b, s, R]
        load_j = _xp.take_along(loads, xp.broadcast_to(gpu_of_slot, (b, num_phy)), xp=xp)  # [b, R]
        new_a = (heavy_load[:, :, None] - out_x[:, :, None]) + slot_load[:, None, :]
        new_b = (load_j[:, None, :] - slot_load[:, None, :]) + out_x[:, :, None]
        changed_max = xp.maximum(new_a, new_b)
        others = xp.where(gpu_ids == heavy, -xp.inf, loads)
        top = xp.reshape(xp.astype(xp.argmax(others, axis=-1), dtype), (b, 1))
        second = xp.max(xp.where(gpu_ids == top, -xp.inf, others), axis=-1, keepdims=True)
        rest = xp.where(gpu_ids == top, second, _xp.take_along(others, top, xp=xp))  # max over GPUs but a, g
        rest_j = _xp.take_along(rest, xp.broadcast_to(gpu_of_slot, (b, num_phy)), xp=xp)
        swap_max = xp.maximum(changed_max, rest_j[:, None, :])
        swap_ok = local & differ & (gpu_of_slot != heavy)[:, None, :] & live[:, None, :]
        swap_ok = swap_ok & (changed_max < heavy_load[:, :, None] * IMPROVEMENT)

        # Replicate out: expert e of the heavy GPU takes the slot of a multi-replica expert.
        cnt_f = xp.where(live, _xp.take_along(cnt, held, xp=xp), xp.zeros_like(cur))
        grown = replica_load(
            _xp.take_along(weight, out_e, xp=xp), _xp.take_along(cnt, out_e, xp=xp) + 1, reciprocal, xp=xp
        )
        donor = local & differ & (cnt_f >= 2)[:, None, :]
        guess = xp.where(donor, (load_j[:, None, :] - slot_load[:, None, :]) + grown[:, :, None], xp.inf)
        target = xp.reshape(xp.astype(xp.argmin(guess, axis=-1), dtype), (b, per_gpu))  # [b, s]
        # Replace in: a multi-replica slot of the heavy GPU gets the coldest or the hottest expert.
        group_here = xp.any(local[:, 0, :, None] & (cur[:, :, None] // group_size == groups), axis=1)  # [b, groups]
        here = xp.reshape(xp.broadcast_to(group_here[:, :, None], (b, groups.shape[0], group_size)), (b, num_log))
        allowed = here[:, None, :] & (expert_ids != out_e[:, :, None])  # [b, s, E]
        extra = replica_load(weight, cnt + 1, reciprocal, xp=xp)
        coldest = xp.astype(xp.argmin(xp.where(allowed, extra[:, None, :], xp.inf), axis=-1), dtype)
        hottest = xp.astype(xp.argmax(xp.where(allowed, per_replica[:, None, :], -1.0), axis=-1), dtype)
        spare = (_xp.take_along(cnt, out_e, xp=xp) >= 2) & xp.any(allowed, axis=-1)
        slots = xp.concat([target, a_slots, a_slots], axis=-1)  # [b, 3s]
        experts = xp.concat([out_e, coldest, hottest], axis=-1)
        one_max, one_moves, one_cnt = _rewrite(cur, cnt, old, weight, slots, experts, num_gpus, xp=xp)
        one_ok = xp.concat([xp.any(donor, axis=-1), spare, spare], axis=-1) & (one_max < heavy_load * IMPROVEMENT)

        # Pick one change per row.
        ok = xp.concat([xp.reshape(swap_ok, (b, width)), one_ok], axis=-1)
        primary = xp.concat([xp.reshape(swap_max, (b, width)), one_max], axis=-1)
        added = xp.concat([xp.reshape(swap_moves, (b, width)), one_moves], axis=-1)
        secondary = xp.concat([xp.reshape(changed_max, (b, width)), one_max], axis=-1)
        ok = ok & (moved + added <= budget)
        choice = _lexargmin(ok, xp.maximum(primary, limit), added, secondary, xp=xp)
        accept = active & _xp.take_along(ok, choice, xp=xp)
        is_swap = choice < width
        one = xp.where(is_swap, 0, choice - width)  # [b, 1] single-slot change
        give = heavy * per_gpu + xp.where(is_swap, choice // num_phy, 0)
        take = choice % num_phy
        at_give, at_take = _xp.take_along(cur, give, xp=xp), _xp.take_along(cur, take, xp=xp)
        swapped = xp.where(slot_ids == give, at_take, xp.where(slot_ids == take, at_give, cur))
        rewritten = xp.where(slot_ids == _xp.take_along(slots, one, xp=xp), _xp.take_along(experts, one, xp=xp), cur)
        cur = xp.where(accept, xp.where(is_swap, swapped, rewritten), cur)
        pick = xp.reshape(one * num_log + expert_ids, (b, num_log))
        new_cnt = _xp.take_along(xp.reshape(one_cnt, (b, 3 * per_gpu * num_log)), pick, xp=xp)
        cnt = xp.where(accept & ~is_swap, new_cnt, cnt)
        moved = moved + xp.where(accept, _xp.take_along(added, choice, xp=xp), 0)
        return (cur, cnt, moved, old, weight, limit, budget, valid), accept[:, 0]

    moved = xp.reshape(count_moves(start, old, num_gpus, xp=xp), (batch, 1))
    rows = (start, start_cnt, moved, old, weight, limit, budget, valid)
    cur, cnt, moved, *_ = _xp.refine_rows(step, rows, max_iters, xp=xp)
    return cur, cnt, moved
