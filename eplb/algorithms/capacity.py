"""GPUs of unequal speed (``gpu_capacity``): minimise the slowest GPU's time, ``load / capacity``.

Every GPU keeps its ``S = R / G`` slots; an idle GPU (capacity 0) holds
``-1`` there, as a failed one under ``active_gpus``. Per layer, on the live
GPUs (times are products with :func:`eplb.algorithms.speed.inverse_capacity`,
never quotients):

1. *blind*: the ``active_gpus`` placement on the live GPUs (capacity-blind);
2. *by time* (global rule; hierarchical: groups to nodes by LPT on time with
   node capacities, the float32 left-to-right sums of their live GPUs'
   capacities, refined by swaps of groups, then this per node): three replica sets, greedy replication for
   the first ``k`` of the ``X = R_live - E`` extra slots and the other ``X - k``
   one each to the lightest experts (lightest first, cycling), for ``k = X,
   X // 4, 0`` (slow GPUs must fill their slots with light replicas), and
   with two slots per GPU a fourth, greedy's counts searched for the fold
   pairing as if all GPUs ran at one speed (:func:`_pair_set`); each packed
   by LPT on time (:func:`eplb.algorithms.speed.lpt_pack_speed`), refined by
   swaps and exchanges out of the slowest GPU
   (:func:`eplb.algorithms.speed.refine_by_swaps_speed`); the fastest of the three (the first unless
   another is faster by the ``IMPROVEMENT`` margin); with two slots per GPU
   also the replica sets of a time budget ``T`` just under that one's time
   (``BUDGET_SHARE`` of it; :data:`BUDGET_SETS`, :func:`_budget_counts`:
   fewest replicas that fit the fastest GPU beside a light partner, then the
   cheapest splits of replicas too heavy for the slowest GPUs into ones that
   pair up there, the rest to the lightest experts), each paired by ``T``
   (:func:`eplb.algorithms.speed.pair_pack_speed`: fastest GPU first, the
   heaviest replica left and the heaviest partner that fits) and refined by
   the same swaps; the fastest of them where it beats the greedy sets' by
   the margin;
3. the by-time placement where its slowest GPU is faster than the blind one's
   by that margin, else the blind one: never slower than capacity-blind.

All live capacities equal: the blind placement (the greedy placement when
every GPU is live), bit for bit. A hierarchical layer where some node has
fewer live slots than the experts of its groups uses the global rule.
Static shapes throughout (capacities may be traced under ``jit``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from eplb import _xp
from eplb.algorithms.elastic import _live_gpu_loads, _live_rows, _live_slot, build_log2phy_masked, rebalance_elastic
from eplb.algorithms.hierarchy import assemble, expert_order, group_loads
from eplb.algorithms.loads import clean_loads
from eplb.algorithms.packing import inverse_permutation, slots_by_pack, sum_left_to_right
from eplb.algorithms.pairs import default_pair_iterations, pair_counts
from eplb.algorithms.refine import IMPROVEMENT
from eplb.algorithms.relabel import occurrence
from eplb.algorithms.replication import replica_items, replica_load, replicate_experts
from eplb.algorithms.speed import (
    SPEED_RANGE,
    _exponent,
    _power_of_two,
    capacity_live,
    clean_capacity,
    inverse_capacity,
    lpt_pack_speed,
    pack_times,
    pair_pack_speed,
    refine_by_swaps_speed,
)

__all__ = [
    "BUDGET_SETS",
    "GREEDY_SHARES",
    "default_swap_rounds",
    "fit_loads_to_times",
    "place_capacity",
    "rebalance_capacity",
]

# fit_loads_to_times keeps a layer's largest load below 2**TIME_HEADROOM / E: with inverse capacities below
# 2**(SPEED_RANGE + 1), every GPU time, sum and difference of times the placement forms stays below 2**126.
TIME_HEADROOM = 120 - (SPEED_RANGE + 1) - 4


def fit_loads_to_times(weight: Any, *, xp: Any) -> Any:
    """Clean float32 ``weight [L, E]`` scaled per layer by a power of two so that no GPU time overflows float32.

    A time is a load times an inverse capacity (up to ``2**(SPEED_RANGE + 1)``), so loads near float32's
    largest overflow to ``inf`` where equal speeds would not, and ``inf`` times cannot rank packs (a full pack
    and an overflowed one look alike). A layer whose largest load ``m`` has ``floor(log2 m) + ceil(log2 E)``
    above ``TIME_HEADROOM`` is multiplied by ``2**-(that excess)``; every other layer is unchanged (a factor 1).
    A power of two scales every product, sum and comparison exactly, so a layer that fits places as before;
    loads scaled below ``2**-64`` then count as 0, as every backend reads them (:func:`clean_loads`).
    """
    num_log = weight.shape[1]
    top = _exponent(xp.max(weight, axis=-1, keepdims=True), xp=xp)  # [L, 1] int32, -64 for an all-zero layer
    excess = top + (max(num_log - 1, 1)).bit_length() - TIME_HEADROOM
    scale = _power_of_two(-xp.where(excess > 0, excess, xp.zeros_like(excess)), xp=xp)
    return clean_loads(weight * scale, xp=xp)


# Candidate replica sets: greedy replication for X * num // den of the X extra slots.
GREEDY_SHARES = ((1, 1), (1, 4), (0, 1))

# Two slots per GPU: replica sets from a time budget T, (margin, share) each (see _budget_counts);
# T is BUDGET_SHARE of the greedy sets' best time. Powers of two: exact float32 products everywhere.
BUDGET_SETS = ((1 / 8, 3 / 4), (1 / 16, 3 / 4))
BUDGET_SHARE = 1 - 1 / 64


def default_swap_rounds(num_gpus: int) -> int:
    """Swap rounds per candidate: most rows converge in well under ``max(64, G)`` (DeepSeek-V3 loads)."""
    return min(256, max(64, num_gpus))


def _lightest_first(mlog_load: Any, index_dtype: Any, *, xp: Any) -> tuple[Any, Any]:
    """``lightest [rows, E]``: experts by ascending load (equal loads by index; +0.0 loads only), and each
    expert's place in that line (its inverse)."""
    lightest = _xp.argsort_desc(-mlog_load, xp=xp)
    return lightest, inverse_permutation(xp.astype(lightest, index_dtype), xp=xp)


