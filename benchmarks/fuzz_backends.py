"""Cross-backend fuzz: random calls through every front door, compared bit for bit with numpy.

Each case draws a shape (one expert and one slot per GPU up to DeepSeek-V3's 256 experts on 144 GPUs), loads
(lognormal, zipf, all tied, small integers, float64 or int64 as well as float32, all-zero layers) and options
(every policy, ``hierarchical``, ``spill``, ``previous=`` with ``balance_tolerance`` / ``max_moves``,
``active_gpus`` masks, ``gpu_capacity`` vectors with idle GPUs), and runs it on numpy (the reference), torch
(and, on CUDA, through a :class:`eplb.GraphedPlanner` kept across cases, so later calls replay graphs
captured on other loads) and JAX (eager, and inside a user's ``jax.jit`` with the arrays and knobs traced).
A share of the cases instead drive an :class:`eplb.Rebalancer` through a random sequence of recorded
windows, steps and GPU changes (``set_gpus``) on each backend, and compare every decision (placement, layers,
gains, moves, tolerance, the transfer plan's copies). A call numpy refuses must be refused (``ValueError`` or
``TypeError``) by the eager CPU front doors too; inside ``jit`` and on a GPU, where value checks are skipped
(no host read), it is only counted. The front doors dispatch to the
kernels (numba, Triton, Pallas) where they apply, so this checks the dispatch as well as the kernels.

    python benchmarks/fuzz_backends.py [--seconds 120 | --cases N] [--seed 0] [--gpu] [--rebalancer 0.15] [--out FILE]

``--gpu``: torch CUDA and JAX GPU arrays instead of CPU ones (on a GPU machine). Mismatches print as they
are found, with the case (seed, index) and the first differing output; ``--out`` writes them as JSON with the
loads, to replay. Exit status 1 when any front door disagrees with numpy. Two bugs it found: the survivable
policy on a JAX GPU ran the greedy kernel, and ``previous=`` with equal capacities placed by the host's
reading of them (both fixed; see CHANGELOG).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eplb
from tests import oracle

# (experts, slots, groups, nodes, gpus): degenerate ones (one expert; one slot per GPU), small, DeepSeek-V3.
SHAPES = [
    (1, 4, 1, 1, 4),
    (1, 2, 1, 1, 2),
    (8, 8, 4, 2, 8),
    (4, 4, 2, 2, 4),
    (16, 24, 4, 2, 4),
    (16, 32, 4, 4, 8),
    (32, 48, 8, 4, 8),
    (64, 80, 8, 4, 16),
    (20, 40, 4, 2, 20),
    (256, 288, 8, 4, 32),
    (256, 288, 8, 4, 144),
]


def draw_loads(rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    kind = rng.integers(5)
    if kind == 0:
        weight = rng.lognormal(0, 1.5, (layers, experts))
    elif kind == 1:
        weight = np.minimum(rng.zipf(1.5, (layers, experts)), 1e6).astype(float)
    elif kind == 2:
        weight = np.full((layers, experts), 7.0)
    elif kind == 3:
        weight = rng.integers(0, 50, (layers, experts)).astype(float)
    else:  # a drift of one reading: near-ties with a few heavy experts
        weight = rng.integers(900, 1100, (layers, experts)).astype(float)
        weight[:, rng.integers(experts)] *= 8
    if rng.random() < 0.3:
        weight[rng.integers(layers)] = 0
    dtype = rng.choice(["float32", "float32", "float64", "int64"])
    return weight.astype(dtype)


def draw_mask(rng: np.random.Generator, gpus: int, slots: int, experts: int) -> np.ndarray:
    per_gpu = slots // gpus
    for _ in range(20):
        mask = rng.random(gpus) > rng.choice([0.1, 0.3])
        if mask.any() and mask.sum() * per_gpu >= experts:
            return mask
    return np.ones(gpus, dtype=bool)


def draw_capacity(rng: np.random.Generator, gpus: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:
        capacity = np.where(np.arange(gpus) % 2 == 0, 1.0, 0.6)
    elif kind == 1:
        capacity = rng.uniform(0.5, 1.5, gpus)
    elif kind == 2:  # equal speeds with one GPU idle
        capacity = np.ones(gpus)
        if gpus > 1:
            capacity[rng.integers(gpus)] = 0
    else:
        capacity = np.ones(gpus)
    return capacity.astype(np.float32)


def draw_call(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...], dict[str, Any]]:
    experts, slots, groups, nodes, gpus = SHAPES[rng.integers(len(SHAPES))]
    weight = draw_loads(rng, int(rng.integers(1, 5)), experts)
    options: dict[str, Any] = {
        "policy": str(rng.choice(["greedy", "greedy", "refined", "survivable"])),
        "hierarchical": [None, True, False][rng.integers(3)],
    }
    sizes = (slots, groups, nodes, gpus)
    if rng.random() < 0.5 and options["policy"] != "survivable":  # survivable refuses previous= (documented)
        try:
            before = draw_loads(rng, weight.shape[0], experts)
            options["previous"] = np.asarray(eplb.rebalance_experts(before, *sizes).phy2log)
        except ValueError:
            pass
        if "previous" in options:
            tolerance = [None, 0.0, 0.005, 0.05][rng.integers(4)]
            if tolerance is not None:
                options["balance_tolerance"] = tolerance
            if rng.random() < 0.3:
                options["max_moves"] = int(rng.choice([0, 1, 2, 16]))
    if rng.random() < 0.25:
        options["active_gpus"] = draw_mask(rng, gpus, slots, experts)
    if rng.random() < 0.25:
        options["gpu_capacity"] = draw_capacity(rng, gpus)
    if rng.random() < 0.1:
        options["spill"] = int(rng.integers(1, 3))
    return weight, sizes, options


def gpu_contents(phy2log: np.ndarray, gpus: int) -> list[list[tuple[int, ...]]]:
    """Per layer, each GPU's experts as a sorted tuple (``-1`` slots left out)."""
    per_gpu = phy2log.reshape(len(phy2log), gpus, -1)
    return [[tuple(sorted(int(e) for e in slots if e >= 0)) for slots in layer] for layer in per_gpu]


