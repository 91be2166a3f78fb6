"""Plots of a placement (needs matplotlib: ``pip install "eplb[plot]"``).

- :func:`plot_gpu_loads`: one layer's per-GPU load as bars, before and after,
  with the mean GPU load and the lower bound on the max GPU load marked;
- :func:`plot_heatmap`: layer x GPU load, relative to each layer's mean;
- :func:`plot_placement`: both in one figure (what ``eplb plan --plot`` draws).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no GUI
backend), so they work headless; save them with ``fig.savefig(path)``.
Inputs may be numpy, torch or JAX arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eplb import metrics

__all__ = ["naive_placement", "plot_gpu_loads", "plot_heatmap", "plot_placement"]

BEFORE_COLOR, AFTER_COLOR, BOUND_COLOR = "#9e9e9e", "#1f77b4", "#d62728"


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
    return np.asarray(x)


def naive_placement(num_layers: int, num_experts: int, num_replicas: int) -> np.ndarray:
    """``phy2log [L, R]`` without balancing: slot ``j`` holds expert ``j % E`` (the usual start-up layout)."""
    return np.broadcast_to(np.arange(num_replicas) % num_experts, (num_layers, num_replicas)).copy()


def plot_gpu_loads(
    ax: Any,
    weight: Any,
    phy2log: Any,
    num_gpus: int,
    *,
    layer: int,
    before: Any = None,
    bound: Any = None,
) -> None:
    """Bars of the per-GPU load of ``layer``: ``before`` (grey, optional) and ``phy2log`` (blue).

    Parameters
    ----------
    ax : matplotlib Axes
        Where to draw.
    weight : array [L, E]
        Expert loads.
    phy2log : array [L, R], integer
        The placement to show (after).
    num_gpus : int
        GPUs; slot ``j`` is on GPU ``j // (R // num_gpus)``.
    layer : int, keyword-only
        The layer to draw.
    before : array [L, R'], integer, optional, keyword-only
        An earlier placement, drawn beside it.
    bound : array [L], optional, keyword-only
        Lower bound on the max GPU load (:func:`eplb.metrics.lower_bound`), drawn as a red line.
    """
    weight = _numpy(weight).astype(np.float32)
    after = _numpy(metrics.gpu_loads(weight, _numpy(phy2log), num_gpus))[layer]
    gpus = np.arange(num_gpus)
    width = 0.8
    if before is not None:
        old = _numpy(metrics.gpu_loads(weight, _numpy(before), num_gpus))[layer]
        width = 0.4
        ax.bar(gpus - 0.2, old, width, color=BEFORE_COLOR, label=f"before (max/mean {old.max() / old.mean():.2f})")
    label = f"after (max/mean {after.max() / after.mean():.2f})" if after.mean() > 0 else "after"
    ax.bar(gpus + (0.2 if before is not None else 0.0), after, width, color=AFTER_COLOR, label=label)
    ax.axhline(after.mean(), color="black", linestyle="--", linewidth=1, label="mean GPU load")
    if bound is not None:
        ax.axhline(
            float(_numpy(bound)[layer]), color=BOUND_COLOR, linestyle=":", linewidth=1.5, label="lower bound on max"
        )
    ax.set_xlabel("GPU")
    ax.set_ylabel("load (tokens)")
    ax.set_title(f"Layer {layer}: load per GPU")
    ax.set_xlim(-0.6, num_gpus - 0.4)
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9)


def plot_heatmap(
    ax: Any, weight: Any, phy2log: Any, num_gpus: int, *, title: str = "", vmax: float | None = None
) -> Any:
    """Heat map of GPU load / layer mean, layers down, GPUs across (1.0 = mean; red = overloaded).

    Parameters
    ----------
    ax : matplotlib Axes
        Where to draw.
    weight : array [L, E]
        Expert loads.
    phy2log : array [L, R], integer
        The placement.
    num_gpus : int
        GPUs.
    title : str, keyword-only
        Axes title.
    vmax : float, optional, keyword-only
        Top of the color scale (share it between heat maps to compare them).

    Returns
    -------
    matplotlib AxesImage
        For a colorbar.
    """
    from matplotlib.colors import TwoSlopeNorm

    loads = _numpy(metrics.gpu_loads(_numpy(weight).astype(np.float32), _numpy(phy2log), num_gpus)).astype(np.float64)
    mean = loads.mean(axis=1, keepdims=True)
    relative = np.divide(loads, mean, out=np.ones_like(loads), where=mean > 0)
    top = max(float(relative.max()) if vmax is None else vmax, 1.01)
    image = ax.imshow(relative, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, top), interpolation="nearest")
    ax.set_xlabel("GPU")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return image


def plot_placement(
    weight: Any,
    phy2log: Any,
    num_gpus: int,
    *,
    before: Any = None,
    bound: Any = None,
    layer: int | None = None,
    title: str | None = None,
) -> Any:
    """One figure: per-GPU load bars of one layer (top) and layer x GPU heat maps (bottom).

    Parameters
    ----------
    weight : array [L, E]
        Expert loads.
    phy2log : array [L, R], integer
        The placement (after).
    num_gpus : int
        GPUs.
    before : array [L, R'], integer, optional, keyword-only
        The placement to compare with (say the previous one, or :func:`naive_placement`).
    bound : array [L], optional, keyword-only
        Lower bound on the max GPU load per layer, marked on the bars.
    layer : int, optional, keyword-only
        Layer of the bar chart; default: the worst-balanced layer after.
    title : str, optional, keyword-only
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        Save it with ``fig.savefig("placement.png")``.
    """
    from matplotlib.figure import Figure

    weight, phy2log = _numpy(weight), _numpy(phy2log)
    if layer is None:
        layer = int(np.argmin(_numpy(metrics.balancedness(weight, phy2log, num_gpus))))
    panels = 2 if before is not None else 1
    fig = Figure(figsize=(12, 9), layout="constrained")
    grid = fig.add_gridspec(2, panels, height_ratios=[1, 1.3])
    plot_gpu_loads(fig.add_subplot(grid[0, :]), weight, phy2log, num_gpus, layer=layer, before=before, bound=bound)
    maps = [(phy2log, "after")] if before is None else [(_numpy(before), "before"), (phy2log, "after")]
    relative_max = max(
        float((loads / np.maximum(loads.mean(axis=1, keepdims=True), 1e-30)).max())
        for loads in (_numpy(metrics.gpu_loads(weight.astype(np.float32), p, num_gpus)) for p, _ in maps)
    )
    axes = [fig.add_subplot(grid[1, i]) for i in range(panels)]
    for ax, (placement, name) in zip(axes, maps, strict=True):
        image = plot_heatmap(ax, weight, placement, num_gpus, title=f"{name}: GPU load / layer mean", vmax=relative_max)
    fig.colorbar(image, ax=axes, label="GPU load / layer mean (1 = balanced)")
    if title:
        fig.suptitle(title)
    return fig
