"""Keep-in-place planning speed: ``previous=`` and its knobs against a fresh plan and the published greedy.

One run, median of warm runs, real DeepSeek-V3 loads from ../shared/data
(EPLB_DATA_DIR overrides): ``previous`` is the placement of one SGLang file,
the call re-plans another. Rows per implementation (numpy and torch CPU take
the compiled kernels where numba is installed, their array-API path with
``--xp``; JAX CPU runs XLA; ``--gpu`` adds torch CUDA and JAX GPU):

- fresh plan (no ``previous``);
- ``previous=`` alone (relabelling);
- ``previous=`` + ``balance_tolerance=0.005``;
- ``previous=`` + ``max_moves=16``;

and the published greedy (Python loops, loads moved to the host) once per
config, for the ratio.

    python benchmarks/keep_speed.py [--runs 20] [--gpu | --gpu-only] [--no-jax] [--xp] [--markdown FILE]
    python benchmarks/keep_speed.py --pairs [--runs 7]
    python benchmarks/keep_speed.py --drift [--runs 5]

``--pairs``: instead, the numpy call with ``balance_tolerance=0.005`` for every
pair of consecutive SGLang files (in name order, the last back to the first):
the time depends on how far the loads moved, since the local search runs
until the limit is met (a prefill/decode change takes the most steps).

``--gpu-only --no-jax``: the torch CUDA row alone (its knobs run the kernels of
:mod:`eplb.kernels.repair_triton`), without XLA's compiles. GPU rows name
the card.

``--drift``: the same call along drifting synthetic traces (58 layers,
lognormal and zipf loads, drift 0.1 and 0.3 a window), each window re-planned
from the one before: the search's worst cases come from fast drift.

``--elastic``: the same calls with ``active_gpus`` (GPU 5 down, or the GPUs
of ``--down``, e.g. ``5,13`` or ``0-7``; the mask on the loads' device),
``balance_tolerance=0.05`` in place of ``0.005`` and no
``max_moves`` (which ``active_gpus`` does not take): the re-plan after a
failure, when a stall costs most. ``--host-mask``: the mask as a numpy
array, which the call reads (a serving stack knows its failed ranks on the
host): whether a node is short of slots is then decided there, and the
call computes one rule instead of both. ``--jax-xla`` (with ``--elastic``):
also a JAX GPU row with the keep-in-place calls forced to XLA
(``impl="xla"``, the path before the Pallas kernels; its fresh plan is the
default call), equality with the default row checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.timing import cuda_median_ms, host_median_ms

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
CONFIGS = {"DeepSeek-V3, 32 GPUs": (288, 8, 4, 32), "global, 144 GPUs": (288, 8, 3, 144)}
CALLS = {
    "fresh plan": None,
    "previous=": {},
    "+ balance_tolerance=0.005": {"balance_tolerance": 0.005},
    "+ max_moves=16": {"max_moves": 16},
}


def failed_gpus(spec: str) -> list[int]:
    """GPU ids from ``"5"``, ``"5,13"`` or ``"0-7"`` (ranges inclusive)."""
    ids: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


ELASTIC_CALLS = {
    "fresh plan (active_gpus)": None,
    "previous=": {},
    "+ balance_tolerance=0.05": {"balance_tolerance": 0.05},
}


def load(name: str) -> np.ndarray:
    counts = np.asarray(json.loads((DATA / "deepseek-v3-sglang" / name).read_text())["logical_count"], np.int64)
    return counts[counts.sum(axis=1) > 0]


def implementations(gpu: bool, xp: bool, jax_rows: bool = True, jax_xla: bool = False) -> dict:
    """name -> (convert numpy -> input, timer, call keywords)."""
    from eplb.backends import _numba

    _numba.warm_up()  # measure the kernels, not their loading
    out = {"numpy": (np.asarray, host_median_ms, {})}
    if xp:
        out["numpy (array API)"] = (np.asarray, host_median_ms, {"_impl": "xp"})
    try:
        import torch

        out["torch CPU"] = (torch.as_tensor, host_median_ms, {})
        if gpu and torch.cuda.is_available():
            card = torch.cuda.get_device_name()
            out[f"torch CUDA ({card})"] = (lambda a: torch.as_tensor(a, device="cuda"), cuda_median_ms, {})
    except ImportError:
        pass
    if jax_rows:
        try:
            import jax

            cpu = jax.devices("cpu")[0]

            def jax_timer(fn, runs):
                return host_median_ms(lambda: jax.block_until_ready(fn()), runs)

            out["JAX CPU"] = (lambda a: jax.device_put(a.astype(np.int32), cpu), jax_timer, {})
            if gpu:
                try:
                    device = jax.devices("gpu")[0]
                    put = lambda a: jax.device_put(a.astype(np.int32), device)  # noqa: E731
                    out[f"JAX GPU ({device.device_kind})"] = (put, jax_timer, {})
                    if jax_xla:
                        out[f"JAX GPU ({device.device_kind}), XLA"] = (put, jax_timer, {"_impl": "xla"})
                except RuntimeError:
                    pass
        except ImportError:
            pass
    return out


def _bool_like(mask: np.ndarray, like):
    """``mask`` as a bool array of ``like``'s kind, on its device."""
    if hasattr(like, "device") and hasattr(like, "detach"):  # torch
        import torch

        return torch.as_tensor(mask, device=like.device)
    if hasattr(like, "sharding"):  # JAX
        import jax

        return jax.device_put(mask, like.sharding)
    return mask


