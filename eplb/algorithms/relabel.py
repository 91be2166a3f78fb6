"""Relabelling a placement to keep experts where they are: counts of kept experts, slot order, GPU order.

A placement's balance depends only on which experts share a GPU, not on
which GPU (within a node, for the hierarchical policy), which node, or which
slot of a GPU carries them. :func:`relabel` picks those labels to keep the
most ``(expert, GPU)`` pairs of an old placement, exactly; the GPU loads do
not change. Pairs are counted as multisets (an expert may have several
replicas). Integer arithmetic and first-index ties only, batched over a
leading axis.
"""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.assignment import max_assignment
from eplb.algorithms.packing import inverse_permutation

__all__ = ["align_slots", "count_moves", "gpu_overlap", "occurrence", "relabel", "replica_counts"]


def _ids(n: int, like: Any, *, xp: Any) -> Any:
    """``arange(n)`` in the integer dtype and on the device of ``like``."""
    return _xp.iota(n, dtype=like.dtype, device=_xp.device(like), xp=xp)


def _count(mask: Any, dtype: Any, axis: int, *, xp: Any) -> Any:
    """True entries of ``mask`` along ``axis``, as ``dtype``."""
    return xp.sum(mask, axis=axis, dtype=dtype)


def _first(mask: Any, dtype: Any, *, xp: Any) -> Any:
    """Index of the first true entry along the last axis (0 if none)."""
    return xp.astype(xp.argmax(xp.astype(mask, dtype), axis=-1), dtype)


def occurrence(x: Any, *, xp: Any) -> Any:
    """``[..., n]``: how many earlier entries along the last axis equal each entry (0 for the first copy)."""
    ids = _ids(x.shape[-1], x, xp=xp)
    earlier = ids[None, :] < ids[:, None]  # [p, p']: p' comes before p
    return _count((x[..., :, None] == x[..., None, :]) & earlier, x.dtype, -1, xp=xp)


def replica_counts(phy2log: Any, num_log: int, *, xp: Any) -> Any:
    """``logcnt [B, E]``: slots of ``phy2log [B, R]`` holding each expert."""
    return _count(phy2log[:, :, None] == _ids(num_log, phy2log, xp=xp), phy2log.dtype, 1, xp=xp)


