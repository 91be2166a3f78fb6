"""A torch MoE model, its experts sharded over ranks, kept balanced by eplb's rebalancing loop.

Run: ``python examples/torch_moe_rebalance.py [--world 4] [--steps 60] [--every 20]`` (it spawns one process per
simulated GPU: ``torch.distributed`` with gloo on CPU), or under torchrun:
``torchrun --nproc-per-node 4 examples/torch_moe_rebalance.py`` (add ``--device cuda`` for NCCL, one GPU per rank).

Expert parallelism as a serving stack runs it, one process per GPU (rank ``g`` is GPU ``g``):

- each MoE layer keeps its experts in ``R`` physical slots, ``R / G`` per rank: rank ``g`` holds the weights of
  slots ``g * R/G .. (g+1) * R/G - 1`` of every layer (``w_in [L, R/G, d, f]``, ``w_out [L, R/G, f, d]``);
- each rank serves its own tokens. A layer routes them, gathers every rank's tokens (all-gather), runs the picks
  its own slots serve and returns the results (all-reduce); a pick of expert ``e`` goes to replica
  ``token % logcnt[e]`` of ``e``;
- an ``eplb.LoadTracker`` counts the rank's routed tokens on the device (no host sync). Every ``--window``
  steps the ranks sum their counts (all-reduce), so that every rank records the same global load in its
  ``eplb.Rebalancer``;
- every ``--every`` steps ``Rebalancer.step()`` decides which layers change. The decision is deterministic and
  every rank recorded the same loads, so every rank takes the same one; ``eplb.executors.torch.apply_plan``
  then carries out its ``TransferPlan`` on all ranks: each rank sends the experts that others lack and
  receives its own, double-buffered (no rank changes a weight unless every copy arrived).

Moving weights leaves the model's function unchanged (replicas are copies), which ``main`` checks on a fixed batch,
bit for bit; it also checks that every rank's slots hold exactly the experts its placement says. Rank 0 prints the
token imbalance (max/mean tokens per GPU) on that batch before and after each decision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import eplb
import eplb.executors.torch

D_MODEL, D_FF, TOP_K = 32, 64, 2


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x``, concatenated in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class ExpertParallelMoE(nn.Module):
    """``L`` top-k MoE layers; this rank holds ``R / G`` of each layer's ``R`` expert slots.

    Buffers hold the placement, the same on every rank: ``phy2log [L, R]``, ``log2phy [L, E, R - E + 1]`` and
    ``logcnt [L, E]``.
    """

    def __init__(self, layers: int, experts: int, slots: int, placement: eplb.Placement, skew: float = 0.5) -> None:
        super().__init__()
        self.rank, self.per_rank = dist.get_rank(), slots // dist.get_world_size()
        # Every rank draws the same logical experts (same seed), then keeps the weights of its own slots.
        self.router = nn.Parameter(torch.randn(layers, D_MODEL, experts) / D_MODEL**0.5)
        self.register_buffer("popularity", skew * torch.randn(layers, experts).exp())  # popular experts
        # The logical experts' weights, kept only to check the slots (a serving stack loads its slots directly).
        self.register_buffer("logical_in", torch.randn(layers, experts, D_MODEL, D_FF) / D_MODEL**0.5, persistent=False)
        self.register_buffer("logical_out", torch.randn(layers, experts, D_FF, D_MODEL) / D_FF**0.5, persistent=False)
        for name, value in zip(("phy2log", "log2phy", "logcnt"), placement, strict=True):
            self.register_buffer(name, value.clone())
        self.w_in = nn.Parameter(self.expected(self.logical_in))  # [L, R/G, d, f]: this rank's slots
        self.w_out = nn.Parameter(self.expected(self.logical_out))  # [L, R/G, f, d]

    def placement(self) -> eplb.Placement:
        """The placement in force (the buffers themselves)."""
        return eplb.Placement(self.phy2log, self.log2phy, self.logcnt)

    def adopt(self, placement: eplb.Placement, layer: int | None = None) -> None:
        """Route ``layer`` (default: every layer) by ``placement`` from now on (its weights must be in place)."""
        for mine, new in zip(self.placement(), placement, strict=True):
            if layer is None:
                mine.copy_(new)
            else:
                mine[layer].copy_(new[layer])

    def expected(self, logical: torch.Tensor) -> torch.Tensor:
        """``[L, R/G, ...]``: the logical experts' weights that this rank's slots must hold."""
        own = self.phy2log[:, self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return logical[torch.arange(len(own), device=own.device)[:, None], own]

    def holds_placement(self) -> bool:
        """Every slot of this rank holds exactly the weights of the expert its placement says."""
        pairs = ((self.w_in, self.logical_in), (self.w_out, self.logical_out))
        return all(torch.equal(weights, self.expected(logical)) for weights, logical in pairs)

    def forward(self, x: torch.Tensor, tracker: eplb.LoadTracker | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output [T, d], slot serving each pick of every rank's tokens [L, G*T, k])`` for this rank's tokens
        ``x [T, d]``. Every rank calls it together (collectives)."""
        served = []
        for layer in range(len(self.router)):
            logits = x @ self.router[layer] + self.popularity[layer]
            gates, topk_ids = logits.topk(TOP_K, dim=-1)  # [T, k] logical experts of this rank's tokens
            if tracker is not None:
                tracker.record(topk_ids, layer=layer)  # on the device, no host sync
            out, slot = self.experts(layer, x, topk_ids)
            x = x + (gates.softmax(dim=-1)[..., None] * out).sum(dim=1)
            served.append(slot)
        return x, torch.stack(served)

    def experts(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch every rank's picks to the slots serving them; ``(out [T, k, d] of this rank's tokens, slots)``."""
        tokens, every_id = all_gather(x), all_gather(topk_ids)  # [G*T, ...]: every rank's tokens
        replica = torch.arange(len(every_id), device=x.device)[:, None] % self.logcnt[layer][every_id]
        slot = self.log2phy[layer][every_id, replica]  # [G*T, k] slot serving each pick
        here = slot // self.per_rank == self.rank
        local = torch.where(here, slot % self.per_rank, 0)
        # A real kernel runs only the picks of this rank's slots (grouped GEMM); computing every pick and keeping
        # those served here keeps this short.
        hidden = torch.nn.functional.gelu(torch.einsum("td,tkdf->tkf", tokens, self.w_in[layer][local]))
        out = torch.where(here[..., None], torch.einsum("tkf,tkfd->tkd", hidden, self.w_out[layer][local]), 0.0)
        dist.all_reduce(out)  # one rank serves each pick: the sum adds zeros, exactly
        start = self.rank * len(x)
        return out[start : start + len(x)], slot


def token_imbalance(slots: torch.Tensor, per_rank: int, world: int) -> float:
    """Mean over layers of max/mean tokens per GPU, from the slots ``[L, T, k]`` that the picks went to."""
    tokens = torch.stack([torch.bincount(s.flatten() // per_rank, minlength=world) for s in slots]).double()
    return float((tokens.max(dim=1).values / tokens.mean(dim=1)).mean())


def gathered(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def run(args: argparse.Namespace, device: torch.device) -> dict[str, list] | None:
    """One rank's serving loop; returns the report on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # tiny matrices, and the ranks share the machine
    torch.manual_seed(0)  # the same model on every rank
    sizes = (args.replicas, args.groups, args.nodes, world)
    start = eplb.rebalance_experts(torch.ones(args.layers, args.experts), *sizes)  # a uniform load: no favourite
    model = ExpertParallelMoE(args.layers, args.experts, args.replicas, start).to(device)
    tracker = eplb.LoadTracker(args.layers, args.experts, args.window, backend="torch", device=device)
    rebalancer = eplb.Rebalancer(*sizes, initial=eplb.Placement(*(a.to(device) for a in start)))
    # The moves get their own group (communicator): with NCCL, copies in flight on the model's group would queue
    # the forward pass's collectives behind them.
    moves = dist.new_group(backend=dist.get_backend())
    probe = torch.randn(world, args.tokens, D_MODEL)[rank].to(device)  # this rank's share of a fixed batch
    data = torch.Generator().manual_seed(1 + rank)  # each rank serves its own requests
    report: dict[str, list] = {key: [] for key in ("before", "after", "max_output_change", "moved", "layers")}
    report.update(received=[], same_decision=[], weights_match=[])

    with torch.no_grad():
        for step in range(1, args.steps + 1):
            model(torch.randn(args.tokens, D_MODEL, generator=data).to(device), tracker)
            tracker.step()  # commit this step's counts
            if step % args.window == 0:
                load = tracker.load()  # [L, E]: this rank's tokens over the last window
                dist.all_reduce(load)  # every rank's: the same global load on every rank
                rebalancer.record(load)
            if step % args.every:
                continue

            decision = rebalancer.step()  # the same on every rank
            reference, before = model(probe)
            received: list[int] = []  # plan rows this rank received from other ranks
            weights = {"w_in": model.w_in, "w_out": model.w_out}
            change = torch.zeros(())
            if args.all_at_once:
                eplb.executors.torch.apply_plan(decision.plan, weights, group=moves, on_transfer=received.append)
                model.adopt(decision.placement)
            else:  # layer by layer: the model keeps serving while each layer's copies are in flight
                for layer in decision.layers.tolist():
                    pending = eplb.executors.torch.begin(
                        decision.plan, weights, layers=[layer], group=moves, on_transfer=received.append
                    )
                    during, _ = model(probe)  # this layer still on its old weights and routing
                    change = torch.maximum(change, (during - reference).abs().max())
                    pending.finish()  # every rank has the layer's copies: switch its routing
                    model.adopt(decision.placement, layer=layer)
            output, after = model(probe)
            change = torch.maximum(change, (output - reference).abs().max())
            dist.all_reduce(change, op=dist.ReduceOp.MAX)

            phy2log = decision.placement.phy2log.tolist()
            report["before"].append(token_imbalance(before, model.per_rank, world))
            report["after"].append(token_imbalance(after, model.per_rank, world))
            report["max_output_change"].append(float(change))
            report["moved"].append(int(decision.plan.remote_copies.sum()))
            report["layers"].append(decision.layers.tolist())
            report["received"].append(gathered(len(received)))
            report["same_decision"].append(all(p == phy2log for p in gathered(phy2log)))
            report["weights_match"].append(gathered(model.holds_placement()))
            if rank == 0:
                print(
                    f"step {step:4d}: layers {report['layers'][-1]} changed, copies between ranks: "
                    f"{report['moved'][-1]} (received {report['received'][-1]}); tokens per GPU max/mean "
                    f"{report['before'][-1]:.2f} -> {report['after'][-1]:.2f}; output change {float(change):.1e}"
                )
    return report if rank == 0 else None


