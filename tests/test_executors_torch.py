"""The torch.distributed executor, with gloo across 4 CPU processes.

One group of 4 processes runs every scenario in turn: a migration (every
rank then holds exactly the new placement's weights, in three tensors of
different dtypes), ``in_place=False``, the ``all_to_all`` transport, a
failure injected on one rank while copies arrive (``on_transfer``), a
``DistBackendError`` from a point-to-point op, programming errors (bad
weights on one rank, weights of no tensor type and a plan for another world
size on every rank, a bug injected into an internal helper on one rank), and
last a peer that dies in the middle of its sends. After a transfer failure
every surviving rank must raise ``TransferError`` naming the failed copy (or
rank); after a programming error the rank that made it raises it unchanged
and the others ``TransferError`` naming it. Every rank must still hold its
old weights bit for bit.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD, LAYERS, EXPERTS, SLOTS = 4, 3, 10, 16
NOTES = 0 if sys.version_info >= (3, 11) else -1  # exception notes (the executor adds one) need Python 3.11
PER_GPU = SLOTS // WORLD


def placements() -> tuple[np.ndarray, np.ndarray]:
    """Old and new placements, the same on every rank: random, every expert present, with replicas."""
    rng = np.random.default_rng(0)

    def one() -> np.ndarray:
        rows = [
            rng.permutation(np.r_[np.arange(EXPERTS), rng.integers(0, EXPERTS, SLOTS - EXPERTS)]) for _ in range(LAYERS)
        ]
        return np.stack(rows)

    old, new = one(), one()
    new[1, 4:8] = [3, 3, 3, old[1, 7]]  # GPU 1 of layer 1: several copies of one expert (local stage-1 copies)
    return old, new


def weights_for(phy2log: np.ndarray, rank: int) -> dict[str, torch.Tensor]:
    """Expert ``e`` of layer ``l`` carries values derived from ``(l, e)`` in three dtypes."""
    mine = torch.as_tensor(phy2log.reshape(LAYERS, WORLD, PER_GPU)[:, rank])  # [L, s]
    layer = torch.arange(LAYERS)[:, None]
    base = (layer * 100 + mine).to(torch.float32)
    return {
        "w13": base[:, :, None, None] + torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3) / 8,
        "w2": (base[:, :, None] * 7).to(torch.int64) + torch.arange(5),
        "scale": ((layer + mine) % 64).to(torch.bfloat16)[:, :, None].expand(LAYERS, PER_GPU, 4).contiguous(),
    }


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def worker(rank: int, init_file: str, out_dir: str) -> None:
    from eplb import TransferError, plan_transfers
    from eplb.executors import torch as executor

    results: dict[str, object] = {}

    def record(name: str, fn) -> None:
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"crash": traceback.format_exc()}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(results))

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=20)
    )
    old, new = placements()
    plan = plan_transfers(old, new, num_gpus=WORLD, num_nodes=2)

    def migrate() -> dict:
        weights = weights_for(old, rank)
        returned = executor.apply_plan(plan, weights)
        moved = int(plan.remote_copies.sum())
        return {"ok": returned is weights and same(weights, weights_for(new, rank)), "moved": moved}

    def collective() -> dict:
        weights = weights_for(old, rank)
        executor.apply_plan(plan, weights, transport="all_to_all")
        failed = expect_failure(weights_for(old, rank), transport="all_to_all", on_transfer=lambda row: 1 / 0)
        return {"ok": same(weights, weights_for(new, rank)), "failed": failed}

    def functional() -> dict:
        weights = weights_for(old, rank)
        out = executor.apply_plan(plan, weights, in_place=False)
        return {"ok": same(out, weights_for(new, rank)) and same(weights, weights_for(old, rank))}

    def expect_failure(weights: dict, plan=plan, **options) -> dict:
        before = {k: v.clone() for k, v in weights.items()}
        try:
            executor.apply_plan(plan, weights, **options)
        except TransferError as err:
            return {
                "raised": True,
                "intact": same(weights, before),
                "transfer": err.transfer,
                "rank": err.rank,
                "msg": str(err),
            }
        except Exception as err:  # must not be wrapped: a programming error, as raised
            return {
                "raised": type(err).__name__,
                "intact": same(weights, before),
                "msg": str(err),
                "notes": getattr(err, "__notes__", []),
            }
        return {"raised": False, "intact": same(weights, before)}

    def hook_fails() -> dict:
        # Rank 2 rejects the second copy it receives (as a checksum would).
        victim = [int(r) for r in np.flatnonzero(plan.remote & (plan.dst_gpu == 2))][1]

        def check(row: int) -> None:
            if rank == 2 and row == victim:
                raise RuntimeError("checksum mismatch")

        return {**expect_failure(weights_for(old, rank), on_transfer=check), "victim": victim}

    def prepare_fails() -> dict:
        weights = weights_for(old, rank)
        if rank == 1:
            weights["w2"] = weights["w2"][:, :2]  # wrong shape on one rank
        return expect_failure(weights)

    def backend_error() -> dict:
        # Rank 0's first point-to-point op reports a backend error after all data moved (as NCCL would).
        real = executor.dist.batch_isend_irecv

        class Done:  # a gloo work must not be waited on twice
            def wait(self) -> None:
                pass

        class Failed:
            def wait(self) -> None:
                raise dist.DistBackendError("NCCL communicator was aborted")

        def first_fails(ops):
            for work in real(ops):
                work.wait()
            return [Failed()] + [Done() for _ in ops[1:]]

        if rank == 0:
            executor.dist.batch_isend_irecv = first_fails
        try:
            # Rank 0's first message: to or from its lowest peer, sends before receives, named by its first copy.
            for peer in range(1, WORLD):
                out = np.flatnonzero(plan.remote & (plan.src_gpu == 0) & (plan.dst_gpu == peer))
                into = np.flatnonzero(plan.remote & (plan.src_gpu == peer) & (plan.dst_gpu == 0))
                if len(out) or len(into):
                    first = int(out[0] if len(out) else into[0])
                    break
            return {**expect_failure(weights_for(old, rank)), "first": first}
        finally:
            executor.dist.batch_isend_irecv = real

    def not_tensors() -> dict:
        # Every rank passes numpy arrays: a TypeError everywhere, voted on without a weights device.
        weights = {k: v.float().numpy() for k, v in weights_for(old, rank).items()}
        try:
            executor.apply_plan(plan, weights)
        except TransferError as err:
            return {"raised": True, "msg": str(err)}
        except Exception as err:
            return {"raised": type(err).__name__, "msg": str(err)}
        return {"raised": False}

    def wrong_world() -> dict:
        two = plan_transfers(old, old[:, ::-1], num_gpus=2)  # a plan for 2 GPUs in a group of 4
        return expect_failure(weights_for(old, rank), plan=two, transport="all_to_all")

    def injected_bug() -> dict:
        # A bug in eplb's own code on rank 2 (here: unpacking the received copies) after the data moved.
        real = executor._unpack

        def broken(*args) -> None:
            raise IndexError("injected bug")

        if rank == 2:
            executor._unpack = broken
        try:
            return expect_failure(weights_for(old, rank))
        finally:
            executor._unpack = real

    def peer_dies() -> dict:
        if rank == 3:
            real = executor.dist.batch_isend_irecv

            def half_then_die(ops):
                for work in real(ops[: len(ops) // 2]):
                    work.wait()
                os._exit(0)

            executor.dist.batch_isend_irecv = half_then_die
        return expect_failure(weights_for(old, rank))

    record("migrate", migrate)
    record("functional", functional)
    record("collective", collective)
    record("hook_fails", hook_fails)
    record("prepare_fails", prepare_fails)
    record("backend_error", backend_error)
    record("not_tensors", not_tensors)
    record("wrong_world", wrong_world)
    record("injected_bug", injected_bug)
    record("migrate_after_errors", migrate)  # the group is still usable after every failure above
    record("peer_dies", peer_dies)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=worker, args=(r, str(tmp / "init"), str(tmp))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    return {
        r: json.loads((tmp / f"{r}.json").read_text()) if (tmp / f"{r}.json").exists() else {} for r in range(WORLD)
    }


def _get(outcomes: dict, rank: int, name: str) -> dict:
    result = outcomes[rank].get(name)
    assert result is not None, f"rank {rank} did not reach {name}: {outcomes[rank]}"
    assert "crash" not in result, result.get("crash")
    return result


def test_every_rank_holds_the_new_weights(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "migrate")
        assert result["ok"] and result["moved"] > 0


def test_all_to_all_transport(outcomes):
    """transport="all_to_all": the same weights; a failing check keeps every rank's old weights, and all
    ranks name the same failed copy."""
    named = set()
    for rank in range(WORLD):
        result = _get(outcomes, rank, "collective")
        assert result["ok"]
        assert result["failed"]["raised"] and result["failed"]["intact"], result
        named.add((result["failed"]["transfer"], result["failed"]["rank"]))
    assert len(named) == 1 and None not in next(iter(named))


def test_not_in_place_leaves_inputs(outcomes):
    for rank in range(WORLD):
        assert _get(outcomes, rank, "functional")["ok"]


def test_failed_copy_keeps_old_weights_and_is_named(outcomes):
    victim = _get(outcomes, 2, "hook_fails")["victim"]
    for rank in range(WORLD):
        result = _get(outcomes, rank, "hook_fails")
        assert result["raised"] and result["intact"], result
        assert (result["transfer"], result["rank"]) == (victim, 2), result
        assert f"transfer {victim} (layer" in result["msg"] and "old weights kept" in result["msg"]


def test_bad_weights_on_one_rank_raise_there_unchanged(outcomes):
    """Rank 1's weights have the wrong shape: rank 1 raises that ValueError, not TransferError; the others
    raise TransferError naming rank 1; nothing moved anywhere."""
    for rank in range(WORLD):
        result = _get(outcomes, rank, "prepare_fails")
        assert result["intact"], result
        if rank == 1:
            assert result["raised"] == "ValueError", result
            assert "weights tensor 1 must have shape" in result["msg"]
            assert NOTES < 0 or any("told the other ranks during preparation" in note for note in result["notes"])
        else:
            assert result["raised"] is True, result
            assert result["transfer"] is None and result["rank"] == 1, result
            assert "raised an exception of its own during preparation" in result["msg"]


def test_backend_error_is_a_transfer_error(outcomes):
    """A DistBackendError from a point-to-point op on rank 0 makes every rank raise TransferError naming rank 0's
    first message."""
    first = _get(outcomes, 0, "backend_error")["first"]
    for rank in range(WORLD):
        result = _get(outcomes, rank, "backend_error")
        assert result["raised"] is True and result["intact"], result
        assert (result["transfer"], result["rank"]) == (first, 0), result
    assert "DistBackendError" in _get(outcomes, 0, "backend_error")["msg"]


def test_weights_of_no_tensor_type_raise_type_error(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "not_tensors")
        assert result["raised"] == "TypeError", result
        assert "weights must be a tensor" in result["msg"]


def test_plan_for_another_world_size_raises_value_error(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "wrong_world")
        assert result["raised"] == "ValueError" and result["intact"], result
        assert "the plan is for 2 GPUs but the process group has 4 ranks" in result["msg"]


def test_bug_in_the_executor_is_not_a_transfer_error(outcomes):
    """An IndexError of eplb's own code on rank 2 reaches rank 2 as it is; the others learn of it in the vote
    and raise TransferError naming rank 2; nobody commits."""
    for rank in range(WORLD):
        result = _get(outcomes, rank, "injected_bug")
        assert result["intact"], result
        if rank == 2:
            assert result["raised"] == "IndexError" and result["msg"] == "injected bug", result
            assert NOTES < 0 or any("told the other ranks during transfer" in note for note in result["notes"])
        else:
            assert result["raised"] is True and result["rank"] == 2, result


def test_group_still_works_after_the_failures(outcomes):
    for rank in range(WORLD):
        assert _get(outcomes, rank, "migrate_after_errors")["ok"]


def test_dead_peer_keeps_old_weights(outcomes):
    """Rank 3 exits after half its sends: ranks 0-2 raise and keep their weights."""
    for rank in range(WORLD - 1):
        result = _get(outcomes, rank, "peer_dies")
        assert result["raised"] and result["intact"], result
        assert "old weights kept" in result["msg"]
