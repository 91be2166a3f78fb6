"""Rebalancing rules for ``benchmarks/replay.py``: when to re-plan which layers, written from public descriptions.

The interface (all the harness relies on):

- ``Rule(config, **options)``, ``config = (num_replicas, num_groups, num_nodes,
  num_gpus)``; the harness passes ``interval`` (windows between decisions) to
  every rule; ``policy`` (``eplb.rebalance_experts``' policy, default
  ``"greedy"``) is accepted by every rule;
- ``observe(window)``: called with every window, ``[L, E]`` int64;
- ``initial() -> phy2log``: the first placement, after the first window was
  observed (by default a fresh plan of that window);
- ``decide() -> phy2log [L, R] | None``: called every ``decide_every`` windows
  (``None``: the harness's ``interval``); ``None`` keeps the placement in force.

Every rule plans with ``eplb.rebalance_experts`` (the published DeepSeek greedy
policy that vLLM, SGLang and vllm-ascend's default adapt; FlashLB, TensorRT-LLM
and xLLM have their own planners, not reproduced: the replay compares the
*rules* -- when, which layers, on which history -- with one planner).
Moved experts are counted by the harness as the ``(expert, GPU)`` pairs a new
placement adds, so the order of slots inside a GPU does not matter to the
score; rules that preserve it upstream (vLLM, FlashLB) do so here too, for
fidelity of the returned ``phy2log`` only.

Our code, written from the descriptions and sources cited in each docstring;
no code was copied.
"""

from __future__ import annotations

import inspect
import math
from collections import deque

import numpy as np

import eplb


class RuleUnavailable(RuntimeError):
    """The rule cannot run in this environment (the harness prints the reason and skips it)."""


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[..., L, G]`` float64 GPU loads of ``weight [..., L, E]`` under ``phy2log [L, R]`` (replica = w / count)."""
    num_slots = phy2log.shape[1]
    num_experts = weight.shape[-1]
    count = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    per_replica = np.asarray(weight, dtype=np.float64) / np.maximum(count, 1)
    index = np.broadcast_to(phy2log, (*per_replica.shape[:-1], num_slots))
    slots = np.take_along_axis(per_replica, index, axis=-1)
    return slots.reshape(*slots.shape[:-1], num_gpus, num_slots // num_gpus).sum(axis=-1)


def imbalance(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[..., L]``: max GPU load / mean GPU load (1 = perfect; 1 for an all-zero layer)."""
    loads = gpu_loads(weight, phy2log, num_gpus)
    mean = loads.mean(axis=-1)
    return np.where(mean > 0, loads.max(axis=-1) / np.where(mean > 0, mean, 1.0), 1.0)


def keep_slots(new: np.ndarray, old: np.ndarray, num_gpus: int) -> np.ndarray:
    """Reorder each GPU's slots of ``new`` so that an expert the GPU already held keeps its old slot.

    Same multiset per GPU as ``new``; incoming experts fill the freed slots in
    ``new``'s order. (vLLM's ``preserve_intragpu_slots``; vllm-ascend FlashLB's
    ``auto_fix_new_placement`` does the same per rank.)
    """
    out = new.copy()
    per_gpu = new.shape[1] // num_gpus
    for layer in range(new.shape[0]):
        for start in range(0, new.shape[1], per_gpu):
            incoming = new[layer, start : start + per_gpu].tolist()
            kept: list[int | None] = []
            for expert in old[layer, start : start + per_gpu].tolist():
                if expert in incoming:
                    incoming.remove(expert)
                    kept.append(expert)
                else:
                    kept.append(None)
            fill = iter(incoming)
            out[layer, start : start + per_gpu] = [next(fill) if e is None else e for e in kept]
    return out


