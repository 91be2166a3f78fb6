"""Two slots per GPU: replica counts chosen for the pairs (the refined policy's last stage).

With two slots per GPU the best GPU assignment of given replicas is known:
sort them and put the heaviest with the lightest, the second heaviest with
the second lightest, and so on (the *fold*: no pairing has a lighter
heaviest pair, and LPT packs two slots per GPU that way). What is left to
choose is the replica counts, and greedy replication, which minimises the
heaviest *replica*, is not what minimises the heaviest *pair*: on the
DeepSeek-V3 loads over 144 GPUs (288 slots), other counts lower the heaviest
GPU by about 1.2% on average and up to 5% on some layers.

:func:`pair_counts` searches them per (layer, node) row, from the row's own
counts: fold the replicas, take the heaviest pair (the first in fold order on
ties) and move one replica to the expert of either of its two items (the
heavy one then splits finer; the light one's expert gets lighter replicas, so
the fold pairs the heavy item with a lighter one), taken from one of the
:data:`DONORS` experts with two or more replicas whose replicas would stay
lightest (``w * fl(1/(c - 1))`` ascending, equal values by index). Of these
``2 * DONORS`` moves, the one whose fold has the lightest heaviest pair
(first in donor order, heavy item's expert before light item's) is taken if
that beats the current one by the ``IMPROVEMENT`` margin; a row stops at
the first round without such a move, or after ``num_iters`` rounds.
:func:`pair_stage` folds the counts found and keeps them per row only where
the row's heaviest GPU is lighter by the margin, so no row gets heavier.

Arithmetic: replica loads are ``w * fl(1/c)`` and a pair's load is one
float32 sum, so numpy, torch (CPU, CUDA) and JAX compare the same bits.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.hierarchy import assemble
from eplb.algorithms.refine import IMPROVEMENT
from eplb.algorithms.repair import gpu_loads
from eplb.algorithms.replication import replica_items, replica_load

__all__ = ["DONORS", "default_pair_iterations", "fold", "fold_live", "pair_counts", "pair_stage"]

#: Experts that may give up a replica in a round (the ones whose replicas would stay lightest).
DONORS = 8


def default_pair_iterations(num_slots: int, num_experts: int) -> int:
    """Rounds of :func:`pair_counts` at most: the spare slots, at least 8 and at most 32 (each round moves one
    replica; from greedy's counts of the 12 SGLang DeepSeek-V3 files at 288 slots a row moves at most 18 times,
    2-4 on average)."""
    return min(32, max(8, num_slots - num_experts))


def fold(item_load: Any, *, xp: Any) -> tuple[Any, Any]:
    """The fold of ``item_load [B, 2m]`` (float32, >= 0): ``order [B, 2m]``, the items by descending load
    (equal loads by index), and ``pair_load [B, m]``, ``order[j]``'s load plus ``order[2m - 1 - j]``'s
    (the heaviest with the lightest first)."""
    order = _xp.argsort_desc(item_load, xp=xp)
    ranked = _xp.take_along(item_load, order, xp=xp)
    half = item_load.shape[-1] // 2
    return order, ranked[:, :half] + xp.flip(ranked[:, half:], axis=-1)


def _heaviest_pair(load: Any, count: Any, num_slots: int, *, xp: Any) -> tuple[Any, Any, Any]:
    """Per row: the heaviest pair's load ``[B, 1]`` and the experts of its heavy and light item ``[B, 1]``."""
    live = _row_slots(count, xp=xp)
    item2exp, item_load = replica_items(load, count, live, num_slots, xp=xp)
    order, pair_load = fold_live(item_load, live, xp=xp)
    index_dtype = count.dtype
    top = xp.reshape(xp.astype(xp.argmax(pair_load, axis=-1), index_dtype), (-1, 1))
    heavy_item = _xp.take_along(order, xp.astype(top, order.dtype), xp=xp)
    light_item = _xp.take_along(order, xp.astype(live - 1 - top, order.dtype), xp=xp)
    heavy = _xp.take_along(item2exp, xp.astype(heavy_item, item2exp.dtype), xp=xp)
    light = _xp.take_along(item2exp, xp.astype(light_item, item2exp.dtype), xp=xp)
    return _xp.take_along(pair_load, top, xp=xp), heavy, light


def _row_slots(count: Any, *, xp: Any) -> Any:
    """``[B, 1]``: the slots a row's counts fill (its live slots; the rest are phantoms)."""
    return xp.sum(count, axis=-1, keepdims=True, dtype=count.dtype)


def _full_rows(count: Any, num_slots: int, *, xp: Any) -> Any:
    """``[B, 1]``: every slot of the row filled (no phantom items)."""
    return xp.full((count.shape[0], 1), num_slots, dtype=count.dtype, device=_xp.device(count))


