"""A JAX MoE training step that tracks expert load and rebalances every N steps, all inside ``jax.jit``.

Run: ``python examples/jax_moe_rebalance.py [--steps 60] [--every 20]``

Pure JAX (no Flax, to keep the install small; the same state would sit in a
Flax ``TrainState``). Each MoE layer keeps its experts in ``R`` physical slots
(``R / G`` per GPU, simulated here). In one jitted ``train_step``:

1. the forward pass routes tokens and records the picks in an
   ``eplb.LoadTracker`` (a pytree in the train state);
2. gradients of the replicas of an expert are summed, so replicas stay copies
   (what the all-reduce among replicas does in expert parallelism), and SGD
   updates the slots;
3. every ``--every`` steps, under ``lax.cond``, ``eplb.rebalance_experts``
   plans from the tracker's window (``previous=`` the current placement, so
   that few experts move) and the slots' weights move to the new placement
   (a gather: the MIGRATION SPOT below).

``main`` prints the loss and, at each rebalance, the token imbalance (max/mean
tokens per GPU) on a fixed batch before and after, and the largest change of
the model's output that moving the weights caused (0: replicas are copies).
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import eplb

D_MODEL, D_FF, TOP_K = 32, 64, 2


class Config(NamedTuple):
    layers: int = 4
    experts: int = 16
    replicas: int = 24
    gpus: int = 8
    nodes: int = 1
    groups: int = 1
    window: int = 20
    every: int = 20
    tokens: int = 256
    lr: float = 0.05


class State(NamedTuple):
    params: dict[str, jax.Array]  # router [L, d, E], w_in [L, R, d, f], w_out [L, R, f, d], readout [d, d]
    placement: eplb.Placement  # phy2log [L, R], log2phy [L, E, R-E+1], logcnt [L, E], int32
    tracker: eplb.LoadTracker
    step: jax.Array


def init(cfg: Config, key: jax.Array) -> State:
    k_router, k_in, k_out, k_readout = jax.random.split(key, 4)
    shape = (cfg.layers, cfg.experts)
    # Start from eplb's placement of a uniform load: no expert is favoured yet.
    placement = eplb.rebalance_experts(jnp.ones(shape, jnp.int32), cfg.replicas, cfg.groups, cfg.nodes, cfg.gpus)
    logical_in = jax.random.normal(k_in, (*shape, D_MODEL, D_FF)) / D_MODEL**0.5
    logical_out = jax.random.normal(k_out, (*shape, D_FF, D_MODEL)) / D_FF**0.5
    params = {
        "router": jax.random.normal(k_router, (cfg.layers, D_MODEL, cfg.experts)) / D_MODEL**0.5,
        "bias": 0.5 * jnp.exp(jax.random.normal(k_router, shape)),  # popular experts, as in a trained router
        "w_in": _take_slots(logical_in, placement.phy2log),
        "w_out": _take_slots(logical_out, placement.phy2log),
        "readout": jax.random.normal(k_readout, (D_MODEL, D_MODEL)) / D_MODEL**0.5,
    }
    tracker = eplb.LoadTracker(cfg.layers, cfg.experts, cfg.window, backend="jax")
    return State(params, placement, tracker, jnp.zeros((), jnp.int32))


def _take_slots(per_slot: jax.Array, index: jax.Array) -> jax.Array:
    """``out[l, j] = per_slot[l, index[l, j]]`` for ``[L, n, ...]`` arrays."""
    return jax.vmap(lambda a, i: a[i])(per_slot, index)


def route(params: dict[str, jax.Array], layer: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = x @ params["router"][layer] + params["bias"][layer]
    gates, topk_ids = jax.lax.top_k(logits, TOP_K)  # [T, k] logical experts
    return topk_ids, jax.nn.softmax(gates, axis=-1)


def slots(placement: eplb.Placement, layer: int, topk_ids: jax.Array) -> jax.Array:
    """``[T, k]`` slot of each pick: replica ``token % logcnt`` of the expert."""
    replica = jnp.arange(topk_ids.shape[0])[:, None] % placement.logcnt[layer][topk_ids]
    return placement.log2phy[layer][topk_ids, replica]


def forward(params: dict, placement: eplb.Placement, tracker: eplb.LoadTracker, x: jax.Array) -> tuple[Any, ...]:
    """``(output [T, d], tracker with this batch recorded, slot of each pick [L, T, k])``."""
    used = []
    for layer in range(params["router"].shape[0]):
        topk_ids, gates = route(params, layer, x)
        tracker = tracker.record(topk_ids, layer=layer)  # a new tracker: JAX is functional
        slot = slots(placement, layer, topk_ids)
        hidden = jax.nn.gelu(jnp.einsum("td,tkdf->tkf", x, params["w_in"][layer][slot]))
        out = jnp.einsum("tkf,tkfd->tkd", hidden, params["w_out"][layer][slot])
        x = x + (gates[..., None] * out).sum(axis=1)
        used.append(slot)
    return x @ params["readout"], tracker, jnp.stack(used)


def loss_fn(params: dict, placement: eplb.Placement, tracker: eplb.LoadTracker, batch: tuple) -> tuple[Any, Any]:
    x, target = batch
    y, tracker, _ = forward(params, placement, tracker, x)
    return jnp.mean((y - target) ** 2), tracker


def sync_replicas(grad: jax.Array, phy2log: jax.Array, num_experts: int) -> jax.Array:
    """Sum the gradients of an expert's replicas and give the sum to each (replicas stay copies)."""
    per_expert = jax.vmap(lambda g, p: jax.ops.segment_sum(g, p, num_segments=num_experts))(grad, phy2log)
    return _take_slots(per_expert, phy2log)


