"""The ``eplb`` command: demo, plan on every load format, inspect, and one-line errors (exit 2) for user mistakes."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import eplb
from eplb import demo as module_demo
from eplb._data import default_load
from eplb._data.generate import CONFIG, generate
from eplb.cli import _common, _files, main

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
LOAD = RNG.integers(0, 1000, (4, 16))  # 4 layers x 16 experts
FLAGS = ["--gpus", "4", "--replicas", "24", "--groups", "4", "--nodes", "2"]


def _expected(weight=LOAD, policy="greedy"):
    return eplb.rebalance_experts(np.asarray(weight), 24, 4, 2, 4, policy=policy).phy2log


def _run(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``eplb ARGV`` run in this process, plain output."""
    status = main(["--plain", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def _quick(monkeypatch):
    monkeypatch.setattr(_common, "TIMED_CALLS", 1)


# ---------------------------------------------------------------- embedded data


def test_embedded_load_is_reproducible():
    """The shipped .npz is exactly what the generator makes, and shaped like DeepSeek-V3."""
    data = default_load()
    np.testing.assert_array_equal(data.load, generate())
    assert data.load.shape == (58, 256) and data.load.dtype == np.int32
    assert (data.load.sum(axis=1) == 8 * 2**20).all()
    assert (data.num_replicas, data.num_groups, data.num_nodes, data.num_gpus) == tuple(CONFIG.values())
    skew = np.median(data.load.max(axis=1) / data.load.mean(axis=1))
    assert 4 < skew < 9  # recorded DeepSeek-V3 loads: median max/mean 5.2 to 8.2


# ---------------------------------------------------------------- demo


def _oracle_gpu_loads(weight, phy2log, num_gpus: int) -> list[list[float]]:
    """``[L][G]`` float64 GPU loads in plain Python, independent of eplb.metrics.

    A replica of expert ``e`` carries ``w[e] / logcnt[e]``; a GPU's load is the sum over its ``R // G`` slots.
    """
    loads = []
    for w, slots in zip(np.asarray(weight).tolist(), np.asarray(phy2log).tolist(), strict=True):
        logcnt = Counter(slots)
        size = len(slots) // num_gpus
        loads.append([sum(w[e] / logcnt[e] for e in slots[g * size : (g + 1) * size]) for g in range(num_gpus)])
    return loads


def _oracle_quality(weight, phy2log, num_gpus: int, bound=None) -> dict[str, float]:
    """Means over layers: balancedness (mean/max GPU load), imbalance (max/mean); with ``bound [L]`` also
    ceiling (mean GPU load / bound) and of_bound (bound / max GPU load)."""
    loads = _oracle_gpu_loads(weight, phy2log, num_gpus)
    means = [statistics.fmean(layer) for layer in loads]
    peaks = [max(layer) for layer in loads]
    figures = {
        "balancedness": statistics.fmean(m / p for m, p in zip(means, peaks, strict=True)),
        "imbalance": statistics.fmean(p / m for m, p in zip(means, peaks, strict=True)),
    }
    if bound is not None:
        bound = np.asarray(bound, dtype=np.float64).tolist()
        figures["ceiling"] = statistics.fmean(m / b for m, b in zip(means, bound, strict=True))
        figures["of_bound"] = statistics.fmean(b / p for b, p in zip(bound, peaks, strict=True))
    return figures


def _demo_oracle(policy: str) -> dict[str, float]:
    """Oracle quality figures of the numpy ``policy`` placement of the embedded load (every backend gives the same)."""
    weight = default_load().load
    phy2log = eplb.rebalance_experts(weight, *CONFIG.values(), policy=policy).phy2log
    bound = eplb.metrics.lower_bound(weight, *CONFIG.values())
    return _oracle_quality(weight, phy2log, CONFIG["num_gpus"], bound)


def _printed(figure: str, oracle: float, digits: int = 4) -> bool:
    """``figure`` is ``oracle`` printed with ``digits`` decimals (float32 metrics vs float64 oracle: 1e-6 slack)."""
    return abs(float(figure) - oracle) <= 0.5 * 10**-digits + 1e-6


def test_demo_writes_nothing_unasked(capsys, tmp_path, monkeypatch):
    """No --out, no --plot: no file in the working folder; the printed figures are the oracle's."""
    monkeypatch.chdir(tmp_path)
    status, stdout, err = _run(capsys, "demo")
    assert status == 0, err
    assert list(tmp_path.iterdir()) == []
    assert "not saved: add --out" in err
    for policy in ("greedy", "refined"):  # the demo's balance policies
        oracle = _demo_oracle(policy)
        rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == [policy]]
        rows = [row for row in rows if _common.installed(row[1])]
        assert rows, stdout
        for row in rows:  # policy, backend, ms/call, balancedness, lower bound, same as numpy
            assert _printed(row[3], oracle["balancedness"]), (row, oracle)
            assert _printed(row[4], oracle["ceiling"]), (row, oracle)


def test_demo_plans_on_every_backend_and_writes_the_placement(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, stdout, err = _run(capsys, "demo", "--out", "x.json")
    assert status == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert "golden example reproduced: yes" in stdout
    for backend in _common.BACKENDS:
        installed = _common.installed(backend)
        lines = [line for line in stdout.splitlines() if line.split()[1:2] == [backend]]
        assert len(lines) == 2, stdout  # one per policy
        assert all(("yes" in line) == installed for line in lines), lines
    assert "NO" not in stdout
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["config"] == {**CONFIG, "hierarchical": True}
    weight = default_load().load
    expected = eplb.rebalance_experts(weight, *CONFIG.values(), policy=data["policy"])
    np.testing.assert_array_equal(data["phy2log"], expected.phy2log)
    np.testing.assert_array_equal(data["log2phy"], expected.log2phy)
    assert data["metrics"] == pytest.approx(_demo_oracle(data["policy"]), rel=1e-5)
    assert 0.8 < data["metrics"]["balancedness"] <= data["metrics"]["ceiling"] <= 1


def test_module_demo(capsys, monkeypatch):
    """``python -m eplb.demo``: golden example reproduced; balance figures are the oracle's on every backend."""
    monkeypatch.setattr(module_demo, "WARM_CALLS", 1)
    monkeypatch.setattr(module_demo, "TIMED_CALLS", 1)
    assert not hasattr(module_demo, "gpu_loads") and not hasattr(module_demo, "balancedness")  # eplb.metrics only
    module_demo.main()
    stdout = capsys.readouterr().out
    assert "equals the published result: yes" in stdout
    weight = module_demo._deepseek_load()
    replicas, groups, nodes, gpus = module_demo.DEEPSEEK_CONFIG
    phy2log = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus).phy2log
    oracle = _oracle_quality(weight, phy2log, gpus)
    layer0 = _oracle_quality(weight[:1], phy2log[:1], gpus)
    row = re.compile(r"^  (numpy|torch \(cpu\)|jax \(cpu\)) +[\d.]+ +([\d.]+)  (yes|NO) +max/mean GPU load ([\d.]+);")
    rows = [m.groups() for m in map(row.match, stdout.splitlines()) if m]
    assert rows[0][0] == "numpy" and len(rows) == 1 + sum(map(_common.installed, ("torch", "jax"))), stdout
    for backend, balance, same, imbalance in rows:
        assert same == "yes", backend
        assert _printed(balance, oracle["balancedness"]), (backend, balance, oracle)
        assert _printed(imbalance, layer0["imbalance"], digits=3), (backend, imbalance, layer0)


def test_demo_with_rich(capsys, tmp_path):
    """With rich installed the demo prints a table (no progress bar off a terminal)."""
    pytest.importorskip("rich")
    assert main(["demo", "--out", str(tmp_path / "d.npz")]) == 0
    stdout = capsys.readouterr().out
    assert "balancedness" in stdout and "refined" in stdout


# ---------------------------------------------------------------- plan


def _write(path: Path, kind: str, weight: np.ndarray) -> Path:
    if kind == "npy":
        np.save(path, weight)
    elif kind == "npz":
        np.savez(path, load=weight, other=np.zeros(3))
    elif kind == "json":
        path.write_text(json.dumps(weight.tolist()))
    elif kind == "sglang-json":
        path.write_text(json.dumps({"logical_count": weight.astype(float).tolist()}))
    elif kind == "csv":
        header = ",".join(f"e{i}" for i in range(weight.shape[-1]))
        np.savetxt(path, weight, delimiter=",", header=header, comments="", fmt="%d")
    return path


@pytest.mark.parametrize("kind", ["npy", "npz", "json", "sglang-json", "csv"])
def test_plan_reads_every_format(capsys, tmp_path, kind):
    suffix = {"sglang-json": "json"}.get(kind, kind)
    path = _write(tmp_path / f"load.{suffix}", kind, LOAD)
    out = tmp_path / "placement.npz"
    status, stdout, err = _run(capsys, "plan", "--load", path, *FLAGS, "--out", out)
    assert status == 0, err
    assert "after: greedy" in stdout and "before: naive" in stdout
    phy2log, config = _files.read_placement(out)
    np.testing.assert_array_equal(phy2log, _expected())
    assert config["num_gpus"] == 4 and config["hierarchical"] is True


def test_plan_reads_torch_files(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    torch.save(torch.as_tensor(LOAD), tmp_path / "load.pt")
    torch.save({"counts": torch.as_tensor(LOAD), "step": torch.tensor(3)}, tmp_path / "state.pt")
    for name in ("load.pt", "state.pt"):
        out = tmp_path / f"{name}.json"
        status, _, err = _run(capsys, "plan", "--load", tmp_path / name, *FLAGS, "--out", out)
        assert status == 0, err
        np.testing.assert_array_equal(_files.read_placement(out)[0], _expected())


def test_plan_sums_a_history_window(capsys, tmp_path):
    history = RNG.integers(0, 100, (10, 4, 16))
    np.save(tmp_path / "history.npy", history)
    out = tmp_path / "p.json"
    status, _, err = _run(capsys, "plan", "--load", tmp_path / "history.npy", "--window", 3, *FLAGS, "--out", out)
    assert status == 0, err
    np.testing.assert_array_equal(_files.read_placement(out)[0], _expected(history[-3:].sum(axis=0)))


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("policy", ["greedy", "refined"])
def test_plan_backends_agree(capsys, tmp_path, backend, policy):
    pytest.importorskip(backend)
    np.save(tmp_path / "load.npy", LOAD)
    out = tmp_path / "p.json"
    argv = ["plan", "--load", tmp_path / "load.npy", *FLAGS, "--backend", backend, "--policy", policy, "--out", out]
    status, _, err = _run(capsys, *argv)
    assert status == 0, err
    np.testing.assert_array_equal(_files.read_placement(out)[0], _expected(policy=policy))


def test_plan_previous_flag(capsys, tmp_path):
    """--previous is passed on when rebalance_experts takes previous=, else a clear one-line error."""
    np.save(tmp_path / "load.npy", LOAD)
    np.save(tmp_path / "old.npy", _expected())
    status, stdout, err = _run(
        capsys, "plan", "--load", tmp_path / "load.npy", *FLAGS, "--previous", tmp_path / "old.npy"
    )
    if "previous" in inspect.signature(eplb.rebalance_experts).parameters:
        assert status == 0, err
        assert "before: previous" in stdout
    else:
        assert status == 2
        assert err.strip().startswith("eplb: error: --previous needs rebalance_experts(previous=...)")


def test_plan_spill_and_migration_knobs(capsys, tmp_path):
    """--spill, --balance-tolerance and --max-moves reach rebalance_experts; the knobs need --previous."""
    np.save(tmp_path / "load.npy", LOAD)
    np.save(tmp_path / "old.npy", _expected())
    load = tmp_path / "load.npy"
    out = tmp_path / "spill.npz"
    status, _, err = _run(capsys, "plan", "--load", load, *FLAGS, "--spill", "2", "--out", out)
    assert status == 0, err
    np.testing.assert_array_equal(np.load(out)["phy2log"], eplb.rebalance_experts(LOAD, 24, 4, 2, 4, spill=2).phy2log)
    for knob in (["--balance-tolerance", "0.01"], ["--max-moves", "2"]):
        status, _, err = _run(capsys, "plan", "--load", load, *FLAGS, "--previous", tmp_path / "old.npy", *knob)
        assert status == 0, err
        status, _, err = _run(capsys, "plan", "--load", load, *FLAGS, *knob)
        assert status == 2 and "needs --previous" in err
    status, _, err = _run(capsys, "plan", "--load", load, *FLAGS, "--spill", "9")
    assert status == 2 and err.strip().startswith("eplb: error: spill=9")


# ---------------------------------------------------------------- inspect


def test_inspect_reads_back_what_plan_wrote(capsys, tmp_path):
    np.save(tmp_path / "load.npy", LOAD)
    for suffix in ("json", "npz"):
        out = tmp_path / f"p.{suffix}"
        assert _run(capsys, "plan", "--load", tmp_path / "load.npy", *FLAGS, "--out", out)[0] == 0
        status, stdout, err = _run(capsys, "inspect", out, "--load", tmp_path / "load.npy")
        assert status == 0, err
        balancedness = float(np.mean(np.asarray(eplb.metrics.balancedness(LOAD, _expected(), 4))))
        assert f"{balancedness:.4f}" in stdout
        assert "4 x 16 -> 24" in stdout
    np.save(tmp_path / "bare.npy", _expected())
    assert _run(capsys, "inspect", tmp_path / "bare.npy", "--load", tmp_path / "load.npy", "--gpus", 4)[0] == 0


# ---------------------------------------------------------------- user errors: one line, exit 2


def _malformed(tmp_path: Path) -> dict[str, Path]:
    files = {
        "missing.npy": None,
        "empty.json": "",
        "broken.json": "{bad",
        "ragged.json": "[[1, 2], [3]]",
        "strings.json": '[["a", "b"]]',
        "several.json": '{"a": [[1]], "b": [[2]]}',
        "words.csv": "a,b\nx,y\n",
        "ragged.csv": "1,2,3\n4,5\n",
        "load.txt": "1 2 3",
        "garbage.npz": "not a zip",
        "garbage.pt": "not a torch file",
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / name
        if text is not None:
            paths[name].write_text(text)
    arrays = {
        "vector.npy": np.arange(5),
        "four_d.npy": np.zeros((2, 2, 2, 2)),
        "negative.npy": -np.ones((2, 16)),
        "nan.npy": np.full((2, 16), np.nan),
        "bool.npy": np.ones((2, 16), dtype=bool),
        "empty.npy": np.zeros((0, 16)),
    }
    for name, array in arrays.items():
        np.save(tmp_path / name, array)
        paths[name] = tmp_path / name
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    paths["objects.npy"] = tmp_path / "objects.npy"
    return paths


BAD_FILES = [
    "missing.npy",
    "empty.json",
    "broken.json",
    "ragged.json",
    "strings.json",
    "several.json",
    "words.csv",
    "ragged.csv",
    "load.txt",
    "garbage.npz",
    "garbage.pt",
    "vector.npy",
    "four_d.npy",
    "negative.npy",
    "nan.npy",
    "bool.npy",
    "empty.npy",
    "objects.npy",
]


def _one_line_error(status: int, err: str) -> str:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("eplb"), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_load_file(capsys, tmp_path, name):
    path = _malformed(tmp_path)[name]
    line = _one_line_error(*_run(capsys, "plan", "--load", path, *FLAGS)[::2])
    if name != "garbage.pt" or importlib.util.find_spec("torch"):
        assert name in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "3"], "must be a multiple of num_gpus=3"),
        (["--gpus", "4", "--replicas", "8"], "num_replicas=8 must be >="),
        (["--gpus", "4", "--groups", "3"], "num_groups=3"),
        (["--gpus", "4", "--nodes", "3"], "num_nodes=3"),
        (["--gpus", "0"], "--gpus: 0 must be at least 1"),
        (["--gpus", "x"], "'x' is not an integer"),
        (["--replicas", "16"], "required: --gpus"),
        (["--gpus", "4", "--policy", "best"], "invalid choice: 'best'"),
        (["--gpus", "4", "--window", "2"], "--window needs a history"),
        (["--gpus", "4", "--key", "x"], "--key picks an array"),
        (["--gpus", "4", "--out", "p.txt"], "--out p.txt"),
        (["--gpus", "4", "--plot", "p.jpg"], "--plot p.jpg"),
        (["--gpus", "4", "--out", "no/such/dir/p.json"], "does not exist"),
    ],
)
def test_bad_config(capsys, tmp_path, argv, message):
    np.save(tmp_path / "load.npy", LOAD)
    line = _one_line_error(*_run(capsys, "plan", "--load", tmp_path / "load.npy", *argv)[::2])
    assert message in line


