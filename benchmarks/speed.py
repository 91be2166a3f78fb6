"""Time per rebalance_experts call: each backend vs the published greedy, in the same process.

Median of many warm runs (100 by default); torch CUDA timed with CUDA events
around the call (so host launch time counts), JAX with ``block_until_ready``.
GPU rows also give the peak device memory of a call: torch's
``max_memory_allocated`` over the call (outputs included), JAX's compiled
``memory_analysis`` (temporaries + outputs).
Run: ``python benchmarks/speed.py [--runs N] [--quick] [--policy P]``; ``--real``
times the real DeepSeek-V3 loads (``../shared/data``, EPLB_DATA_DIR
overrides), ``--scaling`` the growth with layers and experts.
The baseline is the published DeepSeek EPLB greedy as published runs it
(benchmarks/baselines.py: torch, loads moved to the host, Python loops over
layers and items in the packing); the plain-Python oracle (tests/oracle.py,
one layer at a time) is listed too. "numpy (numba)" is the compiled greedy
kernel, the default for numpy and torch CPU inputs when numba is installed;
"numpy (xp)" the array-API algorithm layer it replaces there; "(torch ops)"
and "jax ... (xla)" are the straightforward vectorised eager/jit versions of
the same algorithm that the fused kernels replace ("jax cpu" runs numba's
kernel through a host callback where numba is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.timing import cuda_median_ms, host_median_ms
from tests import oracle

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))

SHAPES = {
    # name: (layers, experts, replicas, groups, nodes, gpus)
    "deepseek-v3 hierarchical": (58, 256, 288, 8, 4, 32),
    "deepseek-v3 global 144 GPUs": (58, 256, 288, 8, 3, 144),
    "94x512 -> 768 / 256 GPUs": (94, 512, 768, 32, 32, 256),
}


def _torch_peak_mib(fn) -> float:
    """Peak CUDA memory a call allocates (its outputs included), MiB."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def _jax_peak_mib(fn, weight) -> float | None:
    """Device memory of the compiled call (temporaries + outputs), MiB; None where XLA does not say."""
    import jax

    stats = jax.jit(fn).lower(weight).compile().memory_analysis()
    if stats is None:
        return None
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


# Substrings of implementation names to keep (--only); empty keeps all.
ONLY: list[str] = []


def implementations(weight: np.ndarray, config: list[int], policy: str) -> list[tuple[str, object, str, object]]:
    """(name, zero-argument call, timer, peak MiB callable or None) per installed backend and fast path.

    timer is "host" or "cuda". ``ONLY`` filters them by name.
    """
    return [row for row in _implementations(weight, config, policy) if not ONLY or any(k in row[0] for k in ONLY)]


def _implementations(weight: np.ndarray, config: list[int], policy: str) -> list[tuple[str, object, str, object]]:
    from eplb.backends import _numba, _numpy

    hier = config[1] % config[2] == 0
    out = [("numpy", lambda: eplb.rebalance_experts(weight, *config, policy=policy), "host", None)]
    if policy == "greedy" and _numba.available():
        out.append(
            ("numpy (numba)", lambda: _numpy.rebalance(weight, *config, hierarchical=hier, impl="numba"), "host", None)
        )
    out.append(
        (
            "numpy (xp)",
            lambda: _numpy.rebalance(weight, *config, hierarchical=hier, policy=policy, impl="xp"),
            "host",
            None,
        )
    )
    if importlib.util.find_spec("torch"):
        import torch

        from eplb.backends import _torch

        wt = torch.as_tensor(weight)
        out.append(("torch cpu", lambda: eplb.rebalance_experts(wt, *config, policy=policy), "host", None))
        out.append(
            (
                "torch cpu (torch ops)",
                lambda: _torch.rebalance(wt, *config, hierarchical=hier, policy=policy, impl="torch"),
                "host",
                None,
            )
        )
        if torch.cuda.is_available():
            wc = wt.cuda()
            calls = [
                ("torch cuda (default)", lambda: eplb.rebalance_experts(wc, *config, policy=policy)),
                (
                    "torch cuda (torch ops)",
                    lambda: _torch.rebalance(wc, *config, hierarchical=hier, policy=policy, impl="torch"),
                ),
            ]
            out += [(name, call, "cuda", lambda c=call: _torch_peak_mib(c)) for name, call in calls]
    if importlib.util.find_spec("jax"):
        out += _jax_implementations(weight, config, policy, hier)
    return out


