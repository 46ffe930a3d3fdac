"""Runs that differ only in their seed, as one configuration with mean ± 95 % CI columns.

A single run's difference from another is often one or two test images (e.g. 97.77 against
97.49 % on 359 digits), so comparisons are made between configurations, each measured over
seeds, and a difference within the seed-to-seed noise (Welch's t-test, 5 %) is said to be.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable

from .runs import RunResult
from .stats import Summary, differ, summarize

# Fields of config.yaml that do not make a different configuration.
NOT_CONFIGURATION = {"seed", "out", "data_dir", "progress", "log_every", "tensorboard", "device", "keep_checkpoints",
                     "dist_timeout_s", "nproc", "threshold", "max_restarts",
                     # derived from the fields above (config.yaml keeps them for reading, not as settings)
                     "resolved_model_config", "name"}

METRICS: dict[str, tuple[str, Callable[[RunResult], float | None], int]] = {
    # key: (column title, value of a run, digits)
    "best_acc": ("best acc %", lambda r: r.best_acc, 2),
    "final_acc": ("final acc %", lambda r: _final_acc(r), 2),
    "epochs_to_threshold": ("epochs to threshold", lambda r: r.epochs_to(r.threshold or 0) if r.threshold else None, 1),
    "train_time_s": ("train s", lambda r: r.train_time_s, 1),
    "inference_time_60k_s": ("inference s (60k)", lambda r: r.inference_time_60k_s, 2),
}


def _final_acc(run: RunResult) -> float | None:
    if run.summary and run.summary.get("final_acc") is not None:
        return float(run.summary["final_acc"])
    return run.test_accs[-1] if run.metrics else None


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    """TrainConfig's defaults as config.yaml reads back (tuples as lists)."""
    from ..training.config import TrainConfig

    return json.loads(json.dumps(TrainConfig().to_dict(), default=str))


def configuration(run: RunResult) -> dict[str, Any]:
    """The fields of a run's config.yaml that make its configuration: not its seed or bookkeeping,
    amp as the precision the run trained in (summary.json's), and not a field at its default value,
    so a run written before a field existed (its config lacks the field) is the same configuration
    as one that holds the default."""
    defaults = _defaults()
    config = dict(run.config)
    trained = (run.summary or {}).get("amp")
    if trained is not None and "amp" in config:  # "auto" is bf16 on one machine and float32 on another
        config["amp"] = trained
    return {k: v for k, v in config.items()
            if k not in NOT_CONFIGURATION and not (k in defaults and v == defaults[k])}


def configuration_key(run: RunResult) -> str:
    """What a run's configuration is, without its seed and bookkeeping (JSON, sorted keys)."""
    cfg = configuration(run) if run.config else {}
    if not cfg:  # no config.yaml (or every field at its default): the name tells runs apart
        cfg = {"name": run.name}
    return json.dumps(cfg, sort_keys=True, default=str)


@dataclass
class Group:
    label: str
    runs: list[RunResult] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        get = METRICS[metric][1]
        return [float(v) for v in (get(r) for r in self.runs) if v is not None]

    def summary(self, metric: str) -> Summary | None:
        vals = self.values(metric)
        return summarize(vals) if vals else None

    @property
    def params(self) -> tuple[int | None, int | None]:
        return self.runs[0].params, self.runs[0].active_params


def group_runs(runs: Iterable[RunResult], label: Callable[[RunResult], str] | None = None) -> list[Group]:
    """Runs grouped by configuration, in first-seen order; labels default to the run name plus,
    where groups share a name, the fields that tell them apart."""
    by_key: dict[str, Group] = {}
    for run in runs:
        key = configuration_key(run)
        by_key.setdefault(key, Group(label(run) if label else run.name)).runs.append(run)
    groups = list(by_key.values())
    if label is None:
        _disambiguate(groups)
    return groups


def _disambiguate(groups: list[Group]) -> None:
    names: dict[str, list[Group]] = {}
    for g in groups:
        names.setdefault(g.label, []).append(g)
    defaults = _leaves(_defaults())
    for same in names.values():
        if len(same) < 2:
            continue
        cfgs = [_leaves(configuration(g.runs[0])) for g in same]
        keys = sorted({k for c in cfgs for k in c if any(c.get(k) != o.get(k) for o in cfgs)})
        for g, c in zip(same, cfgs):
            # A model field the run did not set took its preset's value, which the run recorded
            # as resolved_model_config (spelled model.* here, as --set takes it).
            used = _leaves({"model_config": g.runs[0].config.get("resolved_model_config") or {}})
            g.label += " (" + ", ".join(f"{k}={_short(c[k] if k in c else used.get(k, defaults.get(k)))}"
                                        for k in keys) + ")"


def _leaves(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's nested fields as dotted keys spelled as `--set` takes them (model_config.moe.router
    is model.moe.router), so a label names the setting that differs, not a whole nested dict."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{'model' if not prefix and k == 'model_config' else k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def groups_table(groups: list[Group]) -> str:
    """Markdown: one row per configuration, mean ± 95 % CI over its seeds, and a note on which
    differences in best accuracy (against the first configuration) are within noise."""
    head = ["configuration", "seeds", *(METRICS[m][0] for m in METRICS), "params", "active params"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(METRICS) + 2)]
    for g in groups:
        cells = [g.label.replace("|", "\\|"), str(len(g.runs))]
        for m, (_, _, digits) in METRICS.items():
            s = g.summary(m)
            cells.append("n/a" if s is None else s.text(digits))
        total, active = g.params
        cells += [f"{total:,}" if total else "n/a", f"{active:,}" if active else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean ± half-width of the 95 % confidence interval of the mean over seeds "
                  "(Student t); one seed gives the value alone."]
    base = groups[0] if groups else None
    notes = []
    for g in groups[1:]:
        d = differ(base.values("best_acc"), g.values("best_acc"))
        if d is None:
            notes.append(f"- {g.label} vs {base.label}: one seed, noise unknown (run --seeds 3 or more).")
        elif not d:
            notes.append(f"- {g.label} vs {base.label}: best accuracy differs within the seed-to-seed noise "
                         "(Welch t-test, 5 %).")
        else:
            diff = g.summary("best_acc").mean - base.summary("best_acc").mean
            notes.append(f"- {g.label} vs {base.label}: {diff:+.2f} points, beyond the seed-to-seed noise "
                         "(Welch t-test, 5 %).")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