def token_imbalance(slot: jax.Array, cfg: Config) -> jax.Array:
    """Mean over layers of max/mean tokens per GPU, from the slots ``[L, T, k]`` the picks went to."""
    gpu = slot.reshape(cfg.layers, -1) // (cfg.replicas // cfg.gpus)
    tokens = jax.vmap(lambda g: jnp.bincount(g, length=cfg.gpus))(gpu)
    return jnp.mean(tokens.max(axis=1) / tokens.mean(axis=1))


def rebalance(state: State, cfg: Config, probe: jax.Array) -> tuple[State, jax.Array]:
    """Plan from the tracker's window and move the slots' weights to the new placement.

    Also returns ``[imbalance before, imbalance after, max output change, experts moved]`` on ``probe``.
    """
    sizes = (cfg.replicas, cfg.groups, cfg.nodes, cfg.gpus)
    new = eplb.rebalance_experts(state.tracker.load(), *sizes, previous=state.placement.phy2log)
    # ------------------------------------------------------------------
    # MIGRATION SPOT. Inside jit on one device, moving the weights is this
    # gather: each new slot takes the weights of a slot that holds its expert
    # now (on a sharded mesh XLA turns it into collectives). To move only the
    # experts a device lacks, with checksums, rebalance outside the step and
    # call eplb.executors.jax.apply_plan(eplb.plan_transfers(old, new, num_gpus=G), w)
    # on weights sharded over the expert-parallel mesh axis. Optimizer state
    # would move the same way.
    # ------------------------------------------------------------------
    source = jax.vmap(lambda log2phy, phy2log: log2phy[phy2log, 0])(state.placement.log2phy, new.phy2log)
    params = dict(state.params)
    for name in ("w_in", "w_out"):
        params[name] = _take_slots(params[name], source)
    moved = state._replace(params=params, placement=eplb.Placement(*new))
    y_old, _, slot_old = forward(state.params, state.placement, state.tracker, probe)
    y_new, _, slot_new = forward(moved.params, moved.placement, state.tracker, probe)
    moved_experts = eplb.moved_experts(state.placement.phy2log, new.phy2log, cfg.gpus).sum()
    imbalance = [token_imbalance(slot_old, cfg), token_imbalance(slot_new, cfg)]
    stats = jnp.stack([*imbalance, jnp.abs(y_new - y_old).max(), moved_experts.astype(jnp.float32)])
    return moved, stats


def make_train_step(cfg: Config) -> Any:
    @jax.jit
    def train_step(state: State, batch: tuple, probe: jax.Array) -> tuple[State, jax.Array, jax.Array]:
        """One SGD step; every ``cfg.every`` steps also a rebalance. Returns ``(state, loss, stats [4])``."""
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, tracker), grads = grad_fn(state.params, state.placement, state.tracker, batch)
        for name in ("w_in", "w_out"):
            grads[name] = sync_replicas(grads[name], state.placement.phy2log, cfg.experts)
        grads["bias"] = jnp.zeros_like(grads["bias"])  # keep the popularity fixed for the demo
        params = jax.tree_util.tree_map(lambda p, g: p - cfg.lr * g, state.params, grads)
        state = State(params, state.placement, tracker.step(), state.step + 1)
        due = state.step % cfg.every == 0
        state, stats = jax.lax.cond(
            due, lambda s: rebalance(s, cfg, probe), lambda s: (s, jnp.zeros(4, jnp.float32)), state
        )
        return state, loss, stats

    return train_step


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    for name, default in Config()._asdict().items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    args = parser.parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(args).items() if k in Config._fields})

    key = jax.random.PRNGKey(0)
    state = init(cfg, key)
    teacher = jax.random.normal(jax.random.PRNGKey(1), (D_MODEL, D_MODEL)) / D_MODEL**0.5
    probe = jax.random.normal(jax.random.PRNGKey(2), (cfg.tokens, D_MODEL))  # fixed batch for the checks
    train_step = make_train_step(cfg)
    report: dict[str, list[float]] = {"loss": [], "before": [], "after": [], "max_output_change": [], "moved": []}
    for step in range(1, args.steps + 1):
        x = jax.random.normal(jax.random.fold_in(key, step), (cfg.tokens, D_MODEL))
        state, loss, stats = train_step(state, (x, jnp.tanh(x @ teacher)), probe)
        report["loss"].append(float(loss))
        if step % cfg.every == 0:
            before, after, change, moved = (float(v) for v in stats)
            for name, value in (("before", before), ("after", after), ("max_output_change", change), ("moved", moved)):
                report[name].append(value)
            print(
                f"step {step:4d}: loss {float(loss):.4f}; rebalanced inside jit, {moved:.0f} experts moved; "
                f"tokens per GPU max/mean {before:.2f} -> {after:.2f}; output change {change:.1e}"
            )
    return report


if __name__ == "__main__":
    main()
