"""The rebalancing loop: when to move, which layers, how much (:class:`Rebalancer`).

A serving job records each window's expert load and, every few minutes,
asks for a decision. The rule:

- **history**: the planning load is the recorded windows, older ones
  weighing less: halved every ``half_life`` windows (a power-of-two scale
  and float32 sums, so every backend holds the same bits), or the plain sum
  of the last ``window`` windows;
- **candidate** per layer: ``rebalance_experts(history, previous=placement in
  force, balance_tolerance=...)``, the placement that keeps the most experts
  where they are within ``(1 + balance_tolerance)`` of a fresh plan's
  heaviest GPU. By default (``"auto"``) the tolerance follows how well the
  history predicted the traffic that came: a plan is only as balanced as the
  windows that arrive under it, so when they came out ``r`` times less
  balanced than planned (balancedness planned / arrived), the tolerance is
  ``0.1 * (r - 1)``, within ``[0.025, 0.2]``: 0.025 on predictable traffic,
  more where the balance a tight plan buys is lost to noise anyway. And
  where the tolerance itself cost balance, it falls: each step also keeps a
  fresh plan on its history (the plan with no tolerance), and scores both it
  and the placement in force on the windows that arrive. Their ratio
  (fresh / in force - 1, the *regret*) over the tolerance the step used, a
  running mean ``m`` clipped to ``[-1, 1]``, lowers the tolerance to
  ``max(0.025 - 0.01 m, t (1 - m))`` where ``m > 0`` (``t``: the value
  above) and raises it to ``max(t, 0.025 (1 - 3 m))`` where ``m < 0``. On
  drifting traffic, where the latest windows predict the next ones, the
  fresh plan keeps its edge and the tolerance sinks toward 0.015; where the
  windows alternate (prefill and decode phases), a fresh plan on the latest
  ones serves the next windows worse than the placement in force (planned
  for the mix), so the tolerance rises toward 0.1 and fewer experts move;
  where the windows barely predict each other the regret is noise around 0.
  On such noisy traffic (arrived more than 1.4 times less balanced than
  planned) the rule's premise, that noise takes back what a tight plan
  buys, is checked too: a *ceiling* on the tolerance falls to 0.7 times
  the tolerance used whenever the fresh plan still served those windows
  better, and rises 1.25-fold at every other step (within ``[0.002,
  0.2]``). With 9 slots a GPU a tight plan keeps most of its edge under
  noise (the Llama-4 series on 16 GPUs: the ceiling sinks to about
  0.01); with 5 it does not, and the ceiling stays out of the way;
- **a second candidate for the mix** per layer: the same call on the
  history plus the sum of the last ``long_window`` windows (16) weighed
  ``2**-k`` (about half a window's worth); a layer takes it where its
  heaviest GPU on the history is within ``(1 + tolerance)`` of the first
  candidate's and it is lighter on that sum. Traffic that alternates
  (prefill and decode phases) gets a placement for the mix of its phases,
  while on drifting traffic the mix seldom passes the first test;
- **gain** per layer: how much lighter the candidate's heaviest GPU is than
  the placement in force, on the planning load, relative to it. A layer
  changes only if that gain is at least ``min_gain`` (never worse on the load
  it planned from), best gain per moved expert first, within the budget
  (layers, experts, bytes).

Decisions are taken on the host from float32 values every backend computes
alike (heaviest GPU loads, move counts), so numpy, torch and JAX decide the
same, bit for bit. ``record`` never reads device values (no host sync on
CUDA); ``step`` copies the per-layer figures and the candidate to the host
once, since its :class:`~eplb.TransferPlan` is host data. On torch CUDA the
candidate's plan, the step's longest part (hundreds of kernel launches,
each paid in host time), replays as a CUDA graph
(:class:`~eplb.GraphedPlanner`, ``cuda_graphs=True``): the same placement,
a fraction of the host's time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from eplb import _validate, _xp, metrics
from eplb._api import Placement, rebalance_experts
from eplb.algorithms.hierarchy import build_log2phy
from eplb.algorithms.relabel import count_moves, occurrence, replica_counts
from eplb.graphed import GraphedPlanner
from eplb.migration import TransferPlan, plan_transfers

__all__ = ["Decision", "Rebalancer"]


class Decision(NamedTuple):
    """What :meth:`Rebalancer.step` decided.

    Attributes
    ----------
    placement : Placement
        In force afterwards, all layers (unchanged ones included), arrays of
        the loads' kind and device.
    layers : numpy.ndarray [K], int64
        The layers it changed, ascending.
    plan : TransferPlan
        The copies from the previous placement to ``placement`` (only the
        changed layers have any).
    gain : numpy.ndarray [L], float64
        Predicted relative gain per layer: ``1 - candidate peak / current
        peak`` on the planning load (0 where the current one is as good);
        with ``active_gpus`` or ``gpu_capacity``, peaks are the slowest GPU
        times, and a layer holding an expert on a GPU down has gain 1.
    moves : numpy.ndarray [L], int64
        ``(expert, GPU)`` pairs the candidate adds per layer (0 where unchanged).
    tolerance : float
        The ``balance_tolerance`` the candidates were planned with (the
        option, or its ``"auto"`` value for this step).
    """

    placement: Placement
    layers: np.ndarray
    plan: TransferPlan
    gain: np.ndarray
    moves: np.ndarray
    tolerance: float = 0.0


class Rebalancer:
    """Decides when, which layers and how much to move, from recorded expert loads.

    Parameters
    ----------
    num_replicas, num_groups, num_nodes, num_gpus : int
        As :func:`eplb.rebalance_experts`.
    initial : Placement or array [L, R], optional, keyword-only
        The placement in force; without it the first :meth:`step` plans fresh.
    half_life : int, keyword-only
        History: windows after which a recorded load weighs half (default 1:
        each window counts twice as much as the one before it).
    window : int, optional, keyword-only
        History: instead, the plain sum of the last ``window`` windows.
    long_window : int, keyword-only
        Windows of the longer history the second candidate plans for
        (default 16; 0: no second candidate). Their sum, oldest first, is
        weighed ``2**-k`` with ``k = ceil(log2(long_window)) + 1`` (a power
        of two: the same bits on every backend) and added to the history;
        needs two recorded windows at least. Keeps those windows (on their
        device: ``long_window x L x E`` float32).
    min_gain : float, keyword-only
        Smallest predicted relative gain worth a move (default 0.02: the
        layer's heaviest GPU 2% lighter on the planning load).
    balance_tolerance : float or "auto", keyword-only
        Passed to :func:`eplb.rebalance_experts`. ``"auto"`` (default): from
        the windows recorded since the last step, scored under the placement
        in force (balancedness: mean over layers of mean / max GPU load,
        float64 on the host), against the balancedness that placement was
        planned with: ``t = clip(0.1 * (planned / arrived - 1), 0.025, 0.2)``
        (0.025 until windows arrived under a placement; for an ``initial=``
        placement, whose planning load is unknown, ``planned`` is a fresh
        plan's balancedness on the recorded history); then moved by the
        regret: with ``fresh`` the balancedness of the same windows under a
        fresh plan on the last step's history and ``ratio = (fresh / arrived
        - 1) / (the last step's tolerance)``, the running mean ``m = ratio``
        at the first step that has one, then ``0.75 m + 0.25 ratio``, and
        ``c = clip(m, -1, 1)``: the tolerance is ``max(0.025 - 0.01 c, t (1 -
        c))`` where ``c >= 0``, ``max(t, 0.025 (1 - 3 c))`` where ``c < 0``
        (``t`` until a step has a ratio); at most the ceiling ``u`` (0.2 at
        first): at each step with a ratio, ``u = max(0.002, 0.7 min(u, the
        last step's tolerance))`` where ``planned / arrived > 1.4`` and
        ``fresh > arrived`` (noisy traffic on which the fresh plan served
        better), else ``u = min(0.2, 1.25 u)``.

    max_layers, max_experts, max_bytes : int, optional, keyword-only
        Per-step budget: layers changed, experts moved, bytes moved
        (``max_bytes`` needs ``bytes_per_expert``).
    bytes_per_expert : int, optional, keyword-only
        Size of one expert's weights, for ``max_bytes`` and the plan.
    policy, spill, hierarchical : keyword-only
        As :func:`eplb.rebalance_experts`.
    active_gpus, gpu_capacity : array [num_gpus], optional, keyword-only
        GPUs down and GPU speeds, as :func:`eplb.rebalance_experts` takes
        them (read on the host; change them with :meth:`set_gpus`). Layers
        are then scored by their slowest GPU's time, and a layer with an
        expert on a GPU down always changes.
    cuda_graphs : bool, keyword-only
        ``True`` (default): with loads on a CUDA device, each step's
        candidate (``previous=`` and its knobs) is planned by a
        :class:`~eplb.GraphedPlanner`: captured as a CUDA graph at the first
        step of each kind (with or without GPUs down or speeds; a capture
        costs a few to a hundred milliseconds and keeps the graph's memory),
        replayed by later steps: the plan's kernel launches (4-30 ms of host
        time eagerly) become one replay, steps 0.4-16 ms shorter on an H100
        (``docs/benchmarks.md``; not with a GPU down at 32 GPUs, where the
        eager call reads the mask on the host and computes one rule, the
        graph both); same decisions. ``False``: every call eager. Other
        backends are not affected.

    Notes
    -----
    The defaults were chosen on replayed traffic (``benchmarks/replay.py``,
    ``docs/benchmarks.md``): a short history predicts the next window better
    than the last few windows' sum on drifting traffic, which leaves room for
    a tolerance that keeps most experts in place, and the mix candidate
    serves traffic that alternates. On the 20 replayed traces (Llama-4 on
    160 slots / 32 GPUs, drift, a sudden shift, prefill/decode phases) their
    time-averaged balance is within 0.5% of a fresh plan's every 4 windows
    (worst -0.06%), they move at most 20% of its experts, and they beat a
    32-window history (the FlashLB-like rule) on both balance and moves on
    all 20. Not on every configuration: on the Llama-4 series at 144 slots /
    16 GPUs, over 40 readings of it (``--traces llama-8-g16-orderings``...,
    prefill and decode counts), they meet those conditions on 26 (17 before
    the ceiling), and on 10 of 12 decode readings at 160 slots (3 before);
    82 of 107 replayed traces in all (61 before; ``docs/benchmarks.md``).
    """

    def __init__(
        self,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_gpus: int,
        *,
        initial: Any = None,
        half_life: int = 1,
        window: int | None = None,
        long_window: int = 16,
        min_gain: float = 0.02,
        balance_tolerance: float | str = "auto",
        max_layers: int | None = None,
        max_experts: int | None = None,
        max_bytes: int | None = None,
        bytes_per_expert: int | None = None,
        policy: str = "greedy",
        spill: int = 0,
        hierarchical: bool | None = None,
        active_gpus: Any = None,
        gpu_capacity: Any = None,
        cuda_graphs: bool = True,
    ) -> None:
        names = ("num_replicas", "num_groups", "num_nodes", "num_gpus")
        sizes = (num_replicas, num_groups, num_nodes, num_gpus)
        self._sizes = tuple(_validate.check_count(n, v) for n, v in zip(names, sizes, strict=True))
        self._half_life = _validate.check_count("half_life", half_life)
        self._window = None if window is None else _validate.check_count("window", window)
        if isinstance(long_window, bool) or not isinstance(long_window, int | np.integer):
            raise TypeError(f"long_window must be an int, got {type(long_window).__name__}")
        if long_window < 0:
            raise ValueError(f"long_window={long_window!r} must be >= 0 (0: no second candidate)")
        self._long_window = int(long_window)
        self._long_scale = 2.0 ** -(max(self._long_window - 1, 0).bit_length() + 1)
        self._long: list[Any] = []  # the last long_window windows, oldest first
        self._auto = isinstance(balance_tolerance, str)
        if self._auto and balance_tolerance != "auto":
            raise ValueError(f"balance_tolerance={balance_tolerance!r} must be a number >= 0 or 'auto'")
        for name, value in (
            ("min_gain", min_gain),
            ("balance_tolerance", _AUTO[0] if self._auto else balance_tolerance),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        self._min_gain = float(min_gain)
        self._tolerance = _AUTO[0] if self._auto else float(balance_tolerance)
        budget = (("max_layers", max_layers), ("max_experts", max_experts), ("max_bytes", max_bytes))
        self._budget = {n: None if v is None else _validate.check_count(n, v) for n, v in budget}
        self._bytes = None if bytes_per_expert is None else _validate.check_count("bytes_per_expert", bytes_per_expert)
        if max_bytes is not None and bytes_per_expert is None:
            raise ValueError("max_bytes needs bytes_per_expert")
        self._options: dict[str, Any] = {"policy": policy, "spill": spill}
        if hierarchical is not None:
            self._options["hierarchical"] = hierarchical
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        # The candidate's planner: CUDA graphs on torch CUDA loads, rebalance_experts as it is for any other.
        self._planner = GraphedPlanner(*self._sizes, **self._options) if cuda_graphs else None
        self._placement: Any = initial
        self._history: Any = None
        self._ring: list[Any] = []
        self._recorded = 0
        # "auto" tolerance: GPU loads [L, G] of each window since the last step under the placement in force
        # (device arrays, read at the next step), and the balancedness that placement was planned with.
        self._arrived: list[Any] = []
        self._in_force: Any = None
        self._planned: float | None = None
        # ... and under a fresh plan on the last step's history (phy2log on the loads' device), for the regret:
        # how much balance the tolerance cost on the windows that came (its running mean over steps, and the
        # tolerance of the last step).
        self._reference: Any = None
        self._reference_arrived: list[Any] = []
        self._regret: float | None = None
        self._last_tolerance = _AUTO[0]
        self._ceiling = _AUTO[2]  # "auto": the most the tolerance may be, lowered where noisy traffic proved it costly
        self._gpus: dict[str, np.ndarray] = {}
        self._broken = False  # the placement in force holds experts on a GPU down (until the next step)
        self.set_gpus(active_gpus=active_gpus, gpu_capacity=gpu_capacity)

    def set_gpus(self, *, active_gpus: Any = None, gpu_capacity: Any = None) -> None:
        """The GPUs from the next :meth:`step` on: ``active_gpus`` (bool ``[num_gpus]``: failed or drained GPUs
        ``False``) and ``gpu_capacity`` (relative speeds ``[num_gpus]``, 0: idle), as
        :func:`eplb.rebalance_experts` takes them; ``None`` (default): every GPU up, equal speeds.

        Read on the host once, here (a failure or a speed change is rare; the loads stay on the device). The
        next step plans with them, scores layers by their slowest GPU's time (load / capacity, float64 on the
        host), and changes every layer whose placement in force holds an expert on a GPU now down, whatever
        its gain and the budget (that layer has lost those replicas).
        """
        gpus = self._sizes[3]
        self._gpus = {}
        for name, value, kind in (("active_gpus", active_gpus, bool), ("gpu_capacity", gpu_capacity, np.float64)):
            if value is None:
                continue
            host = np.asarray(_host(value))
            if host.shape != (gpus,):
                raise ValueError(f"{name} must have shape [num_gpus] = [{gpus}], got {list(host.shape)}")
            if kind is bool and host.dtype != np.bool_:
                raise TypeError(f"active_gpus must be a bool array, got {host.dtype}")
            self._gpus[name] = host.astype(kind)
        # The "auto" scoring restarts under the new GPUs; while the placement in force holds experts on a GPU
        # now down (until the next step), arriving windows are not scored (their slowest time is infinite).
        self._in_force, self._arrived = None, []
        self._reference, self._reference_arrived = None, []  # a fresh plan for the old GPUs: no reference
        speeds = self._speeds()
        self._broken = False
        placement = self._placement
        if speeds is not None and placement is not None:
            phy2log = np.asarray(_host(placement.phy2log if isinstance(placement, Placement) else placement))
            self._broken = bool(np.any((phy2log >= 0) & np.repeat(speeds == 0, phy2log.shape[1] // gpus)[None, :]))

    def _speeds(self) -> np.ndarray | None:
        """``[G]`` float64 speeds for scoring (float32-rounded capacities, 1.0 without; 0: a GPU down or idle),
        or ``None`` with every GPU up at equal speed."""
        if not self._gpus:
            return None
        speeds = np.ones(self._sizes[3])
        if "gpu_capacity" in self._gpus:
            speeds = self._gpus["gpu_capacity"].astype(np.float32).astype(np.float64)
            speeds = np.where(np.isfinite(speeds) & (speeds > 0), speeds, 0.0)
        if "active_gpus" in self._gpus:
            speeds = np.where(self._gpus["active_gpus"], speeds, 0.0)
        return speeds

    @property
    def placement(self) -> Any:
        """The placement in force (``None`` before the first :meth:`step` without ``initial``)."""
        return self._placement

    def record(self, load: Any) -> None:
        """Add one window's load ``[L, E]`` (numpy, torch or JAX; or a :class:`~eplb.LoadTracker`: its ``load()``).

        No host sync: float32 array operations on the load's device.
        """
        from eplb.tracker import LoadTracker

        if isinstance(load, LoadTracker):
            load = load.load()
        if _xp.backend_name(load) == "numpy":
            load = np.asarray(load)
        _validate.check_weight_shape(tuple(load.shape))
        xp = _xp.array_namespace(load)
        load = xp.astype(load, xp.float32)
        if self._history is not None and tuple(load.shape) != tuple(self._history.shape):
            raise ValueError(f"load has shape {tuple(load.shape)}, expected {tuple(self._history.shape)}")
        self._recorded += 1
        if self._long_window:
            self._long = [*self._long[max(0, len(self._long) + 1 - self._long_window) :], load]
        if self._window is not None:
            self._ring = [*self._ring[max(0, len(self._ring) + 1 - self._window) :], load]
            total = self._ring[0]
            for part in self._ring[1:]:
                total = total + part  # oldest first: a fixed order, the same bits everywhere
            self._history = total
            return
        self._history = load if self._history is None else self._history + load
        if self._recorded % self._half_life == 0:
            self._history = self._history * 0.5  # a power of two: exact on every backend
        self._score_arrival(load)

    def _score_arrival(self, load: Any) -> None:
        """Keep the window's GPU loads under the placement in force (on the device: no host sync)."""
        if not self._auto or self._placement is None or self._broken:
            return
        if self._in_force is None:  # converted once per step, not per window
            self._in_force = _as_placement(self._placement, load).phy2log
        loads = metrics.gpu_loads(load, self._in_force, self._sizes[3])
        self._arrived = [*self._arrived[1 - _ARRIVED_KEPT :], loads]
        if self._reference is not None:
            loads = metrics.gpu_loads(load, self._reference, self._sizes[3])
            self._reference_arrived = [*self._reference_arrived[1 - _ARRIVED_KEPT :], loads]

    def _step_tolerance(self) -> float:
        """The tolerance of this step: the option, or ``"auto"``'s value from the windows since the last one."""
        if not self._auto:
            return self._tolerance
        floor, slope, cap = _AUTO
        if not self._arrived:
            return min(floor, self._ceiling)
        planned, speeds = self._planned, self._speeds()  # speeds: once per step, not per window
        if planned is None:  # an initial= placement, planned on loads we never saw: a fresh plan's own balance
            fresh = rebalance_experts(self._history, *self._sizes, **self._options, **self._gpus)
            loads = _host(metrics.gpu_loads(self._history, fresh.phy2log, self._sizes[3]))
            planned = _balancedness(loads, speeds)
        xp = _xp.array_namespace(self._arrived[0])
        scored = self._arrived + self._reference_arrived
        windows = _host(xp.stack(scored))  # one copy to the host for all of them, [windows, L, G]
        balance = [_balancedness(loads, speeds) for loads in windows]
        arrived = float(np.mean(balance[: len(self._arrived)]))
        has_fresh = len(self._reference_arrived) == len(self._arrived)  # the fresh reference scored them too
        # fresh / in force - 1 on the windows that came (0 where no load came: nothing says the tolerance cost)
        gap = float(np.mean(balance[len(self._arrived) :])) / arrived - 1.0 if has_fresh and arrived > 0 else 0.0
        if has_fresh:
            # The ceiling: on noisy traffic (arrived well below planned) the rule below raises the tolerance on
            # the premise that noise takes back what a tight plan buys; where the fresh plan still served the
            # windows better, that premise failed: the ceiling falls below the tolerance used, else it recovers.
            noisy_at, down, up, lowest = _NOISY
            if gap > 0 and planned / arrived > noisy_at:  # gap > 0 implies arrived > 0
                self._ceiling = max(lowest, min(self._ceiling, self._last_tolerance) * down)
            else:
                self._ceiling = min(cap, self._ceiling * up)
        if arrived <= 0:
            return min(cap, self._ceiling)
        tolerance = float(min(cap, max(floor, slope * (planned / arrived - 1.0))))
        if has_fresh:
            ratio = gap / self._last_tolerance
            memory = _REGRET[0]
            self._regret = ratio if self._regret is None else memory * self._regret + (1.0 - memory) * ratio
        if self._regret is not None:
            cost = min(max(self._regret, -1.0), 1.0)
            if cost >= 0:  # the tolerance cost balance: lower it
                tolerance = max(floor - _REGRET[1] * cost, tolerance * (1.0 - cost))
            else:  # fresh plans served worse than the placement in force: moving to them buys nothing
                tolerance = max(tolerance, floor * (1.0 - _REGRET[2] * cost))
        return min(tolerance, self._ceiling)

    def step(self) -> Decision:
        """Decide on the recorded history: the layers to change, their new placement and the copies."""
        if self._history is None:
            raise ValueError("record() at least one window before step()")
        history, num_nodes, num_gpus = self._history, self._sizes[2], self._sizes[3]
        tolerance = self._step_tolerance()
        self._arrived, self._in_force, self._broken = [], None, False
        self._reference_arrived, self._last_tolerance = [], tolerance
        speeds = self._speeds()
        if self._placement is None:
            fresh = rebalance_experts(history, *self._sizes, **self._options, **self._gpus)
            layers = np.arange(history.shape[0], dtype=np.int64)
            phy2log = _host(fresh.phy2log)
            plan = plan_transfers(phy2log, phy2log, num_gpus=num_gpus, num_nodes=num_nodes, expert_bytes=self._bytes)
            self._placement = fresh
            if self._auto:
                self._planned = _balancedness(_host(metrics.gpu_loads(history, fresh.phy2log, num_gpus)), speeds)
                self._reference = None if self._options["spill"] else fresh.phy2log
            nothing = np.zeros(len(layers), dtype=np.int64)
            return Decision(
                fresh, layers, plan, np.zeros(len(layers)), nothing, 0.0 if self._options["spill"] else tolerance
            )
        current = _as_placement(self._placement, history)
        knobs = {} if self._options["spill"] else {"balance_tolerance": tolerance}
        gpus = dict(self._gpus)
        if not gpus and bool((_host(current.phy2log) < 0).any()):
            # Empty slots in force (a GPU back from a failure): the elastic rule plans from them, every GPU up.
            gpus["active_gpus"] = np.ones(num_gpus, dtype=bool)
        candidate, loads_new = self._candidate(history, current.phy2log, knobs, gpus, speeds)
        # float32 GPU loads, computed alike on every backend, then decided on the host in float64.
        loads_now = _host(metrics.gpu_loads(history, current.phy2log, num_gpus))
        old, new = _host(current.phy2log), _host(candidate.phy2log)
        peak_now, peak_new = _slowest(loads_now, speeds), _slowest(loads_new, speeds)
        # A layer holding an expert on a GPU now down has lost those replicas: it must change.
        down = np.zeros(num_gpus, dtype=bool) if speeds is None else speeds == 0
        broken = np.any((old >= 0) & np.repeat(down, old.shape[1] // num_gpus)[None, :], axis=-1)
        moves = np.asarray(count_moves(new, old, num_gpus, xp=np), dtype=np.int64)
        gain = np.zeros(len(moves))
        better = (peak_new < peak_now) & (peak_now > 0)
        gain[better] = 1.0 - peak_new[better] / peak_now[better]
        gain[broken] = 1.0
        chosen = self._choose(gain, moves, broken)
        mask = np.zeros(len(moves), dtype=bool)
        mask[chosen] = True
        placed = np.where(mask[:, None], new, old)
        placement = Placement(*(_select(mask, b, a) for a, b in zip(current, candidate, strict=True)))
        plan = plan_transfers(old, placed, num_gpus=num_gpus, num_nodes=num_nodes, expert_bytes=self._bytes)
        self._placement = placement
        if self._auto:
            self._planned = _balancedness(np.where(mask[:, None], loads_new, loads_now), speeds)
            if not self._options["spill"]:  # with spill the tolerance is not used
                self._reference = self._replan(history).phy2log  # graphed on CUDA: a fresh plan by time is long
        return Decision(placement, chosen, plan, gain, np.where(mask, moves, 0), 0.0 if knobs == {} else tolerance)

    def _replan(
        self, history: Any, previous: Any = None, knobs: dict[str, Any] | None = None,
        gpus: dict[str, np.ndarray] | None = None,
    ) -> Placement:  # fmt: skip
        """:func:`eplb.rebalance_experts` on ``history`` (with ``previous``: the candidate; without: the regret's
        fresh reference), or its CUDA graph (``cuda_graphs``: one graph per kind of call)."""
        knobs, gpus = knobs or {}, self._gpus if gpus is None else gpus
        if previous is not None:
            knobs = {"previous": previous, **knobs}
        if self._planner is None:
            return rebalance_experts(history, *self._sizes, **self._options, **knobs, **gpus)
        if _xp.backend_name(history) == "torch" and history.device.type == "cuda":
            import torch

            # A graph takes per-call tensors on the loads' device (a host array would choose the rule on the host,
            # which a graph cannot replay); the same masks and speeds give the same placement.
            gpus = {name: torch.as_tensor(value, device=history.device) for name, value in gpus.items()}
        return self._planner(history, **knobs, **gpus)

    def _candidate(
        self, history: Any, previous: Any, knobs: dict[str, Any], gpus: dict[str, np.ndarray],
        speeds: np.ndarray | None,
    ) -> tuple[Placement, np.ndarray]:  # fmt: skip
        """The step's candidate and its GPU loads on ``history`` (host ``[L, G]`` float32): per layer, the plan
        for the history, or the plan for the mix (the history plus the weighed sum of the last ``long_window``
        windows) where that one's slowest GPU on ``history`` is within ``(1 + tolerance)`` of the first's and it
        is faster on that sum (float32 loads, compared in float64 on the host). Both plans are one call on the
        layers stacked twice (layers are independent problems): one set of kernel launches, one CUDA graph."""
        if len(self._long) < 2:
            candidate = self._replan(history, previous, knobs, gpus)
            return candidate, _host(metrics.gpu_loads(history, candidate.phy2log, self._sizes[3]))
        xp = _xp.array_namespace(history)
        total = self._long[0]
        for part in self._long[1:]:
            total = total + part  # oldest first: a fixed order, the same bits everywhere
        # A power-of-two weight: an exact product, so a fused multiply-add gives the same bits as two steps.
        mixed = history + total * self._long_scale
        both = self._replan(xp.concat([history, mixed]), xp.concat([previous, previous]), knobs, gpus)
        layers = history.shape[0]
        first, second = Placement(*(x[:layers] for x in both)), Placement(*(x[layers:] for x in both))
        num_gpus, tolerance = self._sizes[3], knobs.get("balance_tolerance", 0.0)
        loads = [metrics.gpu_loads(load, c.phy2log, num_gpus) for load in (history, total) for c in (first, second)]
        loads = _host(xp.stack(loads))  # [4, L, G]: one copy to the host
        first_now, second_now, first_long, second_long = (_slowest(x, speeds) for x in loads)
        take = (second_now <= first_now * (1.0 + tolerance)) & (second_long < first_long)
        candidate_loads = np.where(take[:, None], loads[1], loads[0])  # the candidate's loads, as gpu_loads gives them
        if not take.any():
            return first, candidate_loads
        return Placement(*(_select(take, b, a) for a, b in zip(first, second, strict=True))), candidate_loads

    def _choose(self, gain: np.ndarray, moves: np.ndarray, forced: np.ndarray) -> np.ndarray:
        """Layers worth changing: the ``forced`` ones (whatever the budget), then those of gain >= min_gain where
        something moves, best gain per move first, within the budget (the forced ones' moves count in it)."""
        worth = np.flatnonzero((gain >= self._min_gain) & (gain > 0) & (moves > 0) & ~forced)
        # Gain per moved expert, largest first; equal keys by layer (a stable sort of the negated key).
        order = worth[np.argsort(-(gain[worth] / moves[worth]), kind="stable")]
        chosen: list[int] = np.flatnonzero(forced).tolist()
        experts = int(moves[forced].sum())
        for layer in order.tolist():
            if self._budget["max_layers"] is not None and len(chosen) >= self._budget["max_layers"]:
                break
            cost = experts + int(moves[layer])
            if self._budget["max_experts"] is not None and cost > self._budget["max_experts"]:
                continue
            if self._budget["max_bytes"] is not None and cost * self._bytes > self._budget["max_bytes"]:
                continue
            chosen.append(layer)
            experts = cost
        return np.array(sorted(chosen), dtype=np.int64)


_AUTO = (0.025, 0.1, 0.2)  # "auto" tolerance: floor, slope per unit of (planned / arrived - 1), cap
# "auto": memory of the regret's running mean, the most it lowers the floor, how far a negative one raises it
_REGRET = (0.75, 0.01, 3.0)
# "auto": the ceiling on noisy traffic: planned / arrived balance above which traffic counts as noisy, the factor
# on the last tolerance when the fresh plan served better there, the factor otherwise (recovery), the lowest ceiling
_NOISY = (1.4, 0.7, 1.25, 0.002)
_ARRIVED_KEPT = 64  # windows scored for "auto" between two steps (the latest)


def _balancedness(gpu_loads: np.ndarray, speeds: np.ndarray | None = None) -> float:
    """Mean over layers of mean / max GPU load of ``gpu_loads [L, G]`` (float64; layers without load skipped);
    with ``speeds [G]`` (0: down), (total load / total speed) / slowest time, over the GPUs up."""
    loads = gpu_loads.astype(np.float64)
    if speeds is None:
        peak = loads.max(axis=-1)
        mean = loads.mean(axis=-1)
    else:
        peak = _slowest(gpu_loads, speeds)
        mean = loads.sum(axis=-1) / speeds.sum()
    loaded = peak > 0
    return float((mean[loaded] / peak[loaded]).mean()) if loaded.any() else 1.0


def _slowest(gpu_loads: np.ndarray, speeds: np.ndarray | None) -> np.ndarray:
    """``[L]`` float64: the heaviest GPU load, or (``speeds [G]``) the slowest GPU time, load / speed; a GPU
    down (speed 0) holding load takes ``inf``."""
    loads = gpu_loads.astype(np.float64)
    if speeds is None:
        return loads.max(axis=-1)
    up = speeds > 0
    times = np.where(up, loads / np.where(up, speeds, 1.0), np.where(loads > 0, np.inf, 0.0))
    return times.max(axis=-1)


def _host(x: Any) -> np.ndarray:
    """A numpy copy of an array of any backend (a device-to-host copy for CUDA and GPU arrays)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _like(x: np.ndarray, ref: Any) -> Any:
    """Host data ``x`` as an array of ``ref``'s kind, on its device."""
    name = _xp.backend_name(ref)
    if name == "torch":
        import torch

        return torch.as_tensor(x, device=ref.device)
    if name == "jax":
        import jax

        return jax.device_put(x, ref.sharding)
    return np.asarray(x)


def _select(mask: np.ndarray, new: Any, old: Any) -> Any:
    """Per layer (leading axis): ``new`` where ``mask``, else ``old`` (both of one kind and device)."""
    xp = _xp.array_namespace(new)
    pick = _like(mask.reshape((-1,) + (1,) * (len(new.shape) - 1)), new)
    return xp.where(pick, new, xp.astype(old, new.dtype, copy=False))  # (no copy of old: same dtype)


def _as_placement(placement: Any, like: Any) -> Placement:
    """A :class:`Placement` of the loads' kind and device; an ``initial`` phy2log gets its log2phy (slot
    order, as ``previous=`` gives) and logcnt."""
    name = _xp.backend_name(like)
    if isinstance(placement, Placement):
        if all(_xp.backend_name(a) == name for a in placement):
            return placement
        return Placement(*(_like(_host(a), like) for a in placement))
    phy2log = np.asarray(_host(placement))
    num_layers, num_experts = like.shape
    if phy2log.dtype.kind not in "iu" or phy2log.ndim != 2 or phy2log.shape[0] != num_layers:
        got = f"{phy2log.dtype} {list(phy2log.shape)}"
        raise ValueError(f"initial must be an integer [{num_layers}, slots] placement, got {got}")
    if phy2log.size and (phy2log.min() < 0 or phy2log.max() >= num_experts):
        raise ValueError(f"initial must hold expert ids in [0, {num_experts})")
    phy2log = phy2log.astype(np.int64)
    logcnt = replica_counts(phy2log, num_experts, xp=np)
    log2phy = build_log2phy(phy2log, occurrence(phy2log, xp=np), num_experts, xp=np)
    return Placement(*(_like(a, like) for a in (phy2log, log2phy, logcnt)))