class Rule:
    """Base: keeps the last ``keep`` windows and the placement in force (``current``)."""

    decide_every: int | None = None  # windows between decide() calls; None: the harness's interval

    def __init__(self, config, *, interval: int = 4, policy: str = "greedy", keep: int | None = None) -> None:
        self.config = tuple(int(x) for x in config)
        self.num_replicas, self.num_groups, self.num_nodes, self.num_gpus = self.config
        self.interval = int(interval)
        self.policy = policy
        self.history: deque[np.ndarray] = deque(maxlen=keep or self.interval)
        self.current: np.ndarray | None = None

    def observe(self, window: np.ndarray) -> None:
        self.history.append(np.asarray(window, dtype=np.int64))

    def recent(self, count: int) -> np.ndarray:
        """The sum of the last ``count`` observed windows."""
        return np.sum(list(self.history)[-count:], axis=0)

    def plan(self, weight: np.ndarray, **options) -> np.ndarray:
        return np.asarray(eplb.rebalance_experts(weight, *self.config, policy=self.policy, **options).phy2log)

    def initial(self) -> np.ndarray:
        self.current = self.plan(self.history[-1])
        return self.current

    def adopt(self, phy2log: np.ndarray | None) -> np.ndarray | None:
        if phy2log is not None:
            self.current = phy2log
        return phy2log

    def decide(self) -> np.ndarray | None:
        raise NotImplementedError


class Static(Rule):
    """Never rebalance: the first plan stays (baseline: zero moves)."""

    def decide(self) -> None:
        return None


class Oblivious(Rule):
    """Every ``interval`` windows, a fresh plan of all layers on the sum of the last ``interval`` windows.

    The published DeepSeek EPLB used as-is (no ``previous=``): the reference
    every other rule is measured against.
    """

    def decide(self) -> np.ndarray:
        return self.adopt(self.plan(self.recent(self.interval)))


class VllmLike(Rule):
    """vLLM's EPLB: every ``step_interval`` steps, all layers re-planned on the last ``window_size`` steps.

    Parameters: ``step_interval`` (windows between rebalances; default the
    harness's ``interval``), ``window`` (windows of history; default
    ``max(1, round(step_interval / 3))``, vLLM's default ratio
    ``window_size=1000`` / ``step_interval=3000``). The plan is a fresh greedy
    plan (vLLM's ``DefaultEplbPolicy`` is the DeepSeek algorithm), then
    ``preserve_intragpu_slots``: within each GPU, experts that stay keep their
    old slot (:func:`keep_slots`) -- exact, not an approximation; no GPU or
    node relabelling. vLLM's early first rearrangement (at 3/4 of the first
    interval) is not modelled.

    Sources: vLLM ``EPLBConfig`` docs (``window_size=1000``,
    ``step_interval=3000``: "if this is greater than the EPLB window size, only
    the metrics of the last lb_window_size steps will be used"),
    ``vllm/distributed/eplb/policy/default.py::preserve_intragpu_slots``
    docstring ("experts that remain on the same GPU keep their previous slot
    positions when possible ... applied only when the number of GPUs and slots
    per GPU remain the same").
    """

    def __init__(self, config, *, step_interval: int | None = None, window: int | None = None, **options) -> None:
        interval = options.get("interval", 4)
        self.step_interval = int(step_interval or interval)
        self.window = int(window or max(1, round(self.step_interval / 3)))
        super().__init__(config, keep=self.window, **options)
        self.decide_every = self.step_interval

    def decide(self) -> np.ndarray:
        fresh = self.plan(self.recent(self.window))
        return self.adopt(keep_slots(fresh, self.current, self.num_gpus))


