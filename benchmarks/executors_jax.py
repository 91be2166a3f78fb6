"""The JAX executor on simulated devices: where the time of a weight move goes.

    python benchmarks/executors_jax.py [--devices 8] [--layers 8] [--slots 64] [--repeats 7] [--markdown FILE]
                                       [--host-only] [--host-calls 300]

On a CPU the devices are simulated (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX
starts: the script runs itself again with it when missing). DeepSeek-like expert weights scaled down to a CPU:
``--layers`` MoE layers of ``--slots`` slots, each expert ``--matrices`` matrices ``[--rows, --cols]`` (bf16 by
default), one array ``[L, R, rows, cols]`` per matrix sharded over the devices along ``R``. The plan is a real one:
``eplb.plan_transfers`` between two placement-oblivious ``eplb.rebalance_experts`` calls on lognormal loads.

Reported, as the median of ``--repeats`` warm runs (programs compiled before timing):

- host index building: ``plan_arrays`` as the old per-row Python loop and as the vectorised numpy code, on this
  plan and on a DeepSeek-V3-sized one (58 layers, 288 slots, 32 GPUs: host work only);
- ``apply_plan`` end to end (until the new weights are ready): verify on / off, all layers at once / one layer
  per group / groups under ``max_staging_bytes``, donated or not, and the single-program ``make_transfer`` (the
  same plan every run: its host work is memoised after the first);
- a breakdown of one all-layers call (host index building, ``device_put`` of the index array, the transfer
  program, the host read of ``ok``, the commit program), built afresh every run (``CACHED_PLANS = 0``);
- references: a plain ``all_to_all`` of the same buffers (the floor for the exchange), the checksum alone;
- host time per call (``--host-only`` runs only this): ``apply_plan`` on weights of one byte a slot, the same
  plan object again (its host work memoised: checks, index arrays, their device copies) and a new plan object of
  the same rows every call (all of it built again), on a mesh of one device (a rotation of every slot of 4 x 9,
  as ``benchmarks/executors_gpu.py --part jax`` measures it on a GPU: no transfer program) and on all devices
  (this plan: the device work of the fake CPU devices included).

The ``apply_plan`` variants and the references run round-robin, ``--repeats`` rounds after one warm-up round, so
that the load of a shared machine hits them alike; the median and the minimum are reported. GB/s: bytes copied
between devices (``remote_copies * expert bytes``) per median time.

Every variant's result is checked against the new placement's weights, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--slots", type=int, default=64, help="physical slots per layer (R)")
    parser.add_argument("--experts", type=int, default=48, help="logical experts per layer (E)")
    parser.add_argument("--matrices", type=int, default=3, help="weight matrices per expert")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--markdown", help="append the table (markdown) to this file")
    parser.add_argument("--host-only", action="store_true", help="only the host time per call (small, quick)")
    parser.add_argument("--host-calls", type=int, default=300, help="timed calls per host-time row")
    return parser


if __name__ == "__main__" and DEVICE_COUNT not in os.environ.get("XLA_FLAGS", ""):
    devices = parser().parse_args().devices
    flags = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT}={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)

import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb  # noqa: E402
from eplb.executors import jax as executor  # noqa: E402
from tests.oracle import plan_arrays_reference  # noqa: E402

DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def placements(layers: int, experts: int, slots: int, gpus: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Old and new placements: two placement-oblivious rebalances of lognormal loads."""
    rng = np.random.default_rng(seed)
    loads = rng.lognormal(0.0, 1.0, (2, layers, experts))
    old, new = (eplb.rebalance_experts(load, slots, 1, 1, gpus).phy2log for load in loads)
    return np.asarray(old), np.asarray(new)


