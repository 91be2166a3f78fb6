"""Data shipped with eplb: a synthetic DeepSeek-V3-shaped expert load.

``default_load.npz`` holds ``load [58, 256]`` int32 routed-token counts (58 MoE
layers x 256 experts in 8 groups of 32, top-8 routing, 2**20 tokens per layer)
and the deployment it is meant for: 288 slots on 4 nodes of 8 GPUs. It is made
by :mod:`eplb._data.generate` with a fixed seed; its skew is close to recorded
DeepSeek-V3 serving loads (per-layer max/mean expert load around 6, group
max/mean around 1.8, greedy balancedness about 0.85 at this deployment).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["DEFAULT_LOAD_PATH", "DefaultLoad", "default_load"]

DEFAULT_LOAD_PATH = Path(__file__).with_name("default_load.npz")


class DefaultLoad(NamedTuple):
    """The embedded load and the deployment it is shaped for."""

    load: np.ndarray  # [L, E] int32 token counts
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int


def default_load() -> DefaultLoad:
    """Read the embedded DeepSeek-V3-shaped load (``load [58, 256]`` int32) and its config."""
    with np.load(DEFAULT_LOAD_PATH) as data:
        config = (int(data[key]) for key in ("num_replicas", "num_groups", "num_nodes", "num_gpus"))
        return DefaultLoad(data["load"], *config)
