"""A job that loses a GPU, scales down and up: 4 gloo processes, placement, plan and torch executor together.

One job of 4 processes (GPUs 0-3, 4 slots each, 10 experts, 2 layers):

1. **scale down 4 -> 3**: GPU 3 leaves (``active_gpus``); it still sends its experts, then holds nothing;
2. **scale up 3 -> 4**: GPU 3 comes back and receives its slots (``previous`` has ``-1`` there);
3. **failure**: GPU 1's process exits mid-job. The survivors notice (their next collective fails), form a new
   group of 3, re-plan with ``active_gpus`` and ``previous=``, and move the weights with
   ``ranks=[0, -1, 1, 2]``, reading the experts that only GPU 1 held from a checkpoint (``load_expert``).
   A second try whose checkpoint read fails on one rank must raise ``TransferError`` everywhere and change
   nothing; a plan with reloads and no ``load_expert`` is a ``ValueError`` on every rank.

After each step every live GPU's weights must equal, bit for bit, the weights of the new placement built from
scratch (expert ``e`` of layer ``l`` carries values derived from ``(l, e)``).
"""

from __future__ import annotations

import datetime
import json
import os
import traceback
from pathlib import Path

import numpy as np
import pytest

from .processes import run_ranks

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD, LAYERS, EXPERTS, SLOTS = 4, 2, 10, 16
PER_GPU = SLOTS // WORLD
DEAD = 1  # the GPU whose process exits


def loads(step: int) -> np.ndarray:
    return np.random.default_rng(step).lognormal(0.0, 1.0, (LAYERS, EXPERTS))


