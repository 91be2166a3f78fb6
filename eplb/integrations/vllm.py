"""eplb as a vLLM EPLB policy: ``AbstractEplbPolicy``'s signature and return conventions, eplb's placement.

vLLM chooses its policy with ``EPLBConfig.policy`` (``--eplb-config
'{"policy": ...}'``), looked up in the dict ``EPLB_POLICIES`` of
``vllm.distributed.eplb.policy``; the option is a ``Literal["default"]``, so
:func:`register` installs eplb under the name ``"default"``. vLLM then calls,
in each worker (``vllm/distributed/eplb/eplb_state.py``, ``async_worker.py``)::

    phy2log = policy.rebalance_experts(
        load.cpu(),            # [layers, logical experts], summed over the window (integer)
        num_replicas,          # physical experts R
        num_groups,            # model.num_expert_groups
        num_nodes,             # 1 when num_ranks % nodes != 0
        num_ranks,             # EP size: eplb's num_gpus
        physical_to_logical_map.cpu(),  # the placement in use, [layers, R]
    )

and requires a CPU tensor ``[layers, R]`` back; it derives ``log2phy`` and
the replica counts itself. Versions 0.13 to 0.18 returned the tuple
``(phy2log, log2phy, logcnt)`` instead (0.13 without the sixth argument),
and up to 0.12 called the function ``rebalance_experts(weight,
num_replicas, num_groups, num_nodes, num_gpus)`` of
``vllm/distributed/eplb/rebalance_algo.py``, with the same tuple:
:class:`EplbTuplePolicy` / :func:`rebalance_experts_tuple` keep that
contract, and :func:`register` picks the one the installed vLLM uses.

Conversions, explicitly: ``num_ranks`` is eplb's ``num_gpus``;
``num_groups`` below 1 (or ``None``) means one group; the old placement is
passed as ``previous=`` (so the result keeps as many experts in place as
eplb can, with the balance of the placement without it; vLLM's default
policy only reorders slots within a GPU); phy2log comes back as int64 on
the CPU. This module imports no vLLM (but inside :func:`register`) and
imports torch when first called.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import os
import sys
import typing
from typing import Any, ClassVar

from eplb.integrations import _common

__all__ = ["EplbPolicy", "EplbTuplePolicy", "plugin", "rebalance_experts", "rebalance_experts_tuple", "register"]

_EXTRA = ("keep_in_place",)
_POLICY = "vllm.distributed.eplb.policy"
_STATE = "vllm.distributed.eplb.eplb_state"


def _placement(
    weight: Any,
    num_replicas: int,
    num_groups: int | None,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: Any,
    options: dict[str, Any],
) -> Any:
    options = _common.check_options(options, _EXTRA)
    keep_in_place = options.pop("keep_in_place", True)
    weight = _common.as_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, logical experts], got shape {tuple(weight.shape)}")
    if num_groups is None or (
        isinstance(num_groups, numbers.Integral) and not isinstance(num_groups, bool) and num_groups < 1
    ):
        num_groups = 1  # models without expert groups
    previous = None
    if keep_in_place:
        num_layers, num_experts = (int(n) for n in weight.shape)
        previous = _common.usable_previous(old_global_expert_indices, num_layers, num_replicas, num_experts)
    return _common.plan(weight, num_replicas, num_groups, num_nodes, num_ranks, previous, options)


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: Any = None,
    *,
    policy: str = "greedy",
    hierarchical: bool | None = None,
    spill: int = 0,
    balance_tolerance: float | None = None,
    max_moves: int | None = None,
    keep_in_place: bool = True,
) -> Any:
    """vLLM's current policy contract: the new ``physical_to_logical_map``, int64, on the CPU.

    Parameters
    ----------
    weight : torch.Tensor [layers, num_logical_experts]
        Expert loads (any integer or floating dtype, any device; numpy arrays
        and lists are accepted too). Planned where it lives.
    num_replicas : int
        Physical experts ``R``, a multiple of ``num_ranks``.
    num_groups : int
        Expert groups; ``None`` or below 1 means one group. As in vLLM, the
        hierarchical policy runs iff ``num_groups % num_nodes == 0``.
    num_nodes : int
        Nodes; ``num_ranks`` must be a multiple of it.
    num_ranks : int
        EP ranks (GPUs): eplb's ``num_gpus``.
    old_global_expert_indices : torch.Tensor [layers, R], optional
        The placement in use (vLLM passes its ``physical_to_logical_map``;
        its docstring says ``[layers, num_logical_experts]``, its code passes
        ``[layers, num_physical_experts]``). With ``keep_in_place`` it is
        eplb's ``previous=`` when it has this call's shape and holds ids in
        ``[0, E)``; otherwise it is ignored, as vLLM ignores it when the GPU
        count changes.
    policy, hierarchical, spill, balance_tolerance, max_moves : keyword-only
        eplb's options (see :func:`eplb.rebalance_experts`); the defaults
        keep vLLM's algorithm (the published greedy policy, hierarchical
        iff ``num_groups % num_nodes == 0``). ``balance_tolerance`` and
        ``max_moves`` act only on calls with a usable old placement, and
        ``max_moves`` only where it is a placement of this config (else
        left out with a ``RuntimeWarning``).
    keep_in_place : bool, keyword-only
        Pass the old placement as ``previous=`` (default ``True``). With
        ``False`` the old placement is ignored and the result is the
        placement of the policy alone.

    Returns
    -------
    torch.Tensor [layers, R], int64, CPU
        Logical expert of each physical slot; slot ``j`` is on rank
        ``j // (R // num_ranks)``. Placed on the weight's device and copied
        to the CPU (vLLM asserts a CPU result).
    """
    options = {
        "policy": policy,
        "hierarchical": hierarchical,
        "spill": spill,
        "balance_tolerance": balance_tolerance,
        "max_moves": max_moves,
        "keep_in_place": keep_in_place,
    }
    placement = _placement(weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices, options)
    return placement.phy2log.cpu()


def rebalance_experts_tuple(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_global_expert_indices: Any = None,
    *,
    policy: str = "greedy",
    hierarchical: bool | None = None,
    spill: int = 0,
    balance_tolerance: float | None = None,
    max_moves: int | None = None,
    keep_in_place: bool = True,
) -> tuple[Any, Any, Any]:
    """vLLM's earlier contract (up to 0.18): ``(phy2log, log2phy, logcnt)`` on the weight's device.

    Parameters
    ----------
    weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices
        As :func:`rebalance_experts` (``rebalance_algo.rebalance_experts`` of
        vLLM up to 0.12 names the fifth argument ``num_gpus`` and has no
        sixth; pass them positionally).
    policy, hierarchical, spill, balance_tolerance, max_moves, keep_in_place : keyword-only
        As :func:`rebalance_experts`.

    Returns
    -------
    phy2log : torch.Tensor [layers, R], int64
        Logical expert of each physical slot.
    log2phy : torch.Tensor [layers, E, R - E + 1], int64
        Slots of each expert by replica number, ``-1`` padded (vLLM's
        ``num_redundant_experts + 1`` width).
    logcnt : torch.Tensor [layers, E], int64
        Replicas per expert.

    All three on the weight's device, as vLLM's ``DefaultEplbPolicy`` returned them.
    """
    options = {
        "policy": policy,
        "hierarchical": hierarchical,
        "spill": spill,
        "balance_tolerance": balance_tolerance,
        "max_moves": max_moves,
        "keep_in_place": keep_in_place,
    }
    placement = _placement(weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices, options)
    return placement.phy2log, placement.log2phy, placement.logcnt


class EplbPolicy:
    """A vLLM EPLB policy class (duck-typed ``AbstractEplbPolicy``) backed by :func:`rebalance_experts`.

    vLLM calls ``EPLB_POLICIES[name].rebalance_experts(...)`` on the class
    with six positional arguments, so eplb's options live in the class:
    :meth:`configure` returns a subclass with other options, and
    :func:`register` installs one in vLLM (as a subclass of vLLM's
    ``AbstractEplbPolicy``).

    Attributes
    ----------
    options : dict
        Keyword options passed to :func:`rebalance_experts` (``policy``,
        ``hierarchical``, ``spill``, ``balance_tolerance``, ``max_moves``,
        ``keep_in_place``); empty by default (vLLM's algorithm, old
        placement kept in place).
    """

    options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def rebalance_experts(
        cls,
        weight: Any,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: Any = None,
    ) -> Any:
        """``AbstractEplbPolicy.rebalance_experts``: :func:`rebalance_experts` with this class's options."""
        return rebalance_experts(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices, **cls.options
        )

    @classmethod
    def configure(cls, **options: Any) -> type:
        """A subclass whose calls use ``options`` on top of this class's (``TypeError`` for unknown names)."""
        options = _common.check_options(options, _EXTRA)
        return type(cls.__name__, (cls,), {"options": {**cls.options, **options}, "__module__": cls.__module__})


