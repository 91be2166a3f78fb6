"""A JAX MoE training loop on a device mesh, its experts sharded over the devices, kept balanced by eplb.

Run: ``python examples/jax_moe_rebalance.py [--devices 4] [--steps 60] [--every 20]``

On a CPU the devices are simulated: ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before JAX
starts, so the script runs itself again, in a subprocess, with the flag set when it is missing.

Pure JAX (no Flax, to keep the install small; the same state would sit in a Flax ``TrainState``). Each MoE layer
keeps its experts in ``R`` physical slots; the slot axis of the expert weights (``w_in [L, R, d, f]``, ``w_out [L, R,
f, d]``) is sharded over the mesh axis ``"ep"``, so device ``g`` holds slots ``g * R/G .. (g+1) * R/G - 1`` of every
layer, and each device trains on its own share of the batch. The loop:

1. one jitted ``train_step`` runs the forward pass, recording the router's picks in an ``eplb.LoadTracker`` (a
   pytree in the train state), sums the gradients of the replicas of an expert so that replicas stay copies (what
   the all-reduce among replicas does in expert parallelism) and applies SGD;
2. every ``--window`` steps the tracker's load (the last window, a global array: the same on every process of a
   multi-host job) goes to ``eplb.Rebalancer.record``;
3. every ``--every`` steps ``Rebalancer.step()`` decides which layers change, and
   ``eplb.executors.jax.apply_plan`` carries out the decision's ``TransferPlan``: one ``all_to_all`` over ``"ep"``
   moves only the experts a device lacks, checksummed, and returns new arrays (the old ones stay valid until then).
   An optimizer's per-slot state (Adam moments) would move by the same call.

``main`` prints the loss and, at each decision, the token imbalance (max/mean tokens per GPU) on a fixed batch before
and after, and the largest change of the model's output that moving the weights caused (0: replicas are copies); it
also checks that every device's slots hold exactly the weights of the experts its placement says.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="devices of the expert-parallel mesh axis")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20, help="decide every N steps (a multiple of --window)")
    parser.add_argument("--window", type=int, default=5, help="steps per load window recorded")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=24, help="physical slots per layer")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per device and step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--report", help="write the report to this JSON file")
    return parser


if __name__ == "__main__" and DEVICE_COUNT not in os.environ.get("XLA_FLAGS", ""):
    # JAX reads the device count once, when it starts: run this script again with the flag set.
    devices = parser().parse_args().devices
    flags = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT}={devices}".strip()
    sys.exit(subprocess.run([sys.executable, *sys.argv], env={**os.environ, "XLA_FLAGS": flags}).returncode)

import json  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import eplb  # noqa: E402
import eplb.executors.jax  # noqa: E402

D_MODEL, D_FF, TOP_K = 32, 64, 2
EXPERT_WEIGHTS = ("w_in", "w_out")


class State(NamedTuple):
    params: dict[str, jax.Array]  # router [L, d, E], bias [L, E], w_in [L, R, d, f], w_out [L, R, f, d], readout
    placement: eplb.Placement  # phy2log [L, R], log2phy [L, E, R-E+1], logcnt [L, E], int32
    tracker: eplb.LoadTracker


def shardings(mesh: Mesh, params: dict[str, Any]) -> dict[str, NamedSharding]:
    """Expert weights sharded over ``"ep"`` along the slot axis; everything else replicated."""
    by_slot, everywhere = NamedSharding(mesh, PartitionSpec(None, "ep")), NamedSharding(mesh, PartitionSpec())
    return {name: by_slot if name in EXPERT_WEIGHTS else everywhere for name in params}


def init(args: argparse.Namespace, mesh: Mesh, key: jax.Array) -> State:
    k_router, k_bias, k_in, k_out, k_readout = jax.random.split(key, 5)
    shape = (args.layers, args.experts)
    # Start from eplb's placement of a uniform load: no expert is favoured yet.
    placement = eplb.rebalance_experts(jnp.ones(shape), args.replicas, args.groups, args.nodes, args.devices)
    logical_in = jax.random.normal(k_in, (*shape, D_MODEL, D_FF)) / D_MODEL**0.5
    logical_out = jax.random.normal(k_out, (*shape, D_FF, D_MODEL)) / D_FF**0.5
    params = {
        "router": jax.random.normal(k_router, (args.layers, D_MODEL, args.experts)) / D_MODEL**0.5,
        "bias": 0.5 * jnp.exp(jax.random.normal(k_bias, shape)),  # popular experts, as in a trained router
        "w_in": _take_slots(logical_in, placement.phy2log),
        "w_out": _take_slots(logical_out, placement.phy2log),
        "readout": jax.random.normal(k_readout, (D_MODEL, D_MODEL)) / D_MODEL**0.5,
    }
    everywhere = NamedSharding(mesh, PartitionSpec())
    tracker = eplb.LoadTracker(args.layers, args.experts, args.window, backend="jax")
    return State(
        jax.device_put(params, shardings(mesh, params)),
        jax.device_put(placement, everywhere),
        jax.device_put(tracker, everywhere),
    )


def _take_slots(per_slot: jax.Array, index: jax.Array) -> jax.Array:
    """``out[l, j] = per_slot[l, index[l, j]]`` for ``[L, n, ...]`` arrays."""
    return jax.vmap(lambda a, i: a[i])(per_slot, index)


def forward(params: dict, placement: eplb.Placement, x: jax.Array, tracker: eplb.LoadTracker | None = None) -> Any:
    """``(output [T, d], tracker with this batch recorded, slot serving each pick [L, T, k])``."""
    served = []
    for layer in range(params["router"].shape[0]):
        logits = x @ params["router"][layer] + params["bias"][layer]
        gates, topk_ids = jax.lax.top_k(logits, TOP_K)  # [T, k] logical experts
        if tracker is not None:
            tracker = tracker.record(topk_ids, layer=layer)  # a new tracker: JAX is functional
        # A pick of expert e goes to replica ``token % logcnt[e]`` of e.
        replica = jnp.arange(x.shape[0])[:, None] % placement.logcnt[layer][topk_ids]
        slot = placement.log2phy[layer][topk_ids, replica]  # [T, k]
        # Gathering slots of a sharded array: XLA fetches each pick's weights from the device holding the slot.
        hidden = jax.nn.gelu(jnp.einsum("td,tkdf->tkf", x, params["w_in"][layer][slot]))
        out = jnp.einsum("tkf,tkfd->tkd", hidden, params["w_out"][layer][slot])
        x = x + (jax.nn.softmax(gates, axis=-1)[..., None] * out).sum(axis=1)
        served.append(slot)
    return x @ params["readout"], tracker, jnp.stack(served)


@jax.jit
def evaluate(params: dict, placement: eplb.Placement, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(output [T, d], slot serving each pick [L, T, k])`` on ``x``, recording nothing."""
    y, _, slots = forward(params, placement, x)
    return y, slots