def _filler_counts(place_in_line: Any, rest: Any, num_log: int, *, xp: Any) -> Any:
    """Replicas each expert gets from ``rest [rows, 1]`` slots dealt one each to the lightest experts, cycling."""
    return xp.where(place_in_line < rest, (rest - 1 - place_in_line) // num_log + 1, 0)


def _replica_sets(
    mlog_load: Any, live_slots: Any, phy_per_node: int, *, xp: Any, fns: Mapping[str, Callable[..., Any]]
) -> tuple[Any, Any, Any]:
    """Per row and candidate (``C = len(GREEDY_SHARES)``, candidate-major rows ``[C * rows, ...]``):
    ``item2mlog`` (node-local expert of each item; phantoms: 0), ``item_load`` (phantoms: -1), ``mlogcnt``."""
    log_per_node = mlog_load.shape[1]
    device = _xp.device(mlog_load)
    phy2mlog, _, _ = fns["replicate_fn"](mlog_load, phy_per_node, xp=xp)  # greedy, prefix-consistent
    index_dtype = phy2mlog.dtype
    item = xp.arange(phy_per_node, dtype=index_dtype, device=device)
    live_slots = xp.astype(live_slots, index_dtype)  # [rows, 1]
    extra = xp.maximum(live_slots - log_per_node, xp.zeros_like(live_slots))
    lightest, place_in_line = _lightest_first(mlog_load, index_dtype, xp=xp)  # [rows, E/N]
    experts = xp.arange(log_per_node, dtype=index_dtype, device=device)
    steps = phy2mlog[:, log_per_node:]  # [rows, X_max]: the expert of each greedy step
    step_hits = steps[:, :, None] == experts  # [rows, X_max, E/N]
    reciprocal = _xp.reciprocal_table(phy_per_node - log_per_node + 1, xp=xp, device=device)
    kept = item < live_slots
    sets = ([], [], [])
    for num, den in GREEDY_SHARES:
        greedy = extra * num // den  # [rows, 1] greedy steps kept
        rest = extra - greedy  # one each to the lightest experts, cycling
        in_prefix = item[: steps.shape[1]] < greedy
        greedy_cnt = 1 + xp.sum(xp.astype(step_hits & in_prefix[:, :, None], index_dtype), axis=1)
        filler_cnt = _filler_counts(place_in_line, rest, log_per_node, xp=xp)
        mlogcnt = greedy_cnt + xp.astype(filler_cnt, index_dtype)  # [rows, E/N]
        greedy_end = log_per_node + greedy
        cyclic = xp.where(item >= greedy_end, (item - greedy_end) % log_per_node, 0)
        filler = _xp.take_along(lightest, xp.astype(cyclic, lightest.dtype), xp=xp)
        item2mlog = xp.where(item < greedy_end, phy2mlog, xp.where(kept, xp.astype(filler, index_dtype), 0))
        load = replica_load(
            _xp.take_along(mlog_load, item2mlog, xp=xp), _xp.take_along(mlogcnt, item2mlog, xp=xp), reciprocal, xp=xp
        )
        for out, value in zip(sets, (item2mlog, xp.where(kept, load, -1.0), mlogcnt), strict=True):
            out.append(value)
    return tuple(xp.concat(parts, axis=0) for parts in sets)


def _budget_counts(
    mlog_load: Any, inverse: Any, live_gpu: Any, live_slots: Any, budget: Any, phy_per_node: int,
    margin: float, share: float, *, xp: Any,
) -> tuple[Any, Any]:  # fmt: skip
    """``mlogcnt [rows, E]`` for a time budget ``T`` (``budget [rows, 1]``, a scaled time) and ``valid [rows, 1]``.

    With ``r_c = w * fl(1/c)`` (``c <= X_max + 1``) and the fastest and the
    slowest live GPU's ``inverse``: each expert first gets the fewest
    replicas whose load fits the fastest GPU within ``T * (1 - margin)``
    (room for a light partner; counts stop at the row's ``live slots - E + 1``); a replica that then fits no slowest GPU
    within that time is *fast only*. Splitting a fast-only expert into the
    fewest replicas that fit a slowest GPU within ``T * share`` (room for a
    partner there too) costs its extra replicas; these splits are taken
    cheapest first (equal costs: lower expert) while the live slots last (a
    prefix of that order), and the slots still left go one each to the
    lightest experts, cycling, as in :func:`_replica_sets`. ``valid``: the
    first step fits in the live slots (else the counts are unspecified).
    Products only: ``r_c * inverse`` against ``T`` times a power-of-two share.
    """
    num_log = mlog_load.shape[1]
    device = _xp.device(mlog_load)
    max_count = phy_per_node - num_log + 1
    reciprocal = _xp.reciprocal_table(max_count, xp=xp, device=device)
    index_dtype = xp.arange(1, device=device).dtype
    replica = mlog_load[:, :, None] * reciprocal[1:]  # [rows, E, C]: r_c
    top, bottom = xp.max(inverse, axis=-1, keepdims=True), xp.min(inverse, axis=-1, keepdims=True)
    fastest = xp.min(xp.where(live_gpu, inverse, top), axis=-1, keepdims=True)[:, :, None]  # finite without
    slowest = xp.max(xp.where(live_gpu, inverse, bottom), axis=-1, keepdims=True)  # live GPUs (then not valid)
    fast_budget = budget * (1 - margin)
    live_slots = xp.astype(live_slots, index_dtype)
    # A row's counts stop at its own most (its live slots' extra plus one): idle GPUs' slots add none, so an
    # idle GPU places as an absent one.
    row_max = xp.maximum(live_slots - num_log + 1, xp.ones_like(live_slots))

    def fewest(over: Any) -> Any:  # 1 + the counts that miss (r_c falls with c), at most the row's most
        count = 1 + xp.sum(xp.astype(over, index_dtype), axis=-1)
        return xp.where(count > row_max, row_max, count)

    fast_count = fewest(replica * fastest > fast_budget[:, :, None])
    slow_count = fewest(replica * slowest[:, :, None] > (budget * share)[:, :, None])
    fast_only = replica_load(mlog_load, fast_count, reciprocal, xp=xp) * slowest > fast_budget
    cost = xp.where(fast_only & (slow_count > fast_count), slow_count - fast_count, 0)
    left = live_slots - xp.sum(fast_count, axis=-1, keepdims=True)
    order = _xp.argsort_desc(-xp.astype(cost, mlog_load.dtype), xp=xp)  # ascending cost, ties by index
    spent = xp.cumulative_sum(_xp.take_along(cost, xp.astype(order, index_dtype), xp=xp), axis=-1)
    taken = _xp.take_along(spent <= left, inverse_permutation(xp.astype(order, index_dtype), xp=xp), xp=xp)
    mlogcnt = fast_count + xp.where(taken, cost, 0)
    valid = left >= 0
    rest = xp.where(valid, live_slots - xp.sum(mlogcnt, axis=-1, keepdims=True), 0)
    _, place_in_line = _lightest_first(mlog_load, index_dtype, xp=xp)
    return mlogcnt + _filler_counts(place_in_line, rest, num_log, xp=xp), valid


def _budget_rows(
    mlog_load: Any, live_gpu: Any, inverse: Any, live_slots: Any, phy_per_node: int, budget: Any, fallback: Any,
    *, xp: Any, fns: Mapping[str, Callable[..., Any]],
) -> tuple[Any, Any, Any, Any]:  # fmt: skip
    """Two slots per GPU: per row, the fastest of the :data:`BUDGET_SETS` replica sets for ``budget
    [rows, 1]`` (:func:`_budget_counts`), each paired by that budget
    (:func:`eplb.algorithms.speed.pair_pack_speed`) and refined by swaps. Returns ``item2mlog``,
    ``mlogcnt``, ``pphy2phy`` and the slowest time ``[rows, 1]`` (``inf`` where no set is valid; its
    counts are then ``fallback``'s)."""
    rows_n = mlog_load.shape[0]
    num_sets = len(BUDGET_SETS)
    counts, valid = [], []
    for margin, share in BUDGET_SETS:
        mlogcnt, ok = _budget_counts(
            mlog_load, inverse, live_gpu, live_slots, budget, phy_per_node, margin, share, xp=xp
        )
        counts.append(xp.where(ok, xp.astype(mlogcnt, fallback.dtype), fallback))
        valid.append(ok)
    mlogcnt, valid = xp.concat(counts, axis=0), xp.concat(valid, axis=0)
    tile = (num_sets, 1)
    mlog_load, live_gpu, inverse, live_slots, budget = (
        xp.tile(a, tile) for a in (mlog_load, live_gpu, inverse, live_slots, budget)
    )
    item2mlog, item_load = replica_items(mlog_load, mlogcnt, live_slots, phy_per_node, xp=xp)
    pphy2phy = fns["pair_pack_fn"](item_load, live_gpu, inverse, budget, xp=xp)
    pphy2phy = fns["swaps_fn"](
        item_load, xp.astype(pphy2phy, item2mlog.dtype), inverse, live_gpu, default_swap_rounds(live_gpu.shape[1]),
        xp=xp,
    )  # fmt: skip
    times = xp.max(pack_times(_xp.take_along(item_load, pphy2phy, xp=xp), inverse, live_gpu, xp=xp), axis=-1)
    times = xp.where(valid[:, 0], times, xp.inf)
    return _fastest(times, (item2mlog, mlogcnt, pphy2phy), num_sets, rows_n, xp=xp)


def _fastest(times: Any, sets: tuple[Any, ...], num_sets: int, rows_n: int, *, xp: Any) -> tuple[Any, ...]:
    """Per row, the candidate (candidate-major rows) of the smallest time, the first unless another is
    faster by the ``IMPROVEMENT`` margin: its arrays of ``sets`` and its time ``[rows, 1]``."""
    times = xp.permute_dims(xp.reshape(times, (num_sets, rows_n)), (1, 0))  # [rows, C]
    best = xp.reshape(xp.argmin(times, axis=-1), (rows_n, 1))
    choice = xp.where(_xp.take_along(times, best, xp=xp) < times[:, :1] * IMPROVEMENT, best, 0)
    pick = [xp.reshape(a, (num_sets, rows_n, -1)) for a in sets]
    out = [p[0] for p in pick]
    for c in range(1, num_sets):
        out = [xp.where(choice == c, p[c], o) for p, o in zip(pick, out, strict=True)]
    return (*out, _xp.take_along(times, xp.astype(choice, best.dtype), xp=xp))


def _pair_set(
    mlog_load: Any, greedy_cnt: Any, live_slots: Any, phy_per_node: int, *, xp: Any,
    fns: Mapping[str, Callable[..., Any]],
) -> tuple[Any, Any, Any]:  # fmt: skip
    """Two slots per GPU: greedy's counts ``greedy_cnt [rows, E/N]`` searched for the fold pairing as if every
    GPU ran at one speed (:func:`eplb.algorithms.pairs.pair_counts`, ``fns["pair_counts_fn"]``), a replica set
    that the packing by time then places: ``item2mlog``, ``item_load``, ``mlogcnt`` as :func:`_replica_sets`.
    A row with idle GPUs searches the fold of its live slots (greedy's counts fill just those)."""
    iterations = default_pair_iterations(phy_per_node, mlog_load.shape[1])
    found = fns["pair_counts_fn"](mlog_load, greedy_cnt, phy_per_node, iterations, xp=xp)
    count = xp.astype(found, greedy_cnt.dtype)
    item2mlog, item_load = replica_items(mlog_load, count, live_slots, phy_per_node, xp=xp)
    return item2mlog, item_load, count


def _speed_rows(
    mlog_load: Any, live_gpu: Any, inverse: Any, live_slots: Any, phy_per_node: int, per_gpu: int, *, xp: Any,
    fns: Mapping[str, Callable[..., Any]],
) -> tuple[Any, Any, Any]:  # fmt: skip
    """Per (layer, node) row: the fastest candidate of step 2. Returns ``phy2mlog`` (item of each candidate
    item, phantoms 0), ``mlogcnt`` and ``pphy2phy [rows, R/N]`` (item in each slot of the row)."""
    rows_n = mlog_load.shape[0]
    num_sets = len(GREEDY_SHARES)
    device = _xp.device(mlog_load)
    item2mlog, item_load, mlogcnt = _replica_sets(mlog_load, live_slots, phy_per_node, xp=xp, fns=fns)
    if per_gpu == 2:  # the pair set: greedy's counts searched for the fold pairing
        pair_set = _pair_set(mlog_load, mlogcnt[:rows_n], live_slots, phy_per_node, xp=xp, fns=fns)
        sets = zip((item2mlog, item_load, mlogcnt), pair_set, strict=True)
        item2mlog, item_load, mlogcnt = (xp.concat([a, xp.astype(b, a.dtype)]) for a, b in sets)
        num_sets += 1
    tile = (num_sets, 1)
    live_gpu, inverse, live_slots = (xp.tile(a, tile) for a in (live_gpu, inverse, live_slots))
    index_dtype = item2mlog.dtype
    batch = rows_n * num_sets
    live_slot = xp.reshape(xp.broadcast_to(live_gpu[:, :, None], (batch, live_gpu.shape[1], per_gpu)), (batch, -1))
    slot_order = _xp.argsort_desc(xp.astype(live_slot, item_load.dtype), xp=xp)  # live slots, then idle ones
    order, pack_by_step, rank_by_step = fns["lpt_pack_fn"](item_load, live_gpu, inverse, per_gpu, xp=xp)
    step = xp.arange(phy_per_node, dtype=index_dtype, device=device) < xp.astype(live_slots, index_dtype)
    slot_by_step = xp.where(step, pack_by_step * per_gpu + rank_by_step, xp.astype(slot_order, index_dtype))
    row_ids = xp.reshape(xp.arange(batch, dtype=index_dtype, device=device), (batch, 1))
    pphy2phy = xp.empty((batch, phy_per_node), dtype=index_dtype, device=device)
    pphy2phy = _xp.at_set(
        pphy2phy, (row_ids, xp.astype(slot_by_step, index_dtype)), xp.astype(order, index_dtype), xp=xp
    )
    pphy2phy = fns["swaps_fn"](item_load, pphy2phy, inverse, live_gpu, default_swap_rounds(live_gpu.shape[1]), xp=xp)
    times = xp.max(pack_times(_xp.take_along(item_load, pphy2phy, xp=xp), inverse, live_gpu, xp=xp), axis=-1)
    *out, best_time = _fastest(times, (item2mlog, mlogcnt, pphy2phy), num_sets, rows_n, xp=xp)
    if per_gpu == 2:  # the budget sets, for a budget just under the greedy sets' best time
        rows = (mlog_load, live_gpu[:rows_n], inverse[:rows_n], live_slots[:rows_n])
        *mine, my_time = _budget_rows(*rows, phy_per_node, best_time * BUDGET_SHARE, out[1], xp=xp, fns=fns)
        faster = my_time < best_time * IMPROVEMENT
        out = [xp.where(faster, m, o) for m, o in zip(mine, out, strict=True)]
    return tuple(out)


def _group_split(
    weight: Any, capacity: Any, num_groups: int, num_nodes: int, *, xp: Any, fns: Mapping[str, Callable[..., Any]]
) -> Any:
    """``mgroup2group [L, groups]``: groups to nodes by LPT on time, then swaps of groups between nodes
    (:func:`eplb.algorithms.speed.refine_by_swaps_speed`, at most ``num_groups`` rounds); a node's
    capacity is its live GPUs' float32 left-to-right sum."""
    num_layers = weight.shape[0]
    node_capacity = sum_left_to_right(xp.reshape(capacity, (-1, num_nodes, capacity.shape[-1] // num_nodes)), xp=xp)
    node_live = xp.broadcast_to(node_capacity > 0, (num_layers, num_nodes))
    inverse = xp.broadcast_to(inverse_capacity(node_capacity, xp=xp), (num_layers, num_nodes))
    per_node = num_groups // num_nodes
    loads = group_loads(weight, num_groups, xp=xp)
    order, node_by_step, rank_by_step = fns["lpt_pack_fn"](loads, node_live, inverse, per_node, xp=xp)
    split = slots_by_pack(order, node_by_step, rank_by_step, per_node, xp=xp)
    # Cardinality (groups per node) makes LPT fill the fast nodes first; swaps of groups fix the slow ones.
    inverse, node_live = xp.asarray(inverse, copy=True), xp.asarray(node_live, copy=True)  # rows of their own
    return fns["swaps_fn"](loads, split, inverse, node_live, num_groups, xp=xp)


def _by_time(
    weight: Any, capacity: Any, inverse: Any, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int, *,
    xp: Any, fns: Mapping[str, Callable[..., Any]],
) -> tuple[Any, Any]:  # fmt: skip
    """Step 2 under the hierarchical rule (global: one group, one node): ``phy2log`` (``-1`` idle), ``logcnt``.
    ``inverse``: :func:`eplb.algorithms.speed.inverse_capacity` of ``capacity`` (made once a call: about 190
    array operations)."""
    num_layers, num_log = weight.shape
    live = capacity_live(capacity, xp=xp)  # [1, G]
    if num_nodes > 1:
        live_capacity = xp.where(live, capacity, xp.zeros_like(capacity))
        mlog2log = expert_order(
            _group_split(weight, live_capacity, num_groups, num_nodes, xp=xp, fns=fns), num_log // num_groups, xp=xp
        )
    else:
        mlog2log = xp.broadcast_to(xp.arange(num_log, device=_xp.device(weight)), (num_layers, num_log))
    mlog_load = xp.reshape(_xp.take_along(weight, mlog2log, xp=xp), (num_layers * num_nodes, num_log // num_nodes))
    live_gpu, live_slots = _live_rows(weight, live, num_phy, num_nodes, num_gpus, xp=xp)
    inverse = xp.reshape(xp.broadcast_to(inverse, (num_layers, num_gpus)), live_gpu.shape)
    item2mlog, mlogcnt, pphy2phy = _speed_rows(
        mlog_load, live_gpu, inverse, live_slots, num_phy // num_nodes, num_phy // num_gpus, xp=xp, fns=fns
    )
    zeros = xp.zeros_like(item2mlog)
    phy2log, _, logcnt = assemble(mlog2log, item2mlog, zeros, mlogcnt, pphy2phy, num_nodes, xp=xp)
    live_slot = _live_slot(live, num_layers, num_phy, num_gpus, xp=xp)
    return xp.where(live_slot, phy2log, xp.full_like(phy2log, -1)), logcnt


def _max_time(weight: Any, phy2log: Any, logcnt: Any, inverse: Any, num_gpus: int, *, xp: Any) -> Any:
    """``[L, 1]``: the slowest GPU's time (idle GPUs hold nothing: load 0)."""
    return xp.max(_live_gpu_loads(weight, phy2log, logcnt, num_gpus, xp=xp) * inverse, axis=-1, keepdims=True)


def rebalance_capacity(
    weight: Any,
    capacity: Any,
    num_phy: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    fallback: bool | None = None,
    uniform: bool | None = None,
    xp: Any,
    lpt_pack_fn: Callable[..., Any] = lpt_pack_speed,
    pair_pack_fn: Callable[..., Any] = pair_pack_speed,
    swaps_fn: Callable[..., Any] = refine_by_swaps_speed,
    replicate_fn: Callable[..., Any] = replicate_experts,
    pair_counts_fn: Callable[..., Any] = pair_counts,
    **blind_kernels: Callable[..., Any],
) -> tuple[Any, Any, Any]:
    """``phy2log`` (``-1`` on idle GPUs), ``phyrank``, ``logcnt`` on GPUs of clean ``capacity [G]`` (float32).

    ``fallback`` as in :func:`eplb.algorithms.elastic.rebalance_elastic`.
    ``uniform``: ``True``/``False`` when the host knows whether every live
    capacity is equal (``True``: the blind placement alone), ``None``
    decides on the device. With fewer than ``E`` live slots: ``-1`` everywhere
    and ``logcnt = 0``. ``phyrank`` numbers replicas in slot order (the blind
    placement's own numbering where it is chosen).

    ``lpt_pack_fn``, ``pair_pack_fn``, ``swaps_fn``, ``replicate_fn``, ``pair_counts_fn``:
    :func:`eplb.algorithms.speed.lpt_pack_speed`, :func:`~eplb.algorithms.speed.pair_pack_speed`,
    :func:`~eplb.algorithms.speed.refine_by_swaps_speed`,
    :func:`eplb.algorithms.replication.replicate_experts` and :func:`eplb.algorithms.pairs.pair_counts`,
    or compiled kernels equal to them (same arguments); ``blind_kernels`` (``sticky_pack_fn``,
    ``split_fn``) and ``replicate_fn`` also go to the blind placement
    (:func:`eplb.algorithms.elastic.rebalance_elastic`).
    """
    num_layers, num_log = weight.shape
    capacity = xp.reshape(capacity, (-1, num_gpus))
    live = capacity_live(capacity, xp=xp)
    hierarchical = num_nodes > 1 or num_groups > 1
    blind = rebalance_elastic(
        weight, live, num_phy, num_groups, num_nodes, num_gpus, fallback=fallback, xp=xp, replicate_fn=replicate_fn,
        **blind_kernels,
    )  # fmt: skip
    inverse = inverse_capacity(capacity, xp=xp)
    fns = {
        "lpt_pack_fn": lpt_pack_fn,
        "pair_pack_fn": pair_pack_fn,
        "swaps_fn": swaps_fn,
        "replicate_fn": replicate_fn,
        "pair_counts_fn": pair_counts_fn,
    }
    if uniform:
        return blind
    if not hierarchical or fallback:
        phy2log, logcnt = _by_time(weight, capacity, inverse, num_phy, 1, 1, num_gpus, xp=xp, fns=fns)
    else:
        phy2log, logcnt = _by_time(weight, capacity, inverse, num_phy, num_groups, num_nodes, num_gpus, xp=xp, fns=fns)
        if fallback is None and num_nodes > 1:
            _, node_slots = _live_rows(weight, live, num_phy, num_nodes, num_gpus, xp=xp)
            short = xp.any(xp.reshape(node_slots, (num_layers, num_nodes)) < num_log // num_nodes, axis=-1)
            flat = _by_time(weight, capacity, inverse, num_phy, 1, 1, num_gpus, xp=xp, fns=fns)
            phy2log = xp.where(short[:, None], flat[0], phy2log)
            logcnt = xp.where(short[:, None], flat[1], logcnt)
    faster = _max_time(weight, phy2log, logcnt, inverse, num_gpus, xp=xp) < (
        _max_time(weight, blind[0], blind[2], inverse, num_gpus, xp=xp) * IMPROVEMENT
    )
    if uniform is None:
        top = xp.max(xp.where(live, capacity, -xp.inf), axis=-1, keepdims=True)
        bottom = xp.min(xp.where(live, capacity, xp.inf), axis=-1, keepdims=True)
        faster = faster & (top != bottom)
    phyrank = xp.where(phy2log >= 0, occurrence(phy2log, xp=xp), xp.full_like(phy2log, -1))
    _, live_slots = _live_rows(weight, live, num_phy, 1, num_gpus, xp=xp)  # [L, 1]
    faster = faster & (live_slots >= num_log)  # too few live slots: the blind (empty) placement
    return tuple(xp.where(faster, mine, theirs) for mine, theirs in zip((phy2log, phyrank, logcnt), blind, strict=True))


def place_capacity(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    gpu_capacity: Any,
    hierarchical: bool,
    policy: str = "greedy",
    spill: int = 0,
    node_fallback: bool | None = None,
    uniform: bool | None = None,
    xp: Any,
    **kernels: Callable[..., Any],
) -> tuple[Any, Any, Any]:
    """:func:`eplb.algorithms.policies.place` on GPUs of ``gpu_capacity [G]``: ``phy2log`` (``-1`` on idle
    GPUs), ``log2phy``, ``logcnt`` (live replicas), for float32 ``weight [L, E]``. Greedy policy, no spill.

    ``node_fallback``, ``uniform`` and ``kernels`` (compiled steps): see :func:`rebalance_capacity`.
    """
    if policy != "greedy" or spill:
        raise ValueError(f"gpu_capacity supports the greedy policy without spill, got {policy=}, {spill=}")
    weight = fit_loads_to_times(clean_loads(weight, xp=xp), xp=xp)
    capacity = clean_capacity(gpu_capacity, xp=xp)
    sizes = (num_groups, num_nodes) if hierarchical else (1, 1)
    phy2log, phyrank, logcnt = rebalance_capacity(
        weight, capacity, num_replicas, *sizes, num_gpus, fallback=node_fallback, uniform=uniform, xp=xp, **kernels
    )
    return phy2log, build_log2phy_masked(phy2log, phyrank, weight.shape[1], xp=xp), logcnt
