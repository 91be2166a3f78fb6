"""The replay benchmark's own bookkeeping: the Llama-4 readings it builds and issue 16's target check it prints.

``benchmarks/replay.py --target`` decides which traces a rule passes; these tests check its four conditions
against plain arithmetic on hand-made results, and the Llama-4 readings (offset, backwards) against the recorded
request series summed by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import replay  # noqa: E402
import replay_traces  # noqa: E402

from . import cases  # noqa: E402


def result(trace: str, rule: str, balance: list[float], moved: list[int]) -> replay.Result:
    return replay.Result(trace, rule, balance=balance, decisions=[(4 * (i + 1), m, 1) for i, m in enumerate(moved)])


@pytest.mark.parametrize(
    ("balance", "moved", "met"),
    [
        ((0.50, 0.50), (10, 10), True),  # same balance, 20 of 100 moves, FlashLB-like worse on both
        ((0.4975, 0.4975), (10, 10), True),  # exactly 0.5% below: within the bound
        ((0.497, 0.497), (10, 10), False),  # 0.6% below the oblivious rule
        ((0.50, 0.50), (13, 13), False),  # 26 of 100 moves: past 25%
        ((0.50, 0.50), (15, 15), False),  # as many moves as the FlashLB-like rule (30): not fewer
        ((0.40, 0.40), (5, 5), False),  # balance no better than the FlashLB-like rule's
    ],
)
def test_target_checks_each_condition(balance, moved, met):
    results = [
        result("t", "oblivious", [0.5, 0.5], [50, 50]),
        result("t", "flashlb-like", [0.4, 0.4], [15, 15]),
        result("t", "mine", list(balance), list(moved)),
    ]
    text = replay.target(results)
    relative = np.mean(balance) / 0.5 - 1
    assert f"| t | mine | {100 * relative:+.2f}% | {sum(moved):.1f}% |" in text
    assert text.splitlines()[2].endswith("| yes |" if met else "| no |")
    assert f"mine: all four met on {int(met)}/1 traces" in text


def test_target_skips_traces_without_both_references_and_counts_per_rule():
    results = [
        result("a", "oblivious", [0.5], [100]),
        result("a", "flashlb-like", [0.3], [40]),
        result("a", "x", [0.6], [20]),
        result("a", "y", [0.6], [30]),
        result("b", "oblivious", [0.5], [100]),  # no FlashLB-like rule: not scored
        result("b", "x", [0.1], [90]),
    ]
    text = replay.target(results)
    assert "| b |" not in text
    assert "x: all four met on 1/1 traces; balance vs oblivious mean +20.00%, worst +20.00%" in text
    assert "y: all four met on 0/1 traces" in text and "moves at most 30.0%" in text


def test_orderings_name_four_readings_and_expand():
    assert replay_traces.orderings(8) == ["llama-8-g16", "llama-8-g16-o4", "llama-8-g16-r", "llama-8-g16-o4-r"]
    assert replay_traces.expand("llama-6-orderings") == ["llama-6", "llama-6-o3", "llama-6-r", "llama-6-o3-r"]
    assert replay_traces.expand("llama-4-g16-orderings-decode")[3] == "llama-4-g16-o2-r-decode"
    assert replay_traces.expand("drift-fast") == ["drift-fast"]
    assert replay_traces.parametric("llama-8") is None  # the default trace, not a parametric one
    assert replay_traces.parametric("llama-8-x") is None


@pytest.mark.parametrize(
    "name", ["llama-8-g16-o4-r", "llama-5-o2", "llama-7-r", "llama-3-g16", "llama-6-decode", "llama-9-g16-o1-r-decode"]
)
def test_llama_readings_sum_the_recorded_requests(name):
    path = cases.DATA / "llama4-maverick-mmlu" / "llama4_maverick_mmlu_counts.npz"
    if not path.exists():
        pytest.fail(f"{path} is missing (set EPLB_DATA_DIR): CI has it")
    trace = replay_traces.parametric(name)()
    requests = int(name.split("-")[1])
    offset = int(name.split("-o")[1].split("-")[0]) if "-o" in name else 0
    counts = "decode" if name.endswith("-decode") else "prefill"
    series = np.load(path)[counts].astype(np.int64).tolist()  # [requests][24][128], plain Python
    if name.removesuffix("-decode").endswith("-r"):
        series = series[::-1]
    series = series[offset:]
    expected = []
    for start in range(0, len(series) - requests + 1, requests):
        rows = series[start : start + requests]
        expected.append([[sum(r[layer][e] for r in rows) for e in range(128)] for layer in range(24)])
    assert len(trace.windows) == len(expected)
    for got, want in zip(trace.windows, expected, strict=True):
        assert got.tolist() == want
    assert trace.config == (replay_traces.LLAMA_ISSUE_CONFIG if "-g16" in name else replay_traces.LLAMA_CONFIG)
