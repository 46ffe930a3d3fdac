"""Loading training run directories (``config.yaml``, ``metrics.jsonl``, ``summary.json``).

The run directory layout is the trainer's contract:

* ``summary.json`` -- final numbers written when a run finishes (authoritative when present);
* ``metrics.jsonl`` -- one JSON object per epoch (``epoch`` and ``test_acc`` required);
* ``config.yaml`` -- the resolved configuration, used only for fallbacks.

A run killed before it wrote ``summary.json`` is still loadable: what can be recomputed
from ``metrics.jsonl`` is, and the result is flagged ``complete=False``.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RunResult", "RunFormatError", "ReportWarning", "load_run", "epochs_to_threshold",
    "DEFAULT_THRESHOLD", "IMAGES_60K",
]

DEFAULT_THRESHOLD = 75.0
IMAGES_60K = 60_000
# Accuracies are percentages computed from integer counts; allow for float round-off
# (e.g. 74.99999999999999 for 75 %) when comparing against the threshold.
_THRESHOLD_EPS = 1e-9

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"


class RunFormatError(ValueError):
    """A run directory is missing or one of its files cannot be parsed."""


class ReportWarning(UserWarning):
    """Something in a run directory was skipped or had to be guessed."""


@dataclass
class RunResult:
    """One training run, as read from its run directory.

    Numeric fields are ``None`` when they are neither in ``summary.json`` nor computable
    from ``metrics.jsonl``.  ``experts`` is ``None`` for a dense model, an ``int``, or a
    tuple of distinct per-layer expert counts when MoE layers differ.
    """

    path: Path
    name: str
    model: str | None = None
    experts: int | tuple[int, ...] | None = None
    params: int | None = None
    active_params: int | None = None
    best_acc: float | None = None
    best_epoch: int | None = None
    threshold: float | None = None
    epochs_to_threshold: int | None = None
    train_time_s: float | None = None
    time_per_epoch_s: float | None = None
    train_time_60k_s: float | None = None
    inference_time_60k_s: float | None = None
    epochs: int | None = None
    dataset: str | None = None
    complete: bool = True          # summary.json was present
    metrics: list[dict[str, Any]] = field(default_factory=list, repr=False)
    summary: dict[str, Any] | None = field(default=None, repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list, repr=False)

    # -- derived ---------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        """True when the run has MoE layers (experts known or expert loads logged)."""
        return self.experts is not None or any(m.get("expert_load") for m in self.metrics)

    @property
    def epochs_logged(self) -> list[int]:
        return [int(m["epoch"]) for m in self.metrics]

    @property
    def test_accs(self) -> list[float]:
        return [float(m["test_acc"]) for m in self.metrics]

    def epochs_to(self, threshold: float = DEFAULT_THRESHOLD) -> int | None:
        """First epoch whose test accuracy reached ``threshold`` percent, or None.

        Uses the summary's ``epochs_to_threshold`` when it was computed for the same
        threshold; otherwise recomputes from the per-epoch metrics.
        """
        if (self.threshold is not None and math.isclose(self.threshold, threshold)
                and (self.epochs_to_threshold is not None or not self.metrics)):
            return self.epochs_to_threshold
        if self.metrics:
            return epochs_to_threshold(self.metrics, threshold)
        return None

    def threshold_known(self, threshold: float = DEFAULT_THRESHOLD) -> bool:
        """Whether :meth:`epochs_to` can answer for ``threshold`` (None then means 'never')."""
        if self.metrics:
            return True
        return self.threshold is not None and math.isclose(self.threshold, threshold)


def epochs_to_threshold(metrics: list[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD
                        ) -> int | None:
    """First (1-based) epoch at which ``test_acc`` >= ``threshold``; None if never."""
    for m in sorted(metrics, key=lambda r: r["epoch"]):
        acc = _num(m.get("test_acc"))
        if acc is not None and acc >= threshold - _THRESHOLD_EPS:
            return int(m["epoch"])
    return None


# -- helpers --------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(v) if v is not None and v == int(v) else None


def _norm_experts(x: Any) -> int | tuple[int, ...] | None:
    """int / list of per-layer counts / None -> None (dense), int, or tuple of distinct counts."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (list, tuple)):
        counts = sorted({int(v) for v in x if _int(v) is not None and int(v) > 1})
        if not counts:
            return None
        return counts[0] if len(counts) == 1 else tuple(counts)
    v = _int(x)
    return v if v is not None and v > 0 else None


def _warn(run_warnings: list[str], msg: str) -> None:
    run_warnings.append(msg)
    warnings.warn(msg, ReportWarning, stacklevel=3)