def broken_promises(weight: np.ndarray, sizes: tuple, options: dict, placement: tuple) -> list[str]:
    """The documented promises of ``rebalance_experts`` checked on numpy's result, in plain float64 and Python
    (not the code under test): a valid placement; ``previous=`` alone keeps the fresh placement's GPU contents;
    with ``balance_tolerance`` the heaviest GPU (slowest, with ``gpu_capacity``) within ``1 + t`` of the fresh
    placement's; ``max_moves`` per layer at most the cap."""
    slots, _, _, gpus = sizes
    phy2log, log2phy, logcnt = (np.asarray(a) for a in placement)
    layers, experts = weight.shape
    live = np.ones(gpus, dtype=bool)
    if options.get("active_gpus") is not None:
        live &= options["active_gpus"]
    capacity = options.get("gpu_capacity")
    if capacity is not None:
        live &= capacity > 0
    live_slot = np.repeat(live, slots // gpus)
    broken = []
    for layer in range(layers):
        row = phy2log[layer]
        if (row[~live_slot] != -1).any() or not ((row[live_slot] >= 0) & (row[live_slot] < experts)).all():
            broken.append(f"layer {layer}: an expert on a dead GPU or an id out of range")
            continue
        counts = np.bincount(row[live_slot], minlength=experts)
        if not np.array_equal(counts, logcnt[layer]) or (counts < 1).any():
            broken.append(f"layer {layer}: logcnt is not the replica count, or an expert has none")
        for expert in range(experts):
            listed = log2phy[layer, expert]
            held = set(np.flatnonzero(row == expert).tolist())
            if set(listed[listed >= 0].tolist()) != held or (listed >= 0).sum() != len(held):
                broken.append(f"layer {layer}: log2phy of expert {expert} is not its slots")
                break

    def slowest(placed: np.ndarray) -> np.ndarray:
        """``[L]`` float64: each layer's heaviest live GPU, by time with ``gpu_capacity`` (tests/oracle.py)."""
        if capacity is None:
            return oracle.gpu_loads64(weight, placed, gpus)[:, live].max(axis=1)
        return oracle.capacity_times64(weight, placed, gpus, capacity)[:, live].max(axis=1)

    previous = options.get("previous")
    if broken:
        return broken
    if previous is None and capacity is not None:
        # Never slower than the capacity-blind placement on the same live GPUs (by a 2**-16 margin).
        blind_options = {k: v for k, v in options.items() if k != "gpu_capacity"}
        if not live.all():
            blind_options["active_gpus"] = live
        blind = np.asarray(eplb.rebalance_experts(weight, *sizes, **blind_options).phy2log)
        for layer in np.flatnonzero(slowest(phy2log) > slowest(blind) * (1 + 2.0**-16) * (1 + 1e-6)):
            broken.append(f"layer {layer}: gpu_capacity placement slower than the capacity-blind one")
    if previous is None:
        return broken
    fresh_options = {k: v for k, v in options.items() if k not in ("previous", *KNOBS)}
    fresh = np.asarray(eplb.rebalance_experts(weight, *sizes, **fresh_options).phy2log)
    tolerance, cap = options.get("balance_tolerance"), options.get("max_moves")
    plain = tolerance is None and cap is None and options.get("active_gpus") is None and capacity is None
    # Up to labels: the same multiset of GPU contents per layer (GPUs permuted).
    if plain and [sorted(x) for x in gpu_contents(phy2log, gpus)] != [sorted(x) for x in gpu_contents(fresh, gpus)]:
        broken.append("previous= alone changed the GPUs' contents")
    if tolerance is None and (options.get("active_gpus") is not None or capacity is not None):
        tolerance = 0.0  # the elastic and capacity rules promise the bound with the default tolerance, 0
    if tolerance is not None and cap is None:
        bound = (1 + tolerance) * slowest(fresh)
        for layer in np.flatnonzero(slowest(phy2log) > bound * (1 + 1e-5) + 1e-30):
            broken.append(f"layer {layer}: heaviest GPU beyond 1 + balance_tolerance of the fresh placement's")
    if cap is not None:
        for layer, moved in enumerate(oracle.moves(previous, phy2log, gpus).tolist()):
            if moved > cap:
                broken.append(f"layer {layer}: {moved} moves beyond max_moves={cap}")
    return broken


class Fronts:
    """The front doors: numpy arrays in, numpy arrays out, each through its framework's arrays."""

    def __init__(self, gpu: bool) -> None:
        import jax
        import torch

        self.torch, self.jax = torch, jax
        self.torch_device = "cuda" if gpu else "cpu"
        self.jax_device = jax.devices("gpu")[0] if gpu else jax.devices("cpu")[0]
        self.planners: dict[tuple, Any] = {}  # GraphedPlanner per (sizes, fixed options), torch CUDA only

    def to_torch(self, x: np.ndarray) -> Any:
        return self.torch.as_tensor(x, device=self.torch_device)

    def to_jax(self, x: np.ndarray) -> Any:
        return self.jax.device_put(x, self.jax_device)

    def calls(self, rng: np.random.Generator) -> dict[str, Any]:
        """name -> a function of (weight, sizes, options) that runs the call on that front door."""

        def on_torch(weight, sizes, options):
            arrays = {k: self.to_torch(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
            return eplb.rebalance_experts(self.to_torch(weight), *sizes, **arrays)

        def on_jax(weight, sizes, options):
            arrays = {k: self.to_jax(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
            return eplb.rebalance_experts(self.to_jax(weight), *sizes, **arrays)

        def in_jit(weight, sizes, options):
            # Arrays and the knobs traced (a control loop varies them); the rest static.
            traced = sorted(k for k, v in options.items() if isinstance(v, np.ndarray) or k in KNOBS)
            static = {k: v for k, v in options.items() if k not in traced}

            def call(w, *values):
                return tuple(eplb.rebalance_experts(w, *sizes, **dict(zip(traced, values, strict=True)), **static))

            values = [self.to_jax(np.asarray(options[k])) for k in traced]
            return self.jax.jit(call)(self.to_jax(weight), *values)

        def graphed(weight, sizes, options):
            # One planner per (sizes, fixed options), kept across cases: later calls replay graphs captured on
            # other loads (a knob given per call is written into the graph's buffer).
            per_call = {k: v for k, v in options.items() if k in (*GRAPH_INPUTS, *KNOBS)}
            fixed = {k: v for k, v in options.items() if k not in per_call}
            key = (sizes, tuple(sorted(fixed.items())))
            planner = self.planners.setdefault(key, eplb.GraphedPlanner(*sizes, **fixed))
            arrays = {k: self.to_torch(v) if isinstance(v, np.ndarray) else v for k, v in per_call.items()}
            return planner(self.to_torch(weight), **arrays)

        fronts = {"torch": on_torch, "jax": on_jax}
        if self.torch_device == "cuda":
            fronts["torch-graphed"] = graphed
        if rng.random() < 0.3:
            fronts["jax-jit"] = in_jit
        return fronts


KNOBS = ("balance_tolerance", "max_moves")
GRAPH_INPUTS = ("previous", "active_gpus", "gpu_capacity")  # GraphedPlanner's per-call tensors


def as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def first_difference(want: tuple, got: tuple, names: tuple[str, ...]) -> str | None:
    for name, a, b in zip(names, want, got, strict=True):
        a, b = np.atleast_1d(as_numpy(a)), np.atleast_1d(as_numpy(b))
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind or not np.array_equal(a, b):
            rows = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1)).tolist() if a.shape == b.shape else "-"
            return f"{name}: numpy {a.shape} {a.dtype} vs {b.shape} {b.dtype}, rows differing {rows}"
    return None


# ---------------------------------------------------------------- the Rebalancer


def draw_rebalancer(rng: np.random.Generator) -> tuple[tuple[int, ...], dict[str, Any], list[tuple]]:
    experts, slots, groups, nodes, gpus = SHAPES[rng.integers(2, len(SHAPES))]
    layers = int(rng.integers(1, 4))
    options: dict[str, Any] = {"policy": str(rng.choice(["greedy", "refined"]))}
    if rng.random() < 0.3:
        options["window"] = int(rng.integers(1, 5))
    elif rng.random() < 0.5:
        options["half_life"] = int(rng.integers(1, 4))
    options["long_window"] = int(rng.choice([0, 4, 16]))
    options["min_gain"] = float(rng.choice([0.0, 0.02, 0.1]))
    options["balance_tolerance"] = rng.choice(["auto", 0.0, 0.01])
    if options["balance_tolerance"] != "auto":
        options["balance_tolerance"] = float(options["balance_tolerance"])
    if rng.random() < 0.3:
        options["max_layers"] = int(rng.integers(1, layers + 1))
    if rng.random() < 0.3:
        options["max_experts"] = int(rng.integers(0, 3 * experts))
    # Drifting loads: a base that a random walk moves, each window a noisy reading of it.
    base = rng.lognormal(0, 1.0, (layers, experts))
    events: list[tuple] = []
    for _ in range(int(rng.integers(4, 14))):
        base *= rng.lognormal(0, 0.2, base.shape)
        events.append(("record", np.round(base * rng.lognormal(0, 0.3, base.shape) * 100).astype(np.float32)))
        if rng.random() < 0.4:
            events.append(("step",))
        if rng.random() < 0.08 and options["policy"] == "greedy":  # the GPUs' options take the greedy policy
            change: dict[str, Any] = {}
            if rng.random() < 0.6:
                change["active_gpus"] = draw_mask(rng, gpus, slots, experts)
            else:
                change["gpu_capacity"] = draw_capacity(rng, gpus)
            events.append(("set_gpus", change))
    events.append(("step",))
    return (slots, groups, nodes, gpus), options, events


def decision_arrays(decision: Any) -> tuple:
    plan = decision.plan
    copies = tuple(value for _, value in sorted(vars(plan).items()) if isinstance(value, np.ndarray))
    return (
        *decision.placement,
        decision.layers,
        decision.gain,
        decision.moves,
        np.float64(decision.tolerance),
        *copies,
    )


def run_rebalancer(sizes: tuple, options: dict, events: list, convert: Any) -> list[tuple[Any, dict | None]]:
    """The decisions of a Rebalancer fed ``events``, each with the GPUs in force (``set_gpus``'s numpy
    arguments; ``None`` while no GPU changed: then the budget holds for every layer)."""
    rebalancer = eplb.Rebalancer(*sizes, **options)
    out, gpus = [], None
    for event in events:
        if event[0] == "record":
            rebalancer.record(convert(event[1]))
        elif event[0] == "set_gpus":
            rebalancer.set_gpus(**{k: convert(v) for k, v in event[1].items()})
            gpus = event[1]
        else:
            out.append((rebalancer.step(), gpus))
    return out


def broken_decisions(sizes: tuple, options: dict, decisions: list[tuple[Any, dict | None]]) -> list[str]:
    """The Rebalancer's documented promises on numpy's decisions, counted independently: changed layers valid
    placements on the GPUs in force, no layer holding an expert on a GPU down; while no GPU changed, after the
    first step (a fresh plan): unchanged layers keep the placement in force, ``moves`` are the (expert, GPU)
    pairs a layer adds, changed layers gain at least ``min_gain`` and the step keeps its budget
    (``max_layers``, ``max_experts``)."""
    broken, before = [], None
    gpus = sizes[3]
    for step, (decision, gpus_in_force) in enumerate(decisions):
        phy2log = np.asarray(decision.placement.phy2log)
        changed = set(np.asarray(decision.layers).tolist())
        # Layers changed at this step are planned on the GPUs in force: valid placements on them. A layer kept
        # holds nothing on a GPU down (those change whatever the budget), but may leave a GPU back up empty.
        rows = sorted(changed)
        placed = tuple(np.asarray(a)[rows] for a in decision.placement)
        zeros = np.zeros(placed[2].shape)
        if rows:
            broken += [f"step {step}, changed {b}" for b in broken_promises(zeros, sizes, gpus_in_force or {}, placed)]
        down = np.zeros(gpus, dtype=bool)
        for name, value in (gpus_in_force or {}).items():
            down |= ~value if name == "active_gpus" else value <= 0
        on_down = phy2log.reshape(len(phy2log), gpus, -1)[:, down] >= 0
        if on_down.any():
            broken.append(
                f"step {step}: layers {np.flatnonzero(on_down.any(axis=(1, 2))).tolist()} hold experts on GPUs down"
            )
        if before is not None and gpus_in_force is None:
            for layer, added in enumerate(oracle.moves(before, phy2log, gpus).tolist()):
                if layer not in changed and not np.array_equal(phy2log[layer], before[layer]):
                    broken.append(f"step {step}: layer {layer} not in layers but changed")
                if added != int(decision.moves[layer]):
                    broken.append(f"step {step}: layer {layer} moves {int(decision.moves[layer])}, counted {added}")
            if len(changed) > options.get("max_layers", len(changed)):
                broken.append(f"step {step}: {len(changed)} layers beyond max_layers")
            if int(np.sum(decision.moves)) > options.get("max_experts", np.inf):
                broken.append(f"step {step}: {int(np.sum(decision.moves))} experts beyond max_experts")
            low = [layer for layer in changed if decision.gain[layer] < options.get("min_gain", 0.02) - 1e-12]
            if low:
                broken.append(f"step {step}: layers {low} changed below min_gain")
        before = phy2log
    return broken


# ---------------------------------------------------------------- the loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases (a fixed draw)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--rebalancer", type=float, default=0.15, help="share of cases that drive a Rebalancer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    fronts = Fronts(args.gpu)
    stats: Counter = Counter()
    bad: list[dict] = []
    start = time.perf_counter()
    index = 0
    while (index < args.cases) if args.cases is not None else (time.perf_counter() - start < args.seconds):
        index += 1
        if rng.random() < args.rebalancer:
            sizes, options, events = draw_rebalancer(rng)
            label = {"case": index, "rebalancer": True, "sizes": sizes, **options}
            try:
                decisions = run_rebalancer(sizes, options, events, lambda x: x)
            except (ValueError, TypeError) as err:
                stats["rebalancer refused"] += 1
                label["numpy"] = repr(err)
                continue
            stats["rebalancer compared"] += 1
            want = [decision_arrays(d) for d, _ in decisions]
            broken = broken_decisions(sizes, options, decisions)
            if broken:
                stats["promise broken"] += 1
                print(f"PROMISE rebalancer {json.dumps(label, default=str)[:400]} {broken[:3]}", flush=True)
                bad.append({**label, "front": "numpy", "diff": broken[:10]})
            for name, convert in (("torch", fronts.to_torch), ("jax", fronts.to_jax)):
                try:
                    got = [decision_arrays(d) for d, _ in run_rebalancer(sizes, options, events, convert)]
                    diff = None if len(got) == len(want) else f"{len(got)} decisions vs {len(want)}"
                    for step, (a, b) in enumerate(zip(want, got, strict=False)):
                        diff = diff or first_difference(a, b, tuple(f"step {step} output {i}" for i in range(len(a))))
                except Exception as err:
                    diff = f"raised {err!r}"[:400]
                if diff:
                    stats["mismatch"] += 1
                    print(f"MISMATCH rebalancer {name}: {json.dumps(label, default=str)[:400]} {diff}", flush=True)
                    bad.append({**label, "front": name, "diff": diff})
            continue
        weight, sizes, options = draw_call(rng)
        label = {"case": index, "sizes": sizes, "layers": weight.shape[0], "dtype": str(weight.dtype)}
        label.update({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in options.items()})
        try:
            want = eplb.rebalance_experts(weight, *sizes, **options)
        except (ValueError, TypeError) as refusal:
            stats["refused"] += 1
            if not args.gpu:  # CPU arrays are read like numpy's, so the same call must be refused there too
                # Eager front doors only: inside jit nothing is read, and unread bad values are documented.
                for name, run in fronts.calls(rng).items():
                    if name.endswith("jit"):
                        continue
                    try:
                        run(weight, sizes, options)
                    except (ValueError, TypeError):
                        continue
                    except Exception as err:
                        diff = f"numpy refused ({refusal}), {name} raised {err!r}"[:400]
                    else:
                        diff = f"numpy refused ({refusal}), {name} placed"[:400]
                    stats["mismatch"] += 1
                    print(f"MISMATCH {name}: {json.dumps(label)[:400]} {diff}", flush=True)
                    bad.append({**label, "front": name, "diff": diff, "weight": weight.tolist()})
            continue
        stats["compared"] += 1
        broken = broken_promises(weight.astype(np.float64), sizes, options, want)
        for knob in ("previous", *KNOBS):
            stats[f"with {knob}"] += options.get(knob) is not None
        if broken:
            stats["promise broken"] += 1
            print(f"PROMISE {json.dumps(label)[:400]} {broken[:3]}", flush=True)
            bad.append({**label, "front": "numpy", "diff": broken[:10], "weight": weight.tolist()})
        for name, run in fronts.calls(rng).items():
            stats[name] += 1
            try:
                diff = first_difference(want, run(weight, sizes, options), eplb.Placement._fields)
            except Exception as err:
                diff = f"raised {err!r}"[:400]
            if diff:
                stats["mismatch"] += 1
                print(f"MISMATCH {name}: {json.dumps(label)[:400]} {diff}", flush=True)
                bad.append({**label, "front": name, "diff": diff, "weight": weight.tolist()})
    where = "GPU" if args.gpu else "CPU"
    print(f"{where}, seed {args.seed}, {time.perf_counter() - start:.0f} s: {json.dumps(dict(sorted(stats.items())))}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(bad, f, default=str)
    return 1 if stats["mismatch"] or stats["promise broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
