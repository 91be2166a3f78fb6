"""Load traces for ``benchmarks/replay.py``: streams of ``[L, E]`` int64 windows and the config each is replayed on.

- ``llama-N``: the Llama-4-Maverick MMLU request series (24 MoE layers x 128
  experts, top-1; ``prefill`` counts of ``llama4_maverick_mmlu_counts.npz``),
  summed over ``N`` consecutive requests per window
  (``benchmarks/migration.py::llama_windows``); replayed on 160 slots, 32 GPUs,
  global policy (Llama-4 has no group-limited routing).
- ``drift-slow`` / ``drift-fast``: synthetic DeepSeek-V3-shaped loads (256
  experts) drifting by ``exp(N(0, 0.01))`` / ``exp(N(0, 0.05))`` per window
  with occasional shifts of a few experts (``migration.py::drifting``).
- ``shift``: the slow drift, with each layer's expert popularity permuted (one
  random permutation per layer) from the middle window on.
- ``phases``: the 12 real DeepSeek-V3 SGLang dumps (``deepseek-v3-sglang/*.json``,
  key ``logical_count``, all-zero dense layers dropped: 58 x 256), each scaled
  to the same per-layer total (``2**22`` tokens), as phases alternating prefill
  and decode (the 8 prefill files in name order, each followed by one of the 4
  decode files in turn); each phase lasts a few windows, every window with
  multiplicative lognormal noise (sigma 0.1).

``extra_traces()`` adds traces replayed only when named in ``--traces`` (the
hold-out set: defaults are judged on traces they were not tuned on):
``llama-6/12/24/48``; ``drift-0.02-s1`` and ``drift-0.1-s2`` (other speeds and
seeds), ``drift-slow-s5``; ``shift-s7``; ``phases-s4`` (other noise seed) and
``phases-r2/r3/r4/r7`` (phases of 2, 3, 4, 7 windows: in or out of step with
the decision interval). Any ``drift-<sigma>-s<seed>`` (e.g. ``drift-0.15-s3``)
names the drift at that speed and seed, ``phases-r<repeat>-s<seed>`` the
phases of that length with that noise seed (58 layers, as those), and
``llama-<N>-g16`` the Llama-4 series on 144 slots and 16 GPUs (9 slots a GPU:
the configuration of the replay in issue 16's text); ``-o<offset>`` skips the
series' first ``offset`` requests and ``-r`` plays it backwards
(``llama-8-g16-o4-r``, ``llama-16-o8``): other windows of the same traffic
(``orderings(N)`` names four), to tell a rule's effect from the noise of one
reading; ``-decode`` (last) takes the decode counts instead of the prefill ones
(6.7 times the tokens: steadier windows).

DeepSeek-V3-shaped traces run on 288 slots, 8 groups, 4 nodes, 32 GPUs
(hierarchical). Data comes from ``../shared/data`` beside the repository;
``EPLB_DATA_DIR`` overrides it (as in ``benchmarks/migration.py``); a trace
whose file is missing is skipped with a note.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import migration

DEEPSEEK_CONFIG = (288, 8, 4, 32)  # num_replicas, num_groups, num_nodes, num_gpus
LLAMA_CONFIG = (160, 1, 1, 32)
LLAMA_ISSUE_CONFIG = (144, 1, 1, 16)  # the Llama-4 replay of issue 16's text: 144 slots on 16 GPUs
PHASE_TOTAL = 2**22  # tokens per layer and window in the phases trace


@dataclass(frozen=True)
class Trace:
    name: str
    windows: list[np.ndarray]  # each [L, E] int64
    config: tuple[int, int, int, int]
    note: str = ""


def llama(
    requests: int, limit: int | None = None, offset: int = 0, reverse: bool = False, counts: str = "prefill"
) -> Trace | None:
    windows = migration.llama_windows(requests, offset=offset, reverse=reverse, counts=counts)
    if windows is None:
        return None
    windows = windows[:limit]
    reading = (", backwards" if reverse else "") + (f", from request {offset}" if offset else "")
    return Trace(
        f"llama-{requests}",
        windows,
        LLAMA_CONFIG,
        f"Llama-4-Maverick MMLU {counts}, {requests} requests/window{reading}",
    )


def drift(name: str, layers: int, windows: int, sigma: float, seed: int = 0) -> Trace:
    return Trace(
        name,
        migration.drifting(layers, 256, windows, sigma, seed=seed),
        DEEPSEEK_CONFIG,
        f"synthetic drift {sigma:g}, {layers} x 256",
    )


def sudden_shift(layers: int, windows: int, seed: int = 2, name: str = "shift") -> Trace:
    """The slow drift, every layer's experts permuted (a fixed random permutation per layer) from window T // 2 on."""
    base = migration.drifting(layers, 256, windows, 0.01, seed=seed)
    rng = np.random.default_rng(seed + 100)
    perm = np.stack([rng.permutation(256) for _ in range(layers)])
    at = windows // 2
    out = base[:at] + [np.take_along_axis(w, perm, axis=1) for w in base[at:]]
    return Trace(name, out, DEEPSEEK_CONFIG, f"slow drift, popularity permuted at window {at}, {layers} x 256")