def _read_metrics(path: Path, run_warnings: list[str]) -> list[dict[str, Any]]:
    """Parse ``metrics.jsonl``; ignore a truncated last line, raise on a bad middle line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    # index of the last non-blank line: only that one may be a truncated write
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    by_epoch: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = i + 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                _warn(run_warnings, f"{path}:{lineno}: ignoring truncated last line ({e.msg})")
                continue
            raise RunFormatError(f"{path}:{lineno}: malformed JSON line: {e.msg} "
                                 f"(column {e.colno})") from None
        if not isinstance(rec, dict):
            raise RunFormatError(f"{path}:{lineno}: expected a JSON object, "
                                 f"got {type(rec).__name__}")
        for key in ("epoch", "test_acc"):
            if key not in rec:
                raise RunFormatError(f"{path}:{lineno}: missing required key {key!r}")
        epoch = _int(rec["epoch"])
        if epoch is None:
            raise RunFormatError(f"{path}:{lineno}: 'epoch' must be an integer, "
                                 f"got {rec['epoch']!r}")
        acc = rec["test_acc"]
        if isinstance(acc, bool) or not isinstance(acc, (int, float)):  # NaN is allowed
            raise RunFormatError(f"{path}:{lineno}: 'test_acc' must be a number, "
                                 f"got {rec['test_acc']!r}")
        rec["epoch"] = epoch
        if epoch in by_epoch:  # resumed run re-logging an epoch: the later record wins
            _warn(run_warnings, f"{path}:{lineno}: epoch {epoch} logged again; "
                                f"keeping the later record")
        by_epoch[epoch] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise RunFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(path: Path, run_warnings: list[str]) -> dict[str, Any]:
    try:
        import yaml  # lazy: only needed for fallbacks
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except Exception as e:  # config is only used for fallbacks: never fatal
        _warn(run_warnings, f"{path}: cannot read config ({type(e).__name__}: {e}); ignoring it")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        _warn(run_warnings, f"{path}: config is not a mapping; ignoring it")
        return {}
    return data


def _experts_fallback(config: dict[str, Any], metrics: list[dict[str, Any]]
                      ) -> int | tuple[int, ...] | None:
    mc = config.get("model_config")
    if isinstance(mc, dict) and "router" in mc:
        if mc.get("router") is None:
            return None
        return _norm_experts(mc.get("num_experts"))
    for m in reversed(metrics):  # infer from the logged loads
        load = m.get("expert_load")
        if isinstance(load, dict) and load:
            return _norm_experts([len(v) for v in load.values() if isinstance(v, list)])
    return None


# -- public ---------------------------------------------------------------------------
def load_run(path: str | os.PathLike) -> RunResult:
    """Load one run directory.

    Raises :class:`FileNotFoundError` (naming the path) when the directory does not exist
    or has neither ``summary.json`` nor ``metrics.jsonl``, and :class:`RunFormatError`
    (naming file and line) when a file is malformed.  A truncated last line of
    ``metrics.jsonl`` is ignored with a :class:`ReportWarning`.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"run directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a run directory: {root}")
    mpath, spath, cpath = root / METRICS_FILE, root / SUMMARY_FILE, root / CONFIG_FILE
    if not mpath.is_file() and not spath.is_file():
        raise FileNotFoundError(f"{root}: neither {SUMMARY_FILE} nor {METRICS_FILE} found; "
                                f"is this a training run directory?")

    run_warnings: list[str] = []
    metrics = _read_metrics(mpath, run_warnings) if mpath.is_file() else []
    summary = _read_summary(spath) if spath.is_file() else None
    config = _read_config(cpath, run_warnings) if cpath.is_file() else {}
    s = summary or {}

    name = s.get("name") or config.get("name") or root.resolve().name
    run = RunResult(
        path=root, name=str(name), complete=summary is not None,
        metrics=metrics, summary=summary, config=config, warnings=run_warnings,
        model=s.get("model") or config.get("model"),
        dataset=s.get("dataset") or config.get("dataset"),
    )
    if "experts" in s:
        run.experts = _norm_experts(s["experts"])
    else:
        run.experts = _experts_fallback(config, metrics)

    if summary is not None:
        run.params = _int(s.get("params"))
        run.active_params = _int(s.get("active_params"))
        run.best_acc = _num(s.get("best_acc"))
        run.best_epoch = _int(s.get("best_epoch"))
        run.threshold = _num(s.get("threshold"))
        if run.threshold is None and "epochs_to_threshold" in s:
            run.threshold = DEFAULT_THRESHOLD
        run.epochs_to_threshold = _int(s.get("epochs_to_threshold"))
        run.train_time_s = _num(s.get("train_time_s"))
        run.time_per_epoch_s = _num(s.get("time_per_epoch_s"))
        run.train_time_60k_s = _num(s.get("train_time_60k_s"))
        run.inference_time_60k_s = _num(s.get("inference_time_60k_s"))
        run.epochs = _int(s.get("epochs"))
    else:
        _warn(run_warnings, f"{root}: no {SUMMARY_FILE} (run incomplete?); "
                            f"computing what is possible from {METRICS_FILE}")
        run.epochs = metrics[-1]["epoch"] if metrics else None
        run.threshold = None  # epochs_to() recomputes for whatever threshold is asked

    # fill gaps (always for an incomplete run, field by field for a partial summary)
    accs = [(m["epoch"], _num(m["test_acc"])) for m in metrics]
    accs = [(e, a) for e, a in accs if a is not None]
    if run.best_acc is None and accs:
        best_e, best_a = max(accs, key=lambda ea: (ea[1], -ea[0]))  # first epoch on ties
        run.best_acc, run.best_epoch = best_a, best_e
    times = [t for t in (_num(m.get("epoch_time_s")) for m in metrics) if t is not None]
    if run.time_per_epoch_s is None and times:
        run.time_per_epoch_s = sum(times) / len(times)
    if run.train_time_s is None and times and summary is None:
        run.train_time_s = sum(times)
    ips = [v for v in (_num(m.get("images_per_s")) for m in metrics) if v is not None and v > 0]
    if run.train_time_60k_s is None and ips:
        # mean seconds per image over epochs, scaled to 60,000 images
        run.train_time_60k_s = IMAGES_60K * sum(1.0 / v for v in ips) / len(ips)
    return run
