"""Torch executor on real GPUs with NCCL: move DeepSeek-V3-sized experts, check, time.

Run with one process per GPU::

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 benchmarks/multi_gpu_torch.py

Each expert is three bf16 matrices of 7168 x 2048 (w1, w3: [2048, 7168];
w2: [7168, 2048]), 88 MB. Old and new placements come from eplb on two
different loads; after ``apply_plan`` every rank checks that each of its slots
holds exactly its new expert's weights (bitwise), then the move is timed
against a plain ``all_to_all_single`` of the same number of bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from eplb.executors.torch import apply_plan

SIZE = {"hidden": 7168, "inter": 2048}


def expert_weights(expert: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Deterministic weights of an expert, the same on every rank."""
    gen = torch.Generator(device=device).manual_seed(1000 + expert)
    hidden, inter = SIZE["hidden"], SIZE["inter"]
    return {
        "w13": torch.randn(2 * inter, hidden, generator=gen, device=device, dtype=torch.bfloat16),
        "w2": torch.randn(hidden, inter, generator=gen, device=device, dtype=torch.bfloat16),
    }


def slots_of(phy2log: np.ndarray, rank: int, per_gpu: int, device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's slots [L, per_gpu, ...] under a placement."""
    layers = []
    for layer_row in phy2log:
        experts = [expert_weights(int(e), device) for e in layer_row[rank * per_gpu : (rank + 1) * per_gpu]]
        layers.append({k: torch.stack([w[k] for w in experts]) for k in experts[0]})
    return {k: torch.stack([layer[k] for layer in layers]).contiguous() for k in layers[0]}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--slots-per-gpu", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="dry run with gloo and small experts")
    args = parser.parse_args()
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cpu:
        device = torch.device("cpu")
        SIZE.update(hidden=64, inter=32)
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    replicas = args.slots_per_gpu * world
    rng = np.random.default_rng(0)
    load_a = rng.lognormal(0, 1.0, (1, args.experts))
    load_b = rng.lognormal(0, 1.0, (1, args.experts))
    old = eplb.rebalance_experts(load_a, replicas, 1, 1, world).phy2log
    new = eplb.rebalance_experts(load_b, replicas, 1, 1, world).phy2log
    expert_bytes = sum(t.numel() * t.element_size() for t in expert_weights(0, device).values())
    plan = eplb.plan_transfers(old, new, num_gpus=world, expert_bytes=expert_bytes)
    weights = slots_of(old, rank, args.slots_per_gpu, device)
    want = slots_of(new, rank, args.slots_per_gpu, device)

    moved = apply_plan(plan, weights, in_place=False)
    _sync()
    exact = all(torch.equal(moved[k], want[k]) for k in want)
    flags = torch.tensor([int(exact)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)

    remote = int(plan.remote_copies.sum())
    remote_bytes = int(plan.remote_bytes.sum())
    move_s = {
        transport: timed(lambda t=transport: apply_plan(plan, weights, in_place=False, transport=t), args.repeats)
        for transport in ("p2p", "all_to_all")
    }
    # Baseline: all_to_all_single moving the same bytes between GPUs: each rank
    # sends S/world to every rank (itself included), so S*(world-1) cross in all.
    per_rank = max(world, remote_bytes // (world - 1)) // world * world
    send = torch.empty(per_rank, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    a2a_s = timed(lambda: dist.all_to_all_single(recv, send), args.repeats)
    if rank == 0:
        name = "CPU (gloo dry run)" if args.cpu else torch.cuda.get_device_name(device)
        print(f"ranks: {world} x {name}; expert {expert_bytes / 1e6:.1f} MB")
        print(
            f"placement: {args.experts} experts, {replicas} slots; plan rows {len(plan.layer)}, remote copies {remote}"
        )
        print(f"exact weights after move on every rank: {bool(flags.item())}")
        gb = remote_bytes / 1e9
        for transport, seconds in move_s.items():
            rate = gb / seconds
            print(f"apply_plan ({transport}): {seconds * 1e3:.1f} ms for {gb:.2f} GB between GPUs -> {rate:.1f} GB/s")
        cross = per_rank * (world - 1) / 1e9
        print(f"all_to_all_single: {a2a_s * 1e3:.1f} ms for {cross:.2f} GB between GPUs -> {cross / a2a_s:.1f} GB/s")
    dist.destroy_process_group()
    if not bool(flags.item()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