def deepseek_dumps() -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """(prefill, decode) ``[58, 256]`` float64 loads of the SGLang dumps, each layer scaled to ``PHASE_TOTAL``."""
    folder = migration.DATA / "deepseek-v3-sglang"
    files = sorted(folder.glob("*.json"))
    if not files:
        return None
    prefill, decode = [], []
    for path in files:
        counts = np.asarray(json.loads(path.read_text())["logical_count"], dtype=np.float64)
        counts = counts[counts.sum(axis=1) > 0]
        counts *= PHASE_TOTAL / counts.sum(axis=1, keepdims=True)
        (decode if path.name.startswith("decode") else prefill).append(counts)
    return prefill, decode


def phases(
    layers: int, count: int, repeat: int, noise: float = 0.1, seed: int = 3, name: str = "phases"
) -> Trace | None:
    """``count`` phases alternating prefill and decode dumps, ``repeat`` noisy windows each, first ``layers`` layers."""
    dumps = deepseek_dumps()
    if dumps is None:
        return None
    prefill, decode = dumps
    order = []
    for i in range(len(prefill)):
        order.append(prefill[i])
        if decode:
            order.append(decode[i % len(decode)])
    rng = np.random.default_rng(seed)
    windows = []
    for phase in order[:count]:
        for _ in range(repeat):
            noisy = phase[:layers] * rng.lognormal(0.0, noise, phase[:layers].shape)
            windows.append(np.round(noisy).astype(np.int64))
    return Trace(
        name,
        windows,
        DEEPSEEK_CONFIG,
        f"DeepSeek-V3 SGLang dumps, {min(count, len(order))} prefill/decode phases x {repeat} windows, {layers} x 256",
    )


def extra_traces() -> dict[str, Callable[[], Trace | None]]:
    """Name -> builder of traces replayed only when named in ``--traces``: other window sizes, speeds and
    seeds than the default set's (the hold-out set of the Rebalancer's defaults, docs/benchmarks.md)."""
    layers, windows = 58, 48
    return {
        **{f"llama-{n}": (lambda n=n: llama(n)) for n in (6, 12, 24, 48)},
        "drift-0.02-s1": lambda: drift("drift-0.02-s1", layers, windows, 0.02, seed=1),
        "drift-0.1-s2": lambda: drift("drift-0.1-s2", layers, windows, 0.1, seed=2),
        "drift-slow-s5": lambda: drift("drift-slow-s5", layers, windows, 0.01, seed=5),
        "shift-s7": lambda: sudden_shift(layers, windows, seed=7, name="shift-s7"),
        "phases-s4": lambda: phases(layers, count=16, repeat=5, seed=4, name="phases-s4"),
        **{f"phases-r{r}": (lambda r=r: phases(layers, count=16, repeat=r, name=f"phases-r{r}")) for r in (2, 3, 4, 7)},
    }


