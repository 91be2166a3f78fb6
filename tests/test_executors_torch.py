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
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from .processes import run_ranks

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
        real = executor.PendingTransfer._check_received

        def broken(*args) -> None:
            raise IndexError("injected bug")

        if rank == 2:
            executor.PendingTransfer._check_received = broken
        try:
            return expect_failure(weights_for(old, rank))
        finally:
            executor.PendingTransfer._check_received = real

    def peer_dies() -> dict:
        if rank == 3:
            real = executor.dist.batch_isend_irecv

            def half_then_die(ops):
                for work in real(ops[: len(ops) // 2]):
                    work.wait()
                os._exit(0)

            executor.dist.batch_isend_irecv = half_then_die
        return expect_failure(weights_for(old, rank))

    def layer_of(weights: dict, layer: int) -> dict:
        return {k: v[layer] for k, v in weights.items()}

    def per_layer(weights: dict) -> list[str]:
        """Per layer: "new", "old" or "other" (neither)."""
        goal, start = weights_for(new, rank), weights_for(old, rank)
        return [
            "new" if same(layer_of(weights, i), layer_of(goal, i))
            else "old" if same(layer_of(weights, i), layer_of(start, i)) else "other"
            for i in range(LAYERS)
        ]  # fmt: skip

    def partial_layers() -> dict:
        weights = weights_for(old, rank)
        executor.apply_plan(plan, weights, layers=[2, 0])
        first = per_layer(weights)
        executor.apply_plan(plan, weights, layers=np.array([1]))
        return {"first": first, "then": per_layer(weights)}

    def asynchronous() -> dict:
        # Layer 1 in flight while this rank keeps computing on the old weights; then the rest.
        weights = weights_for(old, rank)
        pending = executor.begin(plan, weights, layers=[1])
        during = per_layer(weights)  # nothing written before finish()
        busy = torch.randn(64, 64)
        for _ in range(20):
            busy = torch.tanh(busy @ busy)
        polls = 0
        while not pending.done() and polls < 10_000:
            polls += 1
        pending.finish()
        after_one = per_layer(weights)
        try:
            pending.finish()
            twice = None
        except RuntimeError as err:
            twice = str(err)
        executor.begin(plan, weights, layers=[0, 2], transport="all_to_all").finish()
        return {"during": during, "after_one": after_one, "twice": twice, "end": per_layer(weights),
                "layers": list(pending.layers)}  # fmt: skip

    def zero_copy() -> dict:
        # Every copy its own message, straight from its slot and into its staging row.
        real = executor.ZERO_COPY_BYTES
        executor.ZERO_COPY_BYTES = 1
        try:
            weights = weights_for(old, rank)
            executor.apply_plan(plan, weights)
            mixed = weights_for(old, rank)
            executor.ZERO_COPY_BYTES = 40  # w13 rows (24 bytes) and scale rows (8) packed, w2 rows (40) not
            executor.apply_plan(plan, mixed)
            return {"ok": per_layer(weights) == ["new"] * LAYERS, "mixed": per_layer(mixed) == ["new"] * LAYERS}
        finally:
            executor.ZERO_COPY_BYTES = real

    def chains() -> dict:
        # GPU 0 swaps two of its slots; GPUs 1 and 2 swap their first slots: every such slot is both the source
        # of one copy and the destination of another.
        start = np.tile(np.arange(SLOTS) % EXPERTS, (LAYERS, 1))
        goal = start.copy()
        goal[:, [0, 1]] = start[:, [1, 0]]
        goal[:, [PER_GPU, 2 * PER_GPU]] = start[:, [2 * PER_GPU, PER_GPU]]
        swap = plan_transfers(start, goal, num_gpus=WORLD)
        weights = weights_for(start, rank)
        executor.apply_plan(swap, weights)
        return {"ok": same(weights, weights_for(goal, rank)), "rows": len(swap), "remote": int(swap.remote.sum())}

    class Waited:
        def wait(self) -> None:
            pass

        def is_completed(self) -> bool:
            return True

    def corrupted(verify: bool, zero: bool) -> dict:
        # Rank 1 flips one bit of the first copy it receives, after it arrived (as a faulty link would).
        real_post, real_zero = executor.dist.batch_isend_irecv, executor.ZERO_COPY_BYTES
        if zero:
            executor.ZERO_COPY_BYTES = 1

        def flip_after(ops):
            works = real_post(ops)
            for work in works:
                work.wait()
            received = next(op.tensor for op in ops if op.op is dist.irecv and op.tensor.dtype == torch.float32)
            received.view(torch.int32).view(-1)[0] ^= 1
            return [Waited() for _ in works]  # a gloo work must not be waited on twice

        if rank == 1:
            executor.dist.batch_isend_irecv = flip_after
        try:
            into = np.flatnonzero(plan.remote & (plan.dst_gpu == 1))
            first = int(into[np.argmin(plan.src_gpu[into])])  # the first copy from rank 1's lowest sender
            return {**expect_failure(weights_for(old, rank), verify=verify), "first": first}
        finally:
            executor.dist.batch_isend_irecv, executor.ZERO_COPY_BYTES = real_post, real_zero

    def capped() -> dict:
        weights = weights_for(old, rank)
        slot = sum(v[0, 0].numel() * v.element_size() for v in weights.values())
        rows = np.zeros((LAYERS, WORLD), dtype=np.int64)
        np.add.at(rows, (plan.layer, plan.dst_gpu), 1)
        cap = int(rows.max(axis=1).max()) * slot  # the largest layer: groups of one or two layers
        executor.apply_plan(plan, weights, max_staging_bytes=cap)
        ok = per_layer(weights) == ["new"] * LAYERS
        # A copy of the last layer fails: the groups before it are committed, the last keeps its old weights.
        victim = int(np.flatnonzero(plan.remote & (plan.dst_gpu == 2) & (plan.layer == LAYERS - 1))[0])

        def check(row: int) -> None:
            if rank == 2 and row == victim:
                raise RuntimeError("rejected")

        weights = weights_for(old, rank)
        try:
            executor.apply_plan(plan, weights, max_staging_bytes=cap, on_transfer=check)
            failed = {"raised": False}
        except TransferError as err:
            failed = {"raised": True, "committed": list(err.committed_layers), "transfer": err.transfer}
        try:
            executor.apply_plan(plan, weights_for(old, rank), max_staging_bytes=slot)
            too_small = None
        except ValueError as err:
            too_small = str(err)
        return {"ok": ok, "cap": cap, "failed": failed, "after": per_layer(weights), "victim": victim,
                "too_small": too_small}  # fmt: skip

    def out_of_memory() -> dict:
        real = executor._stage

        def no_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("injected: no memory for staging")

        if rank == 1:
            executor._stage = no_memory
        try:
            return expect_failure(weights_for(old, rank))
        finally:
            executor._stage = real

    def bad_options() -> dict:
        w = weights_for(old, rank)
        out = {}
        for name, options in {
            "layers_range": {"layers": [LAYERS]},
            "layers_repeat": {"layers": [0, 0]},
            "layers_type": {"layers": [0.5]},
            "verify": {"verify": "yes"},
            "cap": {"max_staging_bytes": 0},
            "cap_type": {"max_staging_bytes": 1.5},
        }.items():
            out[name] = expect_failure(w, **options)
        return out

    record("migrate", migrate)
    record("functional", functional)
    record("collective", collective)
    record("hook_fails", hook_fails)
    record("prepare_fails", prepare_fails)
    record("backend_error", backend_error)
    record("not_tensors", not_tensors)
    record("wrong_world", wrong_world)
    record("injected_bug", injected_bug)
    record("partial_layers", partial_layers)
    record("asynchronous", asynchronous)
    record("zero_copy", zero_copy)
    record("chains", chains)
    record("corrupted", lambda: corrupted(True, False))
    record("corrupted_zero_copy", lambda: corrupted(True, True))
    record("corrupted_unverified", lambda: corrupted(False, False))
    record("capped", capped)
    record("out_of_memory", out_of_memory)
    record("bad_options", bad_options)
    record("migrate_after_errors", migrate)  # the group is still usable after every failure above
    record("peer_dies", peer_dies)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    return run_ranks(worker, lambda r: (r, str(tmp / "init"), str(tmp)), WORLD, tmp)


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


def test_partial_layer_sets(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "partial_layers")
        assert result["first"] == ["new", "old", "new"], result
        assert result["then"] == ["new"] * LAYERS, result


def test_begin_finish_moves_one_layer_while_the_old_weights_serve(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "asynchronous")
        assert result["during"] == ["old"] * LAYERS, result  # begin() writes nothing
        assert result["after_one"] == ["old", "new", "old"] and result["layers"] == [1], result
        assert "already called" in result["twice"]
        assert result["end"] == ["new"] * LAYERS, result


def test_zero_copy_messages(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "zero_copy")
        assert result["ok"] and result["mixed"], result


def test_chains_and_slots_that_are_source_and_destination(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "chains")
        assert result["ok"], result
    assert _get(outcomes, 0, "chains")["rows"] == 4 * LAYERS and _get(outcomes, 0, "chains")["remote"] == 2 * LAYERS


@pytest.mark.parametrize("scenario", ["corrupted", "corrupted_zero_copy"])
def test_checksum_catches_a_corrupted_copy(outcomes, scenario):
    """Rank 1 receives a copy with one bit flipped: every rank raises TransferError naming it, weights intact."""
    first = _get(outcomes, 1, scenario)["first"]
    for rank in range(WORLD):
        result = _get(outcomes, rank, scenario)
        assert result["raised"] is True and result["intact"], result
        assert (result["transfer"], result["rank"]) == (first, 1), result
        assert "checksum mismatch" in _get(outcomes, 1, scenario)["msg"]


def test_without_verify_the_corruption_goes_through(outcomes):
    """The same flipped bit with verify=False: no error, and rank 1's weights are wrong (the checksum is what
    caught it above)."""
    result = _get(outcomes, 1, "corrupted_unverified")
    assert result["raised"] is False and not result["intact"], result


def test_staging_cap_moves_in_groups_and_reports_committed_layers(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "capped")
        assert result["ok"], result
        assert result["failed"]["raised"] and result["failed"]["transfer"] == result["victim"], result
        committed = result["failed"]["committed"]
        assert committed and LAYERS - 1 not in committed, result
        assert result["after"] == ["new" if i in committed else "old" for i in range(LAYERS)], result
        assert "max_staging_bytes" in result["too_small"] and "a layer moves in one piece" in result["too_small"]


def test_out_of_memory_while_staging_is_a_transfer_failure(outcomes):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "out_of_memory")
        assert result["raised"] is True and result["intact"] and result["rank"] == 1, result


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("layers_range", "ValueError", "is not a layer of the plan"),
        ("layers_repeat", "ValueError", "must not repeat"),
        ("layers_type", "TypeError", "layers must hold ints"),
        ("verify", "TypeError", "verify must be a bool"),
        ("cap", "ValueError", "max_staging_bytes must be a positive int"),
        ("cap_type", "TypeError", "max_staging_bytes must be an int or None, got float"),
    ],
)
def test_bad_options_name_the_argument(outcomes, case, error, match):
    for rank in range(WORLD):
        result = _get(outcomes, rank, "bad_options")[case]
        assert result["raised"] == error and match in result["msg"] and result["intact"], result
