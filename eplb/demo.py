"""A tour of eplb in plain text: ``python -m eplb.demo``.

Prints the published golden example, then plans a DeepSeek-V3-shaped load
(58 layers x 256 experts -> 288 slots, 8 groups, 4 nodes, 32 GPUs) on every
installed backend (numpy, torch CPU, JAX CPU), with time per call, balance
(from :mod:`eplb.metrics`), and whether the placement is identical to numpy's.
Needs nothing beyond eplb's own dependencies; torch and JAX are used when
installed. ``eplb demo`` (the command line) is the fuller tour: both policies,
lower bounds, and optionally the placement file and a plot.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import eplb
from eplb import metrics

__all__ = ["main"]

GOLDEN_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
GOLDEN_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
GOLDEN_CONFIG = (16, 4, 2, 8)  # replicas, groups, nodes, GPUs

LAYERS, EXPERTS = 58, 256
DEEPSEEK_CONFIG = (288, 8, 4, 32)
SEED = 0
WARM_CALLS, TIMED_CALLS = 2, 7


def _golden() -> None:
    replicas, groups, nodes, gpus = GOLDEN_CONFIG
    print(f"Golden example (DeepSeek EPLB): {replicas} slots, {groups} groups, {nodes} nodes, {gpus} GPUs")
    phy2log, _, _ = eplb.rebalance_experts(np.array(GOLDEN_WEIGHT), replicas, groups, nodes, gpus)
    for name, rows in (("weight", GOLDEN_WEIGHT), ("phy2log", phy2log.tolist())):
        for i, row in enumerate(rows):
            print(f"  {name if i == 0 else '':8} {row}")
    same = phy2log.tolist() == GOLDEN_PHY2LOG
    print(f"  equals the published result: {'yes' if same else 'NO'}")


def _runners() -> list[tuple[str, Callable[[np.ndarray], Any] | None, str]]:
    """(name, convert numpy -> backend array or None if missing, note) per backend."""
    runners: list[tuple[str, Callable[[np.ndarray], Any] | None, str]] = [("numpy", np.asarray, "")]
    if importlib.util.find_spec("torch") is None:
        runners.append(("torch (cpu)", None, "not installed: pip install torch"))
    else:
        import torch

        runners.append(("torch (cpu)", torch.from_numpy, ""))
    if importlib.util.find_spec("jax") is None:
        runners.append(("jax (cpu)", None, "not installed: pip install jax"))
    else:
        import jax

        cpu = jax.devices("cpu")[0]
        runners.append(("jax (cpu)", lambda a: jax.device_put(a, cpu), ""))
    return runners


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
    return np.asarray(x).astype(np.int64)


def _time_ms(call: Callable[[], tuple[Any, ...]]) -> tuple[float, tuple[Any, ...]]:
    """Median wall time of warm calls (the first calls, which may compile, are not timed)."""
    for _ in range(WARM_CALLS):
        out = call()
    times = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        out = call()
        for a in out:
            getattr(a, "block_until_ready", lambda: None)()  # JAX dispatches asynchronously
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), out


def _layer0(weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int) -> str:
    """Layer 0 of ``weight [L, E]`` placed as ``phy2log [L, R]``: max/mean GPU load and the replica histogram."""
    imbalance = metrics.summarize(weight[:1], phy2log[:1], num_gpus).imbalance
    counts = np.bincount(logcnt[0])
    hist = " ".join(f"{c}x{n}" for c, n in enumerate(counts) if n)
    return f"max/mean GPU load {imbalance:.3f}; replicas per expert {hist}"


def _deepseek_load() -> np.ndarray:
    """``[LAYERS, EXPERTS]`` float32: skewed synthetic expert loads (lognormal, fixed seed)."""
    rng = np.random.default_rng(SEED)
    return (rng.lognormal(0.0, 1.5, (LAYERS, EXPERTS)) * 1000).astype(np.float32)


def _deepseek() -> None:
    replicas, groups, nodes, gpus = DEEPSEEK_CONFIG
    weight = _deepseek_load()
    print(
        f"DeepSeek-V3 shape: {LAYERS} layers x {EXPERTS} experts -> {replicas} slots, {groups} groups, "
        f"{nodes} nodes, {gpus} GPUs; lognormal loads (sigma 1.5, seed {SEED})"
    )
    print(f"  {'backend':12} {'ms/call':>8} {'balancedness':>12}  {'same as numpy':13}  layer 0")
    reference = None
    for name, convert, note in _runners():
        if convert is None:
            print(f"  {name:12} skipped ({note})")
            continue
        w = convert(weight)
        ms, out = _time_ms(lambda w=w: tuple(eplb.rebalance_experts(w, replicas, groups, nodes, gpus)))
        phy2log, log2phy, logcnt = (_to_numpy(a) for a in out)
        if reference is None:
            reference = (phy2log, log2phy, logcnt)
        same = all(np.array_equal(a, b) for a, b in zip(reference, (phy2log, log2phy, logcnt), strict=True))
        balance = metrics.summarize(weight, phy2log, gpus).balancedness
        layer0 = _layer0(weight, phy2log, logcnt, gpus)
        print(f"  {name:12} {ms:8.2f} {balance:12.4f}  {'yes' if same else 'NO':13}  {layer0}")


def main() -> None:
    print(f"eplb {eplb.__version__} demo\n")
    _golden()
    print()
    _deepseek()


if __name__ == "__main__":
    main()