def sync_replicas(grad: jax.Array, phy2log: jax.Array, num_experts: int) -> jax.Array:
    """Sum the gradients of an expert's replicas and give the sum to each (replicas stay copies)."""
    per_expert = jax.vmap(lambda g, p: jax.ops.segment_sum(g, p, num_segments=num_experts))(grad, phy2log)
    return _take_slots(per_expert, phy2log)


def make_train_step(args: argparse.Namespace, mesh: Mesh) -> Any:
    @jax.jit
    def train_step(state: State, x: jax.Array, target: jax.Array) -> tuple[State, jax.Array]:
        def loss_fn(params: dict) -> tuple[jax.Array, eplb.LoadTracker]:
            y, tracker, _ = forward(params, state.placement, x, state.tracker)
            return jnp.mean((y - target) ** 2), tracker

        (loss, tracker), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        for name in EXPERT_WEIGHTS:
            grads[name] = sync_replicas(grads[name], state.placement.phy2log, args.experts)
        grads["bias"] = jnp.zeros_like(grads["bias"])  # keep the popularity fixed for the demo
        params = jax.tree_util.tree_map(lambda p, g: p - args.lr * g, state.params, grads)
        params = jax.lax.with_sharding_constraint(params, shardings(mesh, params))  # experts stay sharded
        return State(params, state.placement, tracker.step()), loss

    return train_step


