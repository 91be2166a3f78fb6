"""The JAX executor on 8 CPU devices (``--xla_force_host_platform_device_count=8``).

The device count must be set before JAX starts, so every scenario runs in
one subprocess and reports back as JSON; this test process keeps its own
JAX untouched. Scenarios: a migration in three dtypes (every device then
holds exactly the new placement's weights), the program inside a user's
``jax.jit`` with a plan that reuses the compiled program, a copy corrupted in
flight (caught by its checksum, named in the error, old weights intact),
programming errors (bad arguments, a bug injected into an internal helper:
raised as they are, not as ``TransferError``), and a failing collective.
Then the per-layer forms: chained copies (swaps across and within devices, a
3-cycle, a slot both source and destination, second copies), partial layer
sets, groups under a memory cap, donation, pytrees of weights, ``verify=False``,
``start``/``PendingTransfer``, and a failure injected at each phase (checksum,
transfer program, host read, commit program) with and without donation, after
which the weights are exactly the documented ones. Then reload rows
(``load_expert``) on a 4-device mesh: a failed GPU (exact weights from
``rebalance_experts(..., active_gpus=, previous=)``), second copies of a
reloaded expert, scale down and up, and a failing or malformed callback. Then
``ranks=``: GPU 1 of 4 fails and the plan runs on the 3 survivors' mesh
(the survivors' slots only, exact), in any device order, and every bad
``ranks``. Then the same plan objects again (their host work memoised): each
call moves its own plan's bytes, after a fault, with new values, donated and
in groups, and no program is traced again.
``plan_arrays`` is checked in this process against the loop it replaced, on
random and degenerate plans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from . import oracle

pytest.importorskip("jax")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import eplb
from eplb.executors import jax as executor

G, L, E, R = 8, 3, 20, 32
rng = np.random.default_rng(0)

def placement():
    return np.stack([rng.permutation(np.r_[np.arange(E), rng.integers(0, E, R - E)]) for _ in range(L)])

old, new, other = placement(), placement(), placement()
new[1, 8:12] = [5, 5, 5, old[1, 11]]  # device 2 of layer 1 gets several copies of one expert
plan = eplb.plan_transfers(old, new, num_gpus=G, num_nodes=2)
mesh = jax.make_mesh((G,), ("ep",))
by_slot = NamedSharding(mesh, P(None, "ep"))

def weights(phy2log, dtype):
    base = (np.arange(L)[:, None] * 100 + phy2log).astype(np.float32) % 120
    return jax.device_put(jnp.asarray(base[:, :, None, None] + np.arange(6).reshape(2, 3) / 8, dtype=dtype), by_slot)

def equal(a, b):
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))

out = {"devices": len(jax.devices()), "moved": int(plan.remote_copies.sum()), "second": int((plan.stage == 1).sum())}
for dtype in ("float32", "bfloat16", "int8"):
    before = weights(old, dtype)
    after = executor.apply_plan(plan, before)
    out[dtype] = {
        "new": equal(after, weights(new, dtype)),
        "old_intact": equal(before, weights(old, dtype)),
        "sharding": after.sharding.is_equivalent_to(before.sharding, after.ndim),
    }

# Inside a user's jit, with a second plan of the same capacity: one compiled program.
transfer = executor.make_transfer(mesh, "ep")
spread = NamedSharding(mesh, P("ep"))
second_plan = eplb.plan_transfers(old, other, num_gpus=G, num_nodes=2)
capacity = max(executor.plan_arrays(p).send.shape[-1] for p in (plan, second_plan))

@jax.jit
def step(w, send, gather, second, corrupt):
    moved, ok = transfer(w, send, gather, second, corrupt)
    return moved * 2, ok.all()

results = []
for p, goal in ((plan, new), (second_plan, other)):
    arrays = executor.plan_arrays(p, capacity)
    fields = (arrays.send, arrays.gather, arrays.second, np.zeros(arrays.row.shape, bool))
    moved, ok = step(weights(old, "float32"), *[jax.device_put(a, spread) for a in fields])
    results.append(bool(ok) and equal(moved, 2 * np.asarray(weights(goal, "float32"))))
out["jit"] = {"ok": results, "compiles": step._cache_size()}

# A copy corrupted in flight.
victim = int(np.flatnonzero(plan.remote)[7])
before = weights(old, "float32")
try:
    executor.apply_plan(plan, before, fault=victim)
    out["fault"] = {"raised": False}
except eplb.TransferError as err:
    out["fault"] = {"raised": True, "transfer": err.transfer, "victim": victim, "rank": err.rank,
                    "dst": int(plan.dst_gpu[victim]), "msg": str(err), "intact": equal(before, weights(old, "float32"))}

# Programming errors propagate as they are: bad arguments, and a bug in eplb's own code while tracing.
def outcome(call):
    try:
        call()
    except eplb.TransferError as err:
        return {"raised": "TransferError", "msg": str(err)}
    except Exception as err:
        return {"raised": type(err).__name__, "msg": str(err)}
    return {"raised": None}

four = eplb.plan_transfers(old, old[:, ::-1], num_gpus=4)
out["bad_arguments"] = {
    "plan": outcome(lambda: executor.apply_plan(old, before)),
    "weights": outcome(lambda: executor.apply_plan(plan, [before, "not an array"])),
    "world": outcome(lambda: executor.apply_plan(four, before)),
    "fault": outcome(lambda: executor.apply_plan(plan, before, fault=1.5)),
    "capacity": outcome(lambda: executor.apply_plan(plan, before, capacity=0)),
}

real_checksum = executor._checksum
def buggy_checksum(x):
    raise IndexError("injected bug")

executor._checksum = buggy_checksum
executor._stage_program.cache_clear()  # trace again, through the bug
out["bug"] = {**outcome(lambda: executor.apply_plan(plan, before)), "intact": equal(before, weights(old, "float32"))}
executor._checksum = real_checksum
executor._stage_program.cache_clear()

# A collective that fails outright (as XLA reports it, and as a plain RuntimeError).
real_stage = executor._stage_program
def broken(error):
    def make(*key):
        def run(*args):
            raise error
        return run
    return make

for name, error in (("collective", RuntimeError("INTERNAL: peer unreachable")),
                    ("runtime", jax.errors.JaxRuntimeError("INTERNAL: NCCL operation failed"))):
    executor._stage_program = broken(error)
    try:
        executor.apply_plan(plan, before)
        out[name] = {"raised": False}
    except eplb.TransferError as err:
        out[name] = {"raised": True, "msg": str(err), "intact": equal(before, weights(old, "float32"))}
executor._stage_program = real_stage

# ---- The per-layer forms, on a plan with chained copies (layer 0, by hand) and random layers 1-3.
L4, E4 = 4, 24
def shuffled():
    return rng.permutation(np.r_[np.arange(E4), rng.integers(0, E4, R - E4)])

chain_old = np.stack([np.r_[np.arange(E4), np.arange(R - E4)]] + [shuffled() for _ in range(L4 - 1)])
chain_new = np.stack([chain_old[0]] + [shuffled() for _ in range(L4 - 1)])
row0 = chain_new[0]
row0[[0, 4]] = chain_old[0][[4, 0]]  # swap across devices 0 and 1: each slot is a source and a destination
row0[[8, 9]] = chain_old[0][[9, 8]]  # swap within device 2
row0[[12, 16, 20]] = chain_old[0][[16, 20, 12]]  # a 3-cycle over devices 3, 4, 5
row0[[24, 25]] = 10  # device 6 receives expert 10 once and copies it again (stage 1)
cplan = eplb.plan_transfers(chain_old, chain_new, num_gpus=G, num_nodes=2)

def chain_weights(phy2log, dtype="float32", tail=(2, 3)):
    # Distinct per (layer, expert) in every dtype used (int8 included: at most 3 * 30 + 23).
    base = (np.arange(L4)[:, None] * 30 + phy2log).astype(np.float32)
    values = base.reshape(*base.shape, *([1] * len(tail))) + np.arange(np.prod(tail)).reshape(tail) / 16
    return jax.device_put(jnp.asarray(values, dtype=dtype), by_slot)

def mixed(layers):
    placement = chain_old.copy()
    placement[list(layers)] = chain_new[list(layers)]
    return placement

rows0 = [cplan.row(i) for i in range(len(cplan)) if cplan.layer[i] == 0]
pairs = {(r["src_gpu"], r["src_slot"], r["dst_gpu"], r["dst_slot"]) for r in rows0}
out["chain_plan"] = {
    "cross_swap": (1, 0, 0, 0) in pairs and (0, 0, 1, 0) in pairs,
    "local_swap": (2, 0, 2, 1) in pairs and (2, 1, 2, 0) in pairs,
    "cycle": {(4, 0, 3, 0), (5, 0, 4, 0), (3, 0, 5, 0)} <= pairs,
    "second": any(r["stage"] == 1 and r["dst_gpu"] == 6 for r in rows0),
}

def attempt(call):
    try:
        return {"value": call(), "error": None}
    except Exception as err:
        return {"value": None, "error": err}

res = {}
old_w = chain_weights(chain_old)
res["all"] = equal(executor.apply_plan(cplan, old_w), chain_weights(chain_new))
res["old_intact"] = equal(old_w, chain_weights(chain_old))
res["partial"] = equal(executor.apply_plan(cplan, old_w, layers=[0, 2]), chain_weights(mixed([0, 2])))
moved3 = executor.apply_plan(cplan, old_w, layers=np.array([3]))
res["partial_numpy_layers"] = equal(moved3, chain_weights(mixed([3])))
res["no_layers"] = equal(executor.apply_plan(cplan, old_w, layers=[]), old_w)
slot_bytes = 6 * 4
def round_up(n):  # as documented: up to a multiple of 1/16 of the power of two at or above n (n <= 16 unchanged)
    n, step = int(n), (1 << (int(n) - 1).bit_length()) // 16
    return n if n <= 16 else -(-n // step) * step

def staging(layers):
    rows = np.isin(cplan.layer, layers)
    remote = rows & (cplan.src_gpu != cplan.dst_gpu)
    pairs = np.bincount(cplan.src_gpu[remote] * G + cplan.dst_gpu[remote], minlength=G * G)
    inbound = np.bincount(cplan.dst_gpu[remote | (rows & (cplan.stage == 1))], minlength=G)
    local = np.bincount(cplan.dst_gpu[rows & ~remote & (cplan.stage == 0)], minlength=G)
    return 2 * (G * max(pairs.max(), 1) + round_up(inbound.max()) + round_up(local.max())) * slot_bytes

cap = int(staging([0, 1]))  # the documented estimate of layers 0 and 1 together
groups = executor.layer_groups(cplan, old_w, max_staging_bytes=cap)
res["groups"] = [list(g) for g in groups]
res["group_bytes"] = [int(staging(list(g))) for g in groups]
res["grown_bytes"] = [int(staging(list(a) + [b[0]])) for a, b in zip(groups, groups[1:])]
res["cap"] = cap
res["groups_big_cap"] = [list(g) for g in executor.layer_groups(cplan, old_w, max_staging_bytes=10**9)]
res["groups_per_layer"] = [list(g) for g in executor.layer_groups(cplan, old_w, layers_per_group=1)]
res["grouped"] = equal(executor.apply_plan(cplan, old_w, max_staging_bytes=cap), chain_weights(chain_new))
moved013 = executor.apply_plan(cplan, old_w, layers=[1, 3, 0], layers_per_group=2)
res["grouped_partial"] = equal(moved013, chain_weights(mixed([0, 1, 3])))
res["old_intact"] = res["old_intact"] and equal(old_w, chain_weights(chain_old))
donated = chain_weights(chain_old)
res["donated"] = equal(executor.apply_plan(cplan, donated, donate=True, layers_per_group=2), chain_weights(chain_new))
res["donated_deleted"] = donated.is_deleted()
res["verify_off"] = equal(executor.apply_plan(cplan, old_w, verify=False), chain_weights(chain_new))
victim0 = int(np.flatnonzero(cplan.remote & (cplan.layer == 0))[0])
silent = np.asarray(executor.apply_plan(cplan, old_w, verify=False, fault=victim0))
dst, slot = int(cplan.dst_gpu[victim0]), int(cplan.dst_slot[victim0])
goal = np.asarray(chain_weights(chain_new))
res["verify_off_misses_corruption"] = bool((silent[0, dst * 4 + slot] != goal[0, dst * 4 + slot]).any())
tree = {
    "w_in": chain_weights(chain_old, "float32", (2, 3)),
    "w_out": (chain_weights(chain_old, "bfloat16", (3,)), chain_weights(chain_old, "int8", (5,))),
}
moved_tree = executor.apply_plan(cplan, tree, layers_per_group=2)
res["tree"] = (
    set(moved_tree) == {"w_in", "w_out"} and isinstance(moved_tree["w_out"], tuple)
    and equal(moved_tree["w_in"], chain_weights(chain_new, "float32", (2, 3)))
    and equal(moved_tree["w_out"][0], chain_weights(chain_new, "bfloat16", (3,)))
    and equal(moved_tree["w_out"][1], chain_weights(chain_new, "int8", (5,)))
)
pending = executor.begin(cplan, old_w, layers=[1, 2])
busy = (old_w * 2).sum()  # compute dispatched while the copies travel
first = pending.finish()
res["start"] = (
    pending.layers == (1, 2) and pending.done() and equal(first, chain_weights(mixed([1, 2])))
    and pending.finish() is first
)
res["start_tree"] = equal(executor.begin(cplan, [old_w], donate=False).finish()[0], chain_weights(chain_new))
out["per_layer"] = res

# ---- Failures, at each phase; the weights afterwards are exactly the documented ones.
def error_report(err, expect_weights, moved=()):
    if not isinstance(err, eplb.TransferError):
        return {"type": type(err).__name__, "msg": str(err)}
    got = err.weights if not isinstance(err.weights, list) else err.weights[0]
    return {"type": "TransferError", "msg": str(err), "weights": equal(got, expect_weights),
            "committed_layers": list(err.committed_layers) == list(moved), "transfer": err.transfer}

groups3 = [list(g) for g in executor.layer_groups(cplan, old_w, layers_per_group=2)]
late = int(np.flatnonzero(cplan.remote & (cplan.layer == groups3[1][0]))[0])
fails = {}
for donate in (False, True):
    w = chain_weights(chain_old)
    got = attempt(lambda: executor.apply_plan(cplan, w, layers_per_group=2, fault=late, donate=donate))
    expect = chain_weights(mixed(groups3[0])) if donate else chain_weights(chain_old)
    fails[f"checksum_group2_donate={donate}"] = {
        **error_report(got["error"], expect, groups3[0] if donate else ()),
        "victim": late,
        "input_deleted": w.is_deleted(),
        "input_old": (not w.is_deleted()) and equal(w, chain_weights(chain_old)),
    }
    w = chain_weights(chain_old)
    got = attempt(lambda: executor.apply_plan(cplan, w, fault=victim0, donate=donate))
    fails[f"checksum_donate={donate}"] = {**error_report(got["error"], chain_weights(chain_old)), "victim": victim0,
        "input_old": (not w.is_deleted()) and equal(w, chain_weights(chain_old))}

class FailingRead:  # an ok array whose host read raises, as an asynchronous XLA failure does
    def __array__(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: all_to_all timed out")

def stage_failing(how, on_call):
    calls = []
    def make(*key):
        program = real_stage(*key)
        def run(*args):
            calls.append(1)
            if len(calls) != on_call:
                return program(*args)
            if how == "dispatch":
                raise RuntimeError("INTERNAL: transfer program failed")
            received, ok = program(*args)
            return received, FailingRead()
        return run
    return make

real_commit = executor._commit_program
def commit_failing(on_call, consume):
    calls = []
    def make(mesh, axis, donate):
        program = real_commit(mesh, axis, donate)
        def run(leaves, *args):
            calls.append(1)
            if len(calls) != on_call:
                return program(leaves, *args)
            if consume and donate:
                for leaf in leaves:
                    leaf.delete()  # as a program that took the donated buffers and then failed
            raise jax.errors.JaxRuntimeError("INTERNAL: commit failed")
        return run
    return make

phases = (
    ("transfer_dispatch", lambda: stage_failing("dispatch", 2)),
    ("transfer_read", lambda: stage_failing("read", 2)),
    ("commit", lambda: commit_failing(2, False)),
    ("commit_consumed", lambda: commit_failing(2, True)),
)
for phase, patch in phases:
    for donate in (False, True):
        name = "_commit_program" if phase.startswith("commit") else "_stage_program"
        setattr(executor, name, patch())
        w = chain_weights(chain_old)
        got = attempt(lambda: executor.apply_plan(cplan, w, layers_per_group=2, donate=donate))
        setattr(executor, name, real_commit if name == "_commit_program" else real_stage)
        expect = chain_weights(mixed(groups3[0])) if donate else chain_weights(chain_old)
        report = error_report(got["error"], expect, groups3[0] if donate else ())
        report["notes"] = list(getattr(got["error"], "__notes__", []))
        report["input_old"] = (not w.is_deleted()) and equal(w, chain_weights(chain_old))
        fails[f"{phase}_donate={donate}"] = report
# One group, donated, commit failing before it takes the buffers: the very input is intact.
executor._commit_program = commit_failing(1, False)
w = chain_weights(chain_old)
pending = executor.begin(cplan, w, donate=True)
got = attempt(pending.finish)
executor._commit_program = real_commit
fails["start_commit_donate"] = {
    **error_report(got["error"], chain_weights(chain_old)),
    "input_old": (not w.is_deleted()) and equal(w, chain_weights(chain_old)),
    "same_error": attempt(pending.finish)["error"] is got["error"],
}
out["failures"] = fails

# ---- Bad per-layer arguments.
out["bad_layers"] = {
    "repeated": outcome(lambda: executor.apply_plan(cplan, old_w, layers=[1, 1])),
    "range": outcome(lambda: executor.apply_plan(cplan, old_w, layers=[0, 4])),
    "negative": outcome(lambda: executor.apply_plan(cplan, old_w, layers=[-1])),
    "float": outcome(lambda: executor.apply_plan(cplan, old_w, layers=[0.0])),
    "scalar": outcome(lambda: executor.apply_plan(cplan, old_w, layers=2)),
    "group": outcome(lambda: executor.apply_plan(cplan, old_w, layers_per_group=0)),
    "cap": outcome(lambda: executor.apply_plan(cplan, old_w, max_staging_bytes=1.5)),
    "cap_below_a_layer": outcome(lambda: executor.apply_plan(cplan, old_w, max_staging_bytes=cap // 4)),
    "donate": outcome(lambda: executor.apply_plan(cplan, old_w, donate="yes")),
    "verify": outcome(lambda: executor.apply_plan(cplan, old_w, verify=None)),
    "fault_elsewhere": outcome(lambda: executor.apply_plan(cplan, old_w, layers=[1], fault=victim0)),
    "leaf_shape": outcome(lambda: executor.apply_plan(cplan, {"a": old_w, "b": np.zeros((4, 8, 2))})),
}

# ---- Reloads (plan_transfers(..., allow_reload=True)): a failed GPU, scale down and up, on a 4-device mesh.
G4, R4, E10 = 4, 16, 10
mesh4 = jax.make_mesh((G4,), ("ep",), devices=jax.devices()[:G4])
slot4 = NamedSharding(mesh4, P(None, "ep"))
SENTINEL = -7  # the bytes of a slot no expert has reached (a failed or new GPU's)

def slot_values(layer, expert):
    # One slot's weights, distinct per (layer, expert) in every dtype: a dict pytree, float32, bfloat16 and int8.
    base = float(layer * 16 + expert)
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 8 + base,
            "v": (np.full(3, base, np.float32) + np.arange(3) / 4).astype(jnp.bfloat16),
            "s": np.full((2,), layer * 16 + expert, np.int8)}

def expert_weights(phy2log, fill=None, sharding=None):
    # [L, R, ...] per leaf; a slot holding -1 holds `fill` (default: the SENTINEL)
    fill = {} if fill is None else fill
    layers, slots = phy2log.shape
    out = {}
    for name in ("w", "v", "s"):
        rows = [[slot_values(l, e)[name] if e >= 0 else fill.get((l, j), np.full_like(slot_values(0, 0)[name],
                 SENTINEL)) for j, e in enumerate(phy2log[l])] for l in range(layers)]
        out[name] = jax.device_put(np.asarray(rows, dtype=slot_values(0, 0)[name].dtype), sharding or slot4)
    return out

def same(a, b):
    return all(equal(a[k], b[k]) for k in ("w", "v", "s"))

def loader(calls, fail=None, result=None):
    def load_expert(layer, expert):
        calls.append((layer, expert))
        if (layer, expert) == fail:
            raise KeyError(f"checkpoint shard of expert {expert} unreadable")
        return slot_values(layer, expert) if result is None else result(layer, expert)
    return load_expert

rng4 = np.random.default_rng(5)
load4 = rng4.integers(1, 100, (3, E10))
full = np.asarray(eplb.rebalance_experts(load4, R4, 1, 1, G4).phy2log)
rel = {}
# (a) GPU 2 fails: its slots are -1 in the placement in force, and the new placement leaves it out.
up = np.array([True, True, False, True])
failed = full.copy()
failed[:, 8:12] = -1
after_failure = np.asarray(eplb.rebalance_experts(load4, R4, 1, 1, G4, active_gpus=up, previous=failed).phy2log)
fplan = eplb.plan_transfers(failed, after_failure, num_gpus=G4, allow_reload=True)
goal = np.where(after_failure >= 0, after_failure, failed)  # slots of the failed GPU: untouched (the SENTINEL)
calls = []
before = expert_weights(failed)
moved = executor.apply_plan(fplan, before, load_expert=loader(calls))
want_calls = [(int(fplan.layer[i]), int(fplan.expert[i])) for i in np.flatnonzero(fplan.reload)]
rel["failure"] = {
    "reloads": fplan.reloads.tolist(), "remote": int(fplan.remote_copies.sum()),
    "lost_only_on_failed": all(fplan.expert[i] not in failed[fplan.layer[i]] for i in np.flatnonzero(fplan.reload)),
    "exact": same(moved, expert_weights(goal)), "old_intact": same(before, expert_weights(failed)),
    "calls": calls == want_calls,
}
# Callback results as JAX arrays; and begin/finish.
as_jax = loader([], result=lambda l, e: jax.tree_util.tree_map(jnp.asarray, slot_values(l, e)))
pending = executor.begin(fplan, before, load_expert=as_jax)
rel["failure_jax_results_begin"] = same(pending.finish(), expert_weights(goal))

# A lost expert copied twice on its new GPU (stage 1 from the reloaded slot), beside a copy between devices.
hand_old = np.array([[0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1, 12, 13, 14, 15]])
hand_new = np.array([[0, 1, 8, 8, 0, 5, 6, 7, -1, -1, -1, -1, 9, 13, 9, 15]])
hplan = eplb.plan_transfers(hand_old, hand_new, num_gpus=G4, allow_reload=True)
rows = [hplan.row(i) for i in range(len(hplan))]
hand_before = expert_weights(hand_old)
rel["second_copy"] = {
    "plan": sorted((r["dst_gpu"], r["dst_slot"], r["src_gpu"], r["src_slot"], r["stage"]) for r in rows),
    "exact": same(executor.apply_plan(hplan, hand_before, load_expert=loader([])), expert_weights(hand_new)),
    "donated": same(executor.apply_plan(hplan, expert_weights(hand_old), load_expert=loader([]), donate=True),
                    expert_weights(hand_new)),
}

# (b) Scale down 4 -> 3 (GPU 3 inactive), then up 3 -> 4 (GPU 3's slots -1 in the placement in force).
three = np.array([True, True, True, False])
down = np.asarray(eplb.rebalance_experts(load4, R4, 1, 1, G4, active_gpus=three, previous=full).phy2log)
dplan = eplb.plan_transfers(full, down, num_gpus=G4, allow_reload=True)
moved_down = executor.apply_plan(dplan, expert_weights(full))
everyone = np.ones(G4, dtype=bool)
back = np.asarray(eplb.rebalance_experts(load4, R4, 1, 1, G4, active_gpus=everyone, previous=down).phy2log)
uplan = eplb.plan_transfers(down, back, num_gpus=G4, allow_reload=True)
moved_up = executor.apply_plan(uplan, expert_weights(down))  # GPU 3 starts with the SENTINEL in every slot
# The same moves across sizes: 3-GPU placements [L, 12]; the plan (and the mesh) spans the 4 GPUs.
down_across = eplb.plan_transfers(full, down[:, :12], num_gpus=3, allow_reload=True)
up_across = eplb.plan_transfers(down[:, :12], back, num_gpus=G4, allow_reload=True)
rel["scale"] = {
    "down_gpu3_empty": bool((down[:, 12:] == -1).all()), "up_gpu3_full": bool((back[:, 12:] >= 0).all()),
    "down_moves": int(dplan.remote_copies.sum()), "up_moves": int(uplan.remote_copies.sum()),
    "up_receives_gpu3": int(uplan.receives[:, 3].sum()),
    "down_exact": same(moved_down, expert_weights(np.where(down >= 0, down, full))),
    "up_exact": same(moved_up, expert_weights(back)),
    "across_sizes_gpus": [down_across.num_gpus, up_across.num_gpus],
    "down_across_exact": same(executor.apply_plan(down_across, expert_weights(full)), expert_weights(
        np.where(down >= 0, down, full))),
    "up_across_exact": same(executor.apply_plan(up_across, expert_weights(down)), expert_weights(back)),
    "reloads": int(dplan.reloads.sum() + uplan.reloads.sum()),
}

# (c) Errors: the callback raises (alone, later group with donation, begin), is missing, or returns a bad slot.
lost = want_calls[-1]
last_reload = int(np.flatnonzero(fplan.reload)[-1])
got = attempt(lambda: executor.apply_plan(fplan, before, load_expert=loader([], fail=lost)))
err = got["error"]
rel["callback_raises"] = {
    "type": type(err).__name__, "msg": str(err), "transfer": getattr(err, "transfer", None), "row": last_reload,
    "rank": getattr(err, "rank", None), "dst": int(fplan.dst_gpu[last_reload]),
    "weights": same(err.weights, expert_weights(failed)), "old_intact": same(before, expert_weights(failed)),
    "cause": type(err.__cause__).__name__,
}
donated = expert_weights(failed)
calls = []
got = attempt(lambda: executor.apply_plan(fplan, donated, load_expert=loader(calls, fail=lost), layers_per_group=2,
                                          donate=True))
err = got["error"]
committed = [0, 1]  # groups [0, 1] and [2]; the callback fails in layer 2
partial = failed.copy()
partial[committed] = goal[committed]
rel["callback_raises_later_group_donated"] = {
    "type": type(err).__name__, "lost_in_layer": lost[0], "committed": list(err.committed_layers),
    "weights": same(err.weights, expert_weights(partial)), "calls": calls == want_calls,
    "input_deleted": donated["w"].is_deleted(),
}
donated = expert_weights(failed)
late_bad = loader([], result=lambda l, e: {**slot_values(l, e), "w": np.zeros(3, np.float32)} if l == 2 else
                  slot_values(l, e))
err = attempt(lambda: executor.apply_plan(fplan, donated, load_expert=late_bad, layers_per_group=2,
                                          donate=True))["error"]
rel["bad_result_later_group_donated"] = {
    "type": type(err).__name__, "msg": str(err), "committed": list(getattr(err, "committed_layers", [])),
    "weights": hasattr(err, "weights") and same(err.weights, expert_weights(partial)),
    "notes": list(getattr(err, "__notes__", [])),
}
got = attempt(lambda: executor.begin(fplan, before, load_expert=loader([], fail=want_calls[0])))
rel["callback_raises_begin"] = {"type": type(got["error"]).__name__,
                                "weights": same(got["error"].weights, expert_weights(failed))}
partly = failed.copy()
partly[1] = full[1]  # GPU 2 failed after layer 1 was moved off it: nothing lost in layer 1
pplan = eplb.plan_transfers(partly, after_failure, num_gpus=G4, allow_reload=True)
def bad_shape(l, e):
    return {**slot_values(l, e), "w": np.zeros((3, 2), np.float32)}
def bad_dtype(l, e):
    return {**slot_values(l, e), "s": np.zeros((2,), np.int32)}
def bad_structure(l, e):
    return {"w": slot_values(l, e)["w"], "v": slot_values(l, e)["v"]}
def bad_leaf(l, e):
    return {**slot_values(l, e), "s": "int8[2]"}
rel["bad"] = {
    "missing": outcome(lambda: executor.apply_plan(fplan, before)),
    "missing_begin": outcome(lambda: executor.begin(fplan, before)),
    "not_callable": outcome(lambda: executor.apply_plan(fplan, before, load_expert="ckpt.safetensors")),
    "shape": outcome(lambda: executor.apply_plan(fplan, before, load_expert=loader([], result=bad_shape))),
    "dtype": outcome(lambda: executor.apply_plan(fplan, before, load_expert=loader([], result=bad_dtype))),
    "structure": outcome(lambda: executor.apply_plan(fplan, before, load_expert=loader([], result=bad_structure))),
    "leaf": outcome(lambda: executor.apply_plan(fplan, before, load_expert=loader([], result=bad_leaf))),
    "plan_arrays": outcome(lambda: executor.plan_arrays(fplan)),
    "intact": same(before, expert_weights(failed)),
}
layer1 = np.where(after_failure >= 0, after_failure, partly)
rel["no_reload_layers_need_no_callback"] = {
    "reloads": pplan.reloads.tolist(),
    "ok": same(executor.apply_plan(pplan, expert_weights(partly), layers=[1]),
               expert_weights(np.concatenate([partly[:1], layer1[1:2], partly[2:]]))),
}
rel["layer_groups"] = [list(g) for g in executor.layer_groups(fplan, before, layers_per_group=2)]
out["reload"] = rel

# ---- ranks=: GPU 1 of 4 fails and the survivors' mesh axis has 3 devices (the survivors' slots only).
mesh3 = jax.make_mesh((3,), ("ep",), devices=jax.devices()[:3])
slot3 = NamedSharding(mesh3, P(None, "ep"))
alive = np.array([True, False, True, True])
lost1 = full.copy()
lost1[:, 4:8] = -1
after1 = np.asarray(eplb.rebalance_experts(load4, R4, 1, 1, G4, active_gpus=alive, previous=lost1).phy2log)
splan = eplb.plan_transfers(lost1, after1, num_gpus=G4, allow_reload=True)

def on_survivors(phy2log, order=(0, 2, 3)):  # the slots of plan GPUs `order`, device k holding GPU order[k]
    return np.concatenate([phy2log[:, 4 * g : 4 * g + 4] for g in order], axis=1)

calls = []
survivors = expert_weights(on_survivors(lost1), sharding=slot3)
moved = executor.apply_plan(splan, survivors, mesh3, "ep", ranks=[0, -1, 1, 2], load_expert=loader(calls))
# Device k holds GPU 2 (k=0), 3, 0: mesh and axis from the weights' sharding; begin/finish; numpy ranks.
turned = expert_weights(on_survivors(lost1, (2, 3, 0)), sharding=slot3)
pending = executor.begin(splan, turned, ranks=np.array([2, -1, 0, 1]), load_expert=loader([]))
grouped = executor.apply_plan(splan, expert_weights(on_survivors(lost1), sharding=slot3), ranks=[0, -1, 1, 2],
                              load_expert=loader([]), layers_per_group=1, donate=True)
victim1 = int(np.flatnonzero(splan.remote & (splan.dst_gpu == 3))[0])
err = attempt(lambda: executor.apply_plan(splan, survivors, ranks=[0, -1, 1, 2], load_expert=loader([]),
                                          fault=victim1))["error"]
# GPU 1 was still alive in layer 2 (it sends from there): moving layers 0 and 1 alone needs no device for it.
# (layer 2: the re-plan of layer 0 takes every expert it needs from the survivors, so GPU 1 sends nothing there)
lost0 = lost1.copy()
lost0[2] = full[2]
zplan = eplb.plan_transfers(lost0, after1, num_gpus=G4, allow_reload=True)
layer0_row = int(np.flatnonzero((zplan.layer == 2) & (zplan.src_gpu == 1))[0])
kept = on_survivors(np.concatenate([after1[:2], lost0[2:]]))
good = [0, -1, 1, 2]
def ranked(r, plan=splan, weights=survivors, **kw):
    return lambda: executor.apply_plan(plan, weights, mesh3, "ep", ranks=r, load_expert=loader([]), **kw)
out["ranks"] = {
    "gpu1_lost": bool((after1[:, 4:8] == -1).all() and (on_survivors(after1) >= 0).all()),
    "reloads": int(splan.reloads.sum()), "remote": int(splan.remote_copies.sum()),
    "exact": same(moved, expert_weights(on_survivors(after1), sharding=slot3)),
    "old_intact": same(survivors, expert_weights(on_survivors(lost1), sharding=slot3)),
    "calls": calls == [(int(splan.layer[i]), int(splan.expert[i])) for i in np.flatnonzero(splan.reload)],
    "sharding": moved["w"].sharding.is_equivalent_to(slot3, 4),
    "permuted": same(pending.finish(), expert_weights(on_survivors(after1, (2, 3, 0)), sharding=slot3)),
    "groups_donated": same(grouped, expert_weights(on_survivors(after1), sharding=slot3)),
    "layer_groups": [list(g) for g in executor.layer_groups(splan, survivors, layers_per_group=2, ranks=good)],
    "fault": {"type": type(err).__name__, "transfer": err.transfer, "victim": victim1, "rank": err.rank,
              "src_gpu": err.src_gpu, "dst_gpu": err.dst_gpu, "plan_src": int(splan.src_gpu[victim1]),
              "weights": same(err.weights, expert_weights(on_survivors(lost1), sharding=slot3))},
    "other_layers": same(executor.apply_plan(zplan, expert_weights(on_survivors(lost0), sharding=slot3),
                                             ranks=good, layers=[0, 1], load_expert=loader([])),
                         expert_weights(kept, sharding=slot3)),
    "bad": {
        "none": outcome(ranked(None)),
        "short": outcome(ranked([0, -1, 1])),
        "repeated": outcome(ranked([0, -1, 1, 1])),
        "out_of_range": outcome(ranked([0, -1, 1, 3])),
        "below": outcome(ranked([0, -2, 1, 2])),
        "dead_row": outcome(ranked([0, 1, 2, -1])),
        "dead_other_layer": outcome(ranked(good, plan=zplan)),
        "float": outcome(ranked([0, -1, 1.0, 2])),
        "bool": outcome(ranked([0, -1, True, 2])),
        "string": outcome(ranked("0-112")),
        "begin": outcome(lambda: executor.begin(splan, survivors, ranks=[0, 1, 2, -1], load_expert=loader([]))),
        "layer_groups": outcome(lambda: executor.layer_groups(splan, survivors, ranks=[0, -1, 2, 3])),
        "shape": outcome(lambda: executor.apply_plan(splan, np.zeros((3, 16, 2)), mesh3, "ep", ranks=good,
                                                     load_expert=loader([]))),
    },
    "layer0_row": zplan.row(layer0_row),
}

# ---- The memoised host work (the same plan objects again): every call moves its own plan's bytes.
w32 = weights(old, "float32")
cache = {"repeat": all(equal(executor.apply_plan(plan, w32), weights(new, "float32")) for _ in range(2))}
cache["other"] = equal(executor.apply_plan(second_plan, w32), weights(other, "float32"))
err = attempt(lambda: executor.apply_plan(plan, w32, fault=victim))["error"]
cache["fault"] = isinstance(err, eplb.TransferError) and err.transfer == victim and equal(w32, weights(old, "float32"))
cache["after_fault"] = equal(executor.apply_plan(plan, w32), weights(new, "float32"))
cache["verify_off"] = equal(executor.apply_plan(plan, w32, verify=False), weights(new, "float32"))
cache["new_values"] = equal(executor.apply_plan(plan, w32 * 2), np.asarray(weights(new, "float32")) * 2)
cache["donated"] = all(
    equal(executor.apply_plan(p, weights(old, "float32"), donate=True), weights(goal, "float32"))
    for p, goal in ((plan, new), (second_plan, other), (plan, new), (second_plan, other))
)
cache["groups"] = all(
    equal(executor.apply_plan(cplan, chain_weights(chain_old), layers_per_group=1, donate=d), chain_weights(chain_new))
    for d in (False, True, False, True)
)
stage, commit = executor._stage_program(mesh, "ep", True, False), executor._commit_program(mesh, "ep", False)
compiled = (stage._cache_size(), commit._cache_size())
for _ in range(3):
    executor.apply_plan(plan, w32), executor.apply_plan(second_plan, w32)
cache["no_retrace"] = compiled == (stage._cache_size(), commit._cache_size()) and compiled[0] > 0
out["cache"] = cache
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices_and_a_real_plan(report):
    assert report["devices"] == 8
    assert report["moved"] > 0 and report["second"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_every_device_holds_the_new_weights(report, dtype):
    assert report[dtype] == {"new": True, "old_intact": True, "sharding": True}


def test_inside_jit_one_program_for_two_plans(report):
    assert report["jit"]["ok"] == [True, True]
    assert report["jit"]["compiles"] == 1


def test_corrupted_copy_is_named_and_old_weights_kept(report):
    fault = report["fault"]
    assert fault["raised"] and fault["intact"]
    assert fault["transfer"] == fault["victim"] and fault["rank"] == fault["dst"]
    assert f"transfer {fault['victim']} (layer" in fault["msg"] and "checksum" in fault["msg"]


def test_failed_collective_keeps_old_weights(report):
    failure = report["collective"]
    assert failure["raised"] and failure["intact"]
    assert "peer unreachable" in failure["msg"] and "old weights kept" in failure["msg"]
    failure = report["runtime"]
    assert failure["raised"] and failure["intact"] and "NCCL operation failed" in failure["msg"]


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("plan", "TypeError", "plan must be an eplb.TransferPlan"),
        ("weights", "TypeError", "weights must be a jax.Array"),
        ("world", "ValueError", "the plan is for 4 GPUs but mesh axis 'ep' has 8 devices"),
        ("fault", "TypeError", "fault must be an int or None"),
        ("capacity", "ValueError", "capacity=0 must be positive"),
    ],
)
def test_bad_arguments_are_not_transfer_errors(report, case, error, match):
    result = report["bad_arguments"][case]
    assert result["raised"] == error and match in result["msg"], result


def test_repeated_calls_reuse_nothing_stale(report):
    """The same plans again (memoised host work): after a fault, with new values, donated, in groups; no retrace."""
    assert report["cache"] == dict.fromkeys(report["cache"], True) and len(report["cache"]) == 9


def test_bug_while_tracing_is_not_a_transfer_error(report):
    """An IndexError in eplb's own code (injected into the checksum helper) reaches the caller as it is."""
    assert report["bug"] == {"raised": "IndexError", "msg": "injected bug", "intact": True}