def _jax_implementations(weight: np.ndarray, config: list[int], policy: str, hier: bool) -> list[tuple]:
    import jax

    from eplb.backends import _jax

    out = []
    for platform in ("cpu", "gpu"):
        try:
            device = jax.devices(platform)[0]
        except RuntimeError:
            continue
        wj = jax.device_put(weight, device)
        paths = [
            (f"jax {platform}", lambda w: eplb.rebalance_experts(w, *config, policy=policy)),
            (
                f"jax {platform} (xla)",
                lambda w: _jax.rebalance(w, *config, hierarchical=hier, policy=policy, impl="xla"),
            ),
        ]
        if platform == "gpu" and policy == "greedy" and _jax.kernel_available():
            paths.append(
                (
                    "jax gpu (jax-triton)",
                    lambda w: _jax.rebalance(w, *config, hierarchical=hier, policy=policy, impl="triton"),
                )
            )
        for name, fn in paths:
            memory = (lambda f=fn, w=wj: _jax_peak_mib(f, w)) if platform == "gpu" else None
            out.append((name, lambda f=fn, w=wj: jax.block_until_ready(f(w)), "host", memory))
    return out


def _time_ms(call, timer: str, runs: int) -> float:
    return cuda_median_ms(call, runs) if timer == "cuda" else host_median_ms(call, runs)


# The default path of each backend (plus numba's kernel, the CPU default when installed).
SCALING_ROWS = ("numpy", "numpy (numba)", "torch cpu", "torch cuda (default)", "jax cpu", "jax gpu")