class FlashLBLike(Rule):
    """vllm-ascend / vLLM FlashLB: per-layer re-plan when the layer got worse than when it was planned.

    Each decision (every ``interval`` windows): the history is the last
    ``max_stage_window=32`` windows (FlashLB's ``hotness_window``, loads + 1
    as in the source), each window a "stage" weighted by its total load over
    the heaviest stage's (``compute_stage_weight``). A layer's score ``par`` is
    max/mean GPU load averaged over the stages. A layer is a candidate when its
    ``par`` under the current placement is ``>= threshold_ratio=1.15`` x the
    ``par`` its last adopted plan had when adopted (``need_update``; 0 before
    its first re-plan, so every layer is a candidate at first); a candidate is
    re-planned (a fresh plan on the stage-weighted sum of the history --
    FlashLB's own multi-stage tree search is not reproduced), and the
    candidates whose new ``par`` / current ``par`` is lowest and ``< 1`` are
    adopted, at most ``layers_per_round=8`` (``buffer_expert_layer_num``),
    slots kept in place per GPU (``auto_fix_new_placement``). Upstream a stage
    is the load passed to one rebalance call (one interval); here it is one
    window, so the 32 stages span 32 windows.

    Sources: the vllm-ascend EPLB design page (``policy_flashlb.py``:
    "threshold-based adjustment ... via layer-by-layer fluctuation detection")
    and vLLM's ``FlashlbEplbPolicy`` (``max_stage_window = 32``,
    ``buffer_expert_layer_num = 8``, ``threshold_ratio = 1.15``,
    ``need_update``, ``compute_stage_weight``, ``rebalance_experts``).
    """

    def __init__(
        self,
        config,
        *,
        max_stage_window: int = 32,
        threshold_ratio: float = 1.15,
        layers_per_round: int = 8,
        **options,
    ) -> None:
        super().__init__(config, keep=max_stage_window, **options)
        self.threshold_ratio = threshold_ratio
        self.layers_per_round = layers_per_round
        self.par_history: dict[int, float] = {}

    def decide(self) -> np.ndarray | None:
        stages = np.stack(list(self.history)).astype(np.float64) + 1.0  # [S, L, E]
        totals = stages.sum(axis=2)  # [S, L]
        weights = totals / totals.max(axis=0)  # per layer, heaviest stage = 1
        current_par = imbalance(stages, self.current, self.num_gpus).mean(axis=0)  # [L]
        planned_par = np.array([self.par_history.get(layer, 0.0) for layer in range(len(current_par))])
        need = current_par >= self.threshold_ratio * planned_par
        if not need.any():
            return None
        fresh = self.plan((weights[:, :, None] * stages).sum(axis=0))
        new_par = np.where(need, imbalance(stages, fresh, self.num_gpus).mean(axis=0), current_par)
        priority = new_par / current_par
        order = np.argsort(priority, kind="stable")
        chosen = [int(layer) for layer in order if priority[layer] < 1][: self.layers_per_round]
        if not chosen:
            return None
        out = self.current.copy()
        out[chosen] = keep_slots(fresh[chosen], self.current[chosen], self.num_gpus)
        for layer in chosen:
            self.par_history[layer] = float(new_par[layer])
        return self.adopt(out)


class TrtllmLike(Rule):
    """TensorRT-LLM's online MoE load balancer: ``layer_updates_per_iter`` layers re-planned per iteration.

    Decides every window (an "iteration"). The layers are split into
    ``ceil(L / k)`` update groups, layer ``l`` in group ``l % groups``, plus
    one empty group when all groups are the same size; one group per
    decision, round robin (``MoeLoadBalancer::generateUpdatePlan``). An updated
    layer gets a fresh plan on its load statistic accumulated since its
    previous update, which is then cleared (``copyPlacementInfoToGpu``: "clear
    expert load factor for next statistic"). ``k`` = ``layer_updates_per_iter``,
    default ``ceil(L / interval)``, so that every layer is refreshed about once
    per ``interval`` windows, like the other rules (TensorRT-LLM's examples use
    1 per decode iteration, thousands of iterations per window here). Its
    planner (greedy replication + LPT over all ranks) is the global greedy;
    here the config's policy is used for every rule.

    Sources: TensorRT-LLM docs (``MoeLoadBalancerConfig.layer_updates_per_iter``:
    "Number of layers updated per iteration", 0 = static), tech blog
    "Scaling Expert Parallelism in TensorRT-LLM (Part 1)" (online EP load
    balancer, layer-wise weight updates), ``moeLoadBalancer.cpp``.
    """

    def __init__(self, config, *, layer_updates_per_iter: int | None = None, **options) -> None:
        super().__init__(config, keep=1, **options)
        self.layer_updates_per_iter = layer_updates_per_iter
        self.decide_every = 1
        self.queue: deque[list[int]] | None = None
        self.statistic: np.ndarray | None = None

    def observe(self, window: np.ndarray) -> None:
        super().observe(window)
        self.statistic = self.history[-1].copy() if self.statistic is None else self.statistic + self.history[-1]

    def initial(self) -> np.ndarray:
        placement = super().initial()
        self.statistic = np.zeros_like(self.history[-1])
        num_layers = placement.shape[0]
        per_iter = self.layer_updates_per_iter or math.ceil(num_layers / self.interval)
        groups = math.ceil(num_layers / per_iter)
        plan = [[layer for layer in range(num_layers) if layer % groups == g] for g in range(groups)]
        if len(plan[0]) == len(plan[-1]):
            plan.append([])
        self.queue = deque(plan)
        return placement

    def decide(self) -> np.ndarray | None:
        layers = self.queue[0]
        self.queue.rotate(-1)
        if not layers:
            return None
        out = self.current.copy()
        out[layers] = self.plan(self.statistic[layers])
        self.statistic[layers] = 0
        return self.adopt(out)


