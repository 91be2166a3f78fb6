"""Rows of a compiled kernel on several threads: the numba kernels release the GIL, and their rows are independent.

:func:`map_rows` deals a batch's rows round-robin (a batch's slow rows often sit
together, e.g. one start's block of the local search) to up to :data:`THREADS`
threads, at least ``min_rows`` rows each, and puts every result back in its row:
each row's result is the one-thread result. A forked child (a serving stack's
worker) makes threads of its own: the parent's do not exist there.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["THREADS", "map_rows"]


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _threads_setting(environ: Mapping[str, str] = os.environ) -> int:
    """``EPLB_THREADS`` when set (a positive int), else the CPUs available to the process, at most 8."""
    value = environ.get("EPLB_THREADS", "").strip()
    if not value:
        return min(_available_cpus(), 8)
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"EPLB_THREADS must be a positive int (1: one thread), got {value!r}")
    return threads


THREADS = _threads_setting()
"""Most threads a kernel's rows run on: ``EPLB_THREADS`` when set, else the CPUs available to the process, at
most 8; 1: one thread. Read at import; assign to change it in a running process."""

_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """``threads`` threads (made on first use, then kept)."""
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="eplb-rows")
        return _POOLS[threads]


def _forget_pools() -> None:
    """In a forked child: a pool that thinks it has the parent's threads would never run a task."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def map_rows(
    run: Callable[[np.ndarray | None], tuple[np.ndarray, ...]], batch: int, min_rows: int
) -> tuple[np.ndarray, ...]:
    """``run(None)`` (every row), or the same arrays computed part by part on threads.

    ``run(rows)`` computes the rows ``rows`` (int64 indices, ascending) of a
    batch of ``batch`` and returns arrays whose first axis is those rows. With
    fewer than ``2 * min_rows`` rows, or :data:`THREADS` 1, one call on this
    thread.
    """
    parts = min(THREADS, batch // min_rows)
    if parts <= 1:
        return run(None)
    split = [np.arange(k, batch, parts) for k in range(parts)]
    results = list(_pool(parts).map(run, split))
    out = tuple(np.empty((batch, *part.shape[1:]), part.dtype) for part in results[0])
    for rows, result in zip(split, results, strict=True):
        for whole, part in zip(out, result, strict=True):
            whole[rows] = part
    return out
