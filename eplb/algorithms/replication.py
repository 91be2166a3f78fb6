"""Replication: hand out redundant slots, one at a time, to the most loaded expert."""

from __future__ import annotations

from typing import Any

from eplb import _xp

__all__ = ["add_replicas", "replica_items", "replica_load", "replicate_experts"]


def replica_load(weight: Any, count: Any, reciprocal: Any, *, xp: Any) -> Any:
    """Load of one replica, ``weight * fl(1/count)``, float32, same shape as ``weight``.

    ``reciprocal`` is :func:`eplb._xp.reciprocal_table`. A product of two
    float32 values is correctly rounded on every backend, so every backend
    computes the same bits; ``weight / count`` would not be (XLA on GPU).
    """
    flat = xp.take(reciprocal, xp.reshape(count, (-1,)), axis=0)
    return weight * xp.reshape(flat, count.shape)


def replicate_experts(weight: Any, num_phy: int, *, xp: Any, max_count: int | None = None) -> tuple[Any, Any, Any]:
    """Replicate each row's experts into ``num_phy`` slots, greedily by replica load.

    Parameters
    ----------
    weight : array [B, E], float32
        Expert loads, one independent problem per row.
    num_phy : int
        Physical slots per row, ``>= E``.
    max_count : int, optional
        Stop giving replicas to an expert once it has this many (>= 2), while
        any other expert can still take one. With ``m`` GPUs, counts between
        ``m`` and ``2m`` put two replicas on some GPU, which carries more of
        that expert than ``m`` replicas would: ``max_count=m`` frees those
        slots for other experts.

    Returns
    -------
    phy2log : array [B, num_phy], integer
        Expert held by each slot; slots ``0..E-1`` hold experts ``0..E-1``,
        slot ``E + s`` holds the expert chosen at step ``s``.
    phyrank : array [B, num_phy], integer
        Replica number of each slot within its expert (0 for the original).
    logcnt : array [B, E], integer
        Replicas per expert (>= 1, summing to ``num_phy``).

    Tie rules
    ---------
    Each of the ``num_phy - E`` steps gives a replica to the expert with the
    largest score ``weight * fl(1/logcnt)`` (float32, see :func:`replica_load`),
    equal scores to the lowest expert index. Only the chosen expert's score
    changes per step.
    """
    batch, num_log = weight.shape
    device = _xp.device(weight)
    num_redundant = num_phy - num_log
    if num_redundant < 0:
        raise ValueError(f"num_phy={num_phy} must be >= the number of experts {num_log}")
    index_dtype = xp.arange(1, device=device).dtype
    base_phy2log = xp.broadcast_to(xp.arange(num_log, dtype=index_dtype, device=device), (batch, num_log))
    base_rank = xp.zeros((batch, num_log), dtype=index_dtype, device=device)
    if num_redundant == 0:
        return (
            xp.asarray(base_phy2log, copy=True),
            base_rank,
            xp.ones((batch, num_log), dtype=index_dtype, device=device),
        )
    logcnt = xp.ones((batch, num_log), dtype=index_dtype, device=device)
    expert_by_step, rank_by_step, logcnt = add_replicas(
        weight, logcnt, num_redundant, num_phy, xp=xp, max_count=max_count
    )
    phy2log = xp.concat([base_phy2log, expert_by_step], axis=-1)
    phyrank = xp.concat([base_rank, rank_by_step], axis=-1)
    return phy2log, phyrank, logcnt