class XllmLike(Rule):
    """xLLM's EPLB: a layer is re-planned when its load is no longer similar to the load it was planned on.

    Every ``interval`` windows (``eplb_update_interval``), per layer: the
    cosine similarity of the last ``interval`` windows' load to the load the
    layer's placement was planned on (both scaled by their max, as xLLM does;
    cosine does not depend on it); below ``threshold`` the layer gets a fresh
    plan on the recent load. ``threshold`` default 0.8: xLLM's
    ``eplb_update_threshold`` default in its flags and config reference (its
    EPLB feature page says "default: 1", which would re-plan every layer at
    every update). The xLLM manager's layer-by-layer prepare/switch pipeline
    (one layer's weights in flight at a time) is not modelled: all chosen
    layers switch at once.

    Sources: xLLM docs ``features/eplb.md`` ("When the similarity between
    consecutive loads for a layer is below eplb_update_threshold, that layer is
    updated"), config reference (``eplb_update_interval=1000``,
    ``eplb_update_threshold=0.8``), ``global_flags.cpp``.
    """

    def __init__(self, config, *, threshold: float = 0.8, **options) -> None:
        super().__init__(config, **options)
        self.threshold = threshold
        self.planned_on: np.ndarray | None = None

    def initial(self) -> np.ndarray:
        self.planned_on = self.history[-1].astype(np.float64)
        return super().initial()

    def decide(self) -> np.ndarray | None:
        recent = self.recent(self.interval).astype(np.float64)
        a = recent / np.maximum(recent.max(axis=1, keepdims=True), 1e-30)
        b = self.planned_on / np.maximum(self.planned_on.max(axis=1, keepdims=True), 1e-30)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
        layers = np.flatnonzero(cosine < self.threshold)
        if len(layers) == 0:
            return None
        out = self.current.copy()
        out[layers] = self.plan(recent[layers])
        self.planned_on[layers] = recent[layers]
        return self.adopt(out)


class SglangLike(Rule):
    """SGLang's EPLB: every ``eplb_rebalance_num_iterations``, all layers -- unless GPU utilization is already high.

    Every ``interval`` windows: the utilization rate is the GPU balancedness
    (mean / max GPU load per layer, mean over layers) of each of the last
    ``interval`` windows under the placement in force, averaged over them
    (SGLang's ``compute_utilization_rate`` and
    ``average_utilization_rate_over_window``); above ``threshold`` the
    rebalance is skipped (``_check_rebalance_needed``), otherwise all layers
    get a fresh plan on the last ``window`` windows (default ``interval``: the
    recorder buffer ``expert_distribution_recorder_buffer_size=1000`` equals
    ``eplb_rebalance_num_iterations=1000`` by default). ``threshold`` default
    0.9 is our choice: SGLang's default
    ``eplb_min_rebalancing_utilization_threshold=1.0`` never skips (= the
    oblivious rule). Chunked layer updates (``eplb_rebalance_layers_per_chunk``)
    are not modelled.

    Sources: SGLang server arguments (``--eplb-rebalance-num-iterations``,
    ``--eplb-min-rebalancing-utilization-threshold``), ``eplb_manager.py``
    (``_check_rebalance_needed``: skip when the utilization is above the
    threshold), ``expert_distribution.py`` (``compute_utilization_rate``).
    """

    def __init__(self, config, *, threshold: float = 0.9, window: int | None = None, **options) -> None:
        interval = options.get("interval", 4)
        self.window = int(window or interval)
        super().__init__(config, keep=max(self.window, interval), **options)
        self.threshold = threshold

    def decide(self) -> np.ndarray | None:
        scored = np.stack(list(self.history)[-self.interval :])
        utilization = float((1.0 / imbalance(scored, self.current, self.num_gpus)).mean())
        if utilization > self.threshold:
            return None
        return self.adopt(self.plan(self.recent(self.window)))


