"""Timers shared by the benchmarks: median of warm runs, by the host clock or by CUDA events around a call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def host_median_ms(fn: Callable[[], Any], runs: int) -> float:
    """Median host time of ``fn()``, ms, after one untimed call (``fn`` must block until its work is done)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cuda_median_ms(fn: Callable[[], Any], runs: int, warmup: int = 1) -> float:
    """Median time of ``fn()`` between two CUDA events, ms, after ``warmup`` untimed calls.

    The start event is recorded before the call, so host launch time counts.
    """
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
