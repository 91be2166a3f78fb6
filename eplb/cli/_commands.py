"""The ``eplb demo``, ``eplb plan`` and ``eplb inspect`` commands."""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any

import numpy as np

import eplb
from eplb import metrics
from eplb.cli import _common as common
from eplb.cli import _files
from eplb.cli._console import Console
from eplb.demo import GOLDEN_CONFIG, GOLDEN_PHY2LOG, GOLDEN_WEIGHT

__all__ = ["demo", "inspect_placement", "plan"]


def demo(args: argparse.Namespace, console: Console) -> int:
    from eplb._data import default_load

    common.check_outputs(args)
    data = default_load()
    weight = data.load
    config = {
        "num_replicas": data.num_replicas,
        "num_groups": data.num_groups,
        "num_nodes": data.num_nodes,
        "num_gpus": data.num_gpus,
        "hierarchical": data.num_groups % data.num_nodes == 0,
    }
    golden = eplb.rebalance_experts(GOLDEN_WEIGHT, *GOLDEN_CONFIG).phy2log.tolist() == GOLDEN_PHY2LOG
    console.print(f"[bold]eplb {eplb.__version__} demo[/]")
    console.print(f"published golden example reproduced: {'[green]yes[/]' if golden else '[red]NO[/]'}")
    console.print("embedded load: synthetic DeepSeek-V3-shaped token counts")
    console.print(f"  {common.describe(weight, config)}")
    rows, reference, best = [], {}, None
    runs = [(p, b) for p in common.BALANCE_POLICIES for b in common.BACKENDS]
    with console.progress(len(runs)) as step:
        for policy, backend in runs:
            if not common.installed(backend):
                rows.append([policy, backend, "-", "-", "-", f"not installed (pip install {backend})"])
                continue
            step(f"{policy} on {backend}" + (" (compiling)" if backend == "jax" else ""))
            x = common.as_backend(weight, backend)
            seconds, placement = common.time_calls(lambda x=x, policy=policy: common.rebalance(x, config, policy))
            phy2log = common.host(placement.phy2log)
            quality = common.quality(weight, phy2log, config)
            same = reference.setdefault(policy, phy2log)
            identical = "yes" if np.array_equal(same, phy2log) else "[red]NO[/]"
            rows.append(
                [
                    policy,
                    backend,
                    f"{1e3 * seconds:.2f}",
                    common.fmt(quality["balancedness"]),
                    common.fmt(quality["ceiling"]),
                    identical,
                ]
            )
            if best is None or (backend == "numpy" and policy == "refined"):
                best = (policy, backend, placement, quality)
    console.table(
        "Planning on this machine's CPU",
        ["policy", "backend", "ms/call", "balancedness", "lower bound", "same as numpy"],
        rows,
    )
    console.print(
        "[dim]balancedness: mean over layers of mean/max GPU load (1 = perfect).\n"
        "lower bound: the best balancedness any placement could reach\n"
        "  (mean GPU load / a lower bound on the max GPU load).\n"
        f"ms/call: median of {common.TIMED_CALLS} calls after a first one (which compiles on JAX).[/]"
    )
    _demo_outputs(args, console, weight, config, best)
    return 0


def _demo_outputs(
    args: argparse.Namespace, console: Console, weight: np.ndarray, config: dict[str, Any], best: tuple[Any, ...]
) -> None:
    """Write the ``best = (policy, backend, placement, quality)`` placement and plot, only where asked."""
    policy, backend, placement, quality = best
    if args.out:  # nothing lands in the working folder unasked
        extra = {"load": "embedded DeepSeek-V3-shaped demo load", "policy": policy, "backend": backend}
        written = _files.write_placement(args.out, placement, config, {**extra, "metrics": _metric_record(quality)})
        console.print(f"wrote the {policy} placement ({backend}) to {console.escape(str(written))}")
    else:
        console.note(f"(not saved: add --out placement.json to write the {policy} placement)")
    if args.plot:
        phy2log = common.host(placement.phy2log)
        common.plot(
            args.plot, weight, phy2log, config, before=_naive(weight, config), bound=quality["bound"], title="eplb demo"
        )
        console.print(f"wrote the plot to {console.escape(args.plot)}")


def _metric_record(quality: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in quality.items() if k != "bound"}


