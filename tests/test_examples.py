"""The integration examples in examples/ run (small sizes): load tracked, experts rebalanced across ranks or devices
by the executors, function unchanged.

Each example runs as a script in a subprocess, as a user runs it: the torch one spawns its gloo ranks, the JAX one
runs itself again with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (JAX reads it once, at start-up).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORLD = 4  # ranks (torch) or mesh devices (JAX)
SMALL = ["--steps", "6", "--every", "3", "--window", "1", "--layers", "2", "--tokens", "32"]


def _run(name: str, args: list[str], tmp_path: Path) -> dict:
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the JAX example sets its own
    env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, str(EXAMPLES / f"{name}.py"), *SMALL, *args, "--report", str(report)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("step ") == 2, proc.stdout  # one line per decision
    return json.loads(report.read_text())


def _check(report: dict) -> None:
    assert len(report["before"]) == len(report["after"]) == 2  # decided at steps 3 and 6
    assert report["after"][0] < report["before"][0]  # the first decision spreads the popular experts
    assert report["max_output_change"] == [0.0, 0.0]  # replicas are copies: moving them changes nothing, exactly
    assert report["moved"][0] > 0  # the first decision copies experts between ranks / devices
    assert report["layers"][0] and all(layers == sorted(layers) for layers in report["layers"])
    # After every decision, every rank / device holds exactly the weights of the experts its placement says.
    assert report["weights_match"] == [[True] * WORLD] * 2


@pytest.mark.parametrize("mode", [[], ["--all-at-once"]], ids=["layer-by-layer", "all-at-once"])
def test_torch_example(tmp_path, mode):
    """Layer by layer (begin/finish, serving the probe batch while each layer's copies are in flight: its output
    must not change) and all at once (apply_plan)."""
    pytest.importorskip("torch")
    report = _run("torch_moe_rebalance", ["--world", str(WORLD), *mode], tmp_path)
    _check(report)
    # The executor ran: the ranks received (on_transfer) exactly the plan's copies between ranks.
    assert [sum(ranks) for ranks in report["received"]] == report["moved"]
    assert len(report["received"][0]) == WORLD
    assert report["same_decision"] == [True, True]  # every rank took the same decisions


def test_jax_example(tmp_path):
    pytest.importorskip("jax")
    report = _run("jax_moe_rebalance", ["--devices", str(WORLD)], tmp_path)
    _check(report)
    assert report["devices"] == WORLD  # the expert weights are sharded over the whole mesh axis
    assert len(report["loss"]) == 6 and report["loss"][-1] < report["loss"][0]


@pytest.mark.parametrize("page", ["quickstart.md", "tracking.md"])
def test_docs_code_runs(page, monkeypatch, tmp_path):
    """The Python blocks of the docs pages run as written, in order (those needing a missing framework skip)."""
    monkeypatch.chdir(tmp_path)
    text = (EXAMPLES.parent / "docs" / page).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert blocks
    for index, block in enumerate(blocks):
        needs = [m for m in ("torch", "jax") if re.search(rf"^import {m}\b", block, re.MULTILINE)]
        if any(importlib.util.find_spec(m) is None for m in needs):
            continue
        exec(compile(block, f"{page}[{index}]", "exec"), {"__name__": f"docs_{index}"})