# ---------------------------------------------------------------------------------------------------------------
# plan_arrays against the per-row loop it replaced (in this process: plan_arrays is numpy only).


def _placement(rng, layers, experts, slots):
    import numpy as np

    every = np.arange(experts)
    return np.stack([rng.permutation(np.r_[every, rng.integers(0, experts, slots - experts)]) for _ in range(layers)])


def _random_plans():
    import numpy as np

    import eplb

    rng = np.random.default_rng(7)
    plans = []
    for layers, gpus, per_gpu, experts, nodes in [
        (1, 1, 1, 1, 1),  # one slot in all: an empty plan
        (3, 4, 1, 4, 2),  # one slot per GPU
        (1, 8, 4, 20, 2),  # one layer
        (5, 8, 4, 20, 2),
        (4, 2, 16, 9, 1),
        (6, 16, 3, 30, 4),
    ]:
        slots = gpus * per_gpu
        for _ in range(3):
            old, new = (_placement(rng, layers, experts, slots) for _ in range(2))
            plans.append(eplb.plan_transfers(old, new, num_gpus=gpus, num_nodes=nodes))
            plans.append(eplb.plan_transfers(old, old, num_gpus=gpus, num_nodes=nodes))  # empty
    return plans


def test_plan_arrays_matches_the_loop_on_random_and_degenerate_plans():
    import numpy as np

    from eplb.executors.jax import plan_arrays

    plans = _random_plans()
    assert any(len(p) == 0 for p in plans) and any(p.num_layers == 1 and len(p) for p in plans)
    assert any(p.slots_per_gpu == 1 and len(p) for p in plans) and any((p.stage == 1).any() for p in plans)
    for plan in plans:
        for capacity in (None, 9):
            got, want = plan_arrays(plan, capacity), oracle.plan_arrays_reference(plan, capacity)
            for name, a, b in zip(got._fields, got, want, strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape, name
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_plan_arrays_matches_the_loop_on_hand_made_plans():
    """Rows plan_transfers never writes (rows out of order, many copies per pair, stage 1 from a local copy)."""
    import numpy as np

    from eplb.executors.jax import plan_arrays
    from eplb.migration import TransferPlan

    rng = np.random.default_rng(3)
    for _ in range(20):
        layers, gpus, per_gpu = rng.integers(1, 4), rng.integers(1, 5), rng.integers(1, 6)
        slots = layers * gpus * per_gpu
        count = rng.integers(0, slots + 1)
        dst_flat = rng.choice(slots, size=count, replace=False)  # every destination slot at most once
        layer, rest = np.divmod(dst_flat, gpus * per_gpu)
        dst, dst_slot = np.divmod(rest, per_gpu)
        stage = rng.integers(0, 2, count)
        src = np.where(stage == 1, dst, rng.integers(0, gpus, count))
        columns = [layer, rng.integers(0, 9, count), src, rng.integers(0, per_gpu, count), dst, dst_slot, stage]
        plan = TransferPlan(*[np.asarray(c, dtype=np.int64) for c in columns], int(layers), int(gpus), 1, int(per_gpu))
        got, want = plan_arrays(plan), oracle.plan_arrays_reference(plan)
        for name, a, b in zip(got._fields, got, want, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_report_chained_plan(report):
    """The hand-made layer really chains: swaps across and within devices, a 3-cycle, a second copy."""
    assert report["chain_plan"] == {"cross_swap": True, "local_swap": True, "cycle": True, "second": True}


@pytest.mark.parametrize(
    "case",
    [
        "all",
        "partial",
        "partial_numpy_layers",
        "no_layers",
        "grouped",
        "grouped_partial",
        "old_intact",
        "donated",
        "donated_deleted",
        "verify_off",
        "verify_off_misses_corruption",
        "tree",
        "start",
        "start_tree",
    ],
)
def test_per_layer_forms_move_exactly_the_layers_asked(report, case):
    assert report["per_layer"][case] is True


def test_groups_stay_under_the_memory_cap(report):
    per_layer = report["per_layer"]
    groups, cap = per_layer["groups"], per_layer["cap"]
    assert len(groups) > 1 and [layer for group in groups for layer in group] == [0, 1, 2, 3]
    assert groups[0] == [0, 1]  # the cap is exactly the estimate of layers 0 and 1
    for group, size in zip(groups, per_layer["group_bytes"], strict=True):
        assert size <= cap or len(group) == 1
    # Greedy: each group took every following layer that fitted.
    assert all(size > cap for size in per_layer["grown_bytes"])
    assert per_layer["groups_per_layer"] == [[0], [1], [2], [3]]
    assert per_layer["groups_big_cap"] == [[0, 1, 2, 3]]


@pytest.mark.parametrize("donate", [False, True])
def test_checksum_failure_in_a_later_group(report, donate):
    """Without donation nothing changes; with it the first group stays moved, and the error says so."""
    fail = report["failures"][f"checksum_group2_donate={donate}"]
    assert fail["type"] == "TransferError" and fail["transfer"] == fail["victim"]
    assert fail["weights"] and fail["committed_layers"], fail
    assert "layer group 2 of 2" in fail["msg"] and "checksum" in fail["msg"]
    assert fail["input_deleted"] == donate and fail["input_old"] == (not donate)


@pytest.mark.parametrize("donate", [False, True])
def test_checksum_failure_in_one_group_keeps_the_input(report, donate):
    fail = report["failures"][f"checksum_donate={donate}"]
    assert fail["type"] == "TransferError" and fail["transfer"] == fail["victim"]
    assert fail["weights"] and fail["committed_layers"] and fail["input_old"], fail


@pytest.mark.parametrize("phase", ["transfer_dispatch", "transfer_read", "commit"])
@pytest.mark.parametrize("donate", [False, True])
def test_program_failure_in_a_later_group(report, phase, donate):
    fail = report["failures"][f"{phase}_donate={donate}"]
    assert fail["type"] == "TransferError" and fail["weights"] and fail["committed_layers"], fail
    assert "layer group 2 of 2" in fail["msg"] and "old weights kept" in fail["msg"]
    assert ("commit program" in fail["msg"]) == (phase == "commit")
    assert fail["input_old"] == (not donate)  # with donation, group 1 took the input's buffers


def test_commit_that_consumed_its_own_copy_is_a_transfer_error(report):
    """Without donation, later groups donate eplb's own copy: losing it still leaves the input intact."""
    fail = report["failures"]["commit_consumed_donate=False"]
    assert fail["type"] == "TransferError" and fail["weights"] and fail["input_old"], fail


def test_commit_that_consumed_donated_weights_is_not_a_transfer_error(report):
    """The weights are gone: not a TransferError (which promises old weights), and a note says so."""
    fail = report["failures"]["commit_consumed_donate=True"]
    assert fail["type"] == "JaxRuntimeError" and "commit failed" in fail["msg"], fail
    assert any("lost" in note for note in fail["notes"]) and not fail["input_old"]


def test_failed_commit_of_a_donated_start_keeps_the_input(report):
    fail = report["failures"]["start_commit_donate"]
    assert fail["type"] == "TransferError" and fail["weights"] and fail["committed_layers"], fail
    assert fail["input_old"] and fail["same_error"]


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("repeated", "ValueError", "layers=[1, 1] holds layer 1 more than once"),
        ("range", "ValueError", "layers=[0, 4] holds 4, outside the plan's layers 0..3"),
        ("negative", "ValueError", "layers=[-1] holds -1"),
        ("float", "TypeError", "layers must hold ints"),
        ("scalar", "TypeError", "layers must be an iterable"),
        ("group", "ValueError", "layers_per_group=0 must be positive"),
        ("cap", "TypeError", "max_staging_bytes must be an int or None"),
        ("cap_below_a_layer", "ValueError", "is below layer 0's staging estimate"),
        ("donate", "TypeError", "donate must be True or False"),
        ("verify", "TypeError", "verify must be True or False"),
        ("fault_elsewhere", "ValueError", "is not a copy between devices in the layers moved"),
        ("leaf_shape", "ValueError", "weights['b'] must have shape [layers, slots, ...] = [4, 32]"),
    ],
)
def test_bad_per_layer_arguments(report, case, error, match):
    result = report["bad_layers"][case]
    assert result["raised"] == error and match in result["msg"], result