def call(weight, config, previous, options, extra):
    if extra.get("_impl") == "xla" and previous is not None:  # JAX's keep-in-place call forced to XLA
        from eplb.backends import _jax

        hierarchical = config[1] % config[2] == 0
        knobs = {"tolerance": options.get("balance_tolerance"), "max_moves": options.get("max_moves")}
        masked = {"active_gpus": extra["active_gpus"]} if "active_gpus" in extra else {}
        fixed = {"impl": "xla", "hierarchical": hierarchical, "policy": "greedy", "spill": 0}
        return _jax.rebalance_stable(weight, previous, *config, **fixed, **knobs, **masked)
    if "active_gpus" in extra:
        return eplb.rebalance_experts(weight, *config, active_gpus=extra["active_gpus"], previous=previous, **options)
    if extra.get("_impl") == "xp":  # the numpy adapter's array-API path, forced
        from eplb.backends import _numpy

        hierarchical = config[1] % config[2] == 0
        if previous is None:
            return _numpy.rebalance(weight, *config, hierarchical=hierarchical, impl="xp")
        knobs = {"tolerance": options.get("balance_tolerance"), "max_moves": options.get("max_moves")}
        return _numpy.rebalance_stable(weight, previous, *config, hierarchical=hierarchical, impl="xp", **knobs)
    if previous is None:
        return eplb.rebalance_experts(weight, *config)
    return eplb.rebalance_experts(weight, *config, previous=previous, **options)


