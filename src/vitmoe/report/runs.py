"""Loading training run directories (``config.yaml``, ``metrics.jsonl``, ``summary.json``).

The run directory layout is the trainer's contract, defined with its readers in
:mod:`vitmoe.rundir`:

* ``summary.json`` -- final numbers written when a run finishes (authoritative when present);
* ``metrics.jsonl`` -- one JSON object per epoch (``epoch`` and ``test_acc`` required);
* ``config.yaml`` -- the resolved configuration, used only for fallbacks.

A run killed before it wrote ``summary.json`` is still loadable: what can be recomputed
from ``metrics.jsonl`` is, and the result is flagged ``complete=False``.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..rundir import (CONFIG_FILE, DEFAULT_THRESHOLD, IMAGES_60K, METRICS_FILE, SUMMARY_FILE, RunFormatError,
                      epochs_to_threshold, finite, finite_int, read_config, read_metrics, read_summary, summarize)

__all__ = [
    "RunResult", "RunFormatError", "ReportWarning", "load_run", "epochs_to_threshold", "distinct_labels",
    "DEFAULT_THRESHOLD", "IMAGES_60K", "METRICS_FILE", "SUMMARY_FILE", "CONFIG_FILE",
]


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
    test_images: int | None = None  # size of the test set behind the accuracies
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

    @property
    def own_threshold(self) -> float:
        """The threshold the run was trained with (its summary's), else the default."""
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLD

    def threshold_known(self, threshold: float = DEFAULT_THRESHOLD) -> bool:
        """Whether :meth:`epochs_to` can answer for ``threshold`` (None then means 'never')."""
        if self.metrics:
            return True
        return self.threshold is not None and math.isclose(self.threshold, threshold)


# -- helpers --------------------------------------------------------------------------
def _norm_experts(x: Any) -> int | tuple[int, ...] | None:
    """int / list of per-layer counts / None -> None (dense), int, or tuple of distinct counts."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (list, tuple)):
        counts = sorted({int(v) for v in x if finite_int(v) is not None and int(v) > 1})
        if not counts:
            return None
        return counts[0] if len(counts) == 1 else tuple(counts)
    v = finite_int(x)
    return v if v is not None and v > 0 else None


def _warn(run_warnings: list[str], msg: str) -> None:
    run_warnings.append(msg)
    warnings.warn(msg, ReportWarning, stacklevel=3)


_UNSET = object()


def _experts_fallback(config: dict[str, Any], metrics: list[dict[str, Any]]
                      ) -> int | tuple[int, ...] | None:
    mc = config.get("model_config")
    if isinstance(mc, dict):
        # The router as model_config spells it: nested (moe: {router: ...}) or, in older runs, flat.
        moe = mc.get("moe") if isinstance(mc.get("moe"), dict) else {}
        router = moe.get("router", mc.get("router", _UNSET))
        if router is not _UNSET:
            return None if router is None else _norm_experts(mc.get("num_experts"))
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
    warn = lambda msg: _warn(run_warnings, msg)  # noqa: E731
    metrics = read_metrics(mpath, warn) if mpath.is_file() else []
    summary = read_summary(spath) if spath.is_file() else None
    config = read_config(cpath, warn) if cpath.is_file() else {}
    s = summary or {}

    name = s.get("name") or config.get("name") or root.resolve().name
    run = RunResult(
        path=root, name=str(name), complete=summary is not None,
        metrics=metrics, summary=summary, config=config, warnings=run_warnings,
        model=s.get("model") or config.get("model"),
        dataset=s.get("dataset") or config.get("dataset"),
        test_images=finite_int(s.get("test_images")),
    )
    if "experts" in s:
        run.experts = _norm_experts(s["experts"])
    else:
        run.experts = _experts_fallback(config, metrics)

    if summary is not None:
        run.params = finite_int(s.get("params"))
        run.active_params = finite_int(s.get("active_params"))
        run.best_acc = finite(s.get("best_acc"))
        run.best_epoch = finite_int(s.get("best_epoch"))
        run.threshold = finite(s.get("threshold"))
        if run.threshold is None and "epochs_to_threshold" in s:
            run.threshold = DEFAULT_THRESHOLD
        run.epochs_to_threshold = finite_int(s.get("epochs_to_threshold"))
        run.train_time_s = finite(s.get("train_time_s"))
        run.time_per_epoch_s = finite(s.get("time_per_epoch_s"))
        run.train_time_60k_s = finite(s.get("train_time_60k_s"))
        run.inference_time_60k_s = finite(s.get("inference_time_60k_s"))
        run.epochs = finite_int(s.get("epochs"))
    else:
        _warn(run_warnings, f"{root}: no {SUMMARY_FILE} (run incomplete?); "
                            f"computing what is possible from {METRICS_FILE}")
        run.epochs = metrics[-1]["epoch"] if metrics else None
        run.threshold = None  # epochs_to() recomputes for whatever threshold is asked

    # Fill gaps (always for an incomplete run, field by field for a partial summary) with the
    # numbers the trainer's summary would hold (vitmoe.rundir.summarize).
    if metrics:
        derived = summarize(metrics)
        if run.best_acc is None and derived["best_acc"] is not None:
            run.best_acc, run.best_epoch = derived["best_acc"], derived["best_epoch"]
        if run.time_per_epoch_s is None:
            run.time_per_epoch_s = derived["time_per_epoch_s"]
        if run.train_time_s is None and summary is None and derived["time_per_epoch_s"] is not None:
            run.train_time_s = derived["train_time_s"]
        if run.train_time_60k_s is None:
            run.train_time_60k_s = derived["train_time_60k_s"]
    return run


def distinct_labels(runs: list[RunResult]) -> list[str]:
    """A label per run for tables and legends: its name, and where several runs share a name (two
    runs of one preset), the end of its path that tells them apart: "vit (runs/a)", "vit (runs/b)"."""
    labels = [r.name for r in runs]
    by_name: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        by_name.setdefault(r.name, []).append(i)
    for name, idx in by_name.items():
        if len(idx) < 2:
            continue
        parts = [Path(os.path.abspath(runs[i].path)).parts for i in idx]
        for k in range(1, max(len(p) for p in parts) + 1):
            tails = ["/".join(p[-k:]) for p in parts]
            if len(set(tails)) == len(tails):
                break
        for i, tail in zip(idx, tails):
            labels[i] = f"{name} ({tail})"
    return labels