def test_padded_sizes_add_at_most_an_eighth():
    """Buffer rows are rounded up (few sizes to compile for), by at most 1/8 (little padding to move)."""
    from eplb.executors.jax import _round_up

    sizes = [_round_up(n) for n in range(2049)]
    assert sizes[:17] == list(range(17)) and _round_up(53) == 56 and _round_up(1025) == 1152
    assert all(n <= size <= n + n / 8 for n, size in enumerate(sizes))
    assert len(set(sizes[1025:])) == 8  # eight sizes per doubling


# ---------------------------------------------------------------------------------------------------------------
# Reload rows (load_expert): a failed GPU, scale down and up, and the errors.


def test_failed_gpu_reloads_lost_experts_exactly(report):
    """GPU 2 of 4 fails: the lost experts come from load_expert, once per reload row in plan order, and every
    slot ends up holding exactly its new expert's weights (the failed GPU's slots keep their bytes)."""
    failure = report["reload"]["failure"]
    assert sum(failure["reloads"]) > 0 and failure["remote"] > 0 and failure["lost_only_on_failed"], failure
    assert failure["exact"] and failure["old_intact"] and failure["calls"], failure
    assert report["reload"]["failure_jax_results_begin"] is True


def test_second_copy_of_a_reloaded_expert(report):
    """A lost expert placed twice on one GPU: one reload row, then a stage-1 copy of the reloaded slot."""
    second = report["reload"]["second_copy"]
    # (dst_gpu, dst_slot, src_gpu, src_slot, stage)
    assert second["plan"] == [[0, 2, -1, -1, 0], [0, 3, 0, 2, 1], [1, 0, 0, 0, 0], [3, 0, -1, -1, 0], [3, 2, 3, 0, 1]]
    assert second["exact"] and second["donated"], second


