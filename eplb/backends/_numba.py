"""The numba fast path of the greedy policy for numpy and torch CPU inputs: when it applies, and the call.

The kernel itself is :mod:`eplb.kernels.greedy_numba` (equal to the
array-API policy bit for bit). Here: whether numba imports
(:func:`available`), which options it computes (:func:`supports`), and
:func:`rebalance`, which sends layers the kernel declines (float32 sums that
overflow) to the reference path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import subprocess
import sys
import threading
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np

from eplb import _xp

__all__ = ["available", "greedy", "rebalance", "supports"]

# numba's default "workqueue" threading layer aborts the process if two
# threads launch parallel kernels at once; a thread that finds the parallel
# kernel busy runs the serial one instead (same placement).
_PARALLEL_LOCK = threading.Lock()

# About this many (layer, node) packings run in lockstep.
_LOCKSTEP_ROWS = 8


def supports(options: dict[str, Any]) -> bool:
    """Whether the kernel computes :func:`eplb.algorithms.policies.place` with these keywords (plain greedy)."""
    return (
        "hierarchical" in options
        and set(options) <= {"hierarchical", "policy", "spill"}
        and options.get("policy", "greedy") == "greedy"
        and not options.get("spill", 0)
    )


@functools.cache
def available() -> bool:
    """Whether numba imports (tried once, on the first call): without it the reference path runs.

    numba not installed: ``False``, silently (it is an optional extra). numba
    installed but failing to import (say, built against another numpy): one
    ``RuntimeWarning`` naming the error, then ``False``, since the reference
    path gives the same placement, only slower; a user who installed the
    ``fast`` extra should learn why it is not used.
    """
    try:
        if importlib.util.find_spec("numba") is None:
            return False
    except ImportError:  # an import hook that refuses numba: as good as not installed
        return False
    try:
        import numba  # noqa: F401
    except Exception as err:  # a broken install raises anything (ImportError, AttributeError, SystemError...)
        warnings.warn(
            f"numba is installed but failed to import ({type(err).__name__}: {err}); eplb runs its "
            "reference path instead of the compiled CPU kernel (same placements, slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


_READY = threading.Event()
_WARM_UP_LOCK = threading.Lock()
_WARM_UP: list[threading.Thread] = []
_WARM_UP_ERROR: list[BaseException] = []


def ready(wait: float = 0.0) -> bool:
    """Whether the compiled kernels are loaded; if not, start loading them in the background and wait up to
    ``wait`` seconds for them.

    A fresh process pays for the kernels once: about 0.4-0.7 s to load them
    from numba's disk cache; where the cache is cold, child processes
    compile them first (20-40 s on a 2-core CPU; :func:`_load_kernels`).
    Default dispatch (``impl=None``) asks here and runs the array-API path
    (the same placement) until a background thread has them ready, so
    no call waits for a compile. The fresh greedy plan asks without waiting
    (its array-API path takes milliseconds); ``previous=`` waits up to
    :data:`STABLE_WAIT` (its array-API path takes 0.1-1.3 s at DeepSeek-V3
    size, more than loading the kernels from a warm cache). Call
    :func:`warm_up` to wait until they are ready.
    """
    if _READY.is_set():
        return True
    _start_warm_up()
    # A load that failed never sets _READY: no call waits for it again.
    return wait > 0 and not _WARM_UP_ERROR and _READY.wait(wait)


# Seconds a ``previous=`` call waits for the kernels: a warm cache loads them in well under this; a cold one
# (a compile) does not, and the call then runs the array-API path, a second later than it would have.
STABLE_WAIT = 1.0


def warm_up(wait: bool = True) -> None:
    """Load (or compile) the kernels now, in the background; ``wait``: until they are ready (errors re-raised)."""
    thread = _start_warm_up()
    if wait:
        thread.join()
        if _WARM_UP_ERROR:
            raise _WARM_UP_ERROR[0]


def _start_warm_up() -> threading.Thread:
    with _WARM_UP_LOCK:  # one starter: the first caller creates the thread
        if not _WARM_UP:
            thread = threading.Thread(target=_load_kernels, name="eplb-numba-warm-up", daemon=True)
            _WARM_UP.append(thread)
            thread.start()
    return _WARM_UP[0]


# The kernel families, in load order (repair's kernels take about half of a cold compile).
KERNEL_FAMILIES = ("greedy", "relabel", "repair", "group_split", "speed", "pairs", "polish")


def load_kernel_families(families: tuple[str, ...] = KERNEL_FAMILIES) -> None:
    """Run each family's kernels once on a tiny input: numba compiles (or loads) every specialisation eplb uses.

    In this thread, ready or not; :func:`warm_up` is the way in (this helps a build step split a cold compile
    over processes, each taking some ``families``: numba writes each cache entry on its own).
    """
    from eplb.kernels import group_split_numba, pairs_numba, polish_numba, relabel_numba, repair_numba, speed_numba

    unknown = set(families) - set(KERNEL_FAMILIES)
    if unknown:
        raise ValueError(f"families must be among {KERNEL_FAMILIES}, got {sorted(unknown)}")
    modules = {
        "repair": repair_numba,
        "group_split": group_split_numba,
        "speed": speed_numba,
        "pairs": pairs_numba,
        "polish": polish_numba,
    }
    for family in families:
        if family == "greedy":
            greedy(np.ones((1, 4), dtype=np.float32), 8, 2, 2, 4, hierarchical=True)
        elif family == "relabel":
            previous = np.arange(8, dtype=np.int64).reshape(1, 8) % 4
            relabel_numba.relabel(previous, previous[:, ::-1].copy(), 4, 2, 4)
            relabel_numba.log2phy_in_slot_order(previous, 4)
        else:
            modules[family].warm_up()


# A cold cache's compile split over two processes (repair's kernels are about half of it).
COMPILE_GROUPS = (("repair",), tuple(family for family in KERNEL_FAMILIES if family != "repair"))


def cold_cache() -> bool:
    """Whether a kernel that numba can cache on disk has no cache index there yet (its first call would compile).

    Reads numba's cache paths (``dispatcher._cache._cache_file._index_path``): ``False`` where they are not
    there (another numba), where no kernel can be cached (no writable folder), or where every index exists.
    """
    from eplb.kernels import _numba_jit

    for family in KERNEL_FAMILIES:
        importlib.import_module(f"eplb.kernels.{family}_numba")  # defines (registers) its kernels
    for name, dispatcher in _numba_jit.DISPATCHERS.items():
        if not _numba_jit.CACHED.get(name):
            continue
        try:
            index = dispatcher._cache._cache_file._index_path
        except AttributeError:
            return False
        if not os.path.exists(index):
            return True
    return False


def compile_in_subprocesses(groups: tuple[tuple[str, ...], ...] = COMPILE_GROUPS, timeout: float = 600.0) -> bool:
    """Compile (or load) the kernels in child processes, one per group of families, into numba's disk cache.

    The children see this process's ``sys.path`` (as ``PYTHONPATH``) and environment, so they import this eplb
    and write the cache this process reads. Returns whether every child exited cleanly within ``timeout``
    seconds (a child past it is killed); never raises for a child's failure (the caller's own compile follows).
    """
    unknown = {family for group in groups for family in group} - set(KERNEL_FAMILIES)
    if unknown:
        raise ValueError(f"families must be among {KERNEL_FAMILIES}, got {sorted(unknown)}")
    if not sys.executable:  # an embedded interpreter: no Python to start
        return False
    paths = [path for path in sys.path if path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "import sys; from eplb.backends import _numba; _numba.load_kernel_families(tuple(sys.argv[1:]))"
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, *group],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for group in groups
        ]
    except OSError:
        return False
    ok = True
    for proc in procs:
        try:
            ok = proc.wait(timeout=timeout) == 0 and ok
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ok = False
    return ok


def _load_kernels() -> None:
    """:func:`load_kernel_families`, all of them, then ready (or the error kept for :func:`warm_up`).

    Where the disk cache is cold, child processes compile first (:func:`compile_in_subprocesses`) and this
    thread then only loads: numba's compile holds the GIL much of its 20-30 s, which slows every other thread
    of the process (a serving loop's too); a load takes 0.4-0.7 s. ``EPLB_NUMBA_SUBPROCESS=0`` compiles in
    this thread instead. Where a child fails, this thread compiles what is missing, as before.
    """
    try:
        if os.environ.get("EPLB_NUMBA_SUBPROCESS", "1") != "0" and cold_cache():
            compile_in_subprocesses()
        load_kernel_families()
        _READY.set()
    except BaseException as err:  # surfaced by warm_up(); dispatch keeps the reference path
        _WARM_UP_ERROR.append(err)


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernels (``serial``, ``parallel``) and ``rank_desc`` (for tests), from :mod:`eplb.kernels.greedy_numba`.

    Imported on the first call (it imports numba); each loads from numba's
    disk cache or compiles on its first call.
    """
    from eplb.kernels import greedy_numba

    return SimpleNamespace(
        serial=greedy_numba.layers_serial, parallel=greedy_numba.layers_parallel, rank_desc=greedy_numba.rank_desc
    )


def rebalance(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    log2phy: bool = True,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The numpy backend's ``rebalance`` for plain greedy options, compiled; same placement, bit for bit.

    ``weight [L, E]`` float32, C-contiguous. Layers the kernel declines
    (see :func:`greedy`) are computed by the reference path.
    ``log2phy=False``: the second array is ``[L, E, 0]`` (see :func:`greedy`).
    """
    if not supports(options):
        raise ValueError(f"the compiled kernel runs the plain greedy policy only, got options {options}")
    phy2log, log2phy_out, logcnt, ok = greedy(
        weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical=options["hierarchical"], log2phy=log2phy
    )
    if not ok.all():
        from eplb.algorithms.policies import place

        rows = np.flatnonzero(~ok)
        redo = place(weight[rows], num_replicas, num_groups, num_nodes, num_gpus, xp=np, **options)
        for out, part in zip((phy2log, log2phy_out, logcnt), redo, strict=True):
            if out.size:  # an empty log2phy_out (log2phy=False) takes nothing
                out[rows] = part
    return phy2log, log2phy_out, logcnt


def greedy(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    hierarchical: bool,
    parallel: bool = False,
    batch: int | None = None,
    merge_only: bool = False,
    log2phy: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The greedy placement of float32 ``weight [L, E]`` (C-contiguous), compiled.

    Returns ``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]``, ``logcnt [L, E]``
    (int64) and ``ok [L]`` (bool): layers where ``ok`` is False hold garbage
    and must be recomputed by the reference path (float32 sums that overflow).

    ``parallel``: split the layers over numba's threads (unless another
    thread is running the parallel kernel already). Layers are independent,
    so the result is the same either way; it is off by default: on a busy
    machine a call then waits for the slowest thread to get a core.
    ``batch``: layers whose replica packings run in lockstep (default: about
    8 packings at a time). ``merge_only``: sort every row with the merge
    sort, not the bucket pass first (tests check both). ``log2phy=False``:
    the second array is ``[L, E, 0]`` and not built (``previous=`` builds its
    own; the ``[L, E, R - E + 1]`` array is the largest the call writes,
    3.9 MB at DeepSeek-V3 size, and allocating it afresh each call costs page
    faults).
    The first call in a process compiles the kernels (a few seconds).
    """
    if not hierarchical:
        num_groups, num_nodes = 1, 1
    kernels = _kernels()
    weight = np.ascontiguousarray(weight, dtype=np.float32)  # float32 arithmetic: no other specialisation
    num_layers, num_log = weight.shape
    phy2log = np.empty((num_layers, num_replicas), dtype=np.int64)
    width = num_replicas - num_log + 1 if log2phy else 0
    log2phy = np.empty((num_layers, num_log, width), dtype=np.int64)
    logcnt = np.empty((num_layers, num_log), dtype=np.int64)
    ok = np.empty(num_layers, dtype=np.bool_)
    recip = _xp.reciprocal_table(num_replicas // num_nodes - num_log // num_nodes + 1, xp=np)
    if batch is None:
        batch = max(1, _LOCKSTEP_ROWS // num_nodes)
    batch = max(1, min(batch, num_layers))
    args = (weight, recip, num_groups, num_nodes, num_gpus, phy2log, log2phy, logcnt, ok, batch, merge_only)
    if parallel and _PARALLEL_LOCK.acquire(blocking=False):
        try:
            kernels.parallel(*args, min(_num_threads(), num_layers))
        finally:
            _PARALLEL_LOCK.release()
    else:
        kernels.serial(*args, 1)
    return phy2log, log2phy, logcnt, ok


def _num_threads() -> int:
    import numba

    return numba.get_num_threads()