def _naive(weight: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    from eplb.plots import naive_placement

    return naive_placement(weight.shape[0], weight.shape[1], config["num_replicas"])


def _read_previous(path: str, weight: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    phy2log, _ = _files.read_placement(path)
    expected = (weight.shape[0], config["num_replicas"])
    if phy2log.shape != expected:
        raise common.UsageError(
            f"--previous {path}: phy2log is {list(phy2log.shape)}, expected {list(expected)} (layers, slots)"
        )
    return phy2log


def plan(args: argparse.Namespace, console: Console) -> int:
    common.check_outputs(args)
    if args.previous is not None and "previous" not in inspect.signature(eplb.rebalance_experts).parameters:
        raise common.UsageError(
            f"--previous needs rebalance_experts(previous=...), which this eplb {eplb.__version__} does not have: "
            "upgrade eplb"
        )
    if not common.installed(args.backend):
        raise common.UsageError(f"--backend {args.backend}: not installed (pip install {args.backend})")
    with console.progress(4) as step:
        step(f"reading {args.load}")
        weight = _files.read_load(args.load, key=args.key, window=args.window)
        config = common.config(args, weight.shape[1])
        previous = _read_previous(args.previous, weight, config) if args.previous else None
        step(f"planning ({args.policy} on {args.backend})")
        x = common.as_backend(weight, args.backend)
        extra: dict[str, Any] = {} if previous is None else {"previous": common.as_backend(previous, args.backend)}
        if args.spill:
            extra["spill"] = args.spill
        for flag, key in (("balance_tolerance", "balance_tolerance"), ("max_moves", "max_moves")):
            if getattr(args, flag) is not None:
                if previous is None:
                    raise common.UsageError(f"--{flag.replace('_', '-')} needs --previous (the current placement)")
                extra[key] = getattr(args, flag)
        start = time.perf_counter()
        placement = common.rebalance(x, config, args.policy, **extra)
        seconds = time.perf_counter() - start
        step("measuring")
        phy2log = common.host(placement.phy2log)
        after = common.quality(weight, phy2log, config)
        before_phy2log = previous if previous is not None else _naive(weight, config)
        before = common.quality(weight, before_phy2log, config)
        step("writing")
        console.print(f"load: {console.escape(args.load)}")
        console.print(f"  {common.describe(weight, config)}")
        compiled = " (with compiling)" if args.backend == "jax" else ""
        console.print(f"planned with the {args.policy} policy on {args.backend} in {1e3 * seconds:.1f} ms{compiled}")
        before_name = "before: previous" if previous is not None else "before: naive"
        rows = [
            [name, common.fmt(q["balancedness"]), common.fmt(q["imbalance"], 3), common.fmt(q["of_bound"])]
            for name, q in ((before_name, before), (f"after: {args.policy}", after))
        ]
        console.table("Placement quality", ["placement", "balancedness", "max/mean", "of bound"], rows, left=1)
        naive = "" if previous is not None else "naive: slot j holds expert j mod E (no balancing).\n"
        console.print(
            f"[dim]{naive}best balancedness possible: {after['ceiling']:.4f}\n"
            "  (mean GPU load / a lower bound on the max GPU load).\n"
            "of bound: that lower bound / max GPU load, mean over layers (1 = optimal).[/]"
        )
        if previous is not None:
            console.print(f"slots that changed expert: {int((previous != phy2log).sum())} of {phy2log.size}")
        if args.out:
            record = {"load": str(args.load), "policy": args.policy, "backend": args.backend}
            written = _files.write_placement(args.out, placement, config, {**record, "metrics": _metric_record(after)})
            console.print(f"wrote the placement to {console.escape(str(written))}")
        if args.plot:
            step("plotting")
            title = f"eplb plan: {args.policy} vs {'previous' if previous is not None else 'naive'} placement"
            common.plot(
                args.plot,
                weight,
                phy2log,
                config,
                before=before_phy2log,
                bound=after["bound"],
                layer=args.layer,
                title=title,
            )
            console.print(f"wrote the plot to {console.escape(args.plot)}")
    if not args.out:
        console.note("(not saved: add --out placement.json to write it)")
    return 0


def inspect_placement(args: argparse.Namespace, console: Console) -> int:
    common.check_outputs(args)
    with console.progress(3) as step:
        step(f"reading {args.placement}")
        phy2log, stored = _files.read_placement(args.placement)
        step(f"reading {args.load}")
        weight = _files.read_load(args.load, key=args.key, window=args.window)
        layers, experts = weight.shape
        config = common.config(args, experts, stored)
        config["num_replicas"] = phy2log.shape[1]
        if phy2log.shape[0] != layers:
            raise common.UsageError(f"the placement has {phy2log.shape[0]} layers, the load {layers}")
        if phy2log.min() < 0 or phy2log.max() >= experts:
            raise common.UsageError(f"the placement names experts outside 0..{experts - 1}, the load's experts")
        logcnt = metrics.replica_counts(phy2log, experts)
        if (logcnt == 0).any():
            layer, expert = (int(i[0]) for i in np.nonzero(logcnt == 0))
            raise common.UsageError(
                f"invalid placement: expert {expert} of layer {layer} has no slot (maybe others too)"
            )
        if phy2log.shape[1] % config["num_gpus"]:
            raise common.UsageError(f"{phy2log.shape[1]} slots do not split over num_gpus={config['num_gpus']}")
        step("measuring")
        try:
            quality = common.quality(weight, phy2log, config)
        except (ValueError, TypeError) as err:
            raise common.UsageError(f"cannot compute the lower bound for this config: {err}") from None
        per_layer = np.asarray(metrics.balancedness(weight, phy2log, config["num_gpus"]))
        worst = int(np.argmin(per_layer))
        rows = [
            ["layers x experts -> slots", f"{layers} x {experts} -> {phy2log.shape[1]}"],
            ["GPUs, nodes, groups", f"{config['num_gpus']}, {config['num_nodes']}, {config['num_groups']}"],
            ["replicas per expert", f"{int(logcnt.min())} to {int(logcnt.max())}"],
            ["balancedness (mean/max GPU load)", common.fmt(quality["balancedness"])],
            ["max/mean GPU load", common.fmt(quality["imbalance"], 3)],
            [f"worst layer ({worst})", common.fmt(float(per_layer[worst]))],
            ["lower bound (best balancedness possible)", common.fmt(quality["ceiling"])],
            ["of bound (lower bound / max GPU load)", common.fmt(quality["of_bound"])],
        ]
        console.print(f"placement: {console.escape(args.placement)}")
        console.print(f"load: {console.escape(args.load)}")
        console.table("Placement quality", ["", "value"], rows)
        if args.plot:
            step("plotting")
            bound = quality["bound"]
            common.plot(args.plot, weight, phy2log, config, bound=bound, layer=args.layer, title="eplb inspect")
            console.print(f"wrote the plot to {console.escape(args.plot)}")
    return 0