def test_scale_down_and_up_move_exact_weights(report):
    scale = report["reload"]["scale"]
    assert scale["down_gpu3_empty"] and scale["up_gpu3_full"] and scale["reloads"] == 0, scale
    assert scale["down_moves"] > 0 and scale["up_moves"] > 0 and scale["up_receives_gpu3"] > 0, scale
    assert scale["down_exact"] and scale["up_exact"], scale
    # plan_transfers across sizes (old and new of 4 and 3 GPUs): the plan spans 4 GPUs, the same moves.
    assert scale["across_sizes_gpus"] == [4, 4] and scale["down_across_exact"] and scale["up_across_exact"], scale


def test_failing_callback_is_a_transfer_error_and_keeps_the_weights(report):
    raised = report["reload"]["callback_raises"]
    assert raised["type"] == "TransferError" and raised["cause"] == "KeyError", raised
    assert raised["transfer"] == raised["row"] and raised["rank"] == raised["dst"], raised
    assert "load_expert(2, 0) raised KeyError" in raised["msg"] and "old weights kept" in raised["msg"]
    assert raised["weights"] and raised["old_intact"], raised
    assert report["reload"]["callback_raises_begin"] == {"type": "TransferError", "weights": True}


def test_failing_callback_in_a_later_donated_group(report):
    """With donation, the groups before the failing reload stay committed, as for any transfer failure."""
    raised = report["reload"]["callback_raises_later_group_donated"]
    assert raised["type"] == "TransferError" and raised["lost_in_layer"] == 2, raised
    assert raised["committed"] == [0, 1] and raised["weights"] and raised["calls"] and raised["input_deleted"]


