"""GPUs of unequal speed: ``gpu_capacity=`` against the capacity-blind greedy, on real DeepSeek-V3 loads.

Every SGLang file in ../shared/data/deepseek-v3-sglang (EPLB_DATA_DIR
overrides; ``logical_count`` [61, 256], all-zero layers dropped), 288 slots.
Half the GPUs run at 0.6 of the others' speed. A GPU's time is its load over
its capacity; time-balance of a layer = (total load / total capacity) /
slowest GPU's time (``eplb.metrics.balancedness(..., gpu_capacity=)``: the
share of the GPUs' compute the layer uses; 1.0 = every GPU finishes
together), mean over layers and files, of:

- blind: ``rebalance_experts(w, ...)``, the greedy placement, which ignores speeds;
- ours: ``rebalance_experts(w, ..., gpu_capacity=c)``;
- bound: ``total / capacity`` over ``eplb.metrics.lower_bound(..., gpu_capacity=c)``,
  the best time-balance any placement could reach (global rule; also valid,
  looser, for the hierarchical policy, whose groups stay on their nodes).

Plus the median time of one numpy call (61 layers) and, for reference, the
greedy's balancedness with equal speeds.

``--vectors``: instead, ours / bound and capacity-blind / bound per layer for
other capacity vectors (one slow GPU, one fast GPU, a slow node, three
speeds, half at 0.6, and half at 0.6 with a GPU or a node idle), global policy
over 144 GPUs.

``--devices``: instead, the median time of one call on torch (CUDA where
present, else CPU) and JAX (its default device), capacities on the device
(so decided there, as under ``jit``), for ``prefill_in2048``.

    python benchmarks/capacity.py [--markdown FILE] [--devices | --vectors]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def half_slow(num_gpus: int, layout: str) -> np.ndarray:
    """Capacities: half the GPUs at 0.6, the second half ("second half") or every other one ("alternate")."""
    caps = np.ones(num_gpus)
    if layout == "second half":
        caps[num_gpus // 2 :] = 0.6
    else:
        caps[1::2] = 0.6
    return caps


# name -> (replicas, groups, nodes, gpus, hierarchical, layouts)
CONFIGS = {
    "global, 32 GPUs": (288, 8, 4, 32, False, ("alternate",)),
    "global, 144 GPUs": (288, 8, 18, 144, False, ("alternate",)),
    "hierarchical, 4 nodes / 32 GPUs / 8 groups": (288, 8, 4, 32, True, ("alternate", "second half")),
}


def loads() -> list[tuple[str, np.ndarray]]:
    out = []
    for path in sorted((DATA / "deepseek-v3-sglang").glob("*.json")):
        counts = np.asarray(json.loads(path.read_text())["logical_count"], np.int64)
        out.append((path.stem, counts[counts.sum(axis=1) > 0]))
    return out


def table(data: list[tuple[str, np.ndarray]]) -> str:
    rows = []
    for name, (replicas, groups, nodes, gpus, hierarchical, layouts) in CONFIGS.items():
        sizes = (replicas, groups, nodes, gpus)
        for layout in layouts:
            caps = half_slow(gpus, layout)
            figures = {"equal": [], "blind": [], "ours": [], "bound": [], "ratio": []}
            times = []
            for _, w in data:
                blind = eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical).phy2log
                eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical, gpu_capacity=caps)  # warm
                start = time.perf_counter()
                ours = eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical, gpu_capacity=caps).phy2log
                times.append(time.perf_counter() - start)
                bound = eplb.metrics.lower_bound(w, *sizes, hierarchical=hierarchical, gpu_capacity=caps)
                ideal = w.sum(axis=1) / caps.sum()
                figures["equal"].append(eplb.metrics.summarize(w, blind, gpus).balancedness)
                figures["blind"].append(eplb.metrics.summarize(w, blind, gpus, gpu_capacity=caps).balancedness)
                summary = eplb.metrics.summarize(w, ours, gpus, bound, gpu_capacity=caps)
                figures["ours"].append(summary.balancedness)
                figures["ratio"].append(summary.bound_ratio)
                figures["bound"].append(float(np.mean(ideal / bound)))
            mean = {k: float(np.mean(v)) for k, v in figures.items()}
            rows.append((name, layout, mean, 1e3 * float(np.median(times))))
    header = (
        "config",
        "slow half",
        "greedy, equal speeds",
        "blind",
        "ours",
        "bound",
        "ours / bound (per layer)",
        "ours ms (numpy)",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, layout, m, ms in rows:
        lines.append(
            f"| {name} | {layout} | {m['equal']:.4f} | {m['blind']:.4f} | {m['ours']:.4f} | {m['bound']:.4f} | "
            f"{m['ratio']:.4f} | {ms:.0f} |"
        )
    return "\n".join(lines)


def other_vectors(num_gpus: int) -> dict[str, np.ndarray]:
    """Capacity vectors other than half at 0.6: one slow GPU, one fast GPU, a slow node, three speeds; half at 0.6
    with one GPU or a node idle (capacity 0)."""
    one_slow, one_fast, slow_node = np.ones(num_gpus), np.ones(num_gpus), np.ones(num_gpus)
    one_slow[num_gpus // 3] = 0.5
    one_fast[0] = 2.0
    slow_node[8:16] = 0.7
    return {
        "one GPU at 0.5": one_slow,
        "one GPU at 2.0": one_fast,
        "one node (8 GPUs) at 0.7": slow_node,
        "thirds at 1.0 / 0.8 / 0.6": np.resize([1.0, 0.8, 0.6], num_gpus),
        "half at 0.6 (alternate)": half_slow(num_gpus, "alternate"),
        "half at 0.6, GPU 5 idle": np.where(np.arange(num_gpus) == 5, 0.0, half_slow(num_gpus, "alternate")),
        "half at 0.6, GPUs 16-23 idle": np.where(
            (np.arange(num_gpus) >= 16) & (np.arange(num_gpus) < 24), 0.0, half_slow(num_gpus, "alternate")
        ),
    }


def vectors_table(data: list[tuple[str, np.ndarray]], config: str = "global, 144 GPUs") -> str:
    """Ours / bound and capacity-blind / bound per layer (mean), for :func:`other_vectors` on one config."""
    replicas, groups, nodes, gpus, hierarchical, _ = CONFIGS[config]
    sizes = (replicas, groups, nodes, gpus)
    lines = [f"| capacities ({config}) | ours / bound | capacity-blind / bound |", "| --- | --- | --- |"]
    for name, caps in other_vectors(gpus).items():
        ours, blind = [], []
        for _, w in data:
            bound = eplb.metrics.lower_bound(w, *sizes, hierarchical=hierarchical, gpu_capacity=caps)
            mine = eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical, gpu_capacity=caps).phy2log
            up = {"active_gpus": caps > 0} if (caps == 0).any() else {}  # blind to speeds, not to idle GPUs
            theirs = eplb.rebalance_experts(w, *sizes, hierarchical=hierarchical, **up).phy2log
            ours.append(eplb.metrics.summarize(w, mine, gpus, bound, gpu_capacity=caps).bound_ratio)
            blind.append(eplb.metrics.summarize(w, theirs, gpus, bound, gpu_capacity=caps).bound_ratio)
        lines.append(f"| {name} | {np.mean(ours):.4f} | {np.mean(blind):.4f} |")
    return "\n".join(lines)


def _median_ms(call, runs: int = 20) -> float:
    call()  # warm up (JAX compiles)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _place(weight, caps, sizes: tuple[int, ...], hierarchical: bool) -> None:
    """One call, waited for (torch CUDA: synchronize; JAX: block until ready)."""
    out = eplb.rebalance_experts(weight, *sizes, hierarchical=hierarchical, gpu_capacity=caps)
    if hasattr(out.phy2log, "block_until_ready"):
        out.phy2log.block_until_ready()
    elif getattr(out.phy2log, "is_cuda", False):
        sys.modules["torch"].cuda.synchronize()


def device_table(data: list[tuple[str, np.ndarray]], runs: int = 20) -> str:
    """Median ms of one call on torch and JAX devices (capacities on the device)."""
    import jax
    import jax.numpy as jnp
    import torch

    w = dict(data)["prefill_in2048"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"| config | torch {device} ms | JAX {jax.devices()[0].platform} ms |", "| --- | --- | --- |"]
    for name, (replicas, groups, nodes, gpus, hierarchical, _) in CONFIGS.items():
        sizes = (replicas, groups, nodes, gpus)
        caps = half_slow(gpus, "alternate")
        torch_args = (torch.as_tensor(w, device=device), torch.as_tensor(caps, device=device, dtype=torch.float32))
        jax_args = (jnp.asarray(w), jnp.asarray(caps, jnp.float32))
        medians = [
            _median_ms(functools.partial(_place, *args, sizes, hierarchical), runs) for args in (torch_args, jax_args)
        ]
        lines.append(f"| {name} | {medians[0]:.1f} | {medians[1]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")
    parser.add_argument("--devices", action="store_true", help="time torch and JAX calls instead")
    parser.add_argument("--vectors", action="store_true", help="other capacity vectors, global 144 GPUs, instead")
    args = parser.parse_args()
    data = loads()
    if args.devices:
        print(device_table(data))
        return
    if args.vectors:
        print(vectors_table(data))
        return
    out = table(data)
    print(f"{len(data)} SGLang DeepSeek-V3 load files; half the GPUs at 0.6; time-balance (1.0: all finish together)\n")
    print(out)
    if args.markdown:
        args.markdown.write_text(out + "\n")


if __name__ == "__main__":
    main()
