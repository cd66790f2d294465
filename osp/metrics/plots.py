"""PNG plots of outlier metrics over training, shared by `OutlierMonitor` and `osp report`.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot), so plotting works
headless, from any thread, and leaves no global figure state behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

__all__ = ["Series", "kurtosis_heatmap", "layer_curves", "run_curves"]

# (steps, values) of one curve.
Series = tuple[Sequence[float], Sequence[float]]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def kurtosis_heatmap(steps: Sequence[int], per_layer: np.ndarray, floor: float, path: Path,
                     title: str = "OSP kurtosis per layer") -> Path:
    """Layer x step heatmap of per_layer (n_layers, n_steps) on a log colour scale."""
    values = np.asarray(per_layer, dtype=float)
    # relu-clamped kurtosis can be exactly 0; a tenth of the floor is "clean" on a log scale.
    low = floor / 10 if floor > 0 else 1e-3
    shown = np.clip(np.nan_to_num(values, nan=low), low, None)
    fig = Figure(figsize=(max(5.0, 0.5 * len(steps) + 2.5), max(3.0, 0.35 * values.shape[0] + 1.5)))
    ax = fig.add_subplot()
    high = max(shown.max(), low * 10)
    image = ax.imshow(shown, aspect="auto", origin="lower", cmap="magma", norm=LogNorm(vmin=low, vmax=high))
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label(f"kurtosis (Gaussian floor {floor:.3g})")
    if values.size <= 200:
        # Light text on the dark (low) half of the log scale, dark text on the bright half.
        middle = np.sqrt(low * high)
        for (row, col), value in np.ndenumerate(values):
            ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=7,
                    color="white" if shown[row, col] < middle else "black")
    stride = max(1, len(steps) // 12)
    ax.set_xticks(range(0, len(steps), stride), [str(s) for s in steps[::stride]], rotation=45)
    ax.set_yticks(range(values.shape[0]), [f"{i:02d}" for i in range(values.shape[0])])
    ax.set_xlabel("step")
    ax.set_ylabel("tap (0 = embedding, last = final norm)")
    ax.set_title(title)
    return _save(fig, path)


def layer_curves(steps: Sequence[int], per_layer: np.ndarray, path: Path, ylabel: str, title: str,
                 log: bool = True) -> Path:
    """One curve per layer of per_layer (n_layers, n_steps) against step."""
    values = np.asarray(per_layer, dtype=float)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colors = colormaps["viridis"](np.linspace(0, 1, max(2, values.shape[0])))
    for layer, row in enumerate(values):
        ax.plot(steps, row, marker=".", color=colors[layer], label=f"layer {layer:02d}")
    if log and np.nanmin(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if values.shape[0] > 8 else 1)
    return _save(fig, path)


def run_curves(curves: Mapping[str, Series], path: Path, ylabel: str, title: str, log: bool = True,
               dashed: Mapping[str, Series] | None = None, hlines: Mapping[str, float] | None = None) -> Path:
    """Compare runs: one solid curve per name, optional dashed companions and labelled horizontal lines."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    smallest = np.inf
    for index, (name, (steps, values)) in enumerate(curves.items()):
        color = f"C{index % 10}"
        ax.plot(steps, values, marker=".", color=color, label=name)
        smallest = min(smallest, np.nanmin(values) if len(values) else np.inf)
        if dashed and name in dashed and len(dashed[name][0]):
            ax.plot(*dashed[name], linestyle="--", color=color, label=f"{name} (osp_exact)")
    for label, value in (hlines or {}).items():
        ax.axhline(value, linestyle=":", color="grey")
        ax.annotate(label, (0, value), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                    va="bottom")
    if log and smallest > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, path)
