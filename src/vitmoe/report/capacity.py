"""Capacity-accuracy curves: how much expert compute a trained MoE model can skip at inference.

V-MoE (Riquelme et al. 2021) evaluates one trained model at several eval capacities: with
C = ceil(factor * tokens * k / E) slots per expert, copies over capacity are dropped (the
block's residual carries the token), so the expert FLOPs actually spent fall with the factor.
Batch Prioritized Routing (`priority="score"`) decides which copies survive by the router's
confidence instead of by position, which is what lets accuracy hold at small capacities.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_write_bytes
from ..moe import MoEMlp, collect_moe_outputs, find_moe_layers
from ..moe.routers.topk import PRIORITIES


def capacity_layers(model: nn.Module) -> list[MoEMlp]:
    """The routed MoE layers whose eval capacity can be set (Soft MoE has none)."""
    return [m for _, m in find_moe_layers(model) if isinstance(m, MoEMlp)]


@contextlib.contextmanager
def eval_capacity(model: nn.Module, factor: float | None, priority: str | None = None) -> Iterator[None]:
    """Inside the block every routed MoE layer evaluates at capacity `factor` (None: dropless)
    and, for scoring routers, with `priority`; the layers' settings are restored afterwards."""
    saved = []
    for m in capacity_layers(model):
        saved.append((m, m.config, getattr(m.router, "priority", None)))
        m.config = m.config.replace(capacity_factor_eval=factor)
        if priority is not None and hasattr(m.router, "priority"):
            m.router.priority = priority
    try:
        yield
    finally:
        for m, config, old in saved:
            m.config = config
            if old is not None:
                m.router.priority = old


def expert_flops_per_copy(m: MoEMlp) -> int:
    """Multiply-adds x 2 of one token copy through one expert (both projections)."""
    _, D, H = m.experts.w1.shape
    return 2 * (D * H + H * m.experts.w2.shape[-1])


@torch.no_grad()
def evaluate_spent(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Accuracy, loss and the MoE layers' FLOPs actually spent per image (kept copies through
    their experts, plus each layer's router), in one pass."""
    model.eval()
    layers = {id(m): m for m in capacity_layers(model)}
    names = {name: layers[id(m)] for name, m in find_moe_layers(model) if id(m) in layers}
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    flops = torch.zeros((), dtype=torch.float64, device=device)
    dropped = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in loader:
        with collect_moe_outputs(model) as moe:
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum()
        for name, s in moe.stats().items():
            m = names.get(name)
            if m is None:
                continue
            routed = s["load"].sum().double()
            kept = routed * (1 - s["dropped_frac"].double())
            flops += kept * expert_flops_per_copy(m)
            dropped += routed - kept
        n += y.numel()
    # Each router scores every token of every image once: 2 * D * E per token.
    tokens = getattr(getattr(model, "config", None), "num_tokens", 0)
    router = sum(2 * tokens * m.router.weight.numel() for m in layers.values()
                 if isinstance(getattr(m.router, "weight", None), torch.Tensor))
    return {"acc": 100.0 * correct.item() / n, "loss": loss.item() / n,
            "moe_gflops_per_image": (flops.item() / n + router) / 1e9, "dropped_copies_per_image": dropped.item() / n}


def capacity_curve(model: nn.Module, loader, device: torch.device, factors: Sequence[float],
                   priorities: Sequence[str] = PRIORITIES) -> dict:
    """Evaluate at every factor under every priority, and once as configured (the baseline)."""
    if not capacity_layers(model):
        raise ValueError("the model has no routed MoE layer whose capacity could be set")
    base = evaluate_spent(model, loader, device)
    rows = []
    for priority in priorities:
        for factor in factors:
            with eval_capacity(model, factor, priority):
                rows.append({"factor": float(factor), "priority": priority, **evaluate_spent(model, loader, device)})
    configured = capacity_layers(model)[0].config.capacity_factor_eval
    return {"baseline": {"factor": configured, **base}, "rows": rows}


def curve_table(curve: dict) -> str:
    base = curve["baseline"]
    lines = [f"| capacity factor | priority | {curve.get('split', 'test')} acc % | MoE GFLOPs / image | dropped copies / image |",
             "|---:|---|---:|---:|---:|",
             f"| {base['factor'] or 'dropless'} (as trained) | - | {base['acc']:.2f} | "
             f"{base['moe_gflops_per_image']:.4f} | {base['dropped_copies_per_image']:.1f} |"]
    for r in curve["rows"]:
        lines.append(f"| {r['factor']:g} | {r['priority']} | {r['acc']:.2f} | {r['moe_gflops_per_image']:.4f} | "
                     f"{r['dropped_copies_per_image']:.1f} |")
    return "\n".join(lines)


def curve_files(split: str = "test") -> tuple[str, str, str]:
    """The curve's files for a split: capacity.json/.md/.png for the test split, capacity-train.* for
    the training split (so one curve never replaces the other)."""
    stem = "capacity" if split == "test" else f"capacity-{split}"
    return (f"{stem}.json", f"{stem}.md", f"{stem}.png")


def write_curve(curve: dict, out_dir: str | Path, title: str = "") -> list[Path]:
    """capacity.json, capacity.md and capacity.png (accuracy against the factor and against
    the MoE FLOPs spent) in `out_dir`; named for the curve's split when it is not the test split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in curve_files(curve.get("split", "test"))]
    atomic_write_bytes(paths[0], json.dumps(curve, indent=2).encode())
    atomic_write_bytes(paths[1], (curve_table(curve) + "\n").encode())
    _plot(curve, paths[2], title)
    return paths


def _plot(curve: dict, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for priority in dict.fromkeys(r["priority"] for r in curve["rows"]):
        rows = [r for r in curve["rows"] if r["priority"] == priority]
        label = "BPR (score)" if priority == "score" else "position"
        ax1.plot([r["factor"] for r in rows], [r["acc"] for r in rows], "o-", label=label)
        ax2.plot([r["moe_gflops_per_image"] for r in rows], [r["acc"] for r in rows], "o-", label=label)
    base = curve["baseline"]
    for ax in (ax1, ax2):
        ax.axhline(base["acc"], color="grey", ls="--", lw=1, label="as trained")
        ax.set_ylabel(f"{curve.get('split', 'test')} accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("eval capacity factor")
    ax2.set_xlabel("MoE layers' GFLOPs per image actually spent")
    fig.suptitle(title or "accuracy against expert capacity")
    fig.tight_layout()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a factor like 1e300 overflows the log2 axis' ticks: drawn, not warned
        warnings.simplefilter("ignore", RuntimeWarning)
        fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["curve_files", "eval_capacity", "evaluate_spent", "capacity_curve", "curve_table", "write_curve", "PRIORITIES"]
