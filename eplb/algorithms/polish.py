"""Give moves back after a keep-in-place search: swaps that restore old ``(expert, GPU)`` pairs within a limit.

:func:`eplb.algorithms.repair.repair` stops as soon as the heaviest GPU is
within the limit, and the sticky repackings place replicas before the search
sheds their overload, so the placement a layer ends with often holds pairs
that a swap could give back: an expert that left GPU ``a`` for GPU ``b``
while another left ``b`` for ``a``, or a replica that could trade places with
one whose GPU held it before. :func:`polish` makes those swaps, the best
first, while every GPU it touches stays within the limit. Replica counts never
change (so no replica load does), the moves only fall, and two slots trade
places only inside a node of ``num_nodes`` (whole groups stay on their nodes).

Compiled equivalents: :mod:`eplb.kernels.polish_numba` (numpy and torch CPU
inputs), :mod:`eplb.kernels.polish_triton` (torch CUDA) and
:mod:`eplb.kernels.polish_pallas` (JAX GPU), equal bit for bit.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.packing import sum_left_to_right
from eplb.algorithms.relabel import _count, _first, _ids
from eplb.algorithms.replication import replica_load

__all__ = ["polish"]


def polish(
    phy2log: Any,
    counts: Any,
    old: Any,
    weight: Any,
    limit: Any,
    num_gpus: int,
    num_nodes: int,
    max_iters: int,
    *,
    xp: Any,
) -> Any:
    """Swap slots of ``phy2log [B, R]`` back toward ``old [B, R]`` while every changed GPU stays within ``limit``.

    ``counts [B, E]`` are ``phy2log``'s replica counts (integer),
    ``weight [B, E]`` float32 loads, ``limit [B, 1]`` float32. Slot loads are
    the replica loads ``w * fl(1/c)``; GPU loads their left-to-right sums.
    A slot holds a *new pair* when its GPU holds more copies of its expert
    than ``old`` does there (multisets, as ``count_moves`` counts them).

    Each step, per row, looks at every swap of two slots ``i < j`` on
    different GPUs ``g_i != g_j`` of one node (``R / num_nodes`` consecutive
    slots) whose experts differ, where neither expert is on the other GPU
    yet. Its change in moves is ``[x_i not in old on g_j] + [x_j not in old
    on g_i] - new_i - new_j`` and its changed loads are ``(load[g_i] - y_i)
    + y_j`` and ``(load[g_j] - y_j) + y_i`` (float32, in that order; ``y``
    a slot's load). Allowed: both changed loads ``<= limit`` and a change
    in moves below 0 (so at least one of the two slots holds a new pair).
    The step takes the allowed swap with the lowest change in moves, then
    the lowest of its two changed loads' max, then the first ``(i, j)`` in
    row-major order; a row with no allowed swap stops (it never changes
    again). At most ``max_iters`` steps.

    The changed loads are the search's estimate (one subtraction and one
    addition, as :func:`eplb.algorithms.repair.repair` prices its swaps); a
    caller that promises a limit checks the result's left-to-right sums (as
    :func:`eplb.algorithms.stability.stabilize` does) and keeps the input
    where they exceed it. Returns ``phy2log [B, R]`` (same dtype).
    """
    batch, num_phy = phy2log.shape
    num_log = weight.shape[1]
    per_gpu, per_node = num_phy // num_gpus, num_phy // num_nodes
    dtype = phy2log.dtype
    slot_ids = _ids(num_phy, phy2log, xp=xp)
    gpu_of_slot, node_of_slot = slot_ids // per_gpu, slot_ids // per_node
    reciprocal = _xp.reciprocal_table(num_phy, xp=xp, device=_xp.device(weight))
    counts = xp.astype(counts, dtype, copy=False)
    old = xp.astype(old, dtype, copy=False)
    # Fixed for the whole search: which pairs (i, j) may trade places at all, and each expert's copies per
    # GPU in old ([B, G, E], integer).
    upper = slot_ids[:, None] < slot_ids[None, :]
    pairable = upper & (gpu_of_slot[:, None] != gpu_of_slot[None, :]) & (node_of_slot[:, None] == node_of_slot[None, :])
    expert_ids = _ids(num_log, phy2log, xp=xp)
    old_copies = _count(
        xp.reshape(old, (batch, num_gpus, per_gpu))[..., None] == expert_ids, dtype, 2, xp=xp
    )  # [B, G, E]

    def copies_on(table: Any, experts: Any, gpus: Any) -> Any:
        """``table [b, G, E]`` read at ``(gpus, experts)`` (same shapes, ``[b, ...]``)."""
        b = table.shape[0]
        flat = xp.reshape(table, (b, num_gpus * num_log))
        index = xp.reshape(gpus * num_log + experts, (b, -1))
        return xp.reshape(_xp.take_along(flat, index, xp=xp), experts.shape)

    def step(rows: tuple) -> tuple[tuple, Any]:
        cur, cnt, old_copies, weight, limit = rows
        b = cur.shape[0]
        slot_load = _xp.take_along(replica_load(weight, cnt, reciprocal, xp=xp), cur, xp=xp)  # [b, R]
        loads = sum_left_to_right(xp.reshape(slot_load, (b, num_gpus, per_gpu)), xp=xp)  # [b, G]
        now_copies = _count(
            xp.reshape(cur, (b, num_gpus, per_gpu))[..., None] == expert_ids, dtype, 2, xp=xp
        )  # [b, G, E]
        gpus = xp.broadcast_to(gpu_of_slot, (b, num_phy))  # [b, R]
        here_now = copies_on(now_copies, cur, gpus)
        here_old = copies_on(old_copies, cur, gpus)
        new_pair = here_now > here_old  # [b, R]: giving this copy away removes a move
        # [b, i, j]: expert of i onto j's GPU and expert of j onto i's GPU.
        x_i = xp.broadcast_to(cur[:, :, None], (b, num_phy, num_phy))
        x_j = xp.broadcast_to(cur[:, None, :], (b, num_phy, num_phy))
        g_i = xp.broadcast_to(gpus[:, :, None], (b, num_phy, num_phy))
        g_j = xp.broadcast_to(gpus[:, None, :], (b, num_phy, num_phy))
        i_to_j_now, i_to_j_old = copies_on(now_copies, x_i, g_j), copies_on(old_copies, x_i, g_j)
        j_to_i_now, j_to_i_old = copies_on(now_copies, x_j, g_i), copies_on(old_copies, x_j, g_i)
        gone = xp.astype(new_pair, dtype)
        change = xp.where(i_to_j_old == 0, 1, 0) + xp.where(j_to_i_old == 0, 1, 0) - gone[:, :, None] - gone[:, None, :]
        load_i = _xp.take_along(loads, gpus, xp=xp)  # [b, R]: the load of each slot's GPU
        new_i = (load_i[:, :, None] - slot_load[:, :, None]) + slot_load[:, None, :]
        new_j = (load_i[:, None, :] - slot_load[:, None, :]) + slot_load[:, :, None]
        changed = xp.maximum(new_i, new_j)
        ok = pairable & (x_i != x_j) & (i_to_j_now == 0) & (j_to_i_now == 0)
        ok = ok & (new_i <= limit[:, :, None]) & (new_j <= limit[:, :, None]) & (change < 0)
        flat_ok = xp.reshape(ok, (b, num_phy * num_phy))
        flat_change = xp.reshape(xp.where(ok, change, 0), (b, num_phy * num_phy))
        least = xp.min(flat_change, axis=-1, keepdims=True)
        best = flat_ok & (flat_change == least)
        key = xp.where(best, xp.reshape(changed, (b, num_phy * num_phy)), xp.inf)
        # The first best of the least key (an argmin of key could name a non-candidate where the least is +inf).
        best = best & (key == xp.min(key, axis=-1, keepdims=True))
        choice = xp.reshape(_first(best, dtype, xp=xp), (b, 1))
        accept = xp.any(flat_ok, axis=-1, keepdims=True)
        give, take = choice // num_phy, choice % num_phy
        at_give, at_take = _xp.take_along(cur, give, xp=xp), _xp.take_along(cur, take, xp=xp)
        swapped = xp.where(slot_ids == give, at_take, xp.where(slot_ids == take, at_give, cur))
        cur = xp.where(accept, swapped, cur)
        return (cur, cnt, old_copies, weight, limit), accept[:, 0]

    rows = (phy2log, counts, old_copies, weight, limit)
    return _xp.refine_rows(step, rows, max_iters, xp=xp)[0]
