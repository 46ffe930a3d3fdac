"""Does the MoE pay? Each MoE configuration against its dense twin (the dense model of the same
forward FLOPs per image, `vitmoe.models.dense_twin`), at equal epochs and at equal training time.

For a pair of configurations (each a Group of seeds):
  equal epochs: every run's best test accuracy within the first E epochs, E the fewest epochs any
                run of the pair logged;
  equal time:   every run's best test accuracy among the epochs it finished within t seconds of
                training (epoch_time_s summed), t the shortest total training time of the pair, with
                TIME_TOLERANCE: a time budget stops each run a little after it, not all at once;
and the MoE's mean minus the twin's with the 95 % confidence interval of that difference, said to be
beyond the seed noise by Welch's t-test (5 %) when the interval leaves out 0.
Runs of one fixed epoch count compare at equal time an MoE whose schedule has not ended; give
both the same --time-budget (the cosine then ends with it) for the verdict that matters in practice.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .groups import Group, configuration
from .plots import new_figure, save_png
from .runs import RunResult
from .stats import Summary, summarize, welch

COMPUTE_MATCHED = 0.05
"""Relative FLOPs difference under which a dense configuration counts as an MoE's twin."""
TIME_TOLERANCE = 0.02
"""An epoch ending within this fraction past t counts as within t (runs of one --time-budget of
600 s end between 600.0 and 600.5 s)."""


def acc_within_epochs(run: RunResult, epochs: int) -> float | None:
    accs = [float(m["test_acc"]) for m in run.metrics if int(m["epoch"]) <= epochs]
    return max(accs) if accs else None


def acc_within_time(run: RunResult, seconds: float) -> float | None:
    """Best test accuracy of the epochs that ended within `seconds` of training (None if none did
    or the run logged no epoch times)."""
    elapsed, best = 0.0, None
    for m in run.metrics:
        t = m.get("epoch_time_s")
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            return None
        elapsed += float(t)
        if elapsed > seconds * (1 + TIME_TOLERANCE):
            break
        best = float(m["test_acc"]) if best is None else max(best, float(m["test_acc"]))
    return best


def _train_time(run: RunResult) -> float | None:
    times = [m.get("epoch_time_s") for m in run.metrics]
    return sum(times) if times and all(isinstance(t, (int, float)) for t in times) else None


def _step_time(run: RunResult) -> float | None:
    s = run.summary or {}
    steps, t = s.get("steps"), run.train_time_s
    return t / steps if isinstance(steps, int) and steps > 0 and t else None


def _flops(group: Group) -> float | None:
    v = (group.runs[0].summary or {}).get("forward_flops_per_image")
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


@dataclass
class Comparison:
    moe: Summary | None
    twin: Summary | None
    ci95: float | None
    """Half-width of the 95 % confidence interval of the difference (Welch); None with fewer than
    two seeds on a side."""

    @property
    def diff(self) -> float | None:
        return None if self.moe is None or self.twin is None else self.moe.mean - self.twin.mean

    @property
    def beyond_noise(self) -> bool | None:
        """Welch's t-test at 5 %: the difference lies outside its confidence interval around 0."""
        return None if self.ci95 is None or self.diff is None else abs(self.diff) > self.ci95

    def text(self) -> str:
        if self.diff is None:
            return "n/a"
        if self.ci95 is None:
            return f"{self.diff:+.2f} (noise unknown)"
        return f"{self.diff:+.2f} ± {self.ci95:.2f} ({'beyond' if self.beyond_noise else 'within'} noise)"


def _compare(moe: Group, twin: Group, value: Callable[[RunResult], float | None]) -> Comparison:
    a = [v for v in map(value, moe.runs) if v is not None]
    b = [v for v in map(value, twin.runs) if v is not None]
    w = welch(a, b)
    return Comparison(summarize(a) if a else None, summarize(b) if b else None, None if w is None else w[1])