def rank_device(name: str, local_rank: int) -> tuple[torch.device, str]:
    """``(device, backend)``: the CPU with gloo, or this rank's GPU with NCCL."""
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def spawned(rank: int, args: argparse.Namespace, rendezvous: str) -> None:
    """Entry point of a process spawned by ``main``: rank ``rank`` of ``args.world``."""
    device, backend = rank_device(args.device, rank)
    timeout = datetime.timedelta(seconds=120)  # fail rather than hang if a rank dies
    rendezvous_url = f"file://{rendezvous}"
    dist.init_process_group(backend, init_method=rendezvous_url, rank=rank, world_size=args.world, timeout=timeout)
    try:
        report = run(args, device)
        if report is not None:
            Path(rendezvous).with_suffix(".json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, list] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4, help="ranks (simulated GPUs) to spawn, unless under torchrun")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20, help="decide every N steps (a multiple of --window)")
    parser.add_argument("--window", type=int, default=5, help="steps per load window recorded")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=24, help="physical slots per layer")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank and step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--all-at-once", action="store_true", help="move every changed layer in one apply_plan (default: one "
        "layer at a time with executors.torch.begin/finish, serving in between)"
    )  # fmt: skip
    parser.add_argument("--report", help="write rank 0's report to this JSON file")
    args = parser.parse_args(argv)
    if args.every % args.window:
        parser.error("--every must be a multiple of --window")

    if "RANK" in os.environ:  # under torchrun: this process is one rank
        device, backend = rank_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        report = run(args, device)
        dist.destroy_process_group()
    else:  # one process per simulated GPU; rank 0 leaves its report beside the rendezvous file
        with tempfile.TemporaryDirectory() as tmp:
            rendezvous = os.path.join(tmp, "rendezvous")
            mp.spawn(spawned, args=(args, rendezvous), nprocs=args.world)
            report = json.loads(Path(rendezvous).with_suffix(".json").read_text())
    if report is not None and args.report:
        Path(args.report).write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