class Knobs(Rule):
    """eplb's own knobs: every ``interval`` windows, ``previous=`` + ``balance_tolerance`` on the last ``interval``.

    ``rebalance_experts(recent, ..., previous=current,
    balance_tolerance=0.01)``: all layers, keeping experts in place where the
    heaviest GPU stays within ``1 + 0.01`` of the fresh plan's (``max_moves``
    also accepted). See ``docs/migration.md``.
    """

    def __init__(self, config, *, balance_tolerance: float = 0.01, max_moves: int | None = None, **options) -> None:
        super().__init__(config, **options)
        self.knobs = {"balance_tolerance": balance_tolerance}
        if max_moves is not None:
            self.knobs["max_moves"] = max_moves

    def decide(self) -> np.ndarray:
        return self.adopt(self.plan(self.recent(self.interval), previous=self.current, **self.knobs))


class RebalancerAdapter(Rule):
    """Adapter for ``eplb.Rebalancer`` (being written; skipped with a note when eplb does not expose it).

    API assumed: ``r = eplb.Rebalancer(num_replicas, num_groups, num_nodes,
    num_gpus, **rebalancer_options)``; ``r.record(load [L, E])`` per window;
    ``d = r.step()`` returns a decision with ``d.placement.phy2log [L, R]`` and
    ``d.layers`` (the changed layer ids), or ``None``; ``r.placement``. The
    harness's ``policy`` is passed on where the constructor takes ``policy``;
    ``rebalancer_options`` are passed as they are (none by default: the
    Rebalancer's own defaults). The
    first placement is the Rebalancer's own (its first ``step()``, else
    ``r.placement``, else a fresh plan); then ``step()`` is called every
    ``every`` windows (default the harness's ``interval``, like the other
    rules); a decision with no changed layers keeps the placement.
    """

    def __init__(self, config, *, every: int | None = None, rebalancer_options: dict | None = None, **options) -> None:
        if not hasattr(eplb, "Rebalancer"):
            raise RuleUnavailable("eplb.Rebalancer does not exist yet")
        super().__init__(config, keep=1, **options)
        self.decide_every = every
        settings = dict(rebalancer_options or {})
        if "policy" in inspect.signature(eplb.Rebalancer).parameters:
            settings.setdefault("policy", self.policy)
        self.r = eplb.Rebalancer(*self.config, **settings)

    def observe(self, window: np.ndarray) -> None:
        super().observe(window)
        self.r.record(self.history[-1])

    @staticmethod
    def _phy2log(placement) -> np.ndarray | None:
        if placement is None:
            return None
        return np.asarray(getattr(placement, "phy2log", placement), dtype=np.int64)

    def initial(self) -> np.ndarray:
        decision = self.r.step()
        placement = self._phy2log(getattr(decision, "placement", None))
        if placement is None:
            placement = self._phy2log(getattr(self.r, "placement", None))
        self.current = placement if placement is not None else self.plan(self.history[-1])
        return self.current

    def decide(self) -> np.ndarray | None:
        decision = self.r.step()
        if decision is None or len(getattr(decision, "layers", [])) == 0:
            return None
        return self.adopt(self._phy2log(decision.placement))


# name -> (class, options): the default rule set of benchmarks/replay.py, in table order
RULES: dict[str, tuple[type[Rule], dict]] = {
    "static": (Static, {}),
    "oblivious": (Oblivious, {}),
    "vllm-like": (VllmLike, {}),
    "flashlb-like": (FlashLBLike, {}),
    "trtllm-like": (TrtllmLike, {}),
    "xllm-like": (XllmLike, {}),
    "xllm-like 0.95": (XllmLike, {"threshold": 0.95}),
    "sglang-like": (SglangLike, {}),
    "knobs 0.01": (Knobs, {"balance_tolerance": 0.01}),
    "rebalancer": (RebalancerAdapter, {}),
    "rebalancer every window": (RebalancerAdapter, {"every": 1}),
}
