"""Where the torch executor's time goes, on gloo across CPU processes, against an earlier revision in one run.

    python benchmarks/executors_torch.py [--world 4] [--layers 8] [--runs 9] [--baseline REF]

Each rank holds its slots of every layer, ``{"w13": [L, s, 2I, H], "w2": [L, s, H, I]}`` bf16, for a real
plan: two ``eplb.rebalance_experts`` placements of the DeepSeek-V3 loads in ``../shared/data`` (288 slots,
256 experts, ``--world`` GPUs; EPLB_DATA_DIR overrides), its last ``--layers`` layers. Shapes:

- ``small``: H=128, I=256 (192 KB per expert): below ``ZERO_COPY_BYTES``, copies to one peer are packed;
- ``large``: H=2048, I=1024 (12 MB per expert), one layer (memory): every copy its own message, straight
  from its slot.

Per shape it prints the median wall time of ``apply_plan`` (in place, after a warm-up) of the baseline
revision (``--baseline``, default: the last before ``begin``/``finish``, loaded from git) and of this tree, with
and without checksums, and this tree's breakdown (``eplb.executors.torch._clock``: host layout, staging and
packing, posting the messages, waiting for them, second copies and checksums, the two votes, the commit),
each the median over runs and the maximum over ranks. Also ``plan_transfers`` for the full 58-layer plan
and a plain ``all_to_all_single`` of the same bytes (the floor of the link).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("EPLB_DATA_DIR", ROOT.parent / "shared" / "data"))
SHAPES = {"small": (128, 256, None), "large": (2048, 1024, 1)}  # (hidden, intermediate, layers: None = --layers)


def placements(world: int, layers: int) -> tuple[np.ndarray, np.ndarray]:
    import eplb

    files = sorted((DATA / "deepseek-v3-sglang").glob("*.json"))
    loads = [np.asarray(json.loads(f.read_text())["logical_count"], dtype=np.float64) for f in files[:2]]
    old, new = (eplb.rebalance_experts(load, 288, 8, 1, world).phy2log for load in loads)
    return np.asarray(old)[-layers:], np.asarray(new)[-layers:]  # the last layers: the first 3 are dense


def weights(phy2log: np.ndarray, rank: int, world: int, shape: tuple[int, int]):
    import torch

    hidden, inter, _ = shape
    per_gpu = phy2log.shape[1] // world
    mine = torch.as_tensor(phy2log[:, rank * per_gpu : (rank + 1) * per_gpu])
    base = (mine * 7 + torch.arange(len(phy2log))[:, None]).to(torch.bfloat16)
    return {
        "w13": base[:, :, None, None].expand(-1, -1, 2 * inter, hidden).contiguous(),
        "w2": (base + 1)[:, :, None, None].expand(-1, -1, hidden, inter).contiguous(),
    }


def load_baseline(ref: str) -> types.ModuleType | None:
    try:
        source = subprocess.run(
            ["git", "show", f"{ref}:eplb/executors/torch.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    module = types.ModuleType("eplb_executor_baseline")
    exec(compile(source, f"{ref}:eplb/executors/torch.py", "exec"), module.__dict__)
    return module


def worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist

    import eplb
    from eplb.executors import torch as executor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    old, new = placements(world, args.layers)
    baseline = load_baseline(args.baseline)
    report: dict = {}

    def timed(call, runs: int) -> list[float]:
        times = []
        for _ in range(runs + 1):  # one warm-up
            dist.barrier()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return times[1:]

    def one_shape(shape: tuple, old: np.ndarray, new: np.ndarray) -> dict:
        plan = eplb.plan_transfers(old, new, num_gpus=world, num_nodes=1)
        start = weights(old, rank, world, shape)
        expert_bytes = sum(t[0, 0].numel() * t.element_size() for t in start.values())
        row: dict = {"expert_bytes": expert_bytes, "layers": len(old), "remote": int(plan.remote.sum())}
        if baseline is not None:
            row["baseline"] = timed(lambda: baseline.apply_plan(plan, {k: v.clone() for k, v in start.items()}),
                                    args.runs)  # fmt: skip
            row["clone"] = timed(lambda: {k: v.clone() for k, v in start.items()}, args.runs)
        row["new"] = timed(lambda: executor.apply_plan(plan, {k: v.clone() for k, v in start.items()}), args.runs)
        row["new_unverified"] = timed(
            lambda: executor.apply_plan(plan, {k: v.clone() for k, v in start.items()}, verify=False), args.runs
        )
        laps = []
        for _ in range(args.runs):
            executor._clock.laps = {}
            w = {k: v.clone() for k, v in start.items()}
            dist.barrier()
            executor.apply_plan(plan, w)
            laps.append(executor._clock.laps)
        executor._clock.laps = None
        row["laps"] = {k: statistics.median(lap[k] for lap in laps) for k in laps[0]}
        pending = executor.begin(plan, {k: v.clone() for k, v in start.items()})
        row["messages"] = len(pending._message_rows)
        pending.finish()
        # The floor: one all_to_all_single of the same bytes per tensor.
        sent = [int((plan.remote & (plan.src_gpu == rank) & (plan.dst_gpu == p)).sum()) for p in range(world)]
        got = [int((plan.remote & (plan.dst_gpu == rank) & (plan.src_gpu == p)).sum()) for p in range(world)]
        flats = {k: v.view(-1, *v.shape[2:]) for k, v in start.items()}
        outs = {k: v.new_empty((sum(got), *v.shape[1:])) for k, v in flats.items()}
        srcs = {k: v[: sum(sent)].contiguous() for k, v in flats.items()}

        def plain():
            for k in flats:
                dist.all_to_all_single(outs[k], srcs[k], got, sent)

        row["all_to_all"] = timed(plain, args.runs)
        return row

    for name, shape in SHAPES.items():
        cut = args.layers if shape[2] is None else shape[2]
        report[name] = one_shape(shape, old[-cut:], new[-cut:])
    if rank == 0:
        full_old, full_new = placements(world, 10**6)
        t = []
        for _ in range(args.runs):
            s = time.perf_counter()
            eplb.plan_transfers(full_old, full_new, num_gpus=world)
            t.append(time.perf_counter() - s)
        report["plan_transfers_ms"] = statistics.median(t) * 1e3
        report["plan_layers"] = len(full_old)
    Path(out, f"{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--baseline", default="4de16f9~1", help="git revision of the executor to compare with "
                        "(default: the last one before begin/finish)")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=worker, args=(r, args.world, f"{tmp}/init", args, tmp))
                 for r in range(args.world)]  # fmt: skip
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        reports = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(args.world)]
    ms = lambda times: statistics.median(times) * 1e3  # noqa: E731
    print(f"gloo, {args.world} processes on this machine's CPU; DeepSeek-V3 placements, 288 slots")
    for name in SHAPES:
        rows = [r[name] for r in reports]
        mb = rows[0]["expert_bytes"] / 2**20
        print(f"\n{name}: {mb:.2f} MB per expert, {rows[0]['layers']} layers, {rows[0]['remote']} copies between "
              f"ranks, {rows[0]['messages']} messages on rank 0")  # fmt: skip

        def worst(key: str, rows: list = rows) -> float:
            return max(ms(r[key]) for r in rows)

        if "baseline" in rows[0]:
            clone = worst("clone")
            print(f"  baseline ({args.baseline}) apply_plan: {worst('baseline') - clone:8.1f} ms")
        else:
            clone = 0.0
        print(f"  this tree, verify=True:          {worst('new') - clone:8.1f} ms")
        print(f"  this tree, verify=False:         {worst('new_unverified') - clone:8.1f} ms")
        print(f"  plain all_to_all_single:         {worst('all_to_all'):8.1f} ms (same bytes)")
        print("  breakdown (this tree, verify=True; max over ranks of the median):")
        for lap in rows[0]["laps"]:
            print(f"    {lap:32s} {max(r['laps'][lap] for r in rows) * 1e3:8.2f} ms")
    print(f"\nplan_transfers, {reports[0]['plan_layers']} layers x 288 slots, {args.world} GPUs: "
          f"{reports[0]['plan_transfers_ms']:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