def parametric(name: str) -> Callable[[], Trace | None] | None:
    """The builder of ``drift-<sigma>-s<seed>`` or ``phases-r<repeat>-s<seed>`` (58 layers; drift: 48 windows, as
    ``extra_traces()``'s; phases: the 16 phases of ``phases``, each ``repeat`` windows) or of a Llama-4 reading
    ``llama-<N>[-g16][-o<offset>][-r][-decode]`` (with at least one of the suffixes), else ``None``."""
    match = re.fullmatch(r"drift-(\d+(?:\.\d+)?)-s(\d+)", name)
    if match is not None:
        sigma, seed = float(match.group(1)), int(match.group(2))
        return lambda: drift(name, 58, 48, sigma, seed=seed)
    match = re.fullmatch(r"phases-r(\d+)-s(\d+)", name)
    if match is not None:
        repeat, seed = int(match.group(1)), int(match.group(2))
        return lambda: phases(58, count=16, repeat=repeat, seed=seed, name=name)
    match = re.fullmatch(r"llama-(\d+)(-g16)?(?:-o(\d+))?(-r)?(-decode)?", name)
    if match is not None and any(match.groups()[1:]):
        requests, config = int(match.group(1)), LLAMA_ISSUE_CONFIG if match.group(2) else LLAMA_CONFIG
        offset, reverse = int(match.group(3) or 0), bool(match.group(4))
        counts = "decode" if match.group(5) else "prefill"
        return lambda: _on(llama(requests, offset=offset, reverse=reverse, counts=counts), name, config)
    return None


def orderings(requests: int, g16: bool = True, decode: bool = False) -> list[str]:
    """Four readings of the Llama-4 series at ``requests`` per window: as recorded, shifted by half a window,
    and both backwards (``llama-<N>[-g16]-o<offset>[-r][-decode]``): the same traffic, other windows, for rules
    whose scores on one reading differ by less than its noise."""
    stem, tail = f"llama-{requests}{'-g16' if g16 else ''}", "-decode" if decode else ""
    return [f"{stem}{o}{r}{tail}" for r in ("", "-r") for o in ("", f"-o{requests // 2}")]


def expand(name: str) -> list[str]:
    """``llama-<N>[-g16]-orderings[-decode]``: the four readings of :func:`orderings`; any other name: itself."""
    match = re.fullmatch(r"llama-(\d+)(-g16)?-orderings(-decode)?", name)
    if match is None:
        return [name]
    return orderings(int(match.group(1)), g16=bool(match.group(2)), decode=bool(match.group(3)))


def _on(trace: Trace | None, name: str, config: tuple[int, int, int, int]) -> Trace | None:
    """``trace`` renamed and replayed on another config (``None`` stays ``None``: its data is missing)."""
    return None if trace is None else Trace(name, trace.windows, config, f"{trace.note}, on {config}")


def trace_set(quick: bool) -> dict[str, Callable[[], Trace | None]]:
    """Name -> builder of each trace (built lazily: only the selected ones are loaded)."""
    if quick:
        return {
            "llama-16": lambda: llama(16, limit=12),
            "drift-slow": lambda: drift("drift-slow", 8, 16, 0.01),
            "drift-fast": lambda: drift("drift-fast", 8, 16, 0.05),
            "shift": lambda: sudden_shift(8, 16),
            "phases": lambda: phases(8, count=6, repeat=3),
        }
    layers, windows = 58, 48
    return {
        "llama-8": lambda: llama(8),
        "llama-16": lambda: llama(16),
        "llama-32": lambda: llama(32),
        "drift-slow": lambda: drift("drift-slow", layers, windows, 0.01),
        "drift-fast": lambda: drift("drift-fast", layers, windows, 0.05),
        "shift": lambda: sudden_shift(layers, windows),
        "phases": lambda: phases(layers, count=16, repeat=5),
    }