def pairs_table(runs: int) -> str:
    """Median numpy ms of ``previous=`` + ``balance_tolerance=0.005`` per consecutive pair of SGLang files."""
    from eplb.backends import _numba

    _numba.warm_up()
    names = sorted(path.name for path in (DATA / "deepseek-v3-sglang").glob("*.json"))
    lines = ["| previous -> new | " + " | ".join(f"{label} ms" for label in CONFIGS) + " |"]
    lines.append("| --- |" + " --- |" * len(CONFIGS))
    spread = {label: [] for label in CONFIGS}
    for k, name in enumerate(names):
        after = names[(k + 1) % len(names)]
        old, new = load(name), load(after)
        layers = min(len(old), len(new))  # files differ in their all-zero layers
        old, new = old[:layers], new[:layers]
        cells = []
        for label, config in CONFIGS.items():
            previous = eplb.rebalance_experts(old, *config).phy2log
            knobs = {"balance_tolerance": 0.005}
            ms = host_median_ms(lambda n=new, c=config, p=previous, o=knobs: call(n, c, p, o, {}), runs)
            spread[label].append(ms)
            cells.append(f"{ms:.1f}")
        lines.append(f"| {name[:-5]} -> {after[:-5]} | " + " | ".join(cells) + " |")
    lines.append(
        "| median (min-max) | "
        + " | ".join(f"{np.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for v in spread.values())
        + " |"
    )
    return "\n".join(lines)


DRIFTS = (0.1, 0.3)


def drift_table(runs: int) -> str:
    """Median numpy ms of ``previous=`` + ``balance_tolerance=0.005`` along drifting synthetic traces.

    58 layers x 256 experts (DeepSeek-V3's shape), lognormal loads drifting by
    ``exp(N(0, d))`` a window (:func:`benchmarks.migration.drifting`) and
    zipf loads (:func:`benchmarks.keep_moves.zipf_drift`), 6 windows; each
    window re-planned from the placement of the one before (a live chain).
    Per trace and layout: the median and the worst of the 5 calls' medians.
    """
    from benchmarks.keep_moves import zipf_drift
    from benchmarks.migration import drifting
    from eplb.backends import _numba

    _numba.warm_up()
    lines = ["| trace | " + " | ".join(f"{label}: median, worst ms" for label in CONFIGS) + " |"]
    lines.append("| --- |" + " --- |" * len(CONFIGS))
    for drift in DRIFTS:
        for name, windows in (
            (f"lognormal drift {drift}", drifting(58, 256, 6, drift, seed=3)),
            (f"zipf drift {drift}", zipf_drift(58, 256, 6, drift, seed=5)),
        ):
            cells = []
            for config in CONFIGS.values():
                previous = eplb.rebalance_experts(windows[0], *config).phy2log
                times = []
                for weight in windows[1:]:
                    knobs = {"balance_tolerance": 0.005}
                    timed = lambda w=weight, c=config, p=previous, k=knobs: call(w, c, p, k, {})  # noqa: E731
                    times.append(host_median_ms(timed, runs))
                    previous = call(weight, config, previous, knobs, {}).phy2log
                cells.append(f"{np.median(times):.1f}, {max(times):.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--gpu", action="store_true", help="add torch CUDA and JAX GPU rows")
    parser.add_argument("--xp", action="store_true", help="add numpy's array-API path (slow)")
    parser.add_argument("--gpu-only", action="store_true", help="only the torch CUDA and JAX GPU rows")
    parser.add_argument("--no-jax", action="store_true", help="leave out the JAX rows")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--pairs", action="store_true", help="numpy knobs for every consecutive pair of files")
    parser.add_argument("--drift", action="store_true", help="numpy knobs along drifting synthetic traces")
    parser.add_argument("--elastic", action="store_true", help="the calls with active_gpus (GPU 5 down, or --down)")
    parser.add_argument(
        "--host-mask", action="store_true", help="with --elastic: the mask as a numpy array (read on the host)"
    )
    parser.add_argument("--down", default="5", help="with --elastic: the failed GPUs, e.g. 5,13 or 0-7 (default 5)")
    parser.add_argument("--jax-xla", action="store_true", help="add a JAX GPU row forced to XLA (keep-in-place calls)")
    args = parser.parse_args()
    if args.pairs:
        print(pairs_table(args.runs))
        return
    if args.drift:
        print(drift_table(args.runs))
        return
    old, new = load("prefill_in4096.json"), load("prefill_in2048.json")
    calls = ELASTIC_CALLS if args.elastic else CALLS
    lines = []
    for label, config in CONFIGS.items():
        if args.elastic:
            mask = np.ones(config[3], dtype=bool)
            mask[[g for g in failed_gpus(args.down) if g < config[3]]] = False
            if mask.sum() * (config[0] // config[3]) < new.shape[1]:
                lines.append(f"\n{label} {config}: GPUs {args.down} down leave too few live slots, skipped\n")
                continue
        previous_np = eplb.rebalance_experts(old, *config).phy2log
        try:
            import torch

            from benchmarks.baselines import published_greedy

            baseline_runs = max(3, args.runs // 5)
            published = host_median_ms(lambda c=config: published_greedy(torch.as_tensor(new), *c), baseline_runs)
        except ImportError:
            published = float("nan")
        lines.append(f"\n{label} {config}: published greedy {published:.1f} ms\n")
        lines.append("| implementation | " + " | ".join(calls) + " |")
        lines.append("| --- |" + " --- |" * len(calls))
        rows = implementations(args.gpu or args.gpu_only, args.xp, not args.no_jax, args.jax_xla)
        results: dict[str, list] = {}
        for name, (convert, timer, extra) in rows.items():
            if args.gpu_only and not ("CUDA" in name or "GPU" in name):
                continue
            weight, previous = convert(new), convert(previous_np)
            if args.elastic:  # the mask as a numpy array, or a bool array of the loads' kind and device
                extra = {**extra, "active_gpus": mask if args.host_mask else _bool_like(mask, weight)}
            cells = []
            for options in calls.values():
                prev = None if options is None else previous
                runs = max(3, args.runs // 5) if extra.get("_impl") == "xp" else args.runs
                ms = timer(lambda w=weight, p=prev, o=options or {}, c=config, x=extra: call(w, c, p, o, x), runs)
                cells.append(f"{ms:.2f} ms ({published / ms:.0f}x)")
                placement = call(weight, config, prev, options or {}, extra)
                got = [np.asarray(a.cpu() if hasattr(a, "cpu") else a) for a in placement]  # (torch CUDA: to host)
                if name.endswith(", XLA"):  # the same placement as the default call
                    default = results[name.removesuffix(", XLA")][len(cells) - 1]
                    assert all(np.array_equal(a, b) for a, b in zip(got, default, strict=True)), (name, options)
                else:
                    results.setdefault(name, []).append(got)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