def test_bad_result_in_a_later_donated_group_hands_back_the_weights(report):
    """A malformed result stays a ValueError; the donated input is gone, so the error carries the weights."""
    raised = report["reload"]["bad_result_later_group_donated"]
    assert raised["type"] == "ValueError" and "load_expert(2, " in raised["msg"], raised
    assert raised["committed"] == [0, 1] and raised["weights"], raised
    assert any("layers [0, 1] are committed" in note for note in raised["notes"]), raised


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("missing", "ValueError", "plan has 5 reload rows in the layers moved"),
        ("missing_begin", "ValueError", "pass load_expert=(layer, expert)"),
        ("not_callable", "TypeError", "load_expert must be callable or None, got str"),
        ("shape", "ValueError", "load_expert(0, 2)['w'] must have the shape [2, 3] and dtype float32"),
        ("dtype", "ValueError", "load_expert(0, 2)['s'] must have the shape [2] and dtype int8 of one slot"),
        ("structure", "ValueError", "load_expert(0, 2) must return one slot of weights, with its structure"),
        ("leaf", "TypeError", "load_expert(0, 2)['s'] must be a numpy or JAX array"),
        ("plan_arrays", "ValueError", "plan has reload rows"),
    ],
)
def test_bad_load_expert(report, case, error, match):
    result = report["reload"]["bad"][case]
    assert result["raised"] == error and match in result["msg"], result
    assert report["reload"]["bad"]["intact"] is True


