"""eplb: expert-parallel load balancing for Mixture-of-Experts models.

``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)``
decides how many replicas each expert gets and which GPU slot each replica
occupies, on numpy, torch (CPU/CUDA) or JAX inputs, with identical placements
on every backend.
"""

from eplb._api import Placement, balanced_packing, rebalance_experts, replicate_experts
from eplb.graphed import GraphedPlanner
from eplb.migration import TransferError, TransferPlan, moved_experts, plan_transfers
from eplb.rebalancer import Decision, Rebalancer
from eplb.tracker import LoadTracker

__all__ = [
    "Decision",
    "GraphedPlanner",
    "LoadTracker",
    "Placement",
    "Rebalancer",
    "TransferError",
    "TransferPlan",
    "balanced_packing",
    "moved_experts",
    "plan_transfers",
    "rebalance_experts",
    "replicate_experts",
]
__version__ = "0.1.0"
