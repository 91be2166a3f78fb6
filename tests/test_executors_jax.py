"""The JAX executor on 8 CPU devices (``--xla_force_host_platform_device_count=8``).

The device count must be set before JAX starts, so every scenario runs in
one subprocess and reports back as JSON; this test process keeps its own
JAX untouched. Scenarios: a migration in three dtypes (every device then
holds exactly the new placement's weights), the program inside a user's
``jax.jit`` with a plan that reuses the compiled program, a copy corrupted in
flight (caught by its checksum, named in the error, old weights intact),
programming errors (bad arguments, a bug injected into an internal helper:
raised as they are, not as ``TransferError``), and a failing collective.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    "weights": outcome(lambda: executor.apply_plan(plan, [before])),
    "world": outcome(lambda: executor.apply_plan(four, before)),
    "fault": outcome(lambda: executor.apply_plan(plan, before, fault=1.5)),
    "capacity": outcome(lambda: executor.apply_plan(plan, before, capacity=0)),
}

real_checksum = executor._checksum
def buggy_checksum(x):
    raise IndexError("injected bug")

executor._checksum = buggy_checksum
executor._cached_transfer.cache_clear()  # trace again, through the bug
out["bug"] = {**outcome(lambda: executor.apply_plan(plan, before)), "intact": equal(before, weights(old, "float32"))}
executor._checksum = real_checksum
executor._cached_transfer.cache_clear()

# A collective that fails outright (as XLA reports it, and as a plain RuntimeError).
def broken(error):
    def make(mesh, axis):
        def run(*args):
            raise error
        return run
    return make

for name, error in (("collective", RuntimeError("INTERNAL: peer unreachable")),
                    ("runtime", jax.errors.JaxRuntimeError("INTERNAL: NCCL operation failed"))):
    executor._cached_transfer = broken(error)
    try:
        executor.apply_plan(plan, before)
        out[name] = {"raised": False}
    except eplb.TransferError as err:
        out[name] = {"raised": True, "msg": str(err), "intact": equal(before, weights(old, "float32"))}
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


def test_bug_while_tracing_is_not_a_transfer_error(report):
    """An IndexError in eplb's own code (injected into the checksum helper) reaches the caller as it is."""
    assert report["bug"] == {"raised": "IndexError", "msg": "injected bug", "intact": True}
