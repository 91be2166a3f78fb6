"""``rebalance_experts`` replayed as a CUDA graph: one launch of host work per call on torch CUDA.

On a CUDA device a plan is a chain of kernels. The greedy policy is one
Triton launch, but the calls of a live job (``previous=`` with its knobs, a
GPU down, GPUs of unequal speed) launch 100-1,000 kernels, each costing the
host about 10-20 us: the host, not the GPU, bounds them (the
``gpu_capacity=`` re-plan takes about 20-30 ms of host time on an H200).
Since eplb's CUDA paths never synchronise and their shapes depend only on
the arguments' shapes, the whole call can be captured once as a CUDA graph
and replayed: the host then copies the inputs into the graph's buffers and
launches it, a few launches in all, and the GPU runs the kernels back to
back.

:class:`GraphedPlanner` does that: one capture per *call signature* (the
device, and the shape and dtype of each tensor argument), replayed for every
call with that signature. Any other input (numpy, torch CPU, JAX) is passed
to :func:`eplb.rebalance_experts` as it is.
"""

from __future__ import annotations

import inspect
import sys
import threading
import warnings
from collections import OrderedDict
from typing import Any, NamedTuple

from eplb._api import Placement, rebalance_experts

__all__ = ["GraphedPlanner"]

# Per-call tensor arguments (the graph's inputs); every other keyword of rebalance_experts is fixed per planner.
_TENSOR_ARGS = ("previous", "active_gpus", "gpu_capacity")
_OPTIONS = frozenset(
    name
    for name, parameter in inspect.signature(rebalance_experts).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in _TENSOR_ARGS
)


class _Captured(NamedTuple):
    """One call signature's graph: the input buffers it reads, and the outputs its replays overwrite.
    ``graph`` is ``None`` where the capture failed (the calls then run eagerly)."""

    inputs: dict[str, Any]
    graph: Any
    outputs: Placement | None


