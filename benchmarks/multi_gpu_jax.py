"""JAX executor across the GPUs of one process: move experts with shard_map, check, time.

    python benchmarks/multi_gpu_jax.py

Weights ``[L, R, 2048, 7168]`` bf16 sharded over the GPUs along ``R``; the
move must reproduce, bit for bit, the weights the new placement requires.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from eplb.executors.jax import apply_plan

ROWS, COLS = 2048, 7168


def main() -> None:
    try:
        devices = jax.devices("gpu")
        rows, cols = ROWS, COLS
    except RuntimeError:  # dry run: XLA_FLAGS=--xla_force_host_platform_device_count=2
        devices = jax.devices("cpu")
        rows, cols = 32, 64
    world = len(devices)
    experts, per_gpu = 16, 12
    replicas = per_gpu * world
    rng = np.random.default_rng(0)
    old = eplb.rebalance_experts(rng.lognormal(0, 1.0, (1, experts)), replicas, 1, 1, world).phy2log
    new = eplb.rebalance_experts(rng.lognormal(0, 1.0, (1, experts)), replicas, 1, 1, world).phy2log
    mesh = Mesh(np.array(devices), ("ep",))
    sharding = NamedSharding(mesh, PartitionSpec(None, "ep"))
    table = jax.random.normal(jax.random.key(0), (experts, rows, cols), dtype=jnp.bfloat16)  # expert e's matrix
    weights = jax.device_put(table[jnp.asarray(old)], sharding)  # [L, R, ROWS, COLS]
    want = table[jnp.asarray(new)]
    expert_bytes = rows * cols * 2
    plan = eplb.plan_transfers(old, new, num_gpus=world, expert_bytes=expert_bytes)
    moved = apply_plan(plan, weights)
    exact = bool(jnp.array_equal(jax.device_get(moved), jax.device_get(want)))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(apply_plan(plan, weights))
        times.append(time.perf_counter() - t0)
    remote = int(plan.remote_copies.sum())
    seconds = statistics.median(times)
    print(
        f"JAX {jax.__version__}, {world} x {devices[0].device_kind}; one matrix per expert, {expert_bytes / 1e6:.1f} MB"
    )
    print(f"placement: {experts} experts, {replicas} slots; plan rows {len(plan.layer)}, remote copies {remote}")
    print(f"exact weights after move: {exact}")
    print(f"apply_plan: {seconds * 1e3:.1f} ms for {remote * expert_bytes / 1e9:.2f} GB remote")
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
