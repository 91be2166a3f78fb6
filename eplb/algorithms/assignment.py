"""An exact assignment solver for small integer profit matrices, batched and jit-able."""

from __future__ import annotations

from typing import Any

from eplb import _xp
from eplb.algorithms.packing import inverse_permutation

__all__ = ["BIG", "max_assignment"]

# Larger than any integer cost, move count or potential here; fits int32.
BIG = 2**30


def max_assignment(profit: Any, *, xp: Any) -> Any:
    """``col_of_row [B, n]``: a permutation maximising ``sum_i profit[b, i, col_of_row[b, i]]``, exactly.

    ``profit [B, n, n]`` holds integers. The Hungarian algorithm with
    shortest augmenting paths (rows added one by one, Dijkstra on reduced
    costs with potentials; O(n^3)), in integer arithmetic with first-index
    ties, so every backend returns the same optimum. Rows are added one by
    one (a scan on JAX); the search and augmenting path of row ``i`` end
    within ``i`` steps each, run through :func:`eplb._xp.refine_rows`, so
    they stop early on the host and in JAX, and take ``n (n + 1)`` steps in
    all on CUDA (which cannot stop early without a host sync).
    """
    batch, n, _ = profit.shape
    dtype, device = profit.dtype, _xp.device(profit)
    if n == 1:
        return xp.zeros((batch, 1), dtype=dtype, device=device)
    m = n + 1  # column 0 and row 0 are the algorithm's dummies
    cost = xp.max(profit, axis=(1, 2), keepdims=True) - profit  # >= 0
    cost = xp.concat([xp.zeros((batch, n, 1), dtype=dtype, device=device), cost], axis=2)
    cost = xp.concat([xp.zeros((batch, 1, m), dtype=dtype, device=device), cost], axis=1)
    # Searches read the cost rows they need by index: numpy and torch CPU run
    # them on the still-active rows only, and copying whole matrices per step
    # would dominate.
    flat_cost = xp.reshape(cost, (batch * m * m,))
    col = xp.arange(m, dtype=dtype, device=device)
    row_ids = xp.reshape(xp.arange(batch, dtype=dtype, device=device), (batch, 1))

    def search(rows: tuple) -> tuple[tuple, Any]:
        # One Dijkstra step from column j0 (matched to row i0); stops at a free column.
        u, v, p, way, minv, used, row_used, j0, row_id = rows
        i0 = _xp.take_along(p, j0, xp=xp)  # [b, 1]
        active = i0 != 0
        used = used | ((col == j0) & active)
        row_used = row_used | ((col == i0) & active)
        cost_row = xp.take(flat_cost, xp.reshape((row_id * m + i0) * m + col, (-1,)), axis=0)
        reduced = xp.reshape(cost_row, u.shape) - _xp.take_along(u, i0, xp=xp) - v
        better = ~used & (reduced < minv) & active
        minv = xp.where(better, reduced, minv)
        way = xp.where(better, j0, way)
        reach = xp.where(used, BIG, minv)
        delta = xp.min(reach, axis=-1, keepdims=True)
        # Any closest column will do; a free one ends the search (first index among those).
        closest = reach == delta
        free = closest & (p == 0)
        j1 = xp.where(xp.any(free, axis=-1, keepdims=True), _first(free, dtype, xp=xp)[:, None], 0)
        j1 = xp.where(xp.any(free, axis=-1, keepdims=True), j1, _first(closest, dtype, xp=xp)[:, None])
        delta = xp.where(active, delta, 0)
        u = u + xp.where(row_used, delta, 0)
        v = v - xp.where(used, delta, 0)
        minv = xp.where(used, minv, minv - delta)
        j0 = xp.where(active, j1, j0)
        return (u, v, p, way, minv, used, row_used, j0, row_id), active[:, 0]

    def augment(rows: tuple) -> tuple[tuple, Any]:
        p, way, j0 = rows
        active = j0 != 0
        j1 = _xp.take_along(way, j0, xp=xp)
        p = xp.where(active & (col == j0), _xp.take_along(p, j1, xp=xp), p)
        return (p, way, xp.where(active, j1, j0)), active[:, 0]

    def add_row(carry: tuple, row: Any, steps: int = m) -> tuple[tuple, None]:
        # Row ``row`` (1-based) meets at most ``row - 1`` matched columns: its search and its
        # augmenting path take at most ``row`` steps each.
        u, v, p, way = carry
        p = xp.where(col == 0, row, p)
        start = (
            u,
            v,
            p,
            way,
            xp.full((batch, m), BIG, dtype=dtype, device=device),
            xp.zeros((batch, m), dtype=xp.bool, device=device),
            xp.zeros((batch, m), dtype=xp.bool, device=device),
            xp.zeros((batch, 1), dtype=dtype, device=device),
            row_ids,
        )
        u, v, p, way, _, _, _, j0, _ = _xp.refine_rows(search, start, steps, xp=xp)
        p, way, _ = _xp.refine_rows(augment, (p, way, j0), steps, xp=xp)
        return (u, v, p, way), None

    carry = (xp.zeros((batch, m), dtype=dtype, device=device),) * 4
    if _xp.is_jax(xp):  # one traced row step, looped on the device
        (_, _, p, _), _ = _xp.scan(add_row, carry, col[1:], xp=xp)
    else:  # host loop: each row gets its own step bound (CUDA runs every bounded step)
        for row in range(1, m):
            carry, _ = add_row(carry, row, row)
        p = carry[2]
    return inverse_permutation(p[:, 1:] - 1, xp=xp)  # p[j] = row (1-based) matched to column j


def _first(mask: Any, dtype: Any, *, xp: Any) -> Any:
    """Index of the first true entry along the last axis (0 if none)."""
    return xp.astype(xp.argmax(xp.astype(mask, dtype), axis=-1), dtype)