def test_layers_without_reloads_need_no_callback(report):
    layers = report["reload"]["no_reload_layers_need_no_callback"]
    assert layers["reloads"][1] == 0 and sum(layers["reloads"]) > 0 and layers["ok"], layers
    assert report["reload"]["layer_groups"] == [[0, 1], [2]]


# ---------------------------------------------------------------------------------------------------------------
# ranks=: the plan over 4 GPUs, the mesh axis over the 3 survivors.


def test_ranks_move_a_failed_gpus_plan_on_the_survivors_mesh(report):
    """GPU 1 of 4 fails: the survivors' weights ``[L, 3 * S, ...]`` on a 3-device mesh end exactly as the new
    placement's on GPUs 0, 2, 3, with the lost experts read from load_expert (plan order)."""
    ranks = report["ranks"]
    assert ranks["gpu1_lost"] and ranks["reloads"] > 0 and ranks["remote"] > 0, ranks
    assert ranks["exact"] and ranks["old_intact"] and ranks["calls"] and ranks["sharding"], ranks


def test_ranks_in_any_order_with_begin_groups_and_donation(report):
    ranks = report["ranks"]
    assert ranks["permuted"] and ranks["groups_donated"], ranks
    assert ranks["layer_groups"] == [[0, 1], [2]]


