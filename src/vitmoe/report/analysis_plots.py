"""Figures of `vitmoe analyze`: class x expert heatmaps, patch-position maps per expert, and test
images with each patch tinted by the expert it went to. Drawn on a bare Figure with the Agg
canvas (no pyplot, no global backend), written atomically."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..fileio import atomic_write_bytes

DPI = 110


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue())


def plot_class_experts(shares: np.ndarray, classes: Sequence[str], layer: str, path: Path) -> Path:
    """Rows: classes; columns: experts; cell: share of the class's tokens the expert took."""
    C, E = shares.shape
    fig = _figure(max(4.0, 0.35 * E + 2.5), max(3.0, 0.3 * C + 1.5))
    ax = fig.subplots()
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(shares.max()), 1e-9))
    ax.set_yticks(range(C), [str(c) for c in classes], fontsize=7)
    ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(f"{layer}: share of each class's tokens per expert", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_position_experts(shares: np.ndarray, layer: str, path: Path) -> Path:
    """One small grid per expert: for each patch position, the share of its tokens the expert took."""
    P, E = shares.shape
    side = int(round(math.sqrt(P)))
    cols = min(E, 8)
    rows = math.ceil(E / cols)
    fig = _figure(1.4 * cols + 0.6, 1.5 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    im = None
    for e, ax in enumerate(axes):
        ax.set_axis_off()
        if e < E and side * side == P:
            im = ax.imshow(shares[:, e].reshape(side, side), cmap="magma", vmin=0, vmax=1)
            ax.set_title(f"expert {e}", fontsize=7)
    if im is not None:  # one scale for every panel (vmin 0, vmax 1)
        fig.colorbar(im, ax=axes.tolist(), shrink=0.8).set_label("share of the position's tokens", fontsize=7)
    fig.suptitle(f"{layer}: share of each patch position's tokens", fontsize=9)
    return _save(fig, path)


def plot_routed_images(images: np.ndarray, routes: np.ndarray, experts: int, layer: str, path: Path) -> Path:
    """`images` [n, C, H, W] (any scale), `routes` [n, patches] expert per patch (-1: none, grey)."""
    from matplotlib import colormaps

    n = images.shape[0]
    side = int(round(math.sqrt(routes.shape[1])))
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    palette = colormaps["tab20"].resampled(max(experts, 2))
    fig = _figure(1.5 * cols, 1.5 * rows + 0.4 + 0.25 * math.ceil(max(experts, 1) / 8))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        img = images[i].astype(np.float64)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
        gray = img.mean(0) if img.shape[0] != 3 else None
        rgb = np.stack([gray] * 3, -1) if gray is not None else img.transpose(1, 2, 0)
        tint = np.array([palette(int(e))[:3] if e >= 0 else (0.5, 0.5, 0.5) for e in routes[i]])
        tint = tint.reshape(side, side, 3).repeat(math.ceil(rgb.shape[0] / side), 0).repeat(
            math.ceil(rgb.shape[1] / side), 1)[: rgb.shape[0], : rgb.shape[1]]
        ax.imshow(0.55 * rgb + 0.45 * tint)
    # Which colour is which expert (and grey: a token no expert took, dropped by capacity).
    from matplotlib.patches import Patch

    handles = [Patch(color=palette(e), label=f"expert {e}") for e in range(experts)]
    if (routes < 0).any():
        handles.append(Patch(color=(0.5, 0.5, 0.5), label="dropped"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=6, frameon=False)
    fig.subplots_adjust(bottom=0.08 + 0.05 * math.ceil(len(handles) / 8))
    fig.suptitle(f"{layer}: patches tinted by expert", fontsize=9)
    return _save(fig, path)