@dataclass
class Verdict:
    moe: Group
    twin: Group
    flops_ratio: float | None
    """The MoE's forward FLOPs per image over the twin's."""
    step_time_ratio: float | None
    """Mean seconds per training step, MoE over twin."""
    epochs: int | None
    equal_epochs: Comparison
    seconds: float | None
    equal_time: Comparison


def verdict(moe: Group, twin: Group) -> Verdict:
    runs = moe.runs + twin.runs
    logged = [len(r.metrics) for r in runs]
    epochs = min(logged) if logged and min(logged) > 0 else None
    times = [_train_time(r) for r in runs]
    seconds = min(times) if times and None not in times else None
    fm, ft = _flops(moe), _flops(twin)
    sm = [t for t in map(_step_time, moe.runs) if t]
    st = [t for t in map(_step_time, twin.runs) if t]
    no = Comparison(None, None, None)
    return Verdict(
        moe, twin, fm / ft if fm and ft else None,
        (sum(sm) / len(sm)) / (sum(st) / len(st)) if sm and st else None,
        epochs, _compare(moe, twin, lambda r: acc_within_epochs(r, epochs)) if epochs else no,
        seconds, _compare(moe, twin, lambda r: acc_within_time(r, seconds)) if seconds else no)


def _training(group: Group) -> str:
    """What a configuration's training was apart from its model: data, budget, optimizer and
    schedule, precision; the fields that act only on MoE layers left out (a twin leaves them off)."""
    from ..training.config import MOE_ONLY_FIELDS

    cfg = configuration(group.runs[0])
    skip = ("model", "model_config", "eval_batch_size", *MOE_ONLY_FIELDS)  # evaluation is not training time
    return json.dumps({k: v for k, v in cfg.items() if k not in skip},
                      sort_keys=True, default=str) + str(group.runs[0].dataset)


def nearest_twins(groups: Sequence[Group]) -> list[tuple[Group, Group]]:
    """Each MoE configuration with the dense configuration trained the same way (same data, budget,
    optimizer and schedule: only the model differs) whose forward FLOPs per image are nearest to
    its own, when within COMPUTE_MATCHED; configurations without FLOPs in their summary (runs older
    than this field) are left out. A 600 s MoE is thus never judged against a 120 s dense run."""
    dense = [g for g in groups if not g.runs[0].is_moe and _flops(g)]
    pairs = []
    for g in groups:
        f = _flops(g)
        if not g.runs[0].is_moe or not f:
            continue
        same = [d for d in dense if _training(d) == _training(g)]
        best = min(same, key=lambda d: abs(_flops(d) / f - 1), default=None)
        if best is not None and abs(_flops(best) / f - 1) <= COMPUTE_MATCHED:
            pairs.append((g, best))
    return pairs