def test_ranks_checksum_failure_names_plan_gpus_and_the_mesh_position(report):
    fault = report["ranks"]["fault"]
    assert fault["type"] == "TransferError" and fault["transfer"] == fault["victim"], fault
    assert fault["dst_gpu"] == 3 and fault["rank"] == 2 and fault["src_gpu"] == fault["plan_src"], fault
    assert fault["weights"], fault


def test_ranks_only_the_moved_layers_must_avoid_a_gpu_without_a_device(report):
    ranks = report["ranks"]
    assert ranks["layer0_row"]["src_gpu"] == 1 and ranks["other_layers"], ranks


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("none", "ValueError", "the plan is for 4 GPUs but mesh axis 'ep' has 3 devices (pass ranks="),
        ("short", "ValueError", "ranks must have one entry per GPU of the plan (4), got 3"),
        ("repeated", "ValueError", "ranks must name every device of mesh axis 'ep' (0 .. 2) once"),
        ("out_of_range", "ValueError", "ranks must name every device of mesh axis 'ep' (0 .. 2) once"),
        ("below", "ValueError", "ranks must name every device"),
        ("dead_row", "ValueError", "ranks: plan row "),
        ("dead_other_layer", "ValueError", "'src_gpu': 1"),
        ("float", "TypeError", "ranks must hold ints"),
        ("bool", "TypeError", "ranks must hold ints"),
        ("string", "TypeError", "ranks must be a sequence of ints"),
        ("begin", "ValueError", "reads or writes a GPU without a device (rank -1)"),
        ("layer_groups", "ValueError", "ranks must name every device of the mesh axis (0 .. 2) once"),
        ("shape", "ValueError", "must have shape [layers, slots, ...] = [3, 12]"),
    ],
)
def test_bad_ranks(report, case, error, match):
    result = report["ranks"]["bad"][case]
    assert result["raised"] == error and match in result["msg"], result
