"""The integration examples in examples/ run (small sizes): load tracked, experts rebalanced, function unchanged."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["--steps", "6", "--every", "3", "--layers", "2", "--tokens", "64"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"eplb_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(report: dict[str, list[float]]) -> None:
    assert len(report["before"]) == len(report["after"]) == 2  # rebalanced at steps 3 and 6
    assert report["after"][0] < report["before"][0]  # the first rebalance spreads the popular experts
    assert report["max_output_change"] == [0.0, 0.0]  # replicas are copies: moving them changes nothing
    assert report["moved"][0] > 0  # the first rebalance moves experts away from the start-up layout


def test_torch_example():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        _check(_load("torch_moe_rebalance").main(SMALL))
    finally:
        torch.set_num_threads(threads)


def test_jax_example():
    pytest.importorskip("jax")
    report = _load("jax_moe_rebalance").main(SMALL)
    _check(report)
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
