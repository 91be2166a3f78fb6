"""Run one test worker per rank in spawned processes and collect what each wrote (``{rank}.json`` in a folder)."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_ranks(target: Callable[..., None], args: Callable[[int], tuple], world: int, folder: Path) -> dict[int, dict]:
    """Start ``target(*args(rank))`` for every rank (spawned: no state shared with the test process), wait up to
    two minutes for each, kill the stragglers, and return each rank's ``folder / f"{rank}.json"`` (``{}`` if it
    wrote none)."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=target, args=args(rank)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    found: dict[int, Any] = {}
    for rank in range(world):
        path = folder / f"{rank}.json"
        found[rank] = json.loads(path.read_text()) if path.exists() else {}
    return found