class EplbTuplePolicy(EplbPolicy):
    """:class:`EplbPolicy` with vLLM 0.13 to 0.18's return contract: :func:`rebalance_experts_tuple`.

    Attributes
    ----------
    options : dict
        As :class:`EplbPolicy`.
    """

    @classmethod
    def rebalance_experts(
        cls,
        weight: Any,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: Any = None,
    ) -> tuple[Any, Any, Any]:
        """``AbstractEplbPolicy.rebalance_experts`` (tuple contract) with this class's options."""
        return rebalance_experts_tuple(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices, **cls.options
        )


def _returns_tuple(method: Any) -> bool:
    """Whether vLLM's abstract ``rebalance_experts`` is annotated to return a tuple (0.13 to 0.18)."""
    try:
        annotation = inspect.signature(method).return_annotation
    except (TypeError, ValueError):
        return False
    if isinstance(annotation, str):
        return annotation.replace(" ", "").lower().startswith("tuple")
    return typing.get_origin(annotation) is tuple or annotation is tuple


def register(name: str = "default", *, tuple_contract: bool | None = None, **options: Any) -> Any:
    """Make eplb vLLM's EPLB policy ``name`` in this process; returns what was installed.

    With vLLM's policy registry (0.13 and later) this puts a subclass of
    vLLM's ``AbstractEplbPolicy`` and of :class:`EplbPolicy` (or
    :class:`EplbTuplePolicy`) with ``options`` into ``EPLB_POLICIES[name]``.
    ``name="default"`` (the default) replaces vLLM's policy: ``EPLBConfig.policy``
    only accepts the names vLLM ships, and async EPLB only runs the
    ``"default"`` one. With vLLM up to 0.12 (no registry) it replaces
    ``vllm.distributed.eplb.eplb_state.rebalance_experts`` by a function
    with :func:`rebalance_experts_tuple`'s contract, and ``name`` is unused.

    vLLM plans in every EP worker process, so each one must register: call
    this where every worker runs it (a ``vllm.general_plugins`` entry point,
    see :func:`plugin`, or the top of the script that builds the engine when
    workers are forked). Calling it again replaces the previous
    registration.

    Parameters
    ----------
    name : str
        The key in ``EPLB_POLICIES``.
    tuple_contract : bool or None, keyword-only
        Return ``(phy2log, log2phy, logcnt)`` (vLLM 0.13 to 0.18) rather than
        ``phy2log`` (later). ``None``: read from the return annotation of
        vLLM's ``AbstractEplbPolicy.rebalance_experts``.
    **options
        eplb's options, as :meth:`EplbPolicy.configure`.

    Returns
    -------
    type or function
        The registered policy class (with vLLM up to 0.12, the function).

    Raises
    ------
    ImportError
        vLLM is not installed, or has neither EPLB entry point.
    """
    options = _common.check_options(options, _EXTRA)
    try:
        policies = importlib.import_module(_POLICY)
    except ModuleNotFoundError as err:
        if err.name in ("vllm", "vllm.distributed", "vllm.distributed.eplb"):
            raise ImportError("eplb.integrations.vllm.register() needs vLLM (with EPLB) installed") from err
        if err.name != _POLICY:
            raise
        return _register_function(options)
    base = getattr(policies, "AbstractEplbPolicy", None)
    if base is None:
        base = getattr(importlib.import_module(f"{_POLICY}.abstract"), "AbstractEplbPolicy", None)
    # EPLB_POLICIES: defined in the policy package, imported by eplb_state, which looks it up at each start.
    registries = [table for table in (getattr(policies, "EPLB_POLICIES", None),) if isinstance(table, dict)]
    state = sys.modules.get(_STATE)
    if state is None and not registries:
        state = importlib.import_module(_STATE)
    other = getattr(state, "EPLB_POLICIES", None)
    if isinstance(other, dict) and all(other is not table for table in registries):
        registries.append(other)  # a copy, not the same dict: update it too
    if base is None or not registries:
        raise ImportError(f"vLLM has no AbstractEplbPolicy / EPLB_POLICIES in {_POLICY} to register with")
    if tuple_contract is None:
        tuple_contract = _returns_tuple(base.rebalance_experts)
    ours = EplbTuplePolicy if tuple_contract else EplbPolicy
    policy = type(
        ours.__name__,
        (ours, base),
        {"options": {**ours.options, **options}, "__module__": __name__, "__doc__": ours.__doc__},
    )
    for table in registries:
        table[name] = policy
    return policy


