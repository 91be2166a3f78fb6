"""The JAX greedy policy on a GPU: the Pallas kernel (default on CUDA) vs the XLA path and jax-triton.

For each shape, every path is first checked against numpy (bit for bit),
then timed: median (and 10th percentile) of ``--runs`` warm calls, each
followed by ``jax.block_until_ready`` ("latency": host dispatch + kernel),
and the mean of ``--runs`` calls issued back to back before one block
("pipelined": about the device time once dispatch overlaps it).
``--sweep`` also times the kernel at other launch settings (warps, pairwise
tile budget) to choose the defaults of :func:`eplb.backends._pallas.kernel_meta`.
``--overhead`` times, on the CPU, what ``eplb.rebalance_experts`` adds in
Python (validation, value checks) over the jitted function it calls.

Run: ``python benchmarks/pallas_speed.py [--runs N] [--sweep] [--overhead]``
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import eplb
from eplb.backends import _jax, _pallas

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


def _row(label: str, fn, want, runs: int) -> None:
    same = _same(fn(), want)
    median, p10, pipelined = _times_us(fn, runs)
    print(f"  {label:34s} {median / 1e3:8.3f} {p10 / 1e3:8.3f} {pipelined / 1e3:10.3f}   {'yes' if same else 'NO'}")


def gpu_table(runs: int, sweep: bool) -> None:
    device = jax.devices("gpu")[0]
    print(f"device: {device.device_kind}, jax {jax.__version__}; ms per call")
    rng = np.random.default_rng(1)
    for name, (layers, experts, *config) in SHAPES.items():
        config = tuple(config)
        hier = config[1] % config[2] == 0
        weight = (rng.lognormal(0, 1.5, (layers, experts)) * 1000).astype(np.float32)
        want = eplb.rebalance_experts(weight, *config)
        w = jax.device_put(jnp.asarray(weight), device)
        print(f"\n{name} [{layers}, {experts}] -> {config}")
        print(f"  {'path':34s} {'median':>8s} {'p10':>8s} {'pipelined':>10s}   same as numpy")
        _row("eplb.rebalance_experts (default)", lambda w=w, c=config: eplb.rebalance_experts(w, *c), want, runs)
        for impl in ("pallas", "xla", "triton"):
            if impl == "triton" and not _jax.kernel_available():
                print("  impl='triton': jax-triton not installed")
                continue
            _row(
                f"_jax.rebalance(impl={impl!r})",
                lambda w=w, c=config, i=impl, h=hier: _jax.rebalance(w, *c, hierarchical=h, impl=i),
                want,
                runs,
            )
        if sweep:
            default = _pallas.kernel_meta(experts, *(config if hier else (config[0], 1, 1, config[3])))
            print(f"  defaults: num_warps={default.num_warps} budget={default.budget}")
            for num_warps in (1, 2, 4, 8):
                for budget in sorted({default.budget, 1024 * num_warps, 4096 * num_warps}):
                    _row(
                        f"kernel num_warps={num_warps} budget={budget}",
                        lambda w=w, c=config, h=hier, n=num_warps, b=budget: _pallas.placement(
                            w, c, h, num_warps=n, budget=b
                        ),
                        want,
                        runs,
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
    args = parser.parse_args()
    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        gpu_table(args.runs, args.sweep)
    else:
        print("no JAX GPU: skipping the GPU table")
    if args.overhead or not has_gpu:
        cpu_overhead(max(args.runs, 2000))
    if importlib.util.find_spec("jax_triton") is not None:
        from eplb.backends._triton_kernel import ensure_cache_dir

        ensure_cache_dir()


if __name__ == "__main__":
    main()
