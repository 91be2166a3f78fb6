"""Moves kept by ``balance_tolerance``: the share of an oblivious chain's moved experts, on drifting traces.

Per trace and config, two chains of rebalances over the same windows: oblivious
(no ``previous``) and ``previous=`` + ``balance_tolerance`` (each call given the
last result). Moved experts are counted by a plain-Python counter
(``tests/oracle.py``), balancedness by a float64 scorer, on the window planned
for. Traces: lognormal and zipf loads drifting by ``exp(N(0, d))`` per window
(16 layers x 256 experts, 9 windows), and the Llama-4-Maverick request series
(32 requests a window) from ../shared/data. "floor share": a lower bound on the moves of the
hierarchical configs, the groups that must change node (:func:`forced_moves`), over the oblivious moves.

    python benchmarks/keep_moves.py [--tolerance 0.005]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from benchmarks.migration import drifting, llama_windows
from tests import oracle


def zipf_drift(layers: int, experts: int, windows: int, drift: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = (1.0 / (1 + rng.permutation(experts)[None, :] + np.zeros((layers, 1)))) ** 1.2 * 1e5
    out = []
    for _ in range(windows):
        base = base * np.exp(rng.normal(0, drift, base.shape))
        out.append(np.round(base).astype(np.int64))
    return out


def forced_moves(weight: np.ndarray, previous: np.ndarray, config: tuple[int, ...], tolerance: float) -> int:
    """A floor on the moves of a hierarchical re-plan within ``tolerance`` (float64, plain Python).

    A layer whose old group split puts more load on a node than its GPUs can carry at the fresh
    plan's heaviest GPU times ``1 + tolerance`` (node load / GPUs per node above it) must move a
    group off that node; a node has room for no extra group (its slots hold fewer experts than its
    groups plus one more), so a group moves back too: at least ``2 * group_size`` new
    (expert, GPU) pairs. 0 for the global policy."""
    num_phy, num_groups, num_nodes, num_gpus = config
    experts = weight.shape[1]
    group_size, per_node = experts // num_groups, num_phy // num_nodes
    if num_nodes == 1 or per_node >= (num_groups // num_nodes + 1) * group_size:
        return 0
    peak = oracle.gpu_loads64(weight, eplb.rebalance_experts(weight, *config).phy2log, num_gpus).max(axis=1)
    total = 0
    for layer, row in enumerate(np.asarray(previous).tolist()):
        node_load = [0.0] * num_nodes
        for group in range(num_groups):
            node = row.index(group * group_size) // per_node  # the node holding the group's first expert
            node_load[node] += float(weight[layer, group * group_size : (group + 1) * group_size].astype(float).sum())
        if max(node_load) / (num_gpus // num_nodes) > peak[layer] * (1 + tolerance):
            total += 2 * group_size
    return total


def chain(windows: list[np.ndarray], config: tuple[int, ...], options: dict | None) -> tuple[int, float, int]:
    """Moved experts summed over the chain, the mean balancedness on the planned windows, and the
    :func:`forced_moves` floor summed over the chain (with ``balance_tolerance``)."""
    placement = eplb.rebalance_experts(windows[0], *config).phy2log
    total, balance, floor = 0, [], 0
    for weight in windows[1:]:
        keep = {} if options is None else {"previous": placement, **options}
        if options is not None:
            floor += forced_moves(weight, placement, config, options["balance_tolerance"])
        result = eplb.rebalance_experts(weight, *config, **keep).phy2log
        total += int(oracle.moves(placement, result, config[3]).sum())
        placement = result
        loads = oracle.gpu_loads64(weight, result, config[3])
        balance.append(float((loads.mean(axis=1) / loads.max(axis=1)).mean()))
    return total, float(np.mean(balance)), floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.005)
    args = parser.parse_args()
    from eplb.backends import _numba

    _numba.warm_up()
    traces = []
    for drift in (0.01, 0.03, 0.1):
        traces.append((f"lognormal drift {drift}", drifting(16, 256, 9, drift, seed=1)))
        traces.append((f"zipf drift {drift}", zipf_drift(16, 256, 9, drift, seed=2)))
    llama = llama_windows(32)
    if llama is not None:
        traces.append(("Llama-4, 32 requests/window", llama[:10]))
    print(
        f"| trace | config | oblivious moved | tolerance {args.tolerance} moved | share | floor share | balancedness |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, windows in traces:
        experts = windows[0].shape[1]
        configs = [(288, 8, 4, 32), (288, 8, 3, 144)] if experts == 256 else [(160, 8, 4, 32), (144, 1, 1, 16)]
        for config in configs:
            oblivious, balance_o, _ = chain(windows, config, None)
            kept, balance_k, floor = chain(windows, config, {"balance_tolerance": args.tolerance})
            share, least = kept / max(oblivious, 1), floor / max(oblivious, 1)
            print(
                f"| {name} | {config} | {oblivious} | {kept} | {share:.1%} | {least:.1%} "
                f"| {balance_o:.4f} -> {balance_k:.4f} |"
            )


if __name__ == "__main__":
    main()
