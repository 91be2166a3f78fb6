"""eplb as SGLang's EPLB algorithm: ``sglang.srt.eplb.eplb_algorithms.rebalance_experts``, same contract.

SGLang plans in ``ExpertLocationMetadata.init_by_eplb``
(``python/sglang/srt/eplb/expert_location.py``), which calls::

    phy2log, log2phy, logcnt = eplb_algorithms.rebalance_experts(
        tokens_per_expert=logical_count,  # [steps, layers, logical experts] (a 2-D count gets a step axis)
        num_physical_experts=R,           # logical experts + --ep-num-redundant-experts
        num_local_physical_experts=R // ep_size,
        num_groups=num_groups,            # None for models without expert groups
        num_nodes=server_args.nnodes,
        algorithm=compute_algorithm(server_args.eplb_algorithm, num_groups, num_nodes),
    )

then moves the results to its device and pads ``log2phy`` to width ``R``
with ``-1``. ``--eplb-algorithm`` names a member of the enum
``EplbAlgorithm`` (``auto``: ``deepseek_hierarchical`` when
``num_groups % num_nodes == 0``, else ``deepseek``). Its ``deepseek``
algorithms return int64 CPU tensors with ``log2phy`` of width
``logcnt.max()``; :func:`rebalance_experts` here returns the same.

SGLang has no registry of algorithms: :func:`register` replaces
``eplb_algorithms.rebalance_experts`` in the calling process (SGLang looks
the function up at each call), and :func:`plugin` does it from SGLang's
``sglang.srt.plugins`` entry points in every SGLang process.

Conversions, explicitly: the loads are summed over the steps axis;
``num_gpus = num_physical_experts // num_local_physical_experts``; the enum
picks the hierarchical policy or not (``deepseek_vec*`` as their
``deepseek*`` namesakes: eplb does not run the vectorised variant's
chunked replication); ``num_groups=None`` means the global policy; results
are int64 on the CPU whatever the loads' device. This module imports no SGLang (but inside
:func:`register`) and imports torch when first called.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from eplb.integrations import _common

__all__ = ["ALGORITHMS", "plugin", "rebalance_experts", "register"]

# SGLang's EplbAlgorithm names eplb runs, and whether each is the hierarchical policy.
ALGORITHMS: dict[str, bool] = {
    "deepseek": False,
    "deepseek_hierarchical": True,
    "deepseek_vec": False,
    "deepseek_vec_hierarchical": True,
}


def _algorithm_name(algorithm: Any, num_groups: int | None, num_nodes: int) -> str:
    """The member name of ``algorithm`` (an ``EplbAlgorithm`` or its name); ``"auto"`` resolved as SGLang does."""
    name = getattr(algorithm, "name", algorithm)
    if not isinstance(name, str):
        raise TypeError(f"algorithm must be an EplbAlgorithm or its name, got {type(algorithm).__name__}")
    if name == "auto":
        hierarchical = num_groups is not None and num_groups % num_nodes == 0
        return "deepseek_hierarchical" if hierarchical else "deepseek"
    return name


def rebalance_experts(
    tokens_per_expert: Any,
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    algorithm: Any,
    *,
    policy: str = "greedy",
    spill: int = 0,
    previous: Any = None,
    balance_tolerance: float | None = None,
    max_moves: int | None = None,
) -> tuple[Any, Any, Any]:
    """SGLang's ``eplb_algorithms.rebalance_experts``, planned by eplb.

    Parameters
    ----------
    tokens_per_expert : torch.Tensor [steps, layers, E] or [layers, E]
        Routed token counts per step (SGLang's ``logical_count``), any
        device and numeric dtype (numpy arrays and lists too); summed over
        the steps, planned where they live.
    num_physical_experts : int
        Physical experts ``R`` (logical experts plus redundant ones).
    num_local_physical_experts : int
        Slots per GPU; ``R`` must be a multiple of it, and
        ``num_gpus = R // num_local_physical_experts``.
    num_groups : int or None
        Expert groups; ``None`` for models without them (global policy only).
    num_nodes : int
        Nodes (``--nnodes``).
    algorithm : EplbAlgorithm or str
        ``deepseek`` / ``deepseek_vec``: eplb's global policy;
        ``deepseek_hierarchical`` / ``deepseek_vec_hierarchical``: its
        hierarchical policy (needs ``num_groups``); ``"auto"`` as SGLang's
        ``compute_algorithm``. Others (``elasticity_aware``) raise
        ``NotImplementedError``; :func:`register` hands them to SGLang's own.
    policy, spill, balance_tolerance, max_moves : keyword-only
        eplb's options (see :func:`eplb.rebalance_experts`); the defaults
        keep SGLang's algorithm (the published greedy policy).
        ``balance_tolerance`` and ``max_moves`` act only with a usable
        ``previous`` (``max_moves`` only where it is a placement of this
        config, else left out with a ``RuntimeWarning``).
    previous : torch.Tensor [layers, R], keyword-only
        The placement in use (SGLang does not pass it; :func:`register`
        with ``keep_in_place=True`` reads it from SGLang's global
        ``ExpertLocationMetadata``). Used as eplb's ``previous=`` when it has
        this call's shape and holds ids in ``[0, E)``, else ignored.

    Returns
    -------
    phy2log : torch.Tensor [layers, R], int64, CPU
        Logical expert of each physical slot.
    log2phy : torch.Tensor [layers, E, X], int64, CPU
        Slots of each expert by replica number, ``-1`` padded, ``X`` the
        largest replica count (as SGLang's ``deepseek`` algorithms; SGLang
        pads it to ``R``).
    logcnt : torch.Tensor [layers, E], int64, CPU
        Replicas per expert.

    Raises
    ------
    ValueError
        Bad sizes (eplb's checks), ``R`` not a multiple of
        ``num_local_physical_experts``, or a hierarchical algorithm without
        ``num_groups``.
    NotImplementedError
        An algorithm eplb does not run.
    """
    name = _algorithm_name(algorithm, num_groups, num_nodes)
    if name not in ALGORITHMS:
        raise NotImplementedError(f"eplb runs the algorithms {', '.join(ALGORITHMS)} (and auto), not {name!r}")
    hierarchical = ALGORITHMS[name]
    if hierarchical and num_groups is None:
        raise ValueError(f"algorithm {name!r} needs num_groups (the model has no expert groups)")
    if num_local_physical_experts <= 0 or num_physical_experts % num_local_physical_experts:
        raise ValueError(
            f"num_physical_experts={num_physical_experts} must be a positive multiple of "
            f"num_local_physical_experts={num_local_physical_experts}"
        )
    tokens = _common.as_tensor(tokens_per_expert, "tokens_per_expert")
    if tokens.dim() == 3:
        weight = tokens.sum(dim=0)
    elif tokens.dim() == 2:
        weight = tokens
    else:
        raise ValueError(f"tokens_per_expert must be [steps, layers, experts], got shape {tuple(tokens.shape)}")
    num_layers, num_experts = (int(n) for n in weight.shape)
    previous = _common.usable_previous(previous, num_layers, num_physical_experts, num_experts)
    options = _common.check_options(
        {
            "policy": policy,
            "hierarchical": hierarchical,
            "spill": spill,
            "balance_tolerance": balance_tolerance,
            "max_moves": max_moves,
        }
    )
    num_gpus = num_physical_experts // num_local_physical_experts
    groups = 1 if num_groups is None else num_groups
    phy2log, log2phy, logcnt = _common.plan(
        weight, num_physical_experts, groups, num_nodes, num_gpus, previous, options
    )
    logcnt = logcnt.cpu()
    width = int(logcnt.max())
    return phy2log.cpu(), log2phy.cpu()[..., :width].contiguous(), logcnt


_ORIGINAL = "__eplb_original__"


def _current_placement() -> Any:
    """The placement SGLang runs now (its global ``ExpertLocationMetadata``), or ``None``."""
    location = sys.modules.get("sglang.srt.eplb.expert_location")
    getter = getattr(location, "get_global_expert_location_metadata", None)
    metadata = getter() if getter is not None else None
    if metadata is None:
        return None
    current = getattr(metadata, "physical_to_logical_map_cpu", None)
    return current if current is not None else getattr(metadata, "physical_to_logical_map", None)


def register(*, keep_in_place: bool = False, **options: Any) -> Any:
    """Make SGLang plan with eplb in this process; returns the installed function.

    Replaces ``sglang.srt.eplb.eplb_algorithms.rebalance_experts`` by a
    function of the same signature that runs :func:`rebalance_experts` for
    the ``deepseek*`` algorithms (so ``--eplb-algorithm`` keeps choosing the
    hierarchical or global policy) and hands any other algorithm, or a call
    with arguments this adapter does not know, to the function it replaced.
    Calling it again replaces the previous registration (the original
    SGLang function is kept).

    SGLang plans in its scheduler processes: call this where they run it
    (at the top of the launch script, which spawned processes re-import,
    or in a ``sitecustomize`` module).

    Parameters
    ----------
    keep_in_place : bool, keyword-only
        Pass the placement in use (SGLang's global
        ``ExpertLocationMetadata``) as ``previous=`` so that fewer experts
        move (default ``False``: SGLang's behaviour, a fresh placement).
    **options
        eplb's options for :func:`rebalance_experts`: ``policy``, ``spill``,
        ``balance_tolerance``, ``max_moves``.

    Returns
    -------
    function
        The function now at ``eplb_algorithms.rebalance_experts``.

    Raises
    ------
    ImportError
        SGLang (with ``sglang.srt.eplb.eplb_algorithms``) is not installed.
    """
    options = _common.check_options(options)
    if "hierarchical" in options:
        raise TypeError("hierarchical is chosen by SGLang's --eplb-algorithm, not by an option")
    try:
        module = importlib.import_module("sglang.srt.eplb.eplb_algorithms")
    except ModuleNotFoundError as err:
        raise ImportError("eplb.integrations.sglang.register() needs SGLang (sglang.srt.eplb) installed") from err
    current = module.rebalance_experts
    original = getattr(current, _ORIGINAL, current)

    def rebalance(
        tokens_per_expert: Any,
        num_physical_experts: int,
        num_local_physical_experts: int,
        num_groups: int | None,
        num_nodes: int,
        algorithm: Any,
        **kwargs: Any,
    ) -> Any:
        args = (tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups, num_nodes, algorithm)
        try:
            name = _algorithm_name(algorithm, num_groups, num_nodes)
        except TypeError:
            name = None
        if kwargs or name not in ALGORITHMS:
            return original(*args, **kwargs)
        previous = _current_placement() if keep_in_place else None
        return rebalance_experts(*args, previous=previous, **options)

    rebalance.__doc__ = "eplb in place of SGLang's eplb_algorithms.rebalance_experts (eplb.integrations.sglang)."
    setattr(rebalance, _ORIGINAL, original)
    module.rebalance_experts = rebalance
    return rebalance


PLUGIN_ENV = "EPLB_SGLANG_POLICY"
KEEP_IN_PLACE_ENV = "EPLB_SGLANG_KEEP_IN_PLACE"


def plugin() -> None:
    """A ``sglang.srt.plugins`` entry point: registers eplb when ``EPLB_SGLANG_POLICY`` is set.

    SGLang runs every installed general plugin early in each of its
    processes (``sglang.srt.plugins.load_plugins``, in SGLang versions with
    that framework). This one does nothing unless the environment variable
    ``EPLB_SGLANG_POLICY`` names an eplb policy (``greedy`` or ``refined``),
    so installing it changes nothing by itself; then it calls
    ``register(policy=..., keep_in_place=...)``, ``keep_in_place`` true when
    ``EPLB_SGLANG_KEEP_IN_PLACE`` is ``1``.

    Returns
    -------
    None
    """
    policy = os.environ.get(PLUGIN_ENV, "").strip()
    if policy:
        register(policy=policy, keep_in_place=os.environ.get(KEEP_IN_PLACE_ENV, "").strip() == "1")