def add_replicas(
    weight: Any, logcnt: Any, num_steps: int, total: int, *, xp: Any, max_count: int | None = None
) -> tuple[Any, Any, Any]:
    """Hand out ``num_steps`` more replicas to rows already holding ``logcnt [B, E]`` replicas.

    ``total`` is the replicas per row afterwards (``sum(logcnt) + num_steps``),
    which bounds every count by ``total - E + 1``.

    Returns ``expert_by_step [B, num_steps]`` (who got each new replica),
    ``rank_by_step [B, num_steps]`` (its replica number) and the new
    ``logcnt``. Tie rules and ``max_count`` as in :func:`replicate_experts`.
    """
    batch, num_log = weight.shape
    device = _xp.device(weight)
    index_dtype = logcnt.dtype
    reciprocal = _xp.reciprocal_table(total - num_log + 1, xp=xp, device=device)
    rows = xp.reshape(xp.arange(batch, dtype=index_dtype, device=device), (batch, 1))

    def add_replica(carry: Any, _: Any) -> tuple[Any, Any]:
        # score [B, E] float32: load of one replica if the expert got another;
        # logcnt [B, E]: replicas so far. Both are buffers owned by the loop.
        score, logcnt = carry
        expert = xp.reshape(xp.astype(xp.argmax(score, axis=-1), index_dtype), (batch, 1))  # first max wins
        rank = _xp.take_along(logcnt, expert, xp=xp)  # [B, 1] replicas before this one
        new_score = replica_load(_xp.take_along(weight, expert, xp=xp), rank + 1, reciprocal, xp=xp)
        if max_count is not None:
            # Scores are >= 0, so -1 ranks a full expert last (first index if all are full).
            new_score = xp.where(rank + 1 >= max_count, -1.0, new_score)
        score = _xp.at_set(score, (rows, expert), new_score, xp=xp)
        logcnt = _xp.at_set(logcnt, (rows, expert), rank + 1, xp=xp)
        return (score, logcnt), (expert[:, 0], rank[:, 0])

    if num_steps == 0:
        none = xp.zeros((batch, 0), dtype=index_dtype, device=device)
        return none, none, logcnt
    score = replica_load(weight, logcnt, reciprocal, xp=xp)
    if max_count is not None:
        score = xp.where(logcnt >= max_count, -1.0, score)
    steps = xp.zeros((num_steps, 1), dtype=index_dtype, device=device)
    init = (score, xp.asarray(logcnt, copy=True))
    (_, logcnt), (expert_by_step, rank_by_step) = _xp.scan(add_replica, init, steps, xp=xp)
    return xp.permute_dims(expert_by_step, (1, 0)), xp.permute_dims(rank_by_step, (1, 0)), logcnt


def replica_items(mlog_load: Any, mlogcnt: Any, live_slots: Any, phy_per_node: int, *, xp: Any) -> tuple[Any, Any]:
    """``item2mlog`` (each expert's replicas in a run, experts in order; phantoms: 0) and ``item_load``
    (phantoms: -1), ``[rows, R/N]``, for ``mlogcnt`` summing to ``live_slots``."""
    num_log = mlog_load.shape[1]
    device = _xp.device(mlog_load)
    index_dtype = mlogcnt.dtype
    rows = mlogcnt.shape[0]
    item = xp.arange(phy_per_node, dtype=index_dtype, device=device)
    ends = xp.cumulative_sum(mlogcnt[:, :-1], axis=-1)  # first item of experts 1.., increasing (counts >= 1)
    starts = xp.zeros((rows, phy_per_node + 1), dtype=index_dtype, device=device)
    row_ids = xp.reshape(xp.arange(rows, dtype=index_dtype, device=device), (rows, 1))
    starts = _xp.at_set(starts, (row_ids, ends), xp.ones_like(ends), xp=xp)
    item2mlog = xp.cumulative_sum(starts[:, :phy_per_node], axis=-1)  # experts started so far, minus one
    kept = item < xp.astype(live_slots, index_dtype)
    item2mlog = xp.where(kept, item2mlog, 0)
    reciprocal = _xp.reciprocal_table(phy_per_node - num_log + 1, xp=xp, device=device)
    load = replica_load(
        _xp.take_along(mlog_load, item2mlog, xp=xp), _xp.take_along(mlogcnt, item2mlog, xp=xp), reciprocal, xp=xp
    )
    return item2mlog, xp.where(kept, load, -1.0)