def token_imbalance(slots: jax.Array, per_device: int, devices: int) -> float:
    """Mean over layers of max/mean tokens per GPU, from the slots ``[L, T, k]`` that the picks went to."""
    tokens = np.stack([np.bincount(s.ravel() // per_device, minlength=devices) for s in np.asarray(slots)])
    return float(np.mean(tokens.max(axis=1) / tokens.mean(axis=1)))


def logical_weights(state: State) -> dict[str, np.ndarray]:
    """``[L, E, ...]`` per expert: the weights of its first replica (all its replicas are copies)."""
    first = np.asarray(state.placement.log2phy)[:, :, 0, None, None]  # [L, E, 1, 1]
    return {name: np.take_along_axis(np.asarray(state.params[name]), first, 1) for name in EXPERT_WEIGHTS}


def holds_placement(state: State, logical: dict[str, np.ndarray]) -> list[bool]:
    """Per device: its slots hold exactly the weights of the experts the placement puts there."""
    phy2log = np.asarray(state.placement.phy2log)
    ok: dict[Any, bool] = {}
    for name in EXPERT_WEIGHTS:
        for shard in state.params[name].addressable_shards:  # one per device: [L, R/G, ...]
            expected = np.take_along_axis(logical[name], phy2log[:, shard.index[1], None, None], 1)
            ok[shard.device] = ok.get(shard.device, True) and np.array_equal(np.asarray(shard.data), expected)
    return [ok[device] for device in sorted(ok, key=lambda d: d.id)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.every % args.window:
        raise SystemExit("--every must be a multiple of --window")
    if len(jax.devices()) < args.devices:
        raise SystemExit(f"{args.devices} devices needed, JAX has {len(jax.devices())}: set XLA_FLAGS={DEVICE_COUNT}=N")
    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("ep",))  # the expert-parallel axis
    key = jax.random.PRNGKey(0)
    state = init(args, mesh, key)
    rebalancer = eplb.Rebalancer(args.replicas, args.groups, args.nodes, args.devices, initial=state.placement)
    train_step = make_train_step(args, mesh)
    batch = NamedSharding(mesh, PartitionSpec("ep"))  # each device trains on its share of the tokens
    teacher = jax.random.normal(jax.random.PRNGKey(1), (D_MODEL, D_MODEL)) / D_MODEL**0.5
    tokens = args.devices * args.tokens
    probe = jax.device_put(jax.random.normal(jax.random.PRNGKey(2), (tokens, D_MODEL)), batch)  # for the checks
    per_device = args.replicas // args.devices
    report: dict[str, Any] = {"devices": len(state.params["w_in"].sharding.device_set), "loss": []}
    report.update({name: [] for name in ("before", "after", "max_output_change", "moved", "layers", "weights_match")})

    for step in range(1, args.steps + 1):
        x = jax.device_put(jax.random.normal(jax.random.fold_in(key, step), (tokens, D_MODEL)), batch)
        state, loss = train_step(state, x, jnp.tanh(x @ teacher))
        report["loss"].append(float(loss))
        if step % args.window == 0:
            # The last window's tokens per expert, copied to the host (a few KB): the Rebalancer plans with numpy,
            # off the mesh, and its decision is host data anyway.
            rebalancer.record(np.asarray(state.tracker.load()))
        if step % args.every:
            continue

        decision = rebalancer.step()
        reference, before = evaluate(state.params, state.placement, probe)
        logical = logical_weights(state)  # for the check below
        params = dict(state.params)
        for name in EXPERT_WEIGHTS:
            params[name] = eplb.executors.jax.apply_plan(decision.plan, params[name])  # over the "ep" axis
        placement = jax.device_put(decision.placement, NamedSharding(mesh, PartitionSpec()))
        state = state._replace(params=params, placement=placement)
        output, after = evaluate(state.params, state.placement, probe)

        report["before"].append(token_imbalance(before, per_device, args.devices))
        report["after"].append(token_imbalance(after, per_device, args.devices))
        change = float(jnp.abs(output - reference).max())
        report["max_output_change"].append(change)
        report["moved"].append(int(decision.plan.remote_copies.sum()))
        report["layers"].append(decision.layers.tolist())
        report["weights_match"].append(holds_placement(state, logical))
        print(
            f"step {step:4d}: loss {float(loss):.4f}; layers {report['layers'][-1]} changed, "
            f"copies between devices: {report['moved'][-1]}; tokens per GPU max/mean "
            f"{report['before'][-1]:.2f} -> {report['after'][-1]:.2f}; output change {change:.1e}"
        )
    if args.report:
        with open(args.report, "w") as file:
            json.dump(report, file)
    return report


if __name__ == "__main__":
    main()
