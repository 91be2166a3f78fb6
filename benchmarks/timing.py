"""Timers shared by the benchmarks: CUDA events around a call, median of warm runs."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any


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