def scaling(runs: int) -> None:
    """How the greedy call time grows with layers (E = 256) and with experts (L = 58).

    Config scaled with the experts: R = 9E/8 slots, 8 groups, 4 nodes, E/8 GPUs.
    """
    rng = np.random.default_rng(1)
    cases = [(layers, 256) for layers in (1, 4, 16, 64, 256)] + [(58, e) for e in (64, 128, 256, 512, 1024)]
    names = None
    for layers, experts in cases:
        config = [experts * 9 // 8, 8, 4, experts // 8]
        weight = (rng.lognormal(0, 1.5, (layers, experts)) * 1000).astype(np.float32)
        rows = [r for r in implementations(weight, config, "greedy") if r[0] in SCALING_ROWS]
        if names is None:
            names = [r[0] for r in rows]
            print(f"{'L x E -> R / G':24}" + "".join(f"{n:>22}" for n in names))
        times = [_time_ms(call, timer, runs) for _, call, timer, _ in rows]
        label = f"{layers} x {experts} -> {config[0]} / {config[3]}"
        print(f"{label:24}" + "".join(f"{t:20.3f}ms" for t in times), flush=True)


HEADER = (
    f"{'shape':30} {'policy':8} {'implementation':24} {'ms/call':>9} {'vs published':>13} {'vs oracle':>10}"
    f" {'peak MiB':>9}"
)


def _row(shape: str, policy: str, impl: str, ms: float, base_ms: float, oracle_ms: float, mib=None) -> str:
    peak = "-" if mib is None else f"{mib:.2f}"
    return f"{shape:30} {policy:8} {impl:24} {ms:9.3f} {base_ms / ms:12.1f}x {oracle_ms / ms:9.1f}x {peak:>9}"


def _baselines(weight: np.ndarray, config: list[int]) -> tuple[float, float]:
    """(published greedy ms, plain-Python oracle ms) on this load; the published one is the oracle without torch."""
    slow_runs = 1 if weight.shape[0] > 60 else 3
    oracle_ms = host_median_ms(lambda: oracle.rebalance(weight, *config), slow_runs)
    if not importlib.util.find_spec("torch"):
        return oracle_ms, oracle_ms
    from benchmarks.baselines import published_greedy

    wt = torch_weight(weight)
    return host_median_ms(lambda: published_greedy(wt, *config), slow_runs), oracle_ms


def synthetic(shapes: dict, policies: list[str], runs: int) -> None:
    """Lognormal loads at each shape: every implementation, one row each."""
    rng = np.random.default_rng(0)
    print(HEADER)
    for name, (layers, experts, *config) in shapes.items():
        weight = (rng.lognormal(0, 1.5, (layers, experts)) * 1000).astype(np.float32)
        base_ms, oracle_ms = _baselines(weight, config)
        print(_row(name, "greedy", "published greedy", base_ms, base_ms, oracle_ms))
        print(_row(name, "greedy", "plain-Python oracle", oracle_ms, base_ms, oracle_ms))
        for policy in policies:
            for impl, call, timer, memory in implementations(weight, config, policy):
                ms = _time_ms(call, timer, runs)
                print(_row(name, policy, impl, ms, base_ms, oracle_ms, memory and memory()), flush=True)


def real_loads(policies: list[str], runs: int) -> None:
    """The 12 real DeepSeek-V3 loads: per implementation, the median over files of each file's median (range)."""
    files = sorted((DATA / "deepseek-v3-sglang").glob("*.json"))
    if not files:
        print(f"no real loads under {DATA / 'deepseek-v3-sglang'}")
        return
    loads = []
    for path in files:
        counts = np.asarray(json.loads(path.read_text())["logical_count"], dtype=np.float32)
        loads.append(counts[counts.sum(axis=1) > 0])  # MoE layers only: [58, 256]
    print(f"{len(files)} real DeepSeek-V3 loads from {DATA / 'deepseek-v3-sglang'}; ms: median over files (min-max)")
    print(f"{'config':30} {'policy':8} {'implementation':24} {'ms/call':>9} {'min-max':>15} {'vs published':>13}")
    for name in ("deepseek-v3 hierarchical", "deepseek-v3 global 144 GPUs"):
        config = list(SHAPES[name][2:])
        times: dict[tuple[str, str], list[float]] = {}
        base = []
        for weight in loads:
            base.append(_baselines(weight, config)[0])
            for policy in policies:
                for impl, call, timer, _ in implementations(weight, config, policy):
                    times.setdefault((policy, impl), []).append(_time_ms(call, timer, runs))
        base_ms = statistics.median(base)
        rows = [(("greedy", "published greedy"), base), *times.items()]
        for (policy, impl), ms in rows:
            spread = f"{min(ms):.3f}-{max(ms):.3f}"
            mid = statistics.median(ms)
            print(f"{name:30} {policy:8} {impl:24} {mid:9.3f} {spread:>15} {base_ms / mid:12.1f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="only the DeepSeek-V3 shapes, 20 runs")
    parser.add_argument("--policy", choices=["greedy", "refined", "both"], default="both")
    parser.add_argument("--real", action="store_true", help="the real DeepSeek-V3 loads instead of synthetic ones")
    parser.add_argument("--scaling", action="store_true", help="greedy time vs layers and experts, then stop")
    parser.add_argument("--only", nargs="+", default=[], help="implementations whose name contains one of these")
    args = parser.parse_args()
    ONLY[:] = args.only
    runs = 20 if args.quick else args.runs
    policies = ["greedy", "refined"] if args.policy == "both" else [args.policy]
    if args.scaling:
        scaling(runs)
    elif args.real:
        real_loads(policies, runs)
    else:
        synthetic(dict(list(SHAPES.items())[:2]) if args.quick else SHAPES, policies, runs)


def torch_weight(weight: np.ndarray):
    """The load as the published greedy receives it: a torch tensor (on the GPU where there is one)."""
    import torch

    tensor = torch.as_tensor(weight)
    return tensor.cuda() if torch.cuda.is_available() else tensor


if __name__ == "__main__":
    main()
