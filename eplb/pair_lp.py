"""A near-exact lower bound at two slots per GPU: the linear relaxation of the placement's integer model.

Offline and host-only: it solves linear programs with SciPy's HiGHS
(``pip install scipy``), in float64, on numpy copies of the inputs. Use it to
ask how far a placement is from the best one; it is not on any placement's
path. :func:`eplb.metrics.lower_bound`'s pair bound
(:mod:`eplb.algorithms.pair_bound`) is the cheap relaxation of the same
question; this one is far tighter where speeds differ (on the DeepSeek-V3
loads at 288 slots on 144 GPUs, half at 0.6, it sits within a few tenths of
a percent of the exact optimum where the pair bound can be several percent
below; ``docs/benchmarks.md``) and costs seconds a layer.

The model, for a time ``T``. Live GPUs of equal capacity form a class ``k``
(``n_k`` GPUs, room ``C_k = T c_k``); every live GPU holds two replicas,
so a placement fills ``S = 2 sum n_k`` slots. Expert ``e`` takes a count
``r`` (``1 <= r <= S - E + 1``) of replicas of load ``w_e / r``; each goes
to a class whose room holds it. A class's replicas pair up under its room if
and only if, for every ``tau > C_k / 2``, the replicas of load ``>= tau`` are
no more than those of load ``<= C_k - tau`` (Hall's condition on a threshold
graph's nested neighbourhoods). Relaxed: each expert a convex mix of counts,
each count's replicas split fractionally over the classes. If that linear
program is infeasible, no placement reaches ``T``.

Exact reformulation, so the programs stay small: counts whose replicas sit
in the same place relative to every class's room and every threshold give
columns proportional to the count, so only the first and last count of each
such run is kept (any count between is a mix of the two); a class's
threshold rows become two entries each over prefix sums of its replicas in
decreasing load.

Bisection on ``T`` between :func:`eplb.metrics.lower_bound` (proven; less
``2**-20`` of it, as it is float32) and the slowest time of
``rebalance_experts(..., gpu_capacity=)`` (a placement, so feasible) returns
the largest ``T`` the relaxation proved unreachable, or that start. Rooms
are widened by :data:`SLACK` so rounding in the float64 comparisons can only
weaken the bound.
"""

from __future__ import annotations

import numpy as np

__all__ = ["METHODS", "SLACK", "pair_lp_bound"]

#: Relative widening of every room (float64 rounding of ``T c_k`` and of ``w / r`` cannot prove too much).
SLACK = 2.0**-40
#: SciPy ``linprog`` methods tried in turn until one settles a program (feasible or infeasible).
METHODS = ("highs-ds", "highs-ipm")


def _classes(capacity: np.ndarray) -> list[tuple[int, float]]:
    """``(GPUs, capacity)`` per distinct live capacity, fastest first."""
    values, counts = np.unique(capacity[capacity > 0], return_counts=True)
    return [(int(n), float(c)) for c, n in zip(values[::-1], counts[::-1], strict=True)]


def _kept_counts(load: np.ndarray, counts: np.ndarray, rooms: list[float]) -> np.ndarray:
    """bool ``[E, r_max]``: the counts kept, the two ends of every run of counts whose replicas compare the same
    with every room and threshold (threshold ``tau``: a load in ``(room / 2, room]``)."""
    size = load[:, None] / counts[None, :]
    every = np.unique(size)
    keys = []
    for room in rooms:
        taus = every[(every > room / 2) & (every <= room)]
        partners = np.sort(room - taus)
        keys += [
            size <= room,
            np.searchsorted(taus, size, side="right"),  # thresholds at or below the load
            np.searchsorted(partners, size, side="left"),  # thresholds whose partner bound is below the load
        ]
    key = np.stack(keys, axis=-1)
    same = np.all(key[:, 1:] == key[:, :-1], axis=-1)  # [E, r_max - 1]
    inner = np.zeros(size.shape, bool)
    inner[:, 1:-1] = same[:, 1:] & same[:, :-1]
    return ~inner