def test_bad_placement_for_inspect(capsys, tmp_path):
    np.save(tmp_path / "load.npy", LOAD)
    placement = _expected()
    cases = {
        "layers.npy": placement[:2],
        "range.npy": np.where(placement == 0, 99, placement),
        "missing.npy": np.where(placement == 5, 6, placement),
        "floats.npy": placement.astype(float),
    }
    messages = {
        "layers.npy": "2 layers",
        "range.npy": "outside 0..15",
        "missing.npy": "no slot",
        "floats.npy": "integer",
    }
    for name, array in cases.items():
        np.save(tmp_path / name, array)
        line = _one_line_error(
            *_run(capsys, "inspect", tmp_path / name, "--load", tmp_path / "load.npy", "--gpus", 4)[::2]
        )
        assert messages[name] in line, line
    (tmp_path / "notplacement.json").write_text("[1, 2]")
    line = _one_line_error(
        *_run(capsys, "inspect", tmp_path / "notplacement.json", "--load", tmp_path / "load.npy")[::2]
    )
    assert "not a placement file" in line
    line = _one_line_error(*_run(capsys, "inspect", tmp_path / "layers.npy", "--load", tmp_path / "load.npy")[::2])
    assert "--gpus is required" in line


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    """``python -m eplb`` runs the same command and exits with its status."""
    np.save(tmp_path / "load.npy", LOAD)
    command = [sys.executable, "-m", "eplb", "plan", "--load", str(tmp_path / "load.npy"), "--gpus", "3"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "eplb: error: num_replicas=16 must be a multiple of num_gpus=3"