def gpu_overlap(new: Any, old: Any, num_gpus: int, *, xp: Any) -> Any:
    """``kept [B, G, G]``: size of the multiset intersection of new GPU ``i``'s and old GPU ``j``'s experts."""
    batch, num_phy = new.shape
    new3 = xp.reshape(new, (batch, num_gpus, num_phy // num_gpus))
    old3 = xp.reshape(old, (batch, num_gpus, num_phy // num_gpus))
    # The k-th copy of an expert on new GPU i is kept on old GPU j iff j holds more than k copies.
    have = _count(new3[:, :, :, None, None] == old3[:, None, None, :, :], new.dtype, -1, xp=xp)  # [B, G, s, G]
    return _count(have > occurrence(new3, xp=xp)[..., None], new.dtype, 2, xp=xp)


def count_moves(new: Any, old: Any, num_gpus: int, *, xp: Any) -> Any:
    """``[B]``: ``(expert, GPU)`` pairs of ``new [B, R]`` that ``old [B, R]`` lacks (multisets per GPU)."""
    batch, num_phy = new.shape
    new3 = xp.reshape(new, (batch, num_gpus, num_phy // num_gpus))
    old3 = xp.reshape(old, (batch, num_gpus, num_phy // num_gpus))
    have = _count(new3[..., :, None] == old3[..., None, :], new.dtype, -1, xp=xp)  # [B, G, s]
    kept = _count(have > occurrence(new3, xp=xp), new.dtype, -1, xp=xp)
    return num_phy - xp.sum(kept, axis=-1)


def align_slots(new: Any, old: Any, num_gpus: int, *, xp: Any) -> Any:
    """Reorder each GPU's slots of ``new [B, R]`` so experts it keeps sit in their old slots.

    The k-th copy of expert ``e`` on a GPU goes to the slot of the k-th old
    copy of ``e`` there, if any; the other experts fill the remaining slots
    in their order.
    """
    batch, num_phy = new.shape
    per_gpu = num_phy // num_gpus
    dtype = new.dtype
    new3 = xp.reshape(new, (batch, num_gpus, per_gpu))
    old3 = xp.reshape(old, (batch, num_gpus, per_gpu))
    same = new3[..., :, None] == old3[..., None, :]
    match = same & (occurrence(new3, xp=xp)[..., :, None] == occurrence(old3, xp=xp)[..., None, :])  # [B, G, p, q]
    free_new = ~xp.any(match, axis=-1)
    free_old = ~xp.any(match, axis=-2)
    ids = _ids(per_gpu, new, xp=xp)
    earlier = ids[None, :] < ids[:, None]
    rank_new = _count(free_new[..., None, :] & earlier, dtype, -1, xp=xp)  # among free new slots
    rank_old = _count(free_old[..., None, :] & earlier, dtype, -1, xp=xp)
    fill = free_old[..., None, :] & (rank_old[..., None, :] == rank_new[..., :, None])
    dest = xp.where(free_new, _first(fill, dtype, xp=xp), _first(match, dtype, xp=xp))  # slot of each new entry
    source = _first(dest[..., None, :] == ids[:, None], dtype, xp=xp)  # new entry landing in each slot
    flat = (batch * num_gpus, per_gpu)
    out = _xp.take_along(xp.reshape(new3, flat), xp.reshape(source, flat), xp=xp)
    return xp.reshape(out, (batch, num_phy))


def relabel(new: Any, old: Any, num_gpus: int, num_nodes: int, *, xp: Any) -> Any:
    """``new [B, R]`` with nodes, GPUs within nodes and slots within GPUs permuted to match ``old``.

    Maximises the kept ``(expert, GPU)`` pairs exactly: a node-to-node
    assignment whose values are the best GPU-to-GPU assignment between each
    pair of nodes (``num_nodes == 1``: one assignment over all GPUs).
    """
    batch, num_phy = new.shape
    per_gpu, gpus_per_node = num_phy // num_gpus, num_gpus // num_nodes
    kept = gpu_overlap(new, old, num_gpus, xp=xp)  # [B, G, G]
    if num_nodes == 1:
        gpu_perm = max_assignment(kept, xp=xp)
    else:
        g, pairs = gpus_per_node, batch * num_nodes * num_nodes
        blocks = xp.reshape(kept, (batch, num_nodes, g, num_nodes, g))
        blocks = xp.reshape(xp.permute_dims(blocks, (0, 1, 3, 2, 4)), (pairs, g, g))
        inner = max_assignment(blocks, xp=xp)  # [pairs, g]
        ids_g = _ids(g, new, xp=xp)
        value = xp.sum(_xp.take_along(xp.reshape(blocks, (pairs, g * g)), ids_g * g + inner, xp=xp), axis=-1)
        outer = max_assignment(xp.reshape(value, (batch, num_nodes, num_nodes)), xp=xp)  # [B, N]
        pair = _ids(num_nodes, new, xp=xp) * num_nodes + outer
        pick = xp.reshape(pair[:, :, None] * g + ids_g, (batch, num_nodes * g))
        inner = _xp.take_along(xp.reshape(inner, (batch, num_nodes * num_nodes * g)), pick, xp=xp)
        gpu_perm = xp.reshape(outer[:, :, None] * g + xp.reshape(inner, (batch, num_nodes, g)), (batch, num_gpus))
    holder = inverse_permutation(gpu_perm, xp=xp)  # new GPU placed at each old position
    slots = xp.reshape(holder[:, :, None] * per_gpu + _ids(per_gpu, new, xp=xp), (batch, num_phy))
    return align_slots(_xp.take_along(new, slots, xp=xp), old, num_gpus, xp=xp)
