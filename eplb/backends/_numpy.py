"""numpy backend: the reference. Runs the batched algorithm eagerly."""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb.algorithms.policies import place

__all__ = ["dtype_kind", "host_values", "rebalance"]


def dtype_kind(weight: np.ndarray) -> str:
    return weight.dtype.kind


def host_values(weight: np.ndarray, force: bool) -> np.ndarray:
    return weight


def rebalance(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    hierarchical: bool,
    policy: str = "greedy",
) -> tuple[Any, Any, Any]:
    weight32 = np.ascontiguousarray(weight, dtype=np.float32)
    phy2log, log2phy, logcnt = place(
        weight32, num_replicas, num_groups, num_nodes, num_gpus, hierarchical=hierarchical, policy=policy, xp=np
    )
    return tuple(np.asarray(a, dtype=np.int64) for a in (phy2log, log2phy, logcnt))
