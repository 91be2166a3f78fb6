"""The JAX greedy policy on a GPU: the Pallas kernel (default on CUDA) vs the XLA path and jax-triton.

For each shape, every path is first checked against numpy (bit for bit),
then timed: median (and 10th percentile) of ``--runs`` warm calls, each
followed by ``jax.block_until_ready`` ("latency": host dispatch + kernel),
and the mean of ``--runs`` calls issued back to back before one block
("pipelined": the device time once dispatch overlaps it, or the host time
per call when that is longer). "GPU" is the kernel's own time: the median
duration of its launches in a ``jax.profiler`` trace of 10 calls. "trivial
jitted function" is the latency floor of a jitted call on the GPU (one
tiny op). ``--sweep`` also times the kernel at other settings (packing
step, item reads, unroll, tile lanes) to choose the defaults of
:func:`eplb.kernels.greedy_pallas.kernel_meta`; ``--old PATH`` adds the kernel of
another ``greedy_pallas.py`` (``placement(weight, config, hierarchical)``) for a
before/after comparison; ``--trace`` lists where the host time of a public
call goes.
``--overhead`` times, on the CPU, what ``eplb.rebalance_experts`` adds in
Python (validation, value checks) over the jitted function it calls.

Run: ``python benchmarks/pallas_speed.py [--runs N] [--sweep] [--overhead] [--old PATH] [--trace] [--impls ...]``
"""

from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import eplb
from eplb.backends import _jax
from eplb.kernels import greedy_pallas

SHAPES = {
    # name: (layers, experts, replicas, groups, nodes, gpus)
    "deepseek-v3 hierarchical": (58, 256, 288, 8, 4, 32),
    "94x512 -> 768 / 256 GPUs": (94, 512, 768, 32, 32, 256),
    "deepseek-v3 global 144 GPUs": (58, 256, 288, 8, 3, 144),
}


def _times_us(fn, runs: int) -> tuple[float, float, float]:
    """(median, 10th percentile, pipelined mean) in microseconds."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(runs):
        out = fn()  # earlier outputs are freed as they go; the stream runs them in order
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - t0) / runs
    return statistics.median(times) * 1e6, float(np.percentile(times, 10)) * 1e6, pipelined * 1e6


def _same(got, want) -> bool:
    return all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want, strict=True))


HEADER = f"  {'path':40s} {'median':>8s} {'p10':>8s} {'pipelined':>9s} {'GPU':>8s}   same as numpy"


def _row(label: str, fn, want, runs: int, device: bool = False) -> None:
    """One line: latency (median, p10), pipelined, the kernel's profiled GPU time (``device``), same as numpy."""
    same = "-" if want is None else "yes" if _same(fn(), want) else "NO"
    median, p10, pipelined = _times_us(fn, runs)
    gpu = f"{_device_us(fn) / 1e3:8.4f}" if device else f"{'':8s}"
    print(f"  {label:40s} {median / 1e3:8.4f} {p10 / 1e3:8.4f} {pipelined / 1e3:9.4f} {gpu}   {same}", flush=True)


def _load_old(path: str):
    spec = importlib.util.spec_from_file_location("_pallas_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _public(w, config):
    return eplb.rebalance_experts(w, *config)


def _rebalance(w, *, config, hierarchical, impl):
    return _jax.rebalance(w, *config, hierarchical=hierarchical, impl=impl)


def _old_placement(old, w, *, config, hierarchical):
    return old.placement(w, config, hierarchical)


def _new_placement(w, *, config, hierarchical, options):
    return greedy_pallas.placement(w, config, hierarchical, options=options)


SWEEP = [  # kernel settings other than the defaults (kernel_meta keywords)
    (("fill_first", False),),
    (("unroll", 2),),
    (("unroll", 8),),
    (("lanes", 2),),
    (("select", "arg"),),
]


def _trace_events(fn, calls: int) -> dict[tuple[str, str], list[float]]:
    """``{(plane, event name): durations in ns}`` of ``calls`` calls of ``fn`` under ``jax.profiler``."""
    jax.block_until_ready(fn())
    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder):
        for _ in range(calls):
            jax.block_until_ready(fn())
    [path] = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
    events: dict[tuple[str, str], list[float]] = {}
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                events.setdefault((plane.name, event.name), []).append(event.duration_ns)
    shutil.rmtree(folder, ignore_errors=True)
    return events


_SHOWN = set()


def _device_us(fn, calls: int = 10) -> float:
    """Median GPU time of the kernel that ``fn`` launches, from a ``jax.profiler`` trace (us)."""
    events = {k: v for k, v in _trace_events(fn, calls).items() if "GPU" in k[0]}
    if not events:
        return float("nan")
    key = max(events, key=lambda k: sum(events[k]))
    if key[1] not in _SHOWN:
        _SHOWN.add(key[1])
        print(f"  (GPU column: kernel {key[1][:60]!r} on {key[0]!r})")
    return statistics.median(events[key]) / 1e3


def host_events(fn, calls: int = 20, top: int = 12) -> None:
    """The host-side events of a call, by median duration (where a call's host time goes)."""
    events = _trace_events(fn, calls)
    rows = [(statistics.median(v), len(v), k) for k, v in events.items() if "GPU" not in k[0] and len(v) >= calls]
    rows.sort(reverse=True)
    print(f"  host events per call (median us, count over {calls} calls):")
    for median, count, (_, name) in rows[:top]:
        print(f"    {median / 1e3:8.1f} {count:4d}  {name[:90]}")


