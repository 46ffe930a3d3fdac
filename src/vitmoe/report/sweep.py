"""The results of `vitmoe sweep`: one group per grid cell, a table with mean ± 95 % CI, and a
plot of accuracy and training time against the first swept value (error bars: the CI)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

from ..fileio import atomic_write_bytes
from .groups import Group, groups_table
from .runs import RunResult
from .verdict import nearest_twins, plot_gaps, plot_vs_twins, verdict, verdict_table


def _label(cell: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell.items()) or "base"


def sweep_groups(done: list[tuple[dict[str, str], RunResult]]) -> list[tuple[dict[str, str], Group]]:
    out: dict[str, tuple[dict[str, str], Group]] = {}
    for cell, run in done:
        out.setdefault(_label(cell), (cell, Group(_label(cell))))[1].runs.append(run)
    return list(out.values())


SWEEP_FILES = ("sweep.md", "sweep_results.json", "sweep.png", "vs_dense.png", "vs_dense_gap.png")
"""What `sweep_results` may write into the sweep folder."""


def sweep_results(done: list[tuple[dict[str, str], RunResult]], keys: list[str], root: Path,
                  twins: dict[str, dict[str, str]] | None = None) -> tuple[str, list[Path]]:
    """Write sweep.md, sweep_results.json and sweep.png into `root`; returns (markdown, paths).
    `twins`: each MoE cell's dense twin cell, by cell label (`vitmoe sweep --vs-dense`); without it
    an MoE cell is compared with the dense cell of nearest FLOPs, if one is within 5 %."""
    cells = sweep_groups(done)
    text = groups_table([g for _, g in cells])
    by_label = {g.label: g for _, g in cells}
    if twins is not None:
        pairs = [(by_label[m], by_label[_label(t)]) for m, t in twins.items()
                 if m in by_label and _label(t) in by_label]
    else:
        pairs = nearest_twins([g for _, g in cells])
    if pairs:
        text += ("\nDoes the MoE pay? Against its dense twin:\n\n" + verdict_table(pairs)
                 + "\n![test accuracy against training time, each MoE beside its twin](vs_dense.png)\n"
                 + "\n![MoE minus twin against the share of FLOPs in experts](vs_dense_gap.png)\n")
    verdicts = {moe.label: verdict(moe, twin) for moe, twin in pairs}
    rows = []
    for cell, g in cells:
        row = {"cell": cell, "seeds": len(g.runs), "runs": [str(r.path) for r in g.runs],
               "params": g.params[0], "active_params": g.params[1],
               **{k: (g.runs[0].summary or {}).get(k) for k in ("forward_flops_per_image", "expert_flops_share")}}
        for metric in ("best_acc", "final_acc", "epochs_to_threshold", "train_time_s", "inference_time_60k_s"):
            s = g.summary(metric)
            row[metric] = None if s is None else {"mean": s.mean, "std": s.std, "ci95": None if math.isnan(s.ci95)
                                                  else s.ci95, "n": s.n, "values": g.values(metric)}
        v = verdicts.get(g.label)
        if v is not None:
            row["vs_dense_twin"] = {
                "twin": v.twin.label, "flops_ratio": v.flops_ratio, "step_time_ratio": v.step_time_ratio,
                "equal_epochs": {"epochs": v.epochs, "diff": v.equal_epochs.diff, "ci95": v.equal_epochs.ci95,
                                 "beyond_noise": v.equal_epochs.beyond_noise},
                "equal_time": {"seconds": v.seconds, "diff": v.equal_time.diff, "ci95": v.equal_time.ci95,
                               "beyond_noise": v.equal_time.beyond_noise}}
        rows.append(row)
    files = [atomic_write_bytes(root / "sweep.md", text.encode()),
             atomic_write_bytes(root / "sweep_results.json", json.dumps(rows, indent=2).encode())]
    if keys:
        files.append(_plot(cells, keys, root / "sweep.png"))
    if pairs:
        files += [plot_vs_twins(pairs, root / "vs_dense.png"), plot_gaps(pairs, root / "vs_dense_gap.png")]
    return text, files


def _plot(cells: list[tuple[dict[str, str], Group]], keys: list[str], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x_key, rest = keys[0], keys[1:]
    cells = [(cell, g) for cell, g in cells if x_key in cell]  # a dense twin may not have the swept key
    xs = list(dict.fromkeys(cell[x_key] for cell, _ in cells))
    numeric = all(_is_number(v) for v in xs)
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    lines: dict[str, list[tuple[dict[str, str], Group]]] = {}
    for cell, g in cells:
        lines.setdefault(", ".join(f"{k}={cell.get(k, '-')}" for k in rest) or "", []).append((cell, g))
    for name, members in lines.items():
        for ax, metric in zip(axes, ("best_acc", "train_time_s")):
            pts = [(cell[x_key], g.summary(metric)) for cell, g in members if g.summary(metric) is not None]
            if not pts:
                continue
            x = [float(v) if numeric else xs.index(v) for v, _ in pts]
            y = [s.mean for _, s in pts]
            err = [0.0 if math.isnan(s.ci95) else s.ci95 for _, s in pts]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=4, label=name or None)
    for ax, title in zip(axes, ("best test accuracy (%)", "training time (s)")):
        ax.set_xlabel(x_key)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if not numeric:
            ax.set_xticks(range(len(xs)), xs, rotation=20, fontsize=8)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("mean over seeds, error bars: 95 % confidence interval", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True
