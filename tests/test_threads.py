"""The threads setting of the compiled kernels' rows (``EPLB_THREADS``, :mod:`eplb.kernels._threads`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eplb.kernels import _threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, threads", [("1", 1), ("3", 3), (" 12 ", 12)])
def test_eplb_threads_sets_the_number(value, threads):
    assert _threads._threads_setting({"EPLB_THREADS": value}) == threads


def test_default_is_the_available_cpus_at_most_8():
    expected = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), 8)
    assert _threads._threads_setting({}) == expected
    assert _threads._threads_setting({"EPLB_THREADS": ""}) == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_eplb_threads_names_the_variable(value):
    with pytest.raises(ValueError, match=r"EPLB_THREADS must be a positive int .* got"):
        _threads._threads_setting({"EPLB_THREADS": value})


def test_eplb_threads_is_read_at_import():
    """A process started with EPLB_THREADS=1 runs every batch on its own thread: no pool is ever made."""
    script = (
        "import numpy as np\n"
        "from eplb.kernels import _threads\n"
        "assert _threads.THREADS == 1, _threads.THREADS\n"
        "out = _threads.map_rows(lambda rows: (np.arange(100) if rows is None else rows,), 100, 2)[0]\n"
        "assert (out == np.arange(100)).all() and not _threads._POOLS\n"
        "print('ok')\n"
    )
    env = {**os.environ, "EPLB_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("threads, batch, min_rows", [(1, 40, 4), (2, 40, 4), (3, 41, 4), (8, 9, 4), (5, 7, 1)])
def test_map_rows_puts_every_row_back_in_place(monkeypatch, threads, batch, min_rows):
    """Every row's result lands in its row whatever the split (an independent per-row function as the oracle),
    and the batch splits into ``min(THREADS, batch // min_rows)`` parts."""
    monkeypatch.setattr(_threads, "THREADS", threads)
    seen = []

    def run(rows):
        rows = np.arange(batch) if rows is None else rows
        seen.append(len(rows))
        return rows * 3 + 1, np.stack([rows, -rows], axis=1)

    first, second = _threads.map_rows(run, batch, min_rows)
    assert first.tolist() == [3 * r + 1 for r in range(batch)]
    assert second.tolist() == [[r, -r] for r in range(batch)]
    parts = min(threads, batch // min_rows)
    assert len(seen) == max(parts, 1) and sum(seen) == batch