def gpu_table(
    runs: int,
    sweep: bool,
    old_path: str | None,
    impls: tuple[str, ...] = ("pallas", "xla", "triton"),
    trace: bool = False,
    shapes: tuple[str, ...] = (),
) -> None:
    device = jax.devices("gpu")[0]
    print(f"device: {device.device_kind}, jax {jax.__version__}; ms per call")
    old = _load_old(old_path) if old_path else None
    rng = np.random.default_rng(1)
    w0 = jax.device_put(jnp.zeros((58, 256), jnp.float32), device)
    floor = jax.jit(lambda x: x + 1)
    print(HEADER)
    _row("trivial jitted function (x + 1)", lambda: floor(w0), None, runs)
    for name, (layers, experts, *config) in SHAPES.items():
        if shapes and not any(part in name for part in shapes):
            continue
        config = tuple(config)
        hier = config[1] % config[2] == 0
        weight = (rng.lognormal(0, 1.5, (layers, experts)) * 1000).astype(np.float32)
        want = eplb.rebalance_experts(weight, *config)
        w = jax.device_put(jnp.asarray(weight), device)
        print(f"\n{name} [{layers}, {experts}] -> {config}")
        print(HEADER)
        public = functools.partial(_public, w, config)
        _row("eplb.rebalance_experts (default)", public, want, runs, device=True)
        if trace:
            host_events(public)
        for impl in impls:
            if impl == "triton" and not _jax.kernel_available():
                print("  impl='triton': jax-triton not installed")
                continue
            one = functools.partial(_rebalance, config=config, hierarchical=hier, impl=impl)
            _row(f"_jax.rebalance(impl={impl!r})", lambda one=one, w=w: one(w), want, runs, impl != "xla")
        if old is not None:
            one = functools.partial(_old_placement, old, config=config, hierarchical=hier)
            _row("old kernel (--old)", lambda one=one, w=w: one(w), want, runs, True)
        if sweep:
            meta = greedy_pallas.kernel_meta(experts, *(config if hier else (config[0], 1, 1, config[3])))
            defaults = ", ".join(f"{k}={getattr(meta, k)}" for k in ("select", "fill_first", "unroll", "lanes"))
            print(f"  defaults: {defaults}")
            for options in SWEEP:
                one = functools.partial(_new_placement, config=config, hierarchical=hier, options=options)
                _row(
                    "kernel " + " ".join(f"{k}={v}" for k, v in options),
                    lambda one=one, w=w: one(w),
                    want,
                    runs,
                    True,
                )


def cpu_overhead(runs: int) -> None:
    """What the public call adds in Python over the jitted function it calls, on the CPU.

    The jitted function is swapped for a trivial one of the same signature
    (returns its input), so that XLA's execution time, which varies more
    than the overhead itself on a busy CPU, drops out: what remains is jit
    dispatch plus eplb's own Python (validation, value checks).
    """
    weight = np.array(
        [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    )
    w = jax.device_put(jnp.asarray(weight, dtype=jnp.int32), jax.devices("cpu")[0])

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def trivial(x, config, options, impl):
        return x, x, x

    options = (("hierarchical", True), ("policy", "greedy"), ("spill", 0))
    paths = {
        "trivial jitted function": lambda: trivial(w, (16, 4, 2, 8), options, "xla"),
        "eplb.backends._jax.rebalance": lambda: _jax.rebalance(w, 16, 4, 2, 8, hierarchical=True, spill=0),
        "eplb.rebalance_experts": lambda: eplb.rebalance_experts(w, 16, 4, 2, 8),
        "eplb.rebalance_experts(check_values=False)": lambda: eplb.rebalance_experts(
            w, 16, 4, 2, 8, check_values=False
        ),
    }
    real, _jax._placement = _jax._placement, trivial
    try:
        times = {name: [] for name in paths}
        for fn in paths.values():
            jax.block_until_ready(fn())
        for _ in range(runs):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
    finally:
        _jax._placement = real
    base = statistics.median(times["trivial jitted function"])
    print(f"\nCPU, [2, 12] int32, jitted function made trivial; median of {runs} interleaved calls (us):")
    for name, t in times.items():
        print(f"  {name:44s} {statistics.median(t) * 1e6:7.1f}  (+{(statistics.median(t) - base) * 1e6:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel at other launch settings")
    parser.add_argument("--overhead", action="store_true", help="time the Python overhead of the public call on CPU")
    parser.add_argument("--old", metavar="PATH", help="also time the kernel of another greedy_pallas.py (before/after)")
    parser.add_argument("--impls", default="pallas,xla,triton", help="_jax.rebalance paths to time (comma-separated)")
    parser.add_argument("--trace", action="store_true", help="also list where the host time of a public call goes")
    parser.add_argument("--shapes", default="", help="only the shapes whose name holds one of these (comma-separated)")
    args = parser.parse_args()
    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        gpu_table(
            args.runs,
            args.sweep,
            args.old,
            tuple(filter(None, args.impls.split(","))),
            args.trace,
            tuple(filter(None, args.shapes.split(","))),
        )
    else:
        print("no JAX GPU: skipping the GPU table")
    if args.overhead or not has_gpu:
        cpu_overhead(max(args.runs, 2000))
    if importlib.util.find_spec("jax_triton") is not None:
        from eplb.kernels.greedy_triton import ensure_cache_dir

        ensure_cache_dir()


if __name__ == "__main__":
    main()
