"""Report figures: test accuracy per epoch, and per-layer expert load heatmaps.

matplotlib is imported lazily inside the functions, and figures are drawn on a bare
``Figure`` with the Agg canvas (no pyplot, no display, no global backend switch).
PNGs are written atomically.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..fileio import atomic_write
from .runs import DEFAULT_THRESHOLD, ReportWarning, RunFormatError, RunResult, distinct_labels

__all__ = ["plot_accuracy", "plot_expert_load", "expert_load_matrix", "latest_expert_load"]

DPI = 120


def _natural_key(name: str) -> list[Any]:
    """'blocks.10.mlp' sorts after 'blocks.9.mlp'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def latest_expert_load(run: RunResult) -> tuple[int, dict[str, list[float]]] | None:
    """(epoch, expert_load) of the last epoch that logged a non-empty ``expert_load``."""
    for m in reversed(run.metrics):
        load = m.get("expert_load")
        if isinstance(load, dict) and load:
            return int(m["epoch"]), load
    return None


def expert_load_matrix(run: RunResult) -> tuple[list[str], np.ndarray]:
    """Expert load of the last logged epoch as a (layers, max experts) matrix.

    Each row is the fraction of token copies routed to each expert of that layer (sums
    to 1).  Layers with fewer experts are padded with NaN; a layer that received no
    tokens at all is a row of NaN.  Layers are in natural name order.  Raises
    ``ValueError`` when the run logged no expert load (dense run).
    """
    found = latest_expert_load(run)
    if found is None:
        raise ValueError(f"run {run.name!r} ({run.path}) has no expert_load in its metrics")
    epoch, load = found
    names = sorted(load, key=_natural_key)
    rows = []
    for name in names:
        counts = load[name]
        if (not isinstance(counts, (list, tuple)) or not counts
                or any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in counts)):
            raise RunFormatError(f"{run.path}: epoch {epoch}: expert_load[{name!r}] must be a "
                                 f"non-empty list of numbers")
        arr = np.asarray(counts, dtype=np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise RunFormatError(f"{run.path}: epoch {epoch}: expert_load[{name!r}] has "
                                 f"negative or non-finite counts")
        rows.append(arr)
    width = max(len(r) for r in rows)
    mat = np.full((len(rows), width), np.nan, dtype=np.float64)
    for i, (name, arr) in enumerate(zip(names, rows)):
        total = arr.sum()
        if total > 0:
            mat[i, :len(arr)] = arr / total
        else:
            warnings.warn(f"run {run.name!r}: layer {name} received no tokens at epoch {epoch}",
                          ReportWarning, stacklevel=2)
    return names, mat


def new_figure(figsize: tuple[float, float]):
    """A bare Agg figure with constrained layout (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike) -> Path:
    """`fig` as a PNG at `path`, written atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def threshold_lines(runs: list[RunResult], labels: list[str], threshold: float | None) -> dict[float, list[str]]:
    """The threshold lines of the accuracy plot: {value: labels of the runs it is theirs}; one
    line at `threshold` when given, else one per distinct threshold the runs were trained with."""
    if threshold is not None:
        return {float(threshold): list(labels)}
    lines: dict[float, list[str]] = {}
    for run, label in zip(runs, labels):
        lines.setdefault(run.own_threshold, []).append(label)
    return dict(sorted(lines.items()))


def plot_accuracy(runs: Iterable[RunResult], path: str | os.PathLike,
                  threshold: float | None = None) -> Path:
    """Test accuracy per epoch of all ``runs`` on one figure (runs of one name told apart by
    their path), with the threshold line: `threshold`, or None: each run's own (one line per
    distinct value)."""
    runs = list(runs)
    labels = distinct_labels(runs)
    fig = new_figure((7.0, 4.5))
    ax = fig.add_subplot()
    plotted = 0
    for run, name in zip(runs, labels):
        pts = [(m["epoch"], float(m["test_acc"])) for m in run.metrics]
        pts = [(e, a) for e, a in pts if math.isfinite(a)]
        if not pts:
            warnings.warn(f"run {run.name!r} ({run.path}): no per-epoch test accuracy to plot",
                          ReportWarning, stacklevel=2)
            continue
        epochs, accs = zip(*pts)
        label = name if run.complete else f"{name} (incomplete)"
        marker = "o" if len(pts) <= 30 else None
        (line,) = ax.plot(epochs, accs, label=label, lw=1.5, marker=marker, ms=3)
        best = max(range(len(accs)), key=lambda i: (accs[i], -epochs[i]))
        ax.plot([epochs[best]], [accs[best]], marker="*", ms=10, color=line.get_color(),
                ls="none")
        plotted += 1
    lines = threshold_lines(runs, labels, threshold)
    styles = ("--", ":", "-.")
    for i, (value, owners) in enumerate(sorted(lines.items())):
        whose = f", {', '.join(owners)}" if len(lines) > 1 else ""
        ax.axhline(value, color="gray", ls=styles[i % len(styles)], lw=1, label=f"threshold ({value:g} %{whose})")
    if not plotted:
        ax.text(0.5, 0.5, "no per-epoch metrics", transform=ax.transAxes,
                ha="center", va="center", color="gray")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per epoch (\u2605 = best)")
    ax.grid(True, alpha=0.3)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right", fontsize="small")
    return save_png(fig, path)


def plot_expert_load(run: RunResult, path: str | os.PathLike) -> Path | None:
    """Heatmap (layer x expert) of the last logged epoch's expert load.

    Returns the written path, or None (writing nothing) for a dense run or a MoE run
    that logged no expert load.
    """
    if latest_expert_load(run) is None:
        if run.is_moe:
            warnings.warn(f"run {run.name!r} ({run.path}): MoE run without expert_load in its "
                          f"metrics; no heatmap", ReportWarning, stacklevel=2)
        return None
    epoch, _ = latest_expert_load(run)
    names, mat = expert_load_matrix(run)
    n_layers, n_experts = mat.shape

    import matplotlib
    from matplotlib.ticker import MaxNLocator

    # grey = padding (layer has fewer experts) or a layer that received no tokens
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    width = min(16.0, max(5.0, 0.32 * n_experts + 3.0))
    height = min(14.0, max(2.6, 0.32 * n_layers + 1.6))
    fig = new_figure((width, height))
    ax = fig.add_subplot()
    finite = mat[np.isfinite(mat)]
    vmax = float(finite.max()) if finite.size else 1.0
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", interpolation="nearest",
                   cmap=cmap, vmin=0.0, vmax=max(vmax, 1e-12))
    ax.set_yticks(range(n_layers), labels=names, fontsize="small")
    if n_experts <= 32:
        ax.set_xticks(range(n_experts))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    counts = {int(np.isfinite(r).sum()) for r in mat if np.isfinite(r).any()}
    uniform = f"; uniform = 1/{counts.pop()}" if len(counts) == 1 else ""
    ax.set_title(f"{run.name}: expert load, epoch {epoch}{uniform}", fontsize="medium")
    cbar = fig.colorbar(im, ax=ax)
    cbar.set_label("fraction of token copies")
    return save_png(fig, path)