def median_ms(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median and minimum wall time of ``call()`` in ms, after one untimed warm-up run."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(call())
        if i:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main() -> None:
    args = parser().parse_args()
    gpus = len(jax.devices())
    mesh = jax.make_mesh((gpus,), ("ep",))
    by_slot, spread = NamedSharding(mesh, PartitionSpec(None, "ep")), NamedSharding(mesh, PartitionSpec("ep"))
    dtype = jnp.dtype(args.dtype)
    old, new = placements(args.layers, args.experts, args.slots, gpus, seed=0)
    expert_bytes = args.matrices * args.rows * args.cols * dtype.itemsize
    plan = eplb.plan_transfers(old, new, num_gpus=gpus, expert_bytes=expert_bytes)
    remote = int(plan.remote_copies.sum())
    moved_gb = remote * expert_bytes / 1e9

    rows: list[tuple[str, float, float, str]] = []

    def record(label: str, ms: tuple[float, float], note: str = "") -> None:
        rows.append((label, *ms, note))
        print(f"{label:<62} {ms[0]:9.3f} ms (min {ms[1]:9.3f})  {note}", flush=True)

    print(
        f"JAX {jax.__version__}, {gpus} x {jax.devices()[0].device_kind}; L={args.layers}, R={args.slots}, "
        f"E={args.experts}; expert {args.matrices} x [{args.rows}, {args.cols}] {dtype.name} = "
        f"{expert_bytes / 1e6:.2f} MB; weights {args.layers * args.slots * expert_bytes / 1e9:.2f} GB; plan: "
        f"{len(plan)} rows, {remote} copies between devices ({moved_gb:.3f} GB), {int((plan.stage == 1).sum())} "
        f"second copies"
    )

    host_time(args, (old, new, plan), mesh, record)
    if args.host_only:
        write_markdown(args, rows)
        return

    # Expert e of layer l holds a distinct matrix; the weights of a placement are a gather of that table.
    key = jax.random.key(0)
    tables = [
        jax.random.normal(jax.random.fold_in(key, m), (args.layers, args.experts, args.rows, args.cols), dtype)
        for m in range(args.matrices)
    ]

    def weights(phy2log: np.ndarray) -> dict[str, jax.Array]:
        take = jax.jit(lambda table, ids: jnp.take_along_axis(table, ids[:, :, None, None], axis=1))
        ids = jnp.asarray(phy2log, dtype=jnp.int32)
        return {f"w{m}": jax.device_put(take(table, ids), by_slot) for m, table in enumerate(tables)}

    before, want = weights(old), jax.device_get(weights(new))

    def exact(result: dict[str, jax.Array]) -> bool:
        return all(np.array_equal(jax.device_get(result[name]), want[name]) for name in want)

    # 1. Host index building.
    big_old, big_new = placements(58, 256, 288, 32, seed=1)
    big = eplb.plan_transfers(big_old, big_new, num_gpus=32, num_nodes=4)
    for name, p in (("this plan", plan), (f"DeepSeek-V3 size ({len(big)} rows, 32 GPUs)", big)):
        for impl, function in (("loop (before)", plan_arrays_reference), ("numpy (now)", executor.plan_arrays)):
            record(f"plan_arrays, {name}, {impl}", median_ms(lambda f=function, p=p: f(p), args.repeats))
        record(
            f"apply_plan's index arrays, {name}, all layers",
            median_ms(lambda p=p: _host_arrays(p, expert_bytes), args.repeats),
            "classify rows, split, index arrays",
        )

    # 2. apply_plan end to end. The variants run round-robin, so that the load of a shared machine hits them alike.
    # References: a plain all_to_all of the same buffers (K of the all-layers group), the checksum alone.
    capacity = executor.plan_arrays(plan).send.shape[-1]  # K of the all-layers group
    buffers = [
        jax.device_put(jnp.zeros((gpus * gpus * capacity, args.rows, args.cols), dtype), spread)
        for _ in range(args.matrices)
    ]
    exchange = jax.jit(
        jax.shard_map(
            lambda xs: [jax.lax.all_to_all(x, "ep", 0, 0, tiled=True) for x in xs],
            mesh=mesh,
            in_specs=PartitionSpec("ep"),
            out_specs=PartitionSpec("ep"),
        )
    )
    checksum = jax.jit(
        jax.shard_map(
            lambda xs: [executor._checksum(x.reshape(x.shape[0], -1))[None] for x in xs],
            mesh=mesh,
            in_specs=PartitionSpec("ep"),
            out_specs=PartitionSpec("ep"),
        )
    )

    cap = 16 * expert_bytes * gpus  # about two layers' staging here
    groups_cap = executor.layer_groups(plan, before, max_staging_bytes=cap)
    arrays = executor.plan_arrays(plan)
    fields = [jax.device_put(a, spread) for a in (arrays.send, arrays.gather, arrays.second, arrays.row < -1)]
    transfer = executor.make_transfer(mesh, "ep")
    single = jax.jit(lambda ws, *f: {name: transfer(w, *f)[0] for name, w in ws.items()})
    variants: list[tuple[str, Callable[..., Any], bool, str]] = [  # label, call, donated (fresh weights), note
        ("apply_plan, all layers, verify", lambda w: executor.apply_plan(plan, w), False, ""),
        ("apply_plan, all layers, verify=False", lambda w: executor.apply_plan(plan, w, verify=False), False, ""),
        ("apply_plan, all layers, donate", lambda w: executor.apply_plan(plan, w, donate=True), True, ""),
        ("apply_plan, one layer per group", lambda w: executor.apply_plan(plan, w, layers_per_group=1), False, ""),
        (
            "apply_plan, one layer per group, donate",
            lambda w: executor.apply_plan(plan, w, layers_per_group=1, donate=True),
            True,
            "",
        ),
        (
            "apply_plan, one layer per group, verify=False, donate",
            lambda w: executor.apply_plan(plan, w, layers_per_group=1, verify=False, donate=True),
            True,
            "",
        ),
        (
            f"apply_plan, max_staging_bytes={cap / 1e6:.0f} MB, donate",
            lambda w: executor.apply_plan(plan, w, max_staging_bytes=cap, donate=True),
            True,
            f"({len(groups_cap)} groups)",
        ),
        ("make_transfer (one program, full gather), per matrix", lambda w: single(w, *fields), False, ""),
        ("reference: plain all_to_all of the same buffers", lambda w: exchange(buffers), False, ""),
        ("reference: checksum of the same buffers (one side)", lambda w: checksum(buffers), False, ""),
    ]

    def exchanged(groups: list[tuple[int, ...]]) -> str:
        """Slots the all_to_all carries (every device pair padded to its group's K) per slot copied."""
        remote = plan.remote
        slots = 0
        for group in groups:
            rows = remote & np.isin(plan.layer, group)
            pairs = np.bincount(plan.src_gpu[rows] * gpus + plan.dst_gpu[rows], minlength=gpus * gpus)
            slots += gpus * gpus * max(int(pairs.max(initial=0)), 1)
        return f"all_to_all carries {slots / remote.sum():.1f}x the copies"

    per_layer = exchanged(executor.layer_groups(plan, before, layers_per_group=1))
    notes = {
        "apply_plan, all layers, verify": exchanged(executor.layer_groups(plan, before)),
        "apply_plan, one layer per group": per_layer,
        f"apply_plan, max_staging_bytes={cap / 1e6:.0f} MB, donate": exchanged(groups_cap),
    }
    times: dict[str, list[float]] = {label: [] for label, *_ in variants}
    exactness = {}
    for run in range(args.repeats + 1):
        for label, call, donated, _ in variants:
            weights_in = _copy(before) if donated else before  # copied outside the timing
            jax.block_until_ready(weights_in)
            start = time.perf_counter()
            result = jax.block_until_ready(call(weights_in))
            if run:
                times[label].append(time.perf_counter() - start)
            else:
                exactness[label] = None if label.startswith("reference") else exact(result)
            del result, weights_in
    for label, _, _, note in variants:
        ms, best = 1e3 * statistics.median(times[label]), 1e3 * min(times[label])
        ok = {None: "", True: "exact; ", False: "WRONG; "}[exactness[label]]
        note = f"{note} {notes.get(label, '')}".strip()
        record(label, (ms, best), f"{ok}{moved_gb / ms * 1e3:.2f} GB/s {note}".strip())

    # 3. Breakdown of one all-layers apply_plan (verify on, not donated), its host work built afresh every time.
    cached, executor.CACHED_PLANS = executor.CACHED_PLANS, 0
    leaves = [before[name] for name in sorted(before)]
    parts: dict[str, list[float]] = {name: [] for name in ("host", "device_put", "transfer", "read ok", "commit")}
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        job = executor._prepare(plan, before, None, None, layers=None, capacity=None, verify=True, fault=None)
        (group,) = job.split(None, None)
        idx, _, sizes = job.arrays(group, full=True)
        t1 = time.perf_counter()
        idx_device = jax.block_until_ready(jax.device_put(idx, spread))
        t2 = time.perf_counter()
        stage = executor._stage_program(mesh, "ep", True, False)
        received, ok = stage(leaves, idx_device, None, sizes._replace(full=0))
        jax.block_until_ready((received, ok))
        t3 = time.perf_counter()
        ok_host = np.asarray(ok)
        t4 = time.perf_counter()
        jax.block_until_ready(executor._commit_program(mesh, "ep", False)(leaves, received, idx_device, sizes))
        t5 = time.perf_counter()
        assert ok_host.all()
        if i:
            for name, (a, b) in zip(parts, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)), strict=True):
                parts[name].append(b - a)
    executor.CACHED_PLANS = cached
    for name, values in parts.items():
        note = f"K = {capacity}, idx {idx.nbytes / 1e3:.1f} kB" if name == "device_put" else ""
        record(f"breakdown: {name}", (1e3 * statistics.median(values), 1e3 * min(values)), note)

    write_markdown(args, rows)