def fold_live(item_load: Any, live: Any, *, xp: Any) -> tuple[Any, Any]:
    """:func:`fold` of the first ``live [B, 1]`` items of each row by load, the rest phantoms (load -1,
    ranked last): ``order [B, 2m]`` as :func:`fold`, ``pair_load [B, m]`` with ``order[j]``'s load plus
    ``order[live - 1 - j]``'s for ``j < live / 2`` and ``-inf`` after. Where ``live`` is ``2m`` these are
    :func:`fold`'s sums, bit for bit."""
    order = _xp.argsort_desc(item_load, xp=xp)
    ranked = _xp.take_along(item_load, order, xp=xp)
    half = item_load.shape[-1] // 2
    index_dtype = live.dtype
    j = xp.arange(half, dtype=index_dtype, device=_xp.device(item_load))
    partner = xp.clip(live - 1 - j, 0, item_load.shape[-1] - 1)
    pair_load = ranked[:, :half] + _xp.take_along(ranked, xp.astype(partner, order.dtype), xp=xp)
    return order, xp.where(j < live // 2, pair_load, -xp.inf)


def pair_counts(load: Any, count: Any, num_slots: int, num_iters: int, *, xp: Any) -> Any:
    """Replica counts ``[B, n]`` for rows of two slots per GPU, searched from ``count [B, n]`` (module docstring).

    ``load [B, n]``: float32 expert loads (>= 0); ``count``: integer, >= 1 each, summing per row to at most
    ``num_slots``: the row's live slots (a row with idle GPUs fills fewer, and its fold pairs only its own
    replicas; an odd sum, which no placement makes, leaves the middle item unpaired). Every row's fold under
    the result is at most its fold under ``count``; counts stay >= 1 and keep their sums.
    """
    batch, num_log = load.shape
    device = _xp.device(load)
    index_dtype = count.dtype
    donors = min(DONORS, num_log)
    reciprocal = _xp.reciprocal_table(num_slots - num_log + 1, xp=xp, device=device)
    experts = xp.arange(num_log, dtype=index_dtype, device=device)
    num_cands = 2 * donors

    def move_once(rows: tuple[Any, Any]) -> tuple[tuple[Any, Any], Any]:
        count, load = rows
        rows_n = count.shape[0]
        current, heavy, light = _heaviest_pair(load, count, num_slots, xp=xp)
        # Donors: experts of >= 2 replicas, lightest replica after giving one up first (equal: lower index).
        can_give = count >= 2
        after = replica_load(load, xp.where(can_give, count - 1, 0), reciprocal, xp=xp)
        cost = xp.where(can_give, after, xp.inf)
        donor = xp.astype(_xp.argsort_desc(-cost, xp=xp)[:, :donors], index_dtype)  # [B, D]
        donor_ok = _xp.take_along(can_give, donor, xp=xp)
        # Candidate c = 2 * i + t: donor i gives a replica to the heavy (t = 0) or light (t = 1) item's expert.
        donor_c = xp.reshape(xp.stack([donor, donor], axis=-1), (rows_n, num_cands))
        ok_c = xp.reshape(xp.stack([donor_ok, donor_ok], axis=-1), (rows_n, num_cands))
        target_c = xp.reshape(
            xp.stack([xp.broadcast_to(heavy, donor.shape), xp.broadcast_to(light, donor.shape)], axis=-1),
            (rows_n, num_cands),
        )
        ok_c = ok_c & (donor_c != target_c)
        gives = xp.astype(experts == donor_c[:, :, None], index_dtype)  # [B, C, n]
        takes = xp.astype(experts == target_c[:, :, None], index_dtype)
        moved = count[:, None, :] + xp.where(ok_c[:, :, None], takes - gives, 0)
        flat = xp.reshape(moved, (rows_n * num_cands, num_log))
        flat_load = xp.reshape(xp.broadcast_to(load[:, None, :], moved.shape), (rows_n * num_cands, num_log))
        flat_live = _row_slots(flat, xp=xp)
        _, item_load = replica_items(flat_load, flat, flat_live, num_slots, xp=xp)
        _, pair_load = fold_live(item_load, flat_live, xp=xp)
        value = xp.reshape(xp.max(pair_load, axis=-1), (rows_n, num_cands))
        value = xp.where(ok_c, value, xp.inf)
        best = xp.reshape(xp.astype(xp.argmin(value, axis=-1), index_dtype), (rows_n, 1))
        accept = _xp.take_along(value, best, xp=xp) < current * IMPROVEMENT  # [B, 1]
        chosen = xp.sum(xp.where((xp.arange(num_cands, device=device) == best)[:, :, None], moved, 0), axis=1)
        return (xp.where(accept, chosen, count), load), accept[:, 0]

    if batch == 0 or num_slots == num_log:
        return count
    count, _ = _xp.refine_rows(move_once, (count, load), num_iters, xp=xp)
    return count


def pair_stage(
    weight: Any,
    phy2log: Any,
    phyrank: Any,
    logcnt: Any,
    num_nodes: int,
    num_gpus: int,
    *,
    xp: Any,
    num_iters: int | None = None,
    counts_fn: Any = pair_counts,
) -> tuple[Any, Any, Any]:
    """Refold a two-slots-per-GPU placement with searched counts: ``phy2log, phyrank, logcnt``.

    ``weight [L, E]`` float32 (cleaned); ``phy2log, phyrank [L, R]``, ``logcnt [L, E]`` a placement of
    ``R = 2 * num_gpus`` slots whose experts each live on one node (any placement of the global or
    hierarchical policy). Per (layer, node) row: the node's experts in index order, their counts searched
    by ``counts_fn`` (:func:`pair_counts` or a kernel equal to it) from the current ones, the replicas
    folded onto the node's GPUs (GPU ``j``: fold pair ``j``, heavier item in the first slot, each expert's
    replicas ranked in item order). A row takes that placement only where its heaviest GPU is lighter
    than the current one's by the ``IMPROVEMENT`` margin; every other row keeps its slots.
    """
    num_layers, num_log = weight.shape
    num_phy = phy2log.shape[1]
    slots, log_per_node = num_phy // num_nodes, num_log // num_nodes
    if num_phy != 2 * num_gpus or slots == log_per_node or num_layers == 0:
        return phy2log, phyrank, logcnt
    if num_iters is None:
        num_iters = default_pair_iterations(slots, log_per_node)
    device = _xp.device(weight)
    index_dtype = phy2log.dtype
    rows_n = num_layers * num_nodes
    # Each expert's node: where its replica 0 sits (all its replicas share it). Slots by expert, stable.
    # Unique sort keys (expert, then slot; node, then expert): the same order on every backend.
    slot_ids = xp.arange(num_phy, dtype=index_dtype, device=device)
    by_expert = xp.astype(xp.argsort(phy2log * num_phy + slot_ids, axis=-1), index_dtype)  # [L, R]
    first = xp.astype(xp.cumulative_sum(logcnt, axis=-1) - logcnt, index_dtype)  # each expert's first slot
    node_of = _xp.take_along(by_expert, first, xp=xp) // slots  # [L, E]
    expert_ids = xp.arange(num_log, dtype=index_dtype, device=device)
    mlog2log = xp.astype(xp.argsort(node_of * num_log + expert_ids, axis=-1), index_dtype)  # node-major
    load = xp.reshape(_xp.take_along(weight, mlog2log, xp=xp), (rows_n, log_per_node))
    count = xp.reshape(_xp.take_along(logcnt, mlog2log, xp=xp), (rows_n, log_per_node))
    count = xp.astype(counts_fn(load, xp.astype(count, index_dtype), slots, num_iters, xp=xp), index_dtype)
    item2mlog, item_load = replica_items(load, count, _full_rows(count, slots, xp=xp), slots, xp=xp)
    order, _ = fold(item_load, xp=xp)
    order = xp.astype(order, index_dtype)
    # GPU j: fold pair j, slots 2j (heavy) and 2j + 1 (light).
    pphy2item = xp.reshape(xp.stack([order[:, : slots // 2], xp.flip(order[:, slots // 2 :], axis=-1)], axis=-1),
                           (rows_n, slots))  # fmt: skip
    item = xp.arange(slots, dtype=index_dtype, device=device)
    starts = xp.cumulative_sum(count, axis=-1) - count
    item_rank = item - _xp.take_along(starts, item2mlog, xp=xp)
    new = assemble(mlog2log, item2mlog, item_rank, count, pphy2item, num_nodes, xp=xp)

    # Per row: keep the old slots unless the fold is lighter by the margin (float32 pair sums both).
    def node_max(p2l: Any, cnt: Any) -> Any:  # [L, N]
        by_node = xp.reshape(gpu_loads(weight, p2l, cnt, num_gpus, xp=xp), (num_layers, num_nodes, -1))
        return xp.max(by_node, axis=-1)

    better = node_max(new[0], new[2]) < node_max(phy2log, logcnt) * IMPROVEMENT  # [L, N]
    slot_better = xp.reshape(xp.broadcast_to(better[:, :, None], (num_layers, num_nodes, slots)), (num_layers, num_phy))
    expert_better = _xp.take_along(better, node_of, xp=xp)  # [L, E]
    return (
        xp.where(slot_better, new[0], phy2log),
        xp.where(slot_better, new[1], phyrank),
        xp.where(expert_better, new[2], logcnt),
    )
