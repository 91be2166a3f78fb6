"""A torch MoE model that tracks its expert load and rebalances its experts every N steps.

Run: ``python examples/torch_moe_rebalance.py [--steps 60] [--every 20] [--device cuda]``

What a serving stack does, in one process: each MoE layer keeps its experts in
``R`` physical slots (``R / G`` per GPU; the GPUs are simulated here, the slots
of GPU ``g`` are ``g * R/G .. (g+1) * R/G - 1``). The router picks logical
experts; an ``eplb.LoadTracker`` counts them on the device, with no host sync;
every ``--every`` steps ``eplb.rebalance_experts`` plans a new placement from
the window's load (``previous=`` the current one, so that few experts move),
``eplb.plan_transfers`` lists the copies between GPUs, and the slots' weights
move accordingly. Moving weights leaves the model's function unchanged
(replicas are copies), which ``main`` checks on a fixed batch.

``main`` prints the token imbalance (max/mean tokens per GPU) that the routed
tokens would cause under the old and the new placement.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import eplb


class MoELayer(nn.Module):
    """Top-k MoE layer whose experts live in ``num_slots`` physical slots (a replica per slot).

    Buffers hold the placement: ``phy2log [R]``, ``log2phy [E, R - E + 1]`` and
    ``logcnt [E]``; a token's pick of expert ``e`` goes to replica
    ``token % logcnt[e]`` of ``e``.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, num_slots: int, skew: float) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        # A fixed router bias makes some experts popular, as in a trained model.
        self.register_buffer("popularity", skew * torch.randn(num_experts).exp())
        logical_in = torch.randn(num_experts, d_model, d_ff) / d_model**0.5
        logical_out = torch.randn(num_experts, d_ff, d_model) / d_ff**0.5
        start = torch.arange(num_slots) % num_experts  # slot j holds expert j mod E until the first rebalance
        self.w_in = nn.Parameter(logical_in[start].clone())  # [R, d_model, d_ff]
        self.w_out = nn.Parameter(logical_out[start].clone())  # [R, d_ff, d_model]
        self.register_buffer("phy2log", start)
        self.register_buffer("log2phy", torch.full((num_experts, num_slots - num_experts + 1), -1))
        self.register_buffer("logcnt", torch.zeros(num_experts, dtype=torch.int64))
        for slot, expert in enumerate(start.tolist()):
            self.log2phy[expert, self.logcnt[expert]] = slot
            self.logcnt[expert] += 1

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_ids [T, k] logical experts, gates [T, k])``."""
        logits = self.router(x) + self.popularity
        gates, topk_ids = logits.topk(self.top_k, dim=-1)
        return topk_ids, gates.softmax(dim=-1)

    def slots(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """``[T, k]`` physical slot serving each pick: replica ``token % logcnt`` of the expert."""
        tokens = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]
        replica = tokens % self.logcnt[topk_ids]
        return self.log2phy[topk_ids, replica]

    def forward(self, x: torch.Tensor, tracker: eplb.LoadTracker, layer: int) -> torch.Tensor:
        topk_ids, gates = self.route(x)
        tracker.record(topk_ids, layer=layer)  # on the device, no host sync
        slot = self.slots(topk_ids)  # [T, k]
        # A real kernel groups tokens by slot (grouped GEMM); a gather keeps this short.
        hidden = torch.nn.functional.gelu(torch.einsum("td,tkdf->tkf", x, self.w_in[slot]))
        out = torch.einsum("tkf,tkfd->tkd", hidden, self.w_out[slot])
        return x + (gates[..., None] * out).sum(dim=1)

    @torch.no_grad()
    def migrate(self, plan: eplb.TransferPlan, index: int, placement: eplb.Placement) -> None:
        """Carry out this layer's copies of ``plan`` and adopt row ``index`` of ``placement``.

        ------------------------------------------------------------------
        MIGRATION SPOT. With one process per GPU (rank g = GPU g, each holding
        its slots ``[L, R/G, ...]``), eplb's torch executor carries out the
        same plan with ``torch.distributed``, double-buffered, on every rank:
        ``eplb.executors.torch.apply_plan(plan, {"w_in": w_in, "w_out": w_out})``.
        Here every "GPU" is in this process, so the copies are local gathers.
        ------------------------------------------------------------------
        """
        rows = plan.layer == index
        per_gpu = plan.slots_per_gpu
        source = torch.as_tensor(plan.src_gpu[rows] * per_gpu + plan.src_slot[rows], device=self.w_in.device)
        target = torch.as_tensor(plan.dst_gpu[rows] * per_gpu + plan.dst_slot[rows], device=self.w_in.device)
        first = torch.as_tensor(plan.stage[rows] == 0, device=self.w_in.device)  # stage 0 reads old weights
        for weight in (self.w_in, self.w_out):
            new = weight.clone()
            new[target[first]] = weight[source[first]]
            new[target[~first]] = new[source[~first]]  # stage 1: a second copy on the same GPU
            weight.copy_(new)  # in place: addresses stay (CUDA graphs, optimizers)
        self.phy2log.copy_(placement.phy2log[index])
        self.log2phy.copy_(placement.log2phy[index])
        self.logcnt.copy_(placement.logcnt[index])


class MoEModel(nn.Module):
    def __init__(self, num_layers: int, d_model: int, **layer_args: int | float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MoELayer(d_model, **layer_args) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, tracker: eplb.LoadTracker) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x, tracker, index)
        return x


def token_imbalance(model: MoEModel, x: torch.Tensor, num_gpus: int) -> float:
    """Mean over layers of max/mean tokens per GPU for batch ``x`` under the current placement."""
    scratch = eplb.LoadTracker(len(model.layers), model.layers[0].logcnt.shape[0], 1, backend="torch", device=x.device)
    ratios = []
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            topk_ids, _ = layer.route(x)
            gpu = layer.slots(topk_ids) // (layer.phy2log.shape[0] // num_gpus)
            tokens = torch.bincount(gpu.flatten(), minlength=num_gpus).float()
            ratios.append(float(tokens.max() / tokens.mean()))
            x = layer(x, scratch, index)
    return sum(ratios) / len(ratios)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20, help="rebalance every N steps")
    parser.add_argument("--window", type=int, default=20, help="steps of load the tracker keeps")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=24, help="physical slots per layer")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per step")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MoEModel(args.layers, 32, d_ff=64, num_experts=args.experts, top_k=2, num_slots=args.replicas, skew=0.5).to(
        device
    )
    tracker = eplb.LoadTracker(args.layers, args.experts, args.window, backend="torch", device=device)
    probe = torch.randn(args.tokens, 32, device=device)  # a fixed batch to check that moving weights changes nothing
    report: dict[str, list[float]] = {"before": [], "after": [], "max_output_change": [], "moved": []}

    with torch.no_grad():
        for step in range(1, args.steps + 1):
            batch = torch.randn(args.tokens, 32, device=device)
            model(batch, tracker)
            tracker.step()  # commit this step's counts to the window
            if step % args.every:
                continue
            before = token_imbalance(model, probe, args.gpus)
            scratch = eplb.LoadTracker(args.layers, args.experts, 1, backend="torch", device=device)
            reference = model(probe, scratch)
            current = torch.stack([layer.phy2log for layer in model.layers])  # [L, R]
            sizes = (args.replicas, args.groups, args.nodes, args.gpus)
            placement = eplb.rebalance_experts(tracker.load(), *sizes, previous=current)
            # Host data (a plan is read on the host); sizes by keyword, unlike rebalance_experts.
            plan = eplb.plan_transfers(current, placement.phy2log, num_gpus=args.gpus, num_nodes=args.nodes)
            for index, layer in enumerate(model.layers):
                layer.migrate(plan, index, placement)
            moved = int(plan.remote_copies.sum())
            after = token_imbalance(model, probe, args.gpus)
            output = model(probe, scratch)
            report["before"].append(before)
            report["after"].append(after)
            report["max_output_change"].append(float((output - reference).abs().max()))
            report["moved"].append(moved)
            print(
                f"step {step:4d}: rebalanced, {moved} experts copied between GPUs; "
                f"tokens per GPU max/mean {before:.2f} -> {after:.2f}; "
                f"output change {report['max_output_change'][-1]:.1e}"
            )
    return report


if __name__ == "__main__":
    main()