def _feasible(load: np.ndarray, classes: list[tuple[int, float]], time: float) -> bool:
    """Whether the relaxation admits ``time`` for one layer ``load [E]`` (float64, > 0 somewhere)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    num_experts = load.shape[0]
    slots = 2 * sum(n for n, _ in classes)
    counts = np.arange(1, slots - num_experts + 2, dtype=np.float64)
    rooms = [time * c * (1 + SLACK) for _, c in classes]
    keep = _kept_counts(load, counts, rooms)
    expert, count_index = np.nonzero(keep)
    count = counts[count_index]
    size = load[expert] / count
    num_options, num_classes = expert.shape[0], len(classes)
    # Columns: z [O] (count mix), y [O, K] (replicas per class), u [K, O] (prefix sums by decreasing load).
    y0, u0 = num_options, num_options * (1 + num_classes)
    num_vars = u0 + num_classes * num_options
    order = np.argsort(-size, kind="stable")
    desc = size[order]
    eq_rows, eq_cols, eq_vals, eq_rhs = [], [], [], []
    row = 0

    def equality(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, rhs: np.ndarray) -> None:
        nonlocal row
        eq_rows.append(rows + row)
        eq_cols.append(cols)
        eq_vals.append(vals)
        eq_rhs.append(rhs)
        row += rhs.shape[0]

    options = np.arange(num_options)
    equality(expert, options, np.ones(num_options), np.ones(num_experts))  # one mix of counts per expert
    link_rows = np.repeat(options, 1 + num_classes)  # sum_k y[o, k] = count[o] z[o]
    link_cols = np.concatenate([options[:, None], y0 + options[:, None] * num_classes + np.arange(num_classes)], 1)
    link_vals = np.concatenate([-count[:, None], np.ones((num_options, num_classes))], 1)
    equality(link_rows, link_cols.ravel(), link_vals.ravel(), np.zeros(num_options))
    upper = np.full(num_vars, np.inf)
    upper[:num_options] = 1.0
    ub_rows, ub_cols, ub_vals, ub_rhs = [], [], [], []
    for k, ((gpus, _), room) in enumerate(zip(classes, rooms, strict=True)):
        y = y0 + options * num_classes + k
        upper[y[size > room]] = 0.0
        equality(np.zeros(num_options, np.int64), y, np.ones(num_options), np.array([2.0 * gpus]))
        u = u0 + k * num_options + options  # u[i] = u[i - 1] + y[order[i]]
        prefix_rows = np.concatenate([options, options, options[1:]])
        prefix_cols = np.concatenate([u, y[order], u[:-1]])
        prefix_vals = np.concatenate([np.ones(num_options), -np.ones(num_options), -np.ones(num_options - 1)])
        equality(prefix_rows, prefix_cols, prefix_vals, np.zeros(num_options))
        taus = np.unique(desc[(desc > room / 2) & (desc <= room)])
        last_big = np.searchsorted(-desc, -taus, side="right") - 1  # last replica of load >= tau
        last_over = np.searchsorted(-desc, -(room - taus), side="left") - 1  # last of load > room - tau
        base = sum(r.shape[0] for r in ub_rhs)
        hall = np.arange(taus.shape[0]) + base
        has_over = last_over >= 0
        ub_rows += [hall, hall[has_over]]
        ub_cols += [u[last_big], u[last_over[has_over]]]
        ub_vals += [np.ones(taus.shape[0]), np.ones(int(has_over.sum()))]
        ub_rhs.append(np.full(taus.shape[0], 2.0 * gpus))
    shape_eq = (row, num_vars)
    a_eq = coo_matrix((np.concatenate(eq_vals), (np.concatenate(eq_rows), np.concatenate(eq_cols))), shape=shape_eq)
    b_ub = np.concatenate(ub_rhs)
    a_ub = None
    if b_ub.shape[0]:
        a_ub = coo_matrix(
            (np.concatenate(ub_vals), (np.concatenate(ub_rows), np.concatenate(ub_cols))),
            shape=(b_ub.shape[0], num_vars),
        ).tocsr()
    problem = {
        "A_ub": a_ub,
        "b_ub": b_ub if a_ub is not None else None,
        "A_eq": a_eq.tocsr(),
        "b_eq": np.concatenate(eq_rhs),
        "bounds": np.stack([np.zeros(num_vars), upper], axis=1),
    }
    # HiGHS's dual simplex first, its interior point method where that one cannot settle the program
    # (numerical trouble: status 4). A program neither settles proves nothing: counted as feasible, so the
    # bisection only ever raises the bound on a proof of infeasibility.
    for method in METHODS:
        status = linprog(np.zeros(num_vars), method=method, **problem).status
        if status in (0, 2):
            return status == 0
    return True


def pair_lp_bound(
    load: np.ndarray, capacity: np.ndarray, low: np.ndarray, high: np.ndarray, *, tolerance: float
) -> np.ndarray:
    """``[L]`` float64: per layer, the largest time in ``[low, high]`` the relaxation proves unreachable.

    ``load [L, E]`` float64 >= 0; ``capacity [G]`` float64 (0: idle), two slots
    on every live GPU, at least ``E`` live slots; ``low [L]`` a proven bound and
    ``high [L]`` a reachable time (a placement's). Bisection until the bracket
    is below ``tolerance`` times ``high``.
    """
    classes = _classes(capacity)
    out = np.array(low, np.float64, copy=True)
    for layer in range(load.shape[0]):
        lo, hi = float(low[layer]), float(high[layer])
        if not load[layer].any():
            continue
        while hi - lo > tolerance * hi:
            middle = (lo + hi) / 2
            if _feasible(load[layer], classes, middle):
                hi = middle
            else:
                lo = middle
        out[layer] = lo
    return out