def verdict_table(pairs: Sequence[tuple[Group, Group]]) -> str:
    """Markdown: one row per MoE configuration against its twin, columns explained under it."""
    head = ["configuration", "dense twin", "params", "active params", "FLOPs/image", "in experts",
            "FLOPs x twin", "step time x twin", "equal epochs: MoE - twin", "equal time: MoE - twin"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for moe, twin in pairs:
        v = verdict(moe, twin)
        s = moe.runs[0].summary or {}
        share = s.get("expert_flops_share")
        total, active = moe.params
        cells = [moe.label, twin.label, f"{total:,}" if total else "n/a", f"{active:,}" if active else "n/a",
                 f"{_flops(moe) / 1e6:,.1f} M" if _flops(moe) else "n/a",
                 f"{share:.1%}" if isinstance(share, (int, float)) else "n/a",
                 f"{v.flops_ratio:.3f}" if v.flops_ratio else "n/a",
                 f"{v.step_time_ratio:.2f}" if v.step_time_ratio else "n/a",
                 f"{v.equal_epochs.text()} at {v.epochs} ep" if v.epochs else "n/a",
                 f"{v.equal_time.text()} at {v.seconds:.3g} s" if v.seconds else "n/a"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Each MoE configuration against its dense twin (no MoE layers, the MLP width of equal forward "
                  "FLOPs per image). 'in experts': the share of the MoE's forward FLOPs spent in experts. Equal "
                  "epochs: best test accuracy within the fewest epochs any run of the pair logged; equal time: "
                  "best test accuracy of the epochs finished within the shortest training time of the pair; "
                  "mean over seeds, MoE minus twin, in points, ± the 95 % CI of the difference, and Welch's "
                  "t-test at 5 % (beyond noise: the CI leaves out 0)."]
    return "\n".join(lines) + "\n"


def time_curve(group: Group) -> tuple[list[float], list[float], list[float]]:
    """(seconds, mean accuracy, its 95 % CI half-width) per epoch index over the group's seeds: the
    cumulative training time and test accuracy of epoch i, averaged over the runs that logged it."""
    xs, ys, es = [], [], []
    for i in range(max(len(r.metrics) for r in group.runs)):
        pts = []
        for r in group.runs:
            if i < len(r.metrics) and all(isinstance(m.get("epoch_time_s"), (int, float)) for m in r.metrics[:i + 1]):
                pts.append((sum(float(m["epoch_time_s"]) for m in r.metrics[:i + 1]), float(r.metrics[i]["test_acc"])))
        if pts:
            acc = summarize([a for _, a in pts])
            xs.append(sum(t for t, _ in pts) / len(pts))
            ys.append(acc.mean)
            es.append(0.0 if math.isnan(acc.ci95) else acc.ci95)
    return xs, ys, es


def plot_gaps(pairs: Sequence[tuple[Group, Group]], path) -> Path:
    """MoE minus twin at equal epochs and at equal time (two panels) against the share of the MoE's
    FLOPs spent in experts, bars: the 95 % CI of the difference. Configurations that differ in
    width or placement spread along x; where a trend meets the zero line, the MoE would pay."""
    fig = new_figure((11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    verdicts = [verdict(moe, twin) for moe, twin in pairs]
    for ax, side in zip(axes, ("equal_epochs", "equal_time")):
        ax.axhline(0.0, color="k", lw=0.8)
        for v in verdicts:
            c: Comparison = getattr(v, side)
            share = (v.moe.runs[0].summary or {}).get("expert_flops_share")
            if c.diff is None or not isinstance(share, (int, float)):
                continue
            ax.errorbar([100 * share], [c.diff], yerr=[c.ci95 or 0.0], fmt="o", ms=4, capsize=3)
            ax.annotate(v.moe.label, (100 * share, c.diff), fontsize=6, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("share of the MoE's FLOPs in experts (%)")
        ax.set_title(side.replace("_", " "), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MoE - dense twin, test accuracy (points)")
    fig.suptitle("Does the MoE pay? Mean over seeds, bars: 95 % CI of the difference (Welch)", fontsize=9)
    return save_png(fig, path)


def plot_vs_twins(pairs: Sequence[tuple[Group, Group]], path) -> Path:
    """Test accuracy against training time, each MoE configuration beside its twin (one panel per
    twin), mean over seeds with 95 % CI bars: where an MoE line crosses its twin's, the MoE pays."""
    by_twin: dict[str, tuple[Group, list[Group]]] = {}
    for moe, twin in pairs:
        by_twin.setdefault(twin.label, (twin, []))[1].append(moe)
    fig = new_figure((6 * len(by_twin), 4.2))
    axes = fig.subplots(1, len(by_twin), squeeze=False)[0]
    for ax, (twin, moes) in zip(axes, by_twin.values()):
        for g, style in [(twin, "k-")] + [(m, "o-") for m in moes]:
            x, y, e = time_curve(g)
            ax.errorbar(x, y, yerr=e, fmt=style, ms=3, capsize=2, label=("twin: " if g is twin else "") + g.label)
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("MoE against its dense twin: mean over seeds, bars: 95 % CI", fontsize=9)
    return save_png(fig, path)