def _register_function(options: dict[str, Any]) -> Any:
    """vLLM up to 0.12: ``eplb_state`` calls its module-level ``rebalance_experts`` (5 arguments, a tuple)."""
    try:
        state = importlib.import_module(_STATE)
    except ModuleNotFoundError as err:
        raise ImportError("this vLLM has no EPLB policy registry and no vllm.distributed.eplb.eplb_state") from err
    if not hasattr(state, "rebalance_experts"):
        raise ImportError("vllm.distributed.eplb.eplb_state has no rebalance_experts to replace")

    def rebalance(weight: Any, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> Any:
        return rebalance_experts_tuple(weight, num_replicas, num_groups, num_nodes, num_gpus, **options)

    rebalance.__doc__ = "eplb in place of vLLM's rebalance_algo.rebalance_experts (eplb.integrations.vllm.register)."
    state.rebalance_experts = rebalance
    return rebalance


PLUGIN_ENV = "EPLB_VLLM_POLICY"


def plugin() -> None:
    """A ``vllm.general_plugins`` entry point: registers eplb when ``EPLB_VLLM_POLICY`` is set.

    vLLM runs every installed general plugin in every process it starts.
    This one does nothing unless the environment variable
    ``EPLB_VLLM_POLICY`` names an eplb policy (``greedy`` or ``refined``),
    so installing it changes nothing by itself; then it calls
    ``register(policy=...)``.

    Returns
    -------
    None
    """
    policy = os.environ.get(PLUGIN_ENV, "").strip()
    if policy:
        register(policy=policy)
