"""Shared pieces of the ``eplb`` commands: backends, planning, quality figures, config, plots."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import eplb
from eplb import metrics
from eplb.cli._files import host

__all__ = [
    "BACKENDS",
    "BALANCE_POLICIES",
    "TIMED_CALLS",
    "UsageError",
    "as_backend",
    "check_outputs",
    "config",
    "describe",
    "fmt",
    "host",
    "installed",
    "plot",
    "quality",
    "rebalance",
    "time_calls",
]

BACKENDS = ("numpy", "torch", "jax")
# The policies the commands plan and score against the config's lower bound ("survivable", a global placement
# for failure domains, is scored differently: Python API and eplb.metrics.surviving_load).
BALANCE_POLICIES = ("greedy", "refined")
TIMED_CALLS = 5


class UsageError(Exception):
    """A mistake in the command line or its files: reported in one line, exit status 2."""


def installed(backend: str) -> bool:
    return backend == "numpy" or importlib.util.find_spec(backend) is not None


def as_backend(weight: np.ndarray, backend: str) -> Any:
    """``weight`` as an array of ``backend`` on its CPU (JAX: int32 if it fits, else float32: same placement)."""
    if backend == "numpy":
        return weight
    if backend == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(weight))
    import jax

    if weight.dtype.kind in "iu" and weight.sum(axis=-1).max(initial=0) < 2**31:
        weight = weight.astype(np.int32)
    else:  # eplb compares loads as float32 anyway
        weight = weight.astype(np.float32)
    return jax.device_put(weight, jax.devices("cpu")[0])


def rebalance(weight: Any, config: dict[str, Any], policy: str, **extra: Any) -> eplb.Placement:
    """Run ``rebalance_experts`` and wait for the result; bad configs become :class:`UsageError`."""
    sizes = (config[k] for k in ("num_replicas", "num_groups", "num_nodes", "num_gpus"))
    try:
        placement = eplb.rebalance_experts(weight, *sizes, hierarchical=config["hierarchical"], policy=policy, **extra)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    for array in placement:
        getattr(array, "block_until_ready", lambda: None)()
    return placement


def time_calls(call: Callable[[], Any]) -> tuple[float, Any]:
    """Median seconds of ``TIMED_CALLS`` warm calls (the first call, which may compile, is not timed)."""
    out = call()
    times = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def quality(weight: np.ndarray, phy2log: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
    """Quality figures of ``phy2log [L, R]`` against ``weight [L, E]``, all from :mod:`eplb.metrics`.

    Python floats (means over layers): ``balancedness`` (mean/max GPU load),
    ``imbalance`` (max/mean), ``ceiling`` (mean GPU load / lower bound: the
    best balancedness any placement could reach), ``of_bound`` (lower bound /
    max GPU load); and ``bound``, the ``[L]`` float64 lower bound itself.
    """
    sizes = [config[k] for k in ("num_replicas", "num_groups", "num_nodes", "num_gpus")]
    bound = np.asarray(metrics.lower_bound(weight, *sizes, hierarchical=config["hierarchical"]), dtype=np.float64)
    summary = metrics.summarize(weight, phy2log, config["num_gpus"], bound)
    # Mean GPU load of the float32 loads that balancedness uses, not a float64 sum of our own: one convention.
    mean = np.asarray(metrics.gpu_loads(weight, phy2log, config["num_gpus"])).mean(axis=-1, dtype=np.float64)
    ceiling = np.where(bound > 0, mean / np.where(bound > 0, bound, 1.0), 1.0)
    return {
        "balancedness": summary.balancedness,
        "imbalance": summary.imbalance,
        "ceiling": float(np.mean(ceiling)),
        "of_bound": summary.bound_ratio,
        "bound": bound,
    }


def config(args: argparse.Namespace, num_experts: int, stored: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sizes from the flags, else from ``stored`` (a placement file's config), else the defaults."""
    stored = stored or {}

    def pick(name: str, flag: Any, default: Any) -> Any:
        return flag if flag is not None else stored.get(name, default)

    config = {
        "num_replicas": pick("num_replicas", args.replicas, num_experts),
        "num_groups": pick("num_groups", args.groups, 1),
        "num_nodes": pick("num_nodes", args.nodes, 1),
        "num_gpus": pick("num_gpus", args.gpus, None),
        "hierarchical": pick("hierarchical", args.hierarchical, None),
    }
    if config["num_gpus"] is None:
        raise UsageError("--gpus is required (the number of GPUs the experts are spread over)")
    if config["hierarchical"] is None:
        config["hierarchical"] = config["num_groups"] % config["num_nodes"] == 0  # the published rule
    return config


def check_outputs(args: argparse.Namespace) -> None:
    """Fail fast, before any planning, on output files that cannot be written."""
    out = getattr(args, "out", None)
    if out is not None and Path(out).suffix.lower() not in (".json", ".npz"):
        raise UsageError(f"--out {out}: placements are written as .json or .npz")
    if args.plot is not None:
        if Path(args.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
            raise UsageError(f"--plot {args.plot}: use a .png, .svg or .pdf file name")
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError('--plot needs matplotlib: pip install "eplb[plot]"')
    for path in (out, args.plot):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"{path}: the folder {Path(path).parent} does not exist")


def plot(path: str, weight: np.ndarray, phy2log: np.ndarray, config: dict[str, Any], **kwargs: Any) -> None:
    from eplb.plots import plot_placement

    layers, slots = phy2log.shape
    layer = kwargs.get("layer")
    if layer is not None and not 0 <= layer < layers:
        raise UsageError(f"--layer {layer} must be between 0 and {layers - 1}")
    title = kwargs.pop("title", "")
    title += f"  ({layers} layers, {weight.shape[1]} experts, {slots} slots, {config['num_gpus']} GPUs)"
    figure = plot_placement(weight, phy2log, config["num_gpus"], title=title, **kwargs)
    try:
        figure.savefig(path, dpi=110)
    except OSError as err:
        raise UsageError(f"{path}: cannot write the plot: {err.strerror or err}") from None


def describe(weight: np.ndarray, config: dict[str, Any]) -> str:
    """``58 layers x 256 experts -> 288 slots, 32 GPUs, 4 nodes, 8 groups: hierarchical``."""
    nodes, groups = config["num_nodes"], config["num_groups"]
    hierarchical = config["hierarchical"] and nodes > 1
    where = f"{config['num_gpus']} GPUs" + (f", {nodes} nodes, {groups} groups" if hierarchical else "")
    sizes = f"{weight.shape[0]} layers x {weight.shape[1]} experts -> {config['num_replicas']} slots, {where}"
    return f"{sizes}: {'hierarchical' if hierarchical else 'global'}"


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
