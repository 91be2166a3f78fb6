"""Peer baselines for benchmarks/speed.py: the published DeepSeek EPLB greedy, as published runs it.

:func:`published_greedy` re-implements the published greedy policy (DeepSeek
EPLB's ``rebalance_experts``) from its description in ``docs/algorithm.md``
and ``/work/shared/DESIGN.md``, keeping the published implementation's cost
profile, which is what a peer comparison measures:

- the loads are moved to the host first (``weight.float().cpu()``);
- balanced packing sorts with torch, then loops in Python over layers and
  items, each item to the lightest pack with room (a Python ``min`` over
  the packs);
- replication runs ``R - E`` torch steps batched over rows, each taking the
  argmax of ``weight / logcnt``;
- the hierarchical policy's permutations are torch gathers and scatters,
  and ``log2phy`` one scatter.

Its placements equal eplb's on loads without ties (it divides where eplb
multiplies by a reciprocal table, and sorts unstably, so replicas of one
expert may be numbered in another order in ``log2phy``); ``python
benchmarks/baselines.py`` checks the golden example and tie-free loads.
"""

from __future__ import annotations

import torch

__all__ = ["published_greedy"]


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """``inv[b, perm[b, j]] = j`` for a batch of permutations ``perm [B, n]``."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inv


def _balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LPT of ``weight [B, n]`` into ``num_packs`` packs of ``n / num_packs``: (pack, rank in pack), Python loops."""
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return torch.arange(n, dtype=torch.int64).expand(rows, n), torch.zeros(rows, n, dtype=torch.int64)
    visit = weight.float().sort(-1, descending=True).indices.cpu()
    pack_index = torch.full((rows, n), -1, dtype=torch.int64)
    rank_in_pack = torch.full((rows, n), -1, dtype=torch.int64)
    for row in range(rows):
        loads = [0.0] * num_packs
        sizes = [0] * num_packs
        for item in visit[row]:
            pack = min((p for p in range(num_packs) if sizes[p] < per_pack), key=loads.__getitem__)
            pack_index[row, item] = pack
            rank_in_pack[row, item] = sizes[pack]
            loads[pack] += weight[row, item]
            sizes[pack] += 1
    return pack_index, rank_in_pack


def _replicate(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``R - E`` greedy steps over all rows at once: (phy2log, phyrank, logcnt)."""
    rows, num_log = weight.shape
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    phyrank = torch.zeros(rows, num_phy, dtype=torch.int64)
    logcnt = torch.ones(rows, num_log, dtype=torch.int64)
    every_row = torch.arange(rows, dtype=torch.int64)
    for slot in range(num_log, num_phy):
        expert = (weight / logcnt).max(dim=-1).indices
        phy2log[:, slot] = expert
        phyrank[:, slot] = logcnt[every_row, expert]
        logcnt[every_row, expert] += 1
    return phy2log, phyrank, logcnt


def _hierarchical(
    weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    # Groups to nodes.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = _balanced_packing(group_load, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
        + torch.arange(group_size, dtype=torch.int64)
    ).flatten(-2)
    mlog2log = _inverse(log2mlog)
    # Replicas within each node.
    mlog_load = weight.gather(-1, mlog2log).view(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = _replicate(mlog_load, num_phy // num_nodes)
    # Replicas to GPUs within each node.
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    gpu, rank = _balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * phy_per_gpu + rank)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    node_offset = torch.arange(0, num_log, num_log // num_nodes, dtype=torch.int64).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(layers, num_nodes, -1) + node_offset).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def published_greedy(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The published greedy ``rebalance_experts``: ``(phy2log [L, R], log2phy [L, E, R - E + 1], logcnt [L, E])``.

    Hierarchical iff ``num_groups % num_nodes == 0``, else the global policy
    (one group, one node). Runs on the host whatever the input's device.
    """
    layers, num_log = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    width = num_replicas - num_log + 1
    log2phy = torch.full((layers, num_log, width), -1, dtype=torch.int64)
    log2phy.view(layers, -1).scatter_(
        -1, phy2log * width + phyrank, torch.arange(num_replicas, dtype=torch.int64).expand(layers, -1)
    )
    return phy2log, log2phy, logcnt


def _self_check() -> None:
    """The golden example, and eplb's placement on a tie-free DeepSeek-V3-shaped load."""
    import numpy as np

    import eplb

    golden = torch.tensor(
        [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    )
    phy2log, _, _ = published_greedy(golden, 16, 4, 2, 8)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ], phy2log.tolist()
    rng = np.random.default_rng(0)
    weight = np.stack([rng.permutation(256) * 977 + rng.integers(1, 900, 256) for _ in range(8)])
    for config in [(288, 8, 4, 32), (288, 8, 3, 144)]:
        ours = eplb.rebalance_experts(weight, *config)
        theirs = published_greedy(torch.as_tensor(weight), *config)
        # Same slots and counts; replicas of one expert tie in load, and the
        # published unstable sort may number them in another order (log2phy).
        np.testing.assert_array_equal(ours.phy2log, theirs[0].numpy())
        np.testing.assert_array_equal(ours.logcnt, theirs[2].numpy())
        np.testing.assert_array_equal(np.sort(ours.log2phy, axis=-1), np.sort(theirs[1].numpy(), axis=-1))
    print("published_greedy: golden example, and eplb's placement on tie-free loads")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _self_check()
