"""torch CUDA: ``rebalance_experts`` eager against ``eplb.GraphedPlanner`` (the same call replayed as a CUDA graph).

Run on a GPU machine: ``python benchmarks/graphed.py [--runs 30]``. Real DeepSeek-V3 loads from ../shared/data
(EPLB_DATA_DIR overrides): ``previous`` is the placement of one SGLang file, the call re-plans another; masks and
capacities are CUDA tensors (GPU 5 down; every other GPU at 0.6). Per call and config, median of warm calls:

- **call ms**: CUDA-event time from before the call to the end of its work (host launches included);
- **host ms**: time until the call returns, without waiting for the GPU (what the serving loop's thread pays;
  eager torch CUDA calls return when their last kernel is queued);

for the eager call, the graphed call (copies into the graph's buffers, replay, copies of the outputs) and the
graphed call with ``copy_outputs=False``, and the first call of a new planner (an eager plan, the capture and a
replay; eplb's constant tables already built), with the published greedy (Python loops, loads on the host) once per
config for reference. Every graphed result is checked equal to the eager one before timing.

``--rebalancer``: instead, ``eplb.Rebalancer.step()`` on CUDA loads with ``cuda_graphs=False`` (every call eager)
against the default (the candidate replayed as a CUDA graph), the two fed the same windows (the 12 SGLang files in
turn, each with lognormal noise, sigma 0.1) and stepped one after the other on the same history, every other window,
all GPUs up / GPU 5 down / every other GPU at 0.6: median and max host time of a step (it ends with the host copies
of its decision), the first two steps (the fresh plan and the capture) left out, decisions checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.baselines import published_greedy
from benchmarks.keep_speed import load
from benchmarks.timing import cuda_median_ms, host_median_ms
from eplb.backends import _numba

CONFIGS = {"4 nodes / 32 GPUs": (288, 8, 4, 32), "global, 144 GPUs": (288, 8, 3, 144)}
# name: (options of the planner, per-call vectors: None, "active_gpus" or "gpu_capacity", with previous=)
CALLS = {
    "fresh greedy": ({}, None, False),
    "fresh refined": ({"policy": "refined"}, None, False),
    "previous=": ({}, None, True),
    "previous= + balance_tolerance=0.005": ({"balance_tolerance": 0.005}, None, True),
    "previous= + max_moves=16": ({"max_moves": 16}, None, True),
    "active_gpus + previous= + tolerance 0.05": ({"balance_tolerance": 0.05}, "active_gpus", True),
    "gpu_capacity, fresh": ({}, "gpu_capacity", False),
    "gpu_capacity + previous= + tolerance 0.01": ({"balance_tolerance": 0.01}, "gpu_capacity", True),
}


def host_return_ms(fn, runs: int) -> float:
    """Median time until ``fn()`` returns, ms, the GPU drained before each call (no queue to wait behind)."""
    fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rebalancer", action="store_true", help="Rebalancer.step(), eager against graphed")
    args = parser.parse_args()
    _numba.warm_up()  # the setup's numpy calls would otherwise compile numba's kernels beside the timings (GIL)
    if args.rebalancer:
        rebalancer_steps(args.runs)
        return
    old, new = load("prefill_in4096.json"), load("prefill_in2048.json")
    layers = min(len(old), len(new))
    old, new = old[:layers], new[:layers]
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}; {layers} layers x 256 experts, median of {args.runs}")
    for label, config in CONFIGS.items():
        gpus = config[3]
        published = host_median_ms(lambda c=config: published_greedy(torch.as_tensor(new), *c), 5)
        print(f"\n{label} {config}: published greedy {published:.1f} ms")
        print(
            "| call | eager: call ms | eager: host ms | graphed: call ms | graphed: host ms | no copies: call ms "
            "| first call (capture) ms |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        mask = np.ones(gpus, bool)
        mask[5] = False
        capacity = np.ones(gpus, np.float32)
        capacity[1::2] = 0.6
        for name, (options, vector, with_previous) in CALLS.items():
            host = {"active_gpus": {"active_gpus": mask}, "gpu_capacity": {"gpu_capacity": capacity}}.get(vector, {})
            kwargs = {key: torch.as_tensor(x, device="cuda") for key, x in host.items()}
            if with_previous:
                prev = eplb.rebalance_experts(old, *config, **host, **options_without_knobs(options)).phy2log
                kwargs["previous"] = torch.as_tensor(prev, device="cuda")
            weight = torch.as_tensor(new, device="cuda")
            planner = eplb.GraphedPlanner(*config, **options)
            raw = eplb.GraphedPlanner(*config, copy_outputs=False, **options)

            def eager(w=weight, k=kwargs, o=options, c=config):
                return eplb.rebalance_experts(w, *c, **k, **o)

            def graphed(w=weight, k=kwargs, p=planner):
                return p(w, **k)

            def no_copies(w=weight, k=kwargs, p=raw):
                return p(w, **k)

            want = eager()
            torch.cuda.synchronize()
            start = time.perf_counter()
            first = graphed()  # this signature's first call: one eager plan, the capture, the replay
            torch.cuda.synchronize()
            capture = (time.perf_counter() - start) * 1e3
            for got in (first, graphed(), no_copies()):
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), name
            cells = [
                cuda_median_ms(eager, args.runs, warmup=2),
                host_return_ms(eager, args.runs),
                cuda_median_ms(graphed, args.runs, warmup=2),
                host_return_ms(graphed, args.runs),
                cuda_median_ms(no_copies, args.runs, warmup=2),
                capture,
            ]
            print(f"| {name} | " + " | ".join(f"{ms:.3f}" for ms in cells) + " |")


def rebalancer_steps(runs: int) -> None:
    """``Rebalancer.step()`` host time, eager against graphed (see the module docstring)."""
    from benchmarks.rebalancer_speed import sglang_windows

    windows = sglang_windows(2 * runs + 4)
    layers = windows[0].shape[0]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; Rebalancer.step() host ms, {layers} layers")
    print("| config | GPUs | eager: median / max | graphed: median / max | steps |")
    print("| --- | --- | --- | --- | --- |")
    for label, config in CONFIGS.items():
        gpus = config[3]
        mask = np.arange(gpus) != 5
        capacity = np.where(np.arange(gpus) % 2 == 1, 0.6, 1.0)
        kinds = {"all up": {}, "GPU 5 down": {"active_gpus": mask}, "half at 0.6": {"gpu_capacity": capacity}}
        for kind, vectors in kinds.items():
            eager = eplb.Rebalancer(*config, cuda_graphs=False, **vectors)
            graphed = eplb.Rebalancer(*config, **vectors)
            times: dict[str, list[float]] = {"eager": [], "graphed": []}
            for t, window in enumerate(windows):
                load_gpu = torch.as_tensor(window, device="cuda")
                eager.record(load_gpu)
                graphed.record(load_gpu)
                if t % 2 == 0:
                    continue
                decisions = {}
                for name, rebalancer in (("eager", eager), ("graphed", graphed)):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    decisions[name] = rebalancer.step()
                    times[name].append((time.perf_counter() - start) * 1e3)
                a, b = decisions["eager"], decisions["graphed"]
                assert np.array_equal(a.layers, b.layers) and np.array_equal(a.gain, b.gain), (label, kind, t)
                assert all(torch.equal(x, y) for x, y in zip(a.placement, b.placement, strict=True)), (label, kind, t)
            cells = [f"{statistics.median(v[2:]):.2f} / {max(v[2:]):.2f}" for v in times.values()]
            print(f"| {label} | {kind} | {cells[0]} | {cells[1]} | {len(times['eager']) - 2} |")


def options_without_knobs(options: dict) -> dict:
    """The options a fresh plan takes (the knobs need ``previous=``)."""
    return {k: v for k, v in options.items() if k not in ("balance_tolerance", "max_moves")}


if __name__ == "__main__":
    main()