def expert_weights(layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The reference weights of one expert (also the checkpoint's answer)."""
    base = float(layer * 100 + expert)
    return {
        "w13": base + torch.arange(6, dtype=torch.float32).reshape(2, 3) / 8,
        "w2": torch.full((5,), layer * 1000 + expert * 7, dtype=torch.int64) + torch.arange(5),
    }


def weights_for(phy2log: np.ndarray, gpu: int) -> dict[str, torch.Tensor]:
    """GPU ``gpu``'s slots of ``phy2log`` (empty slots, ``-1``, hold zeros)."""
    out = {"w13": torch.zeros(LAYERS, PER_GPU, 2, 3), "w2": torch.zeros(LAYERS, PER_GPU, 5, dtype=torch.int64)}
    for layer in range(LAYERS):
        for slot in range(PER_GPU):
            expert = int(phy2log[layer, gpu * PER_GPU + slot])
            if expert >= 0:
                for name, value in expert_weights(layer, expert).items():
                    out[name][layer, slot] = value
    return out


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def worker(gpu: int, tmp: str) -> None:
    import eplb
    from eplb.executors import torch as executor

    results: dict[str, object] = {}

    def record(name: str, value: object) -> None:
        results[name] = value
        Path(tmp, f"{gpu}.json").write_text(json.dumps(results))

    try:
        timeout = datetime.timedelta(seconds=20)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init1", rank=gpu, world_size=WORLD, timeout=timeout)
        everyone = np.ones(WORLD, dtype=bool)
        start = np.asarray(eplb.rebalance_experts(loads(0), SLOTS, 1, 1, WORLD).phy2log)
        weights = weights_for(start, gpu)

        # 1. Scale down: GPU 3 leaves after sending its experts.
        down = everyone.copy()
        down[3] = False
        smaller = np.asarray(
            eplb.rebalance_experts(loads(1), SLOTS, 1, 1, WORLD, active_gpus=down, previous=start).phy2log
        )
        plan = eplb.plan_transfers(start, smaller, num_gpus=WORLD)
        executor.apply_plan(plan, weights)
        record("down", {"ok": gpu == 3 or same(weights, weights_for(smaller, gpu)), "gpu3_empty": bool(
            (smaller[:, 3 * PER_GPU :] == -1).all()), "moved": int(plan.remote_copies.sum())})  # fmt: skip

        # 2. Scale up: GPU 3 is back (its old weights are stale) and receives every slot.
        bigger = np.asarray(  # previous holds -1 (GPU 3's slots): the elastic rule, every GPU up
            eplb.rebalance_experts(loads(2), SLOTS, 1, 1, WORLD, active_gpus=everyone, previous=smaller).phy2log
        )
        plan = eplb.plan_transfers(smaller, bigger, num_gpus=WORLD)
        executor.apply_plan(plan, weights)
        record("up", {"ok": same(weights, weights_for(bigger, gpu)), "moved": int(plan.remote_copies.sum())})

        # 3. GPU 1's process exits; the others notice at their next collective.
        dist.barrier()
        if gpu == DEAD:
            os._exit(0)
        try:
            dist.all_reduce(torch.ones(1))
            noticed = False
        except RuntimeError:
            noticed = True
        record("noticed", noticed)
        dist.destroy_process_group()
        survivors = [g for g in range(WORLD) if g != DEAD]
        rank = survivors.index(gpu)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init2", rank=rank, world_size=3, timeout=timeout)
        active = everyone.copy()
        active[DEAD] = False
        lost = bigger.copy()
        lost[:, DEAD * PER_GPU : (DEAD + 1) * PER_GPU] = -1  # GPU 1's weights are gone
        after = np.asarray(
            eplb.rebalance_experts(loads(3), SLOTS, 1, 1, WORLD, active_gpus=active, previous=lost).phy2log
        )
        plan = eplb.plan_transfers(lost, after, num_gpus=WORLD, allow_reload=True)
        ranks = [survivors.index(g) if g in survivors else -1 for g in range(WORLD)]
        before = {k: v.clone() for k, v in weights.items()}

        try:  # no checkpoint reader: refused on every rank before anything moves
            executor.apply_plan(plan, weights, ranks=ranks)
            refused = "no error"
        except ValueError as err:
            refused = str(err)

        victim = int(plan.dst_gpu[plan.reload].min()) if plan.reload.any() else -1  # a GPU with reloads

        def broken_checkpoint(layer: int, expert: int):
            if gpu == victim:
                raise OSError("injected: checkpoint unreadable")
            return expert_weights(layer, expert)

        try:  # a checkpoint read fails on one rank: every rank raises TransferError, nothing changes
            executor.apply_plan(plan, weights, ranks=ranks, load_expert=broken_checkpoint)
            failed = {"raised": False}
        except eplb.TransferError as err:
            failed = {"raised": True, "transfer": err.transfer, "reload": bool(plan.reload[err.transfer])
                      if err.transfer is not None else None}  # fmt: skip
        failed["intact"] = same(weights, before)

        reads: list[tuple[int, int]] = []

        def checkpoint(layer: int, expert: int) -> dict[str, torch.Tensor]:
            reads.append((layer, expert))
            return expert_weights(layer, expert)

        executor.apply_plan(plan, weights, ranks=ranks, load_expert=checkpoint)
        mine = plan.reload & (plan.dst_gpu == gpu)
        record("failure", {
            "ok": same(weights, weights_for(after, gpu)),
            "reloads": int(plan.reload.sum()),
            "reads": sorted(map(list, reads)),
            "expected_reads": sorted([int(plan.layer[r]), int(plan.expert[r])] for r in np.flatnonzero(mine)),
            "dead_empty": bool((after[:, DEAD * PER_GPU : (DEAD + 1) * PER_GPU] == -1).all()),
            "every_expert_live": bool(all(set(range(EXPERTS)) <= set(row.tolist()) for row in after)),
            "refused": refused,
            "failed": failed,
            "victim": victim,
        })  # fmt: skip
        dist.destroy_process_group()
    except Exception:
        record("crash", traceback.format_exc())


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("elastic")
    return run_ranks(worker, lambda g: (g, str(tmp)), WORLD, tmp)


def _get(outcomes: dict, gpu: int, name: str):
    assert "crash" not in outcomes[gpu], outcomes[gpu]["crash"]
    assert name in outcomes[gpu], f"GPU {gpu} did not reach {name}: {outcomes[gpu]}"
    return outcomes[gpu][name]


def test_scale_down_then_up_moves_the_weights_exactly(outcomes):
    for gpu in range(WORLD):
        down, up = _get(outcomes, gpu, "down"), _get(outcomes, gpu, "up")
        assert down["ok"] and down["gpu3_empty"] and down["moved"] > 0
        assert up["ok"] and up["moved"] >= PER_GPU * LAYERS  # GPU 3 receives every slot


def test_survivors_notice_replan_reload_and_end_exact(outcomes):
    for gpu in (0, 2, 3):
        assert _get(outcomes, gpu, "noticed") is True
        result = _get(outcomes, gpu, "failure")
        assert result["reloads"] > 0, "the scenario must lose an expert that only GPU 1 held"
        assert result["ok"] and result["dead_empty"] and result["every_expert_live"]
        assert result["reads"] == result["expected_reads"]  # each of its reload rows read once, nothing else


def test_reload_needs_a_callback_and_a_failed_read_changes_nothing(outcomes):
    for gpu in (0, 2, 3):
        result = _get(outcomes, gpu, "failure")
        assert "pass load_expert=" in result["refused"]
        failed = result["failed"]
        assert failed["raised"] and failed["intact"], failed
    # every rank names the failed read's row: a reload row (the vote's first failure)
    for gpu in (0, 2, 3):
        result = _get(outcomes, gpu, "failure")
        assert result["victim"] in (0, 2, 3) and result["failed"]["reload"] is True