class GraphedPlanner:
    """:func:`eplb.rebalance_experts` with fixed sizes and options, captured as CUDA graphs on torch CUDA.

    ``planner = GraphedPlanner(num_replicas, num_groups, num_nodes, num_gpus, **options)``, then
    ``planner(weight, previous=..., active_gpus=..., gpu_capacity=...)`` returns what
    ``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, previous=...,
    active_gpus=..., gpu_capacity=..., **options)`` returns, bit for bit.

    With ``weight`` a CUDA tensor, the first call of each *signature* (the
    device and the shape and dtype of every tensor argument, including which
    ones are given) runs the plan once eagerly (it validates the arguments
    and builds eplb's constant tables, a host copy once per device), then
    captures it as one CUDA graph; every call, the first included, then
    copies its tensors into the graph's input buffers (device-to-device, on
    the current stream) and replays the graph. No call synchronises the
    host after the first of its signature: the result is queued on the
    current stream, like any torch CUDA op. Any other ``weight`` (numpy, a
    list, torch CPU, JAX) goes to :func:`eplb.rebalance_experts` unchanged.

    Parameters
    ----------
    num_replicas, num_groups, num_nodes, num_gpus : int
        As :func:`eplb.rebalance_experts`.
    copy_outputs : bool, keyword-only
        ``True`` (default): each call returns new tensors (three copies on
        the device). ``False``: the graph's own output tensors, which the
        next call of the same signature overwrites (no copy; for a caller
        that consumes the result before the next call).
    max_graphs : int, keyword-only
        Signatures kept (default 8); the least recently used graph is freed
        beyond that and captured again if its signature returns.
    **options
        Every other keyword of :func:`eplb.rebalance_experts` (``policy``,
        ``hierarchical``, ``spill``, ``check_values``), fixed for the
        planner: a graph bakes them in. ``balance_tolerance`` and
        ``max_moves`` may be fixed here too (Python numbers), or passed to
        each call instead (below). ``check_values=True`` is refused (it
        copies the loads to the host every call, which a graph cannot
        replay).

    Call arguments
    --------------
    weight : array [L, E]
        The loads. On CUDA: a torch tensor; the graph reads its values.
    previous, active_gpus, gpu_capacity : keyword-only
        As :func:`eplb.rebalance_experts` (``previous`` may be a
        :class:`~eplb.Placement`). With a CUDA ``weight`` each must be a
        torch tensor on the same device (``TypeError`` otherwise): a host
        array would be copied to the device in every call, which
        synchronises, and its values, read on the host, may choose the rule
        (``rebalance_experts``' docstring), which a graph cannot. Convert a
        mask or capacity vector once, ``torch.as_tensor(x,
        device=weight.device)``, and pass that.
    balance_tolerance, max_moves : keyword-only
        As :func:`eplb.rebalance_experts`, where not fixed at construction:
        a Python number (checked as there, then written into the graph's
        0-d buffer with ``fill_``, no host-to-device copy) or a 0-d tensor
        on the loads' device (copied). The graph reads the value, so a
        control loop varies it with no new capture; only whether a knob is
        given is part of the signature. Same placement as the Python number
        given to :func:`eplb.rebalance_experts`, bit for bit.

    Raises
    ------
    TypeError
        An unknown option, a per-call argument passed as an option, a fixed
        knob that is not a Python number, a knob both fixed and passed to a
        call, or (CUDA) a per-call argument that is not a tensor on the
        loads' device.
    ValueError
        ``check_values=True``, ``max_graphs < 1``; the first call of a
        signature raises what :func:`eplb.rebalance_experts` raises on its
        arguments.

    Warns
    -----
    RuntimeWarning
        When a signature's plan cannot be captured (it would have to
        synchronise: a bug of eplb's, since its CUDA paths promise not to);
        its calls then run eagerly, with the same results.

    Notes
    -----
    Thread-safe: calls share the graphs' buffers, so they take a lock from
    the copy into the buffers to the (copied) outputs. Graphs keep their
    own memory pools (freed with the graph, past ``max_graphs``). A call
    queues its copies, the replay and the output copies on the current
    stream of the loads' device, after the previous call's work on the
    planner's buffers (an event: no host wait), so calls from threads on
    different streams do not overwrite each other's inputs. With
    ``copy_outputs=False`` the returned tensors are the graph's, overwritten
    by the next call of the signature, from any thread.

    Examples
    --------
    On CUDA, with the loads and the placement in force on the GPU::

        planner = GraphedPlanner(288, 8, 4, 32)  # once
        placement = planner(load_on_gpu, previous=placement, balance_tolerance=0.005)  # each re-plan

    Other inputs are passed through (the README's example):

    >>> import numpy as np
    >>> planner = GraphedPlanner(16, 4, 2, 8)
    >>> w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
    >>> planner(w).phy2log.tolist()
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]
    """

    def __init__(
        self,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_gpus: int,
        *,
        copy_outputs: bool = True,
        max_graphs: int = 8,
        **options: Any,
    ) -> None:
        per_call = sorted(set(options) & set(_TENSOR_ARGS))
        if per_call:
            raise TypeError(f"pass {', '.join(per_call)} to each call of the planner, not to GraphedPlanner()")
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; GraphedPlanner takes {sorted(_OPTIONS)}")
        for knob in ("balance_tolerance", "max_moves"):
            value = options.get(knob)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise TypeError(f"{knob} must be a Python number for GraphedPlanner (a graph bakes it in)")
        if options.get("check_values"):
            raise ValueError(
                "check_values=True copies the loads to the host on every call, which a CUDA graph cannot replay; "
                "check them yourself before the call, or call eplb.rebalance_experts"
            )
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        if not isinstance(copy_outputs, bool):
            raise TypeError(f"copy_outputs must be a bool, got {type(copy_outputs).__name__}")
        self._sizes = (num_replicas, num_groups, num_nodes, num_gpus)
        # A knob fixed as None is a knob not fixed (a call may pass it).
        self._options = {
            k: v for k, v in options.items() if v is not None or k not in ("balance_tolerance", "max_moves")
        }
        self._copy_outputs = copy_outputs
        self._max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._lock = threading.Lock()
        self._done: dict[str, Any] = {}  # device -> event after the last call's work on the buffers
        self._captures = 0

    @property
    def captures(self) -> int:
        """Graphs captured so far (kept or freed, failed captures included); a known signature's call adds none."""
        return self._captures

    def __call__(
        self,
        weight: Any,
        *,
        previous: Any = None,
        active_gpus: Any = None,
        gpu_capacity: Any = None,
        balance_tolerance: Any = None,
        max_moves: Any = None,
    ) -> Placement:
        if isinstance(previous, Placement):
            previous = previous.phy2log
        given = {"previous": previous, "active_gpus": active_gpus, "gpu_capacity": gpu_capacity}
        knobs = {"balance_tolerance": balance_tolerance, "max_moves": max_moves}
        twice = sorted(name for name, value in knobs.items() if value is not None and name in self._options)
        if twice:
            raise TypeError(f"{', '.join(twice)} is fixed for this planner (at construction); do not pass it to a call")
        knobs = {name: value for name, value in knobs.items() if value is not None}
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(weight, torch.Tensor) or weight.device.type != "cuda":
            return rebalance_experts(weight, *self._sizes, **given, **knobs, **self._options)
        inputs = _static_inputs(weight, **given)
        knobs = _checked_knobs(knobs, weight, previous, self._options.get("spill", 0))
        signature = (
            str(weight.device),
            *((name, tuple(x.shape), x.dtype) for name, x in inputs.items()),
            *sorted(knobs),
        )
        # The loads' device current throughout: a graph is captured on, and replays on, the current device.
        with self._lock, torch.cuda.device(weight.device):
            captured = self._graphs.get(signature)
            if captured is None:
                captured = self._capture(inputs, knobs)
                self._graphs[signature] = captured
                while len(self._graphs) > self._max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(signature)
            stream = torch.cuda.current_stream()
            done = self._done.get(str(weight.device))
            if done is not None:  # the previous call's work on the buffers first (another stream, maybe)
                stream.wait_event(done)
            for name, x in inputs.items():
                captured.inputs[name].copy_(x)
            for name, value in knobs.items():
                _write_knob(captured.inputs[name], value)
            if captured.graph is None:
                result = self._plan(captured.inputs)
            else:
                captured.graph.replay()
                outputs = captured.outputs
                result = outputs if not self._copy_outputs else Placement(*(x.clone() for x in outputs))
            self._done.setdefault(str(weight.device), torch.cuda.Event()).record(stream)
            return result

    def _plan(self, inputs: dict[str, Any]) -> Placement:
        return rebalance_experts(inputs["weight"], *self._sizes, **_named(inputs), **self._options)

    def _capture(self, inputs: dict[str, Any], knobs: dict[str, Any]) -> _Captured:
        """Warm up on a side stream (validation, constant tables), then capture the plan on static buffers
        (the knobs' 0-d buffers: float32 ``balance_tolerance``, int64 ``max_moves``)."""
        import torch

        device = inputs["weight"].device
        buffers = {name: x.clone() for name, x in inputs.items()}
        for name, value in knobs.items():
            dtype = torch.float32 if name == "balance_tolerance" else torch.int64
            buffers[name] = torch.zeros((), dtype=dtype, device=device)
            _write_knob(buffers[name], value)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._plan(buffers)  # raises what rebalance_experts raises on these arguments
        torch.cuda.current_stream(device).wait_stream(side)
        self._captures += 1
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads' CUDA work (a serving loop) goes on during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self._plan(buffers)
        except Exception as err:  # any capture failure: the call is still correct, eagerly
            warnings.warn(
                f"eplb.GraphedPlanner: this call could not be captured as a CUDA graph ({type(err).__name__}: "
                f"{err}); calls of this signature run eagerly, with the same results. Please report it.",
                RuntimeWarning,
                stacklevel=3,
            )
            return _Captured(buffers, None, None)
        return _Captured(buffers, graph, Placement(*outputs))


