"""eplb.plots (matplotlib) and the --plot option of the command line."""

from __future__ import annotations

import numpy as np
import pytest

import eplb
from eplb import metrics
from eplb.cli import _common, main

matplotlib = pytest.importorskip("matplotlib")
plots = pytest.importorskip("eplb.plots")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WEIGHT = np.random.default_rng(1).lognormal(0, 1.2, (6, 16)).astype(np.float32) * 100
CONFIG = (24, 4, 2, 8)


def _placement():
    return eplb.rebalance_experts(WEIGHT, *CONFIG).phy2log


def test_naive_placement():
    naive = plots.naive_placement(2, 4, 6)
    assert naive.tolist() == [[0, 1, 2, 3, 0, 1]] * 2


def test_plot_placement_before_after(tmp_path):
    """Bars (with mean and bound lines) over two heat maps and a colorbar; saves a PNG headless."""
    bound = metrics.lower_bound(WEIGHT, *CONFIG)
    before = plots.naive_placement(6, 16, 24)
    fig = plots.plot_placement(WEIGHT, _placement(), 8, before=before, bound=bound, title="t")
    bars, heat_before, heat_after, _colorbar = fig.axes
    assert len(bars.patches) == 2 * 8  # before and after bars per GPU
    labels = bars.get_legend_handles_labels()[1]
    assert "mean GPU load" in labels and "lower bound on max" in labels
    worst = int(np.argmin(metrics.balancedness(WEIGHT, _placement(), 8)))
    assert bars.get_title() == f"Layer {worst}: load per GPU"
    assert heat_before.images[0].get_array().shape == (6, 8) == heat_after.images[0].get_array().shape
    path = tmp_path / "p.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_bars_match_gpu_loads():
    fig = plots.plot_placement(WEIGHT, _placement(), 8, layer=2)
    bars = fig.axes[0]
    heights = [patch.get_height() for patch in bars.patches]
    np.testing.assert_allclose(heights, np.asarray(metrics.gpu_loads(WEIGHT, _placement(), 8))[2], rtol=1e-6)
    assert len(fig.axes) == 3  # bars, one heat map, colorbar


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_plot_accepts_torch_and_jax_arrays(framework):
    module = pytest.importorskip(framework)
    weight = module.numpy.asarray(WEIGHT) if framework == "jax" else module.as_tensor(WEIGHT)
    placement = eplb.rebalance_experts(weight, *CONFIG).phy2log
    fig = plots.plot_placement(weight, placement, 8, bound=metrics.lower_bound(weight, *CONFIG))
    assert len(fig.axes) == 3


@pytest.mark.parametrize("command", ["plan", "inspect", "demo"])
def test_cli_plot(tmp_path, monkeypatch, command):
    monkeypatch.setattr(_common, "TIMED_CALLS", 1)
    np.save(tmp_path / "load.npy", WEIGHT)
    png = tmp_path / "plot.png"
    flags = ["--gpus", "8", "--replicas", "24", "--groups", "4", "--nodes", "2"]
    if command == "demo":
        argv = ["demo", "--out", str(tmp_path / "d.json"), "--plot", str(png)]
    elif command == "plan":
        argv = ["plan", "--load", str(tmp_path / "load.npy"), *flags, "--plot", str(png), "--layer", "1"]
    else:
        np.save(tmp_path / "p.npy", _placement())
        argv = ["inspect", str(tmp_path / "p.npy"), "--load", str(tmp_path / "load.npy"), *flags, "--plot", str(png)]
    assert main(["--plain", *argv]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_plot_bad_layer(tmp_path, capsys):
    np.save(tmp_path / "load.npy", WEIGHT)
    argv = ["plan", "--load", str(tmp_path / "load.npy"), "--gpus", "8", "--replicas", "24"]
    assert main([*argv, "--plot", str(tmp_path / "p.png"), "--layer", "6"]) == 2
    assert capsys.readouterr().err.strip() == "eplb: error: --layer 6 must be between 0 and 5"
