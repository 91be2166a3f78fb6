"""The JAX executor on 8 CPU devices (``--xla_force_host_platform_device_count=8``).

The device count must be set before JAX starts, so every scenario runs in
one subprocess and reports back as JSON; this test process keeps its own
JAX untouched. Scenarios: a migration in three dtypes (every device then
holds exactly the new placement's weights), the program inside a user's
``jax.jit`` with a plan that reuses the compiled program, a copy corrupted in
flight (caught by its checksum, named in the error, old weights intact), and
a failing collective.
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
plan = eplb.plan_transfers(old, new, G, 2)
mesh = jax.make_mesh((G,), ("ep",))
by_slot = NamedSharding(mesh, P(None, "ep"))

def weights(phy2log, dtype):
    base = (np.arange(L)[:, None] * 100 + phy2log).astype(np.float32) % 120
    return jax.device_put(jnp.asarray(base[:, :, None, None] + np.arange(6).reshape(2, 3) / 8, dtype=dtype), by_slot)

def equal(a, b):
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))

out = {"devices": len(jax.devices()), "moved": int(plan.moved.sum()), "second": int((plan.stage == 1).sum())}
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
second_plan = eplb.plan_transfers(old, other, G, 2)
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

# A collective that fails outright.
def broken(mesh, axis):
    def run(*args):
        raise RuntimeError("INTERNAL: peer unreachable")
    return run

executor._cached_transfer = broken
try:
    executor.apply_plan(plan, before)
    out["collective"] = {"raised": False}
except eplb.TransferError as err:
    out["collective"] = {"raised": True, "msg": str(err), "intact": equal(before, weights(old, "float32"))}
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