def write_markdown(args: argparse.Namespace, rows: list[tuple[str, float, float, str]]) -> None:
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write("| measurement | median ms | min ms | notes |\n| --- | --- | --- | --- |\n")
            for label, ms, best, note in rows:
                out.write(f"| {label} | {ms:.3f} | {best:.3f} | {note} |\n")


def host_time(args: argparse.Namespace, this: tuple[Any, ...], mesh: Any, record: Callable[..., None]) -> None:
    """``apply_plan``'s time per call on weights of one byte a slot (two arrays, as an expert's two matrices): the
    same plan object again (memoised host work) and a new plan object of the same rows each call (built again).
    Each result is checked against the new placement once, bit for bit."""
    rotation = np.tile(np.arange(9), (4, 1))
    cases = [
        ("1 device, rotation of 4 x 9 slots", Mesh(np.array(jax.devices()[:1]), ("ep",)), rotation,
         np.roll(rotation, 1, axis=1), None),
        (f"{len(jax.devices())} devices, this plan", mesh, *this),
    ]  # fmt: skip
    for name, where, old, new, plan in cases:
        plan = plan if plan is not None else eplb.plan_transfers(old, new, num_gpus=1)
        by_slot = NamedSharding(where, PartitionSpec(None, "ep"))
        # Slot bytes: the expert id (plus one per array), so that the new placement's weights are known.
        tiny = [jax.device_put((old + k).astype(np.uint8)[:, :, None], by_slot) for k in range(2)]
        moved = executor.apply_plan(plan, tiny, where, "ep")
        assert all(np.array_equal(np.asarray(m)[:, :, 0], new + k) for k, m in enumerate(moved)), name
        fresh = [dataclasses.replace(plan) for _ in range(16)]  # more than executor.CACHED_PLANS
        calls = iter(range(10**9))
        variants = (
            ("same plan object (memoised)", lambda w=where, p=plan, t=tiny: executor.apply_plan(p, t, w, "ep")),
            (
                "a new plan object of the same rows each call",
                lambda w=where, f=fresh, t=tiny, c=calls: executor.apply_plan(f[next(c) % len(f)], t, w, "ep"),
            ),
        )
        for label, call in variants:
            ms = median_ms(call, args.host_calls)
            record(f"apply_plan host time per call, {name}, {label}", ms, "weights of one byte a slot")
    per_message(args, mesh, record)


