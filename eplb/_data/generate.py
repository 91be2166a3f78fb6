"""Regenerate ``default_load.npz``: ``python -m eplb._data.generate [PATH]``.

A synthetic DeepSeek-V3-shaped load, 58 MoE layers x 256 routed experts in 8
groups of 32, top-8 routing of 2**20 tokens per layer. Per layer, an expert's
routing probability is a group factor (lognormal, sigma 0.5) times its own
factor (lognormal, sigma 0.5), with two hot experts boosted 2.5x to 6x; the
counts are one multinomial draw. The seed is fixed, so the file is
reproducible (``tests/test_cli.py`` checks it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

__all__ = ["CONFIG", "SEED", "generate", "main"]

SEED = 20250226
LAYERS, EXPERTS, GROUPS, TOP_K, TOKENS = 58, 256, 8, 8, 2**20
CONFIG = {"num_replicas": 288, "num_groups": GROUPS, "num_nodes": 4, "num_gpus": 32}


def generate(seed: int = SEED) -> np.ndarray:
    """``[58, 256]`` int32 routed-token counts; every layer sums to ``8 * 2**20``."""
    rng = np.random.default_rng(seed)
    group = np.repeat(rng.lognormal(0.0, 0.5, (LAYERS, GROUPS)), EXPERTS // GROUPS, axis=1)
    prob = group * rng.lognormal(0.0, 0.5, (LAYERS, EXPERTS))
    for layer in range(LAYERS):
        hot = rng.choice(EXPERTS, 2, replace=False)
        prob[layer, hot] *= rng.uniform(2.5, 6.0, 2)
    prob /= prob.sum(axis=1, keepdims=True)
    counts = np.stack([rng.multinomial(TOP_K * TOKENS, p) for p in prob])
    return counts.astype(np.int32)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path(__file__).with_name("default_load.npz")
    np.savez_compressed(path, load=generate(), **{k: np.int32(v) for k, v in CONFIG.items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
