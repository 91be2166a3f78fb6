"""What a cold numba cache costs the other threads of a process: the warm-up in child processes or in-process.

    python benchmarks/numba_warm_up.py

Runs two fresh processes, each with an empty ``NUMBA_CACHE_DIR`` (a temporary folder): one with eplb's default
(``_numba.compile_in_subprocesses`` compiles the kernels, the background thread then loads them), one with
``EPLB_NUMBA_SUBPROCESS=0`` (the background thread compiles them). In each, the main thread times a pure-Python
loop (200k additions) in chunks while the warm-up runs: a chunk that waits for the GIL takes longer. Prints the
median and the longest chunk, against the same loop before the warm-up, and the warm-up's wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PROBE = """
    import statistics, time
    from eplb.backends import _numba

    def chunk():
        start, x = time.perf_counter(), 0
        for i in range(200_000):
            x += i
        return (time.perf_counter() - start) * 1e3

    before = [chunk() for _ in range(20)]
    start = time.perf_counter()
    thread = _numba._start_warm_up()
    during = []
    while thread.is_alive():
        during.append(chunk())
    print(f"loop chunk {statistics.median(before):.1f} ms before; during the warm-up median "
          f"{statistics.median(during):.1f} ms, longest {max(during):.0f} ms ({len(during)} chunks); "
          f"warm-up {time.perf_counter() - start:.1f} s, ready {_numba.ready()}")
"""


def main() -> None:
    root = str(Path(__file__).resolve().parents[1])
    for label, setting in (("child processes (default)", "1"), ("in-process (EPLB_NUMBA_SUBPROCESS=0)", "0")):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache, "EPLB_NUMBA_SUBPROCESS": setting, "PYTHONPATH": root}
            out = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(PROBE)], env=env, capture_output=True, text=True, check=True
            )
            print(f"{label}: {out.stdout.strip()}")


if __name__ == "__main__":
    main()