def _checked_knobs(knobs: dict[str, Any], weight: Any, previous: Any, spill: int) -> dict[str, Any]:
    """The given per-call knobs, each a checked Python number (as :func:`eplb.rebalance_experts` checks it; a 0-d
    CPU tensor is read as one) or a 0-d tensor on ``weight``'s device (``TypeError`` on another device)."""
    from eplb import _api

    torch = sys.modules["torch"]
    for name, value in knobs.items():
        if isinstance(value, torch.Tensor) and value.device.type != "cpu" and value.device != weight.device:
            raise TypeError(
                f"{name} as a torch tensor must be on the loads' device ({weight.device}), got {value.device}"
            )
    tolerance, moves = _api._checked_knobs(knobs.get("balance_tolerance"), knobs.get("max_moves"), previous, spill)
    checked = {"balance_tolerance": tolerance, "max_moves": moves}
    return {name: checked[name] for name in knobs}


def _write_knob(buffer: Any, value: Any) -> None:
    """``value`` into a knob's 0-d device buffer: a Python number by ``fill_`` (a kernel argument, no
    host-to-device copy), a tensor by ``copy_``."""
    if isinstance(value, int | float):
        buffer.fill_(min(value, 2**62) if isinstance(value, int) else value)  # a cap past R counts as R anyway
    else:
        buffer.copy_(value)


def _named(inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``inputs`` (all but the loads)."""
    return {name: x for name, x in inputs.items() if name != "weight"}


def _static_inputs(weight: Any, **given: Any) -> dict[str, Any]:
    """``{"weight": weight, name: tensor}`` for every given per-call argument, each checked to be a torch tensor
    on ``weight``'s device (``TypeError`` naming the argument otherwise).

    ``given`` holds ``previous``, ``active_gpus`` and ``gpu_capacity`` (``None``: not given).
    """
    torch = sys.modules["torch"]
    inputs = {"weight": weight}
    for name, value in given.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.device != weight.device:
            where = f"a torch tensor on {value.device}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(
                f"{name} must be a torch tensor on the loads' device ({weight.device}) for GraphedPlanner, got "
                f"{where}: a host value would be copied (a sync) and read on the host in every call; convert it "
                f"once with torch.as_tensor({name}, device=weight.device)"
            )
        inputs[name] = value
    return inputs