def per_message(args: argparse.Namespace, mesh: Any, record: Callable[..., None]) -> None:
    """Host time of :func:`eplb.executors.jax.begin` per plan row (a copy: the JAX executor's message), as
    ``benchmarks/executors_gpu.py``'s ``messages`` part measures the torch executor: the real DeepSeek-V3 plan
    between two SGLang files (288 slots over the mesh's devices; its last 2 layers, then all), weights of one
    byte a slot, a new plan object of the same rows every call (nothing memoised: what a ``Rebalancer`` step
    pays). ``begin`` dispatches the programs and returns; ``finish`` runs untimed."""
    files = sorted((DATA / "deepseek-v3-sglang").glob("*.json"))
    gpus = mesh.shape["ep"]
    if len(files) < 2 or 288 % gpus:
        print(f"per-message rows skipped: no SGLang files under {DATA} or 288 slots do not split over {gpus}")
        return
    loads = [np.asarray(json.loads(f.read_text())["logical_count"], dtype=np.float64) for f in files[:2]]
    old, new = (np.asarray(eplb.rebalance_experts(load, 288, 8, 1, gpus).phy2log) for load in loads)
    by_slot = NamedSharding(mesh, PartitionSpec(None, "ep"))
    for layers in (2, old.shape[0]):
        plan = eplb.plan_transfers(old[-layers:], new[-layers:], num_gpus=gpus)
        tiny = [jax.device_put((old[-layers:] + k).astype(np.uint8)[:, :, None], by_slot) for k in range(2)]
        moved = executor.apply_plan(plan, tiny, mesh, "ep")
        assert all(np.array_equal(np.asarray(m)[:, :, 0], (new[-layers:] + k) % 256) for k, m in enumerate(moved))
        fresh = [dataclasses.replace(plan) for _ in range(16)]  # more than executor.CACHED_PLANS
        times = []
        for i in range(args.host_calls // 10 + 1):
            start = time.perf_counter()
            pending = executor.begin(fresh[i % len(fresh)], tiny, mesh, "ep")
            if i:
                times.append(time.perf_counter() - start)
            jax.block_until_ready(pending.finish())
        ms = 1e3 * statistics.median(times), 1e3 * min(times)
        copies, remote = len(plan), int(plan.remote_copies.sum())
        note = f"{copies} plan rows ({remote} between devices): {1e3 * ms[0] / copies:.2f} us per row"
        record(f"begin host time, {gpus} devices, DeepSeek-V3 plan, {layers} layers, new plan object", ms, note)


def _classified(plan: eplb.TransferPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.arange(len(plan))
    return (rows, *executor._classify(plan, rows))


def _host_arrays(plan: eplb.TransferPlan, slot_bytes: int) -> Any:
    """The host work of apply_plan for ``plan`` on all layers in one group (without a mesh)."""
    job = executor._Job(
        plan, None, None, None, [], slot_bytes, np.arange(plan.num_layers), *_classified(plan), None, True, None
    )
    return [job.arrays(group, full=True) for group in job.split(None, None)]


def _copy(weights: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: jnp.copy(w) for name, w in weights.items()}


if __name__ == "__main__":
    main()
