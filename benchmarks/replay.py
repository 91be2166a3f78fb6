"""Replay: rebalancing rules fed a stream of load windows, scored the way a serving job pays.

Each rule (``benchmarks/replay_rules.py``) sees every window of a trace
(``benchmarks/replay_traces.py``) through ``observe``; the first placement is
its ``initial()`` (a fresh plan of the first window unless the rule has its
own), and every ``interval`` windows (or the rule's own ``decide_every``) the
harness calls ``decide()``, which returns a new ``phy2log`` or ``None`` to keep
the placement in force. A placement is scored only on windows that arrive
after it was decided: window ``t`` is served by the placement decided after
window ``t - 1`` (decisions after the last window are not taken).

Per (trace, rule):

- balance: time-averaged balancedness (mean GPU load / max GPU load per layer,
  mean over layers) of each window under the placement in force, in float64
  (``tests/oracle.py::gpu_loads64``); "worst": the worst window's;
- experts moved: the ``(expert, GPU)`` pairs each new placement adds
  (``tests/oracle.py::moves``), summed over layers and decisions, and the worst
  single decision; GB: the same in bytes (``--expert-bytes``, default
  DeepSeek-V3: 3 x 7168 x 2048 x 2 bytes per expert);
- rebalances: decisions that moved at least one expert (of all decisions);
  layers: layers changed, summed; ms: mean time of ``decide()``.

``--traces`` also takes the hold-out traces of ``replay_traces.extra_traces()``
(other Llama window sizes, drift speeds, seeds and phase lengths), which are not
replayed by default.

"hindsight" is a reference, not a rule: each window planned fresh on itself
(no rule can know the window before serving it).

    python benchmarks/replay.py [--quick] [--interval N] [--traces a,b] [--rules a,b] [--target]
                                [--markdown FILE] [--plot FILE.png] [--plot-trace NAME]

``llama-<N>[-g16]-orderings[-decode]`` in ``--traces`` names the four readings of
``replay_traces.orderings``. ``--target`` adds issue 16's target per trace and rule (within 0.5% of the
oblivious rule's balance, at most 25% of its moves, better than the FlashLB-like
rule on both) and how many traces each rule meets it on.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import replay_rules  # noqa: E402
import replay_traces  # noqa: E402

import eplb  # noqa: E402
from tests.oracle import gpu_loads64, moves  # noqa: E402

EXPERT_BYTES = 3 * 7168 * 2048 * 2  # DeepSeek-V3 routed expert: gate, up, down projections in bf16


@dataclass
class Result:
    trace: str
    rule: str
    balance: list[float] = field(default_factory=list)  # per scored window (windows 1..T-1)
    decisions: list[tuple[int, int, int]] = field(default_factory=list)  # (window, experts moved, layers changed)
    seconds: list[float] = field(default_factory=list)  # per decide()


def balancedness(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> float:
    loads = gpu_loads64(weight, phy2log, num_gpus)
    peak, mean = loads.max(axis=1), loads.mean(axis=1)
    return float(np.mean(np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)))


def checked(phy2log, shape: tuple[int, int], num_experts: int, rule: str) -> np.ndarray:
    phy2log = np.asarray(phy2log)
    if phy2log.shape != shape or not np.issubdtype(phy2log.dtype, np.integer):
        raise ValueError(f"{rule}: placement {phy2log.shape} {phy2log.dtype}, expected {shape} integers")
    phy2log = phy2log.astype(np.int64)
    if phy2log.min() < 0 or phy2log.max() >= num_experts:
        raise ValueError(f"{rule}: expert ids outside [0, {num_experts})")
    for layer, row in enumerate(phy2log):
        if np.bincount(row, minlength=num_experts).min() == 0:
            raise ValueError(f"{rule}: layer {layer} leaves an expert without a replica")
    return phy2log


def replay(trace: replay_traces.Trace, name: str, rule: replay_rules.Rule, interval: int) -> Result:
    windows, num_gpus = trace.windows, trace.config[3]
    shape = (windows[0].shape[0], trace.config[0])
    every = rule.decide_every or interval
    result = Result(trace.name, name)
    rule.observe(windows[0])
    placement = checked(rule.initial(), shape, windows[0].shape[1], name)
    for t in range(1, len(windows)):
        result.balance.append(balancedness(windows[t], placement, num_gpus))
        rule.observe(windows[t])
        if t % every or t == len(windows) - 1:
            continue
        start = time.perf_counter()
        new = rule.decide()
        result.seconds.append(time.perf_counter() - start)
        if new is None:
            result.decisions.append((t, 0, 0))
            continue
        new = checked(new, shape, windows[0].shape[1], name)
        moved = moves(placement, new, num_gpus)
        result.decisions.append((t, int(moved.sum()), int(np.count_nonzero(moved))))
        placement = new
    return result


def warm_up(trace: replay_traces.Trace) -> None:
    """Plan once fresh and once with ``previous=`` and knobs, so that ``ms`` does not time kernels compiling."""
    first = eplb.rebalance_experts(trace.windows[0], *trace.config)
    eplb.rebalance_experts(trace.windows[1], *trace.config, previous=first, balance_tolerance=0.01)


def hindsight(trace: replay_traces.Trace, policy: str) -> Result:
    result = Result(trace.name, "(hindsight)")
    for window in trace.windows[1:]:
        plan = eplb.rebalance_experts(window, *trace.config, policy=policy).phy2log
        result.balance.append(balancedness(window, plan, trace.config[3]))
    return result


HEADER = [
    "trace",
    "rule",
    "balance",
    "worst window",
    "experts moved",
    "worst step",
    "GB moved",
    "worst step GB",
    "rebalances",
    "layers",
    "ms",
]


def row(result: Result, expert_bytes: int) -> list[str]:
    cells = [result.trace, result.rule, f"{np.mean(result.balance):.4f}", f"{np.min(result.balance):.4f}"]
    if result.rule == "(hindsight)":
        return cells + ["-"] * (len(HEADER) - len(cells))
    moved = [d[1] for d in result.decisions]
    total, worst = sum(moved), max(moved, default=0)
    return [
        *cells,
        f"{total}",
        f"{worst}",
        f"{total * expert_bytes / 1e9:.1f}",
        f"{worst * expert_bytes / 1e9:.1f}",
        f"{sum(m > 0 for m in moved)}/{len(moved)}",
        f"{sum(d[2] for d in result.decisions)}",
        f"{1000 * np.mean(result.seconds):.1f}" if result.seconds else "-",
    ]


def fmt_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join("---" for _ in HEADER) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def plot(results: list[Result], trace: replay_traces.Trace, interval: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    windows = np.arange(1, len(trace.windows))
    colors = plt.get_cmap("tab20").colors
    for i, result in enumerate(results):
        if result.rule == "(hindsight)":
            style = {"color": "black", "linestyle": ":"}
        else:
            style = {"color": colors[(2 * i) % 20 + (2 * i) // 20 % 2], "linestyle": "-" if i % 2 else "--"}
        top.plot(windows, result.balance, label=result.rule, linewidth=1.2, **style)
        at = [d[0] for d in result.decisions if d[1] > 0]
        moved = [d[1] for d in result.decisions if d[1] > 0]
        if at:
            bottom.plot(at, moved, marker="o", markersize=3, linewidth=0.8, **style)
    top.set_ylabel("balancedness of the window\n(mean / max GPU load)")
    top.set_title(f"{trace.name}: {trace.note}; config {'/'.join(map(str, trace.config))}, interval {interval}")
    top.legend(fontsize=7, ncol=3)
    bottom.set_ylabel("experts moved per decision")
    bottom.set_yscale("symlog", linthresh=10)
    bottom.set_xlabel("window (decided after window t, served from window t + 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def total_moves(result: Result) -> int:
    return sum(d[1] for d in result.decisions)


def target(results: list[Result], share: float = 0.25, slack: float = 0.005) -> str:
    """Issue 16's target per trace and rule (other than ``oblivious`` and ``flashlb-like``, which both must have been
    replayed): balance at least ``(1 - slack)`` times the oblivious rule's, at most ``share`` of its experts moved,
    and better than the FlashLB-like rule on both (higher balance, fewer experts moved); then per rule the traces
    meeting all four, the mean and worst balance against the oblivious rule, and the largest moved share."""
    by_trace: dict[str, dict[str, Result]] = {}
    for result in results:
        by_trace.setdefault(result.trace, {})[result.rule] = result
    lines = [
        "| trace | rule | balance vs oblivious | moves vs oblivious | vs FlashLB-like: balance, moves | all four |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict[str, list[tuple[float, float, bool]]] = {}
    for trace, rules in by_trace.items():
        if "oblivious" not in rules or "flashlb-like" not in rules:
            continue
        oblivious, flashlb = rules["oblivious"], rules["flashlb-like"]
        base, base_moves = np.mean(oblivious.balance), max(total_moves(oblivious), 1)
        for name, result in rules.items():
            if name in ("(hindsight)", "oblivious", "flashlb-like"):
                continue
            balance, moved = np.mean(result.balance), total_moves(result)
            checks = (
                balance >= (1 - slack) * base,
                moved <= share * base_moves,
                balance > np.mean(flashlb.balance),
                moved < total_moves(flashlb),
            )
            relative, moved_share = balance / base - 1, moved / base_moves
            summary.setdefault(name, []).append((relative, moved_share, all(checks)))
            lines.append(
                f"| {trace} | {name} | {100 * relative:+.2f}% | {100 * moved_share:.1f}% | "
                f"{'better' if checks[2] else 'WORSE'}, {'fewer' if checks[3] else 'MORE'} | "
                f"{'yes' if all(checks) else 'no'} |"
            )
    for name, scores in summary.items():
        relative = np.array([s[0] for s in scores])
        lines.append(
            f"\n{name}: all four met on {sum(s[2] for s in scores)}/{len(scores)} traces; balance vs oblivious mean "
            f"{100 * relative.mean():+.2f}%, worst {100 * relative.min():+.2f}%; moves at most "
            f"{100 * max(s[1] for s in scores):.1f}% of the oblivious rule's"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer windows and layers, one Llama window size")
    parser.add_argument("--interval", type=int, default=4, help="windows between decisions (default 4)")
    parser.add_argument(
        "--traces",
        help="comma-separated trace names (default: the main set; replay_traces.extra_traces() names others)",
    )
    parser.add_argument("--rules", help="comma-separated rule names (default: all)")
    parser.add_argument("--policy", default="greedy", choices=["greedy", "refined"], help="planner of every rule")
    parser.add_argument("--expert-bytes", type=int, default=EXPERT_BYTES, help="bytes per expert (default DeepSeek-V3)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--plot", type=Path, help="plot balance and moves over time per rule (PNG)")
    parser.add_argument("--plot-trace", help="trace to plot (default: the first one replayed)")
    parser.add_argument(
        "--target",
        action="store_true",
        help="also check issue 16's target per trace (needs the oblivious and flashlb-like rules among --rules)",
    )
    args = parser.parse_args()

    builders = replay_traces.trace_set(args.quick)
    trace_names = args.traces.split(",") if args.traces else list(builders)
    trace_names = [expanded for name in trace_names for expanded in replay_traces.expand(name)]
    if not args.quick:
        builders = {**replay_traces.extra_traces(), **builders}
    rule_names = args.rules.split(",") if args.rules else list(replay_rules.RULES)
    for name in trace_names:
        built = replay_traces.parametric(name)
        if name not in builders and built is not None:
            builders[name] = built
        if name not in builders:
            parser.error(f"unknown trace {name!r}; choose from {', '.join(builders)}")
    for name in rule_names:
        if name not in replay_rules.RULES:
            parser.error(f"unknown rule {name!r}; choose from {', '.join(replay_rules.RULES)}")

    if args.target and not {"oblivious", "flashlb-like"} <= set(rule_names):
        parser.error("--target compares against the oblivious and flashlb-like rules: add both to --rules")

    started = time.perf_counter()
    rows, skipped, plotted, replayed = [], set(), None, []
    for trace_name in trace_names:
        trace = builders[trace_name]()
        if trace is None:
            print(f"note: data for trace {trace_name!r} not found under {replay_traces.migration.DATA}: skipped")
            continue
        warm_up(trace)
        results = [hindsight(trace, args.policy)]
        for rule_name in rule_names:
            cls, options = replay_rules.RULES[rule_name]
            try:
                rule = cls(trace.config, interval=args.interval, policy=args.policy, **options)
            except replay_rules.RuleUnavailable as error:
                if rule_name not in skipped:
                    print(f"note: rule {rule_name!r} skipped: {error}")
                    skipped.add(rule_name)
                continue
            results.append(replay(trace, rule_name, rule, args.interval))
        replayed += results
        for result in results:
            rows.append(row(result, args.expert_bytes))
            print(" | ".join(rows[-1]), flush=True)
        if args.plot and plotted is None and (args.plot_trace in (None, trace_name)):
            plot(results, trace, args.interval, args.plot)
            plotted = trace_name
    text = fmt_table(rows)
    print()
    print(text)
    print(f"\n{time.perf_counter() - started:.0f} s; interval {args.interval} windows; policy {args.policy}")
    if args.target:
        checked = target(replayed)
        text += "\n\n" + checked
        print("\n" + checked)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.plot and plotted is None:
        print(f"note: trace {args.plot_trace!r} not replayed: no plot written")


if __name__ == "__main__":
    main()
