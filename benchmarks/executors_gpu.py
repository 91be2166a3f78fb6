"""The torch executor on one GPU: device copy and checksum bandwidth, host time per message, overlap.

    python benchmarks/executors_gpu.py [--layers 4] [--runs 10] [--hidden 7168] [--inter 2048] [--slots 9]

Weights are DeepSeek-V3-shaped by default (``w13 [L, s, 2I, H]``, ``w2 [L, s, H, I]`` bf16, 88 MB per
expert, ``s = 9`` slots per GPU as at 288 slots / 32 GPUs). Every figure is the median of ``--runs`` warm runs,
device-synchronised. Parts, each in its own process (one default process group each):

- ``bandwidth``: a plain ``copy_`` of the same bytes (the card's device-to-device copy, counted as bytes read
  plus written), the executor's primitives (the staging gather ``index_select``, the commit scatter
  ``index_copy_``, the checksum ``_word_sums``) on the moved rows, and ``apply_plan`` end to end on one rank
  (a world of 1: every copy is local) for a plan that moves every slot of ``--layers`` layers. The executor
  reads and writes each moved byte twice (staging, then the commit that keeps the all-or-nothing guarantee).
- ``messages``: host time of :func:`eplb.executors.torch.begin` per message, on rank 0 of a world of 8 run by
  torch's fake process group (no data moves: what is left is eplb's own Python and the launches), for the
  real DeepSeek-V3 plan between two SGLang files (288 slots / 8 GPUs), large experts (every copy its own
  message), with and without checksums.
- ``jax``: the JAX executor on one device (a mesh of one), the same weights and plan as ``bandwidth``: a jitted
  copy of the same bytes, its checksum alone, the Triton row-copy kernel alone (per block size), ``apply_plan``
  with and without checksums and with donation, its commit's copies by XLA and by the kernel; ``share``: the
  jitted copy's time over the step's (the moved bytes read and written once, at the card's copy bandwidth).
- ``overlap``: a synthetic forward (bf16 matmuls) on the current stream, alone and while one layer's moves
  run on the side stream (``begin`` before the forward, ``finish`` after; votes on a gloo group so that they
  never wait for the GPU).

On a machine without CUDA it runs on the CPU (gloo) with small shapes, to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("EPLB_DATA_DIR", ROOT.parent / "shared" / "data"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(runs):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _weights(layers: int, slots: int, hidden: int, inter: int, device):
    import torch

    def make(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32).to(torch.bfloat16)

    return {"w13": make(layers, slots, 2 * inter, hidden), "w2": make(layers, slots, hidden, inter)}


def _init_world_of_one(backend: str) -> None:
    import torch
    import torch.distributed as dist

    kwargs = {"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kwargs)


def part_bandwidth(args) -> dict:
    import torch
    import torch.distributed as dist

    import eplb
    from eplb.executors import torch as executor

    device = _device()
    _init_world_of_one("nccl" if device.type == "cuda" else "gloo")
    weights = _weights(args.layers, args.slots, args.hidden, args.inter, device)
    slot_bytes = sum(t[0, 0].numel() * t.element_size() for t in weights.values())
    moved = args.layers * args.slots * slot_bytes
    out = {"slot_bytes": slot_bytes, "moved_bytes": moved, "device": torch.cuda.get_device_name(0)
           if device.type == "cuda" else "cpu"}  # fmt: skip

    # The card's copy: the same bytes, one copy_ per tensor (GB/s of bytes read + written).
    copies = {k: torch.empty_like(t) for k, t in weights.items()}
    ms = _median_ms(lambda: [copies[k].copy_(t) for k, t in weights.items()], args.runs)
    out["copy_"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6}

    flats = {k: t.view(-1, *t.shape[2:]) for k, t in weights.items()}
    n = args.layers * args.slots
    order = torch.as_tensor(np.random.default_rng(0).permutation(n), device=device)
    staged = {k: torch.empty_like(f) for k, f in flats.items()}
    ms = _median_ms(lambda: [torch.index_select(f, 0, order, out=staged[k]) for k, f in flats.items()], args.runs)
    out["index_select (stage)"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6}
    ms = _median_ms(lambda: [copies[k].view_as(f).index_copy_(0, order, staged[k]) for k, f in flats.items()],
                    args.runs)  # fmt: skip
    out["index_copy_ (the commit before)"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6}
    dst_host = order.cpu().numpy()
    ms = _median_ms(lambda: [executor._commit(copies[k].view_as(f), order, dst_host, staged[k])
                             for k, f in flats.items()], args.runs)  # fmt: skip
    out["_commit (the commit now)"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6}
    ms = _median_ms(lambda: [executor._word_sums(f) for f in flats.values()], args.runs)
    out["_word_sums (checksum, bytes read)"] = {"ms": ms, "GBps": moved / ms / 1e6}
    # Checksums of the large-expert path, one row at a time as the senders do (launch-bound per row).
    rows = list(range(min(n, 16)))
    ms = _median_ms(lambda: [torch.stack([executor._word_sums(f[r : r + 1])[0] for r in rows]) for f in flats.values()],
                    args.runs)  # fmt: skip
    out["_word_sums per row (16 rows, bytes read)"] = {"ms": ms, "GBps": len(rows) * slot_bytes / ms / 1e6}
    # The same rows as the senders checksum them now: executor._slot_sums (one Triton launch per tensor on CUDA).
    index = torch.as_tensor(rows, device=device)
    ms = _median_ms(lambda: [executor._slot_sums(f, index, np.asarray(rows)) for f in flats.values()], args.runs)
    out["_slot_sums (16 rows, the senders' path now, bytes read)"] = {
        "ms": ms,
        "GBps": len(rows) * slot_bytes / ms / 1e6,
    }

    # apply_plan on a world of one: every slot of every layer gets another expert, all copies local.
    old = np.tile(np.arange(args.slots), (args.layers, 1))
    new = np.roll(old, 1, axis=1)
    forward = eplb.plan_transfers(old, new, num_gpus=1)
    backward = eplb.plan_transfers(new, old, num_gpus=1)
    state = {"i": 0}

    def move():
        plan = (forward, backward)[state["i"] % 2]
        state["i"] += 1
        executor.apply_plan(plan, weights)

    ms = _median_ms(move, args.runs)
    out["apply_plan, world of 1"] = {"ms": ms, "GBps": 4 * moved / ms / 1e6, "copies": len(forward.layer)}
    laps: dict[str, float] = {}
    executor._clock.laps = laps
    runs = args.runs
    for _ in range(runs):
        move()
        _sync()
    executor._clock.laps = None
    out["apply_plan host laps (ms per call)"] = {k: v * 1e3 / runs for k, v in laps.items()}
    dist.destroy_process_group()
    return out


def _deepseek_plan(world: int, layers: int):
    import eplb

    files = sorted((DATA / "deepseek-v3-sglang").glob("*.json"))
    loads = [np.asarray(json.loads(f.read_text())["logical_count"], dtype=np.float64) for f in files[:2]]
    old, new = (np.asarray(eplb.rebalance_experts(load, 288, 8, 1, world).phy2log)[-layers:] for load in loads)
    return eplb.plan_transfers(old, new, num_gpus=world)


def part_messages(args) -> dict:
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import eplb
    from eplb.executors import torch as executor

    world, layers = 8, 2
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    device = _device()
    plan = _deepseek_plan(world, layers)
    weights = _weights(layers, 288 // world, args.hidden, args.inter, device)
    out = {"world": world, "layers": layers}
    for verify in (False, True):
        laps: dict[str, float] = {}

        def once(verify=verify):
            pending = executor.begin(plan, weights, verify=verify)
            with contextlib.suppress(eplb.TransferError):  # fake receives hold garbage: checksums disagree
                pending.finish()

        for _ in range(2):
            once()
        _sync()
        executor._clock.laps = laps
        times = []
        for _ in range(args.runs):
            _sync()
            start = time.perf_counter()
            pending = executor.begin(plan, weights, verify=verify)
            times.append(time.perf_counter() - start)
            messages = len(pending._message_rows)
            with contextlib.suppress(eplb.TransferError):
                pending.finish()
            _sync()
        executor._clock.laps = None
        begin_ms = statistics.median(times) * 1e3
        out[f"verify={verify}"] = {
            "messages": messages,
            "begin ms": begin_ms,
            "begin us per message": begin_ms * 1e3 / max(messages, 1),
            "post us per message": laps.get("post messages", 0.0) / args.runs * 1e6 / max(messages, 1),
            "laps ms per call": {k: v * 1e3 / args.runs for k, v in laps.items()},
        }
    del torch
    dist.destroy_process_group()
    return out


def part_jax(args) -> dict:
    """The JAX executor on one device (a mesh of one: every copy local), the same weights and plan as
    ``bandwidth``: a jitted copy of the same bytes (the card's copy under XLA), the executor's checksum alone,
    and ``apply_plan`` with and without checksums (its result checked bit for bit)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import eplb
    from eplb.executors import jax as executor

    device = jax.devices()[0]
    small = device.platform == "cpu"
    layers, slots = args.layers, args.slots
    hidden, inter = (args.hidden, args.inter) if not small else (256, 64)
    mesh = Mesh(np.array([device]), ("ep",))
    sharding = NamedSharding(mesh, PartitionSpec(None, "ep"))
    keys = jax.random.split(jax.random.key(0), 2)
    weights = {
        "w13": jax.device_put(jax.random.normal(keys[0], (layers, slots, 2 * inter, hidden), jnp.bfloat16), sharding),
        "w2": jax.device_put(jax.random.normal(keys[1], (layers, slots, hidden, inter), jnp.bfloat16), sharding),
    }
    slot_bytes = sum(int(np.prod(t.shape[2:])) * t.dtype.itemsize for t in weights.values())
    moved = layers * slots * slot_bytes
    out = {"slot_bytes": slot_bytes, "moved_bytes": moved, "device": str(device.device_kind)}

    def median_ms(fn) -> float:
        jax.block_until_ready(fn())
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    copied = jax.jit(lambda w: {k: jnp.copy(t) for k, t in w.items()})  # a new buffer: XLA must copy
    ms = median_ms(lambda: copied(weights))
    out["jitted copy"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6}
    rolled = jax.jit(lambda w: {k: jnp.roll(t, 1, axis=1) for k, t in w.items()})
    ms = median_ms(lambda: rolled(weights))
    out["jitted roll by one slot (the move as one XLA op)"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6}
    sums = jax.jit(lambda w: [executor._checksum(t.reshape(layers * slots, -1)) for t in w.values()])
    ms = median_ms(lambda: sums(weights))
    out["_checksum (bytes read)"] = {"ms": ms, "GBps": moved / ms / 1e6}

    # Variants the executor does not use (yet), to tell where XLA loses bandwidth: the checksum reduced in two
    # stages (chunks of 4096 words, then the chunks; the same value mod 2**32), and the staging gather as one
    # dynamic slice per row instead of one gather.
    def two_stage(t):
        words = executor._words(t.reshape(layers * slots, -1))
        weights = jnp.arange(words.shape[-1], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        chunked = (words * weights).reshape(words.shape[0], -1, 4096)
        return jnp.sum(jnp.sum(chunked, axis=-1, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)

    if all((int(np.prod(t.shape[2:])) * t.dtype.itemsize // 4) % 4096 == 0 for t in weights.values()):
        staged = jax.jit(lambda w: [two_stage(t) for t in w.values()])
        assert all(bool(jnp.array_equal(a, b)) for a, b in zip(staged(weights), sums(weights), strict=True))
        ms = median_ms(lambda: staged(weights))
        out["variant: checksum in two stages (bytes read)"] = {"ms": ms, "GBps": moved / ms / 1e6}
    order = jnp.asarray(np.random.default_rng(0).permutation(layers * slots))
    flats = {k: t.reshape(layers * slots, *t.shape[2:]) for k, t in weights.items()}
    take = jax.jit(lambda f, i: {k: jnp.take(t, i, axis=0) for k, t in f.items()})
    ms = median_ms(lambda: take(flats, order))
    out["jnp.take of every slot (the staging gather)"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6}
    sliced = jax.jit(
        lambda f, i: {
            k: jnp.concatenate([jax.lax.dynamic_slice_in_dim(t, i[r], 1) for r in range(layers * slots)])
            for k, t in f.items()
        }
    )
    assert all(bool(jnp.array_equal(sliced(flats, order)[k], take(flats, order)[k])) for k in flats)
    ms = median_ms(lambda: sliced(flats, order))
    out["variant: one dynamic slice per slot"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6}

    # The commit's copy kernel alone (eplb.kernels.copy_pallas.copy_rows: one Triton launch, a gather of every
    # slot into a fresh array, as jnp.take above), per block size and warps; the best one is used below.
    copy_ms = out["jitted copy"]["ms"]
    best = None
    if not small:
        from eplb.kernels import copy_pallas

        index = jnp.stack([order.astype(jnp.int32), jnp.arange(layers * slots, dtype=jnp.int32)])
        want_take = take(flats, order)
        for block_bytes, warps in ((8192, 4), (16384, 4), (32768, 8)):
            name = f"copy_rows gather of every slot, {block_bytes // 1024} KB blocks, {warps} warps"
            try:
                kernel = jax.jit(
                    lambda f, i, b=block_bytes, w=warps: {
                        k: copy_pallas.copy_rows(t.shape[0], [t.reshape(t.shape[0], -1)], i, block_bytes=b,
                                                 num_warps=w).reshape(t.shape)
                        for k, t in f.items()
                    }
                )  # fmt: skip
                got = kernel(flats, index)
                assert all(bool(jnp.array_equal(got[k], want_take[k])) for k in flats), "copy_rows: wrong bytes"
                ms = median_ms(lambda kernel=kernel: kernel(flats, index))
            except Exception as err:  # report and go on with XLA
                out[name] = {"error": repr(err)[:400]}
                continue
            out[name] = {"ms": ms, "GBps": 2 * moved / ms / 1e6, "share": copy_ms / ms}
            if best is None or ms < best[0]:
                best = (ms, block_bytes, warps)
        if best is not None:
            copy_pallas.BLOCK_BYTES, copy_pallas.NUM_WARPS = best[1], best[2]
            out["copy_rows block used"] = {"block_bytes": best[1], "num_warps": best[2]}

    # apply_plan for the rotation (every slot of every layer moved, every copy within the device), with the
    # commit's copies by XLA (COPY_KERNEL = None) and by the Triton kernel ("auto" on a GPU). "share": the
    # jitted copy's time of the same bytes over apply_plan's (the moved bytes read and written once each).
    old = np.tile(np.arange(slots), (layers, 1))
    plan = eplb.plan_transfers(old, np.roll(old, 1, axis=1), num_gpus=1)
    backward = eplb.plan_transfers(np.roll(old, 1, axis=1), old, num_gpus=1)
    want = rolled(weights)
    for kernel in (None, "auto"):
        if kernel == "auto" and best is None:
            continue
        executor.COPY_KERNEL = kernel
        label = "XLA" if kernel is None else "Triton copy_rows"
        try:
            for verify in (True, False):
                got = executor.apply_plan(plan, weights, mesh, "ep", verify=verify)
                assert all(bool(jnp.array_equal(got[k], want[k])) for k in weights), "apply_plan moved wrong bytes"
                ms = median_ms(lambda verify=verify: executor.apply_plan(plan, weights, mesh, "ep", verify=verify))
                out[f"apply_plan, {label}, verify={verify}"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6,
                                                               "share": copy_ms / ms}  # fmt: skip
            # A Rebalancer step brings a new plan each time: a new plan object of the same rows each call, so the
            # executor's per-plan host work (memoised for a repeated plan object) is paid every call.
            fresh = [dataclasses.replace(plan) for _ in range(16)]  # more than executor.CACHED_PLANS
            calls = iter(range(10**9))
            ms = median_ms(lambda f=fresh, c=calls: executor.apply_plan(f[next(c) % len(f)], weights, mesh, "ep"))
            out[f"apply_plan, {label}, verify=True, a new plan object each call"] = {
                "ms": ms, "GBps": 2 * moved / ms / 1e6, "share": copy_ms / ms}  # fmt: skip
            # donate=True: the commit writes into the old buffers; each call consumes its input, so plans
            # alternate. A rotation stages every copy (each slot it reads is overwritten).
            state = {"w": executor.apply_plan(plan, {k: jnp.copy(t) for k, t in weights.items()}, mesh, "ep"), "i": 0}
            assert all(bool(jnp.array_equal(state["w"][k], want[k])) for k in weights)

            def donated(state=state):
                state["w"] = executor.apply_plan((backward, plan)[state["i"] % 2], state["w"], mesh, "ep", donate=True)
                state["i"] += 1
                return state["w"]

            ms = median_ms(donated)
            if state["i"] % 2:
                assert all(bool(jnp.array_equal(state["w"][k], weights[k])) for k in weights), "donate: wrong bytes"
            else:
                assert all(bool(jnp.array_equal(state["w"][k], want[k])) for k in weights), "donate: wrong bytes"
            out[f"apply_plan, {label}, donate=True"] = {"ms": ms, "GBps": 2 * moved / ms / 1e6, "share": copy_ms / ms}
            if kernel is not None:  # permute_rows' bytes per program (a layer's 9 copies, one block of each)
                from eplb.kernels import copy_pallas

                default = copy_pallas.PERMUTE_GROUP_BYTES
                for group_bytes in (65536, default):
                    copy_pallas.PERMUTE_GROUP_BYTES = group_bytes
                    executor._commit_program.cache_clear()  # trace again with this block
                    ms = median_ms(donated)
                    out[f"apply_plan, {label}, donate=True, {group_bytes // 1024} KB a program"] = {
                        "ms": ms, "share": copy_ms / ms}  # fmt: skip
            # Where the time goes with donation: the transfer program (staging) and the commit, apart.
            stage, total = [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                pending = executor.begin((backward, plan)[state["i"] % 2], state["w"], mesh, "ep", donate=True)
                jax.block_until_ready(pending._received)
                t1 = time.perf_counter()
                state["w"] = pending.finish()
                jax.block_until_ready(state["w"])
                state["i"] += 1
                stage.append(t1 - t0)
                total.append(time.perf_counter() - t0)
            # The commit program alone (no host work: its inputs prepared once), and the host's share: apply_plan
            # on weights of one byte a slot (the same plan; nothing to wait for on the device).
            pending = executor.begin(plan, weights, mesh, "ep")
            program = executor._commit_program(mesh, "ep", False)
            leaves = jax.tree_util.tree_leaves(weights)
            args_ = (leaves, pending._received, pending._idx, pending._sizes, pending._kernel)
            ms = median_ms(lambda program=program, args_=args_: program(*args_))
            out[f"commit program alone, {label}, no donation"] = {"ms": ms, "share": copy_ms / ms}
            tiny = {k: jnp.zeros((layers, slots, 1), jnp.uint8) for k in weights}
            ms = median_ms(lambda tiny=tiny: executor.apply_plan(plan, tiny, mesh, "ep"))
            out[f"apply_plan host time (1-byte slots), {label}"] = {"ms": ms}
            out[f"apply_plan, {label}, donate=True, split"] = {
                "transfer program ms": statistics.median(stage) * 1e3,
                "commit ms": (statistics.median(total) - statistics.median(stage)) * 1e3,
            }
            del state
        except Exception as err:
            out[f"apply_plan, {label}"] = {"error": repr(err)[:600]}
    executor.COPY_KERNEL = "auto"
    return out


def part_overlap(args) -> dict:
    import torch
    import torch.distributed as dist

    from eplb.executors import torch as executor

    device = _device()
    _init_world_of_one("nccl" if device.type == "cuda" else "gloo")
    votes = dist.new_group(backend="gloo")
    weights = _weights(1, args.slots, args.hidden, args.inter, device)  # one layer
    import eplb

    old = np.arange(args.slots)[None]
    plans = [eplb.plan_transfers(old, np.roll(old, 1, axis=1), num_gpus=1),
             eplb.plan_transfers(np.roll(old, 1, axis=1), old, num_gpus=1)]  # fmt: skip
    size = args.matmul
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def forward():
        x = a
        for _ in range(args.steps):
            x = torch.mm(x, b)
            x = x / x.abs().amax().clamp_min(1)  # keep values finite; a second kernel per step like a layer's
        return x

    def timed_forward(work_before=None, work_after=None) -> float:
        _sync()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        pending = work_before() if work_before else None
        if device.type == "cuda":
            start.record()
        t0 = time.perf_counter()
        forward()
        if device.type == "cuda":
            end.record()
        if work_after:
            work_after(pending)
        _sync()
        return start.elapsed_time(end) if device.type == "cuda" else (time.perf_counter() - t0) * 1e3

    state = {"i": 0}

    def begin():
        plan = plans[state["i"] % 2]
        state["i"] += 1
        return executor.begin(plan, weights, vote_group=votes)

    for _ in range(3):
        timed_forward()
        timed_forward(begin, lambda p: p.finish())
    alone = statistics.median(timed_forward() for _ in range(args.runs))
    together = statistics.median(timed_forward(begin, lambda p: p.finish()) for _ in range(args.runs))
    moves = _median_ms(lambda: executor.apply_plan(plans[0], weights, vote_group=votes), args.runs)
    slot_bytes = sum(t[0, 0].numel() * t.element_size() for t in weights.values())
    dist.destroy_process_group()
    return {
        "forward alone ms": alone,
        "forward with one layer's moves on the side stream ms": together,
        "slowdown": together / alone - 1,
        "moves alone (apply_plan) ms": moves,
        "layer bytes moved": slot_bytes * args.slots,
    }


PARTS = {"bandwidth": part_bandwidth, "messages": part_messages, "overlap": part_overlap, "jax": part_jax}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--matmul", type=int, default=8192, help="forward: square bf16 matmuls of this size")
    parser.add_argument("--steps", type=int, default=8, help="forward: matmuls per forward")
    parser.add_argument("--part", choices=sorted(PARTS), help="run one part in this process")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    results = {}
    for name in PARTS:
        cmd = [sys.executable, __file__, "--part", name, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            results[name] = {"error": done.stderr[-500:]}
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"== {name}\n{json.dumps(results[name], indent=1)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
