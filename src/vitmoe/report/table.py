"""The results table of the source project, as markdown, with the columns explained under it.

Columns: the source project's (switch-vit's published table)::

    | model | experts | size | highest acc (epoch) | t_epoch |
    | Training Time (60,000 images) | Inference Time (60,000 images) |

plus ``dataset`` (after model), ``active params`` (after size) and ``test images`` (after the
accuracy), so that a table never silently compares runs on different data or hides what a
token actually computes with:

* ``dataset``: the dataset the run trained and was tested on;
* ``experts``: experts per MoE layer (``a/b`` when layers differ), ``-`` for a dense model;
* ``size``: total parameter count with thousands separators;
* ``active params``: parameters one token passes through (summary ``active_params``);
* ``highest acc (epoch)``: best test accuracy in percent, 2 decimals, and its epoch;
* ``test images``: size of the test set behind the accuracy (summary ``test_images``);
* ``t_epoch``: first epoch whose test accuracy reached the threshold, ``-`` if never;
* times: seconds to train on / classify 60,000 images at the run's median throughput
  (summary ``train_time_60k_s`` / ``inference_time_60k_s``), 2 decimals.

A value that is unavailable (e.g. the inference time of a run killed before it wrote
``summary.json``, or a field an older run did not record) is written ``n/a``; such runs are
marked ``(incomplete)`` and explained in a note under the table.  Row order is the order of
``runs``.  Runs of more than one dataset get a note and a :class:`ReportWarning`.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Union

from ..data import builtin_name
from .runs import DEFAULT_THRESHOLD, METRICS_FILE, SUMMARY_FILE, ReportWarning, RunResult, distinct_labels, load_run

__all__ = ["results_table", "HEADER", "format_row", "column_notes", "datasets_of"]

HEADER = ("model", "dataset", "experts", "size", "active params", "highest acc (epoch)", "test images", "t_epoch",
          "Training Time (60,000 images)", "Inference Time (60,000 images)")
ALIGN = ("---",) + (":---:",) * (len(HEADER) - 1)
NA = "n/a"
INCOMPLETE = "(incomplete)"

RunLike = Union[RunResult, str, os.PathLike]

def _dataset(run: RunResult) -> str | None:
    """The run's dataset in its canonical spelling (fashion_mnist -> fashion-mnist), or None; a name
    the dataset registry does not know (a run of another version) is kept, lower-cased."""
    if not run.dataset:
        return None
    if str(run.dataset).startswith("folder:"):  # your own images: the path is case-sensitive
        return str(run.dataset)
    key = str(run.dataset).strip().lower()
    return builtin_name(key) or key


def _dataset_label(run: RunResult) -> str | None:
    """The dataset column: a folder dataset as folder:NAME (K classes: a, b, ...), from the run's summary."""
    d = _dataset(run)
    if d is None or not d.startswith("folder:"):
        return d
    classes = (run.summary or {}).get("classes")
    label = f"folder:{os.path.basename(d[len('folder:'):].rstrip('/')) or d}"
    if isinstance(classes, list) and classes:
        names = ", ".join(map(str, classes[:5])) + (", ..." if len(classes) > 5 else "")
        label += f" ({len(classes)} classes: {names})"
    return label


def _test_images(run: RunResult) -> int | None:
    value = getattr(run, "test_images", None)
    if value is None and run.summary:
        value = run.summary.get("test_images")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        return None
    return int(value)


def datasets_of(runs: Iterable[RunResult]) -> list[str]:
    """The distinct datasets of ``runs``, in order of first appearance."""
    out: list[str] = []
    for run in runs:
        d = _dataset(run)
        if d and d not in out:
            out.append(d)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _seconds(x: float | None) -> str:
    return NA if x is None else f"{x:.2f}"


def _count(x: int | None) -> str:
    return NA if x is None else f"{x:,}"


def _experts(x: int | tuple[int, ...] | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, tuple):
        return "/".join(str(v) for v in x)
    return str(x)


def format_row(run: RunResult, threshold: float | None = DEFAULT_THRESHOLD, label: str | None = None) -> list[str]:
    """The cells of ``run``'s row (unescaped), in ``HEADER`` order; `threshold` None: the run's
    own; `label`: the name shown (distinct_labels), else the run's name."""
    label = label or run.name
    threshold = run.own_threshold if threshold is None else threshold
    name = label if run.complete else f"{label} {INCOMPLETE}"
    if run.best_acc is None:
        best = NA
    elif run.best_epoch is None:
        best = f"{run.best_acc:.2f}"
    else:
        best = f"{run.best_acc:.2f} ({run.best_epoch})"
    if not run.threshold_known(threshold):
        t_epoch = NA
    else:
        e = run.epochs_to(threshold)
        t_epoch = "-" if e is None else str(e)
    return [name, _dataset_label(run) or NA, _experts(run.experts), _count(run.params), _count(run.active_params), best,
            _count(_test_images(run)), t_epoch, _seconds(run.train_time_60k_s), _seconds(run.inference_time_60k_s)]


def _threshold_text(runs: list[RunResult], labels: list[str], threshold: float | None) -> str:
    """'75 %', or with per-run thresholds that differ, each run's."""
    if threshold is not None:
        return f"{threshold:g} %"
    own = [r.own_threshold for r in runs]
    if len(set(own)) <= 1:
        return f"{own[0] if own else DEFAULT_THRESHOLD:g} %"
    return "the run's own threshold (" + ", ".join(f"{lab}: {t:g} %" for lab, t in zip(labels, own)) + ")"


def column_notes(threshold: float | str = DEFAULT_THRESHOLD) -> list[str]:
    """What every column means (markdown bullet lines, printed under the table); `threshold` a
    number or the text of per-run thresholds."""
    threshold = threshold if isinstance(threshold, str) else f"{threshold:g} %"
    return [
        "- model: the run's name (vit, switch-vit, random-vit, ...; runs of one name followed by the end of "
        "their path); `(incomplete)`: the run wrote no "
        f"{SUMMARY_FILE} (killed), its values come from {METRICS_FILE}.",
        "- dataset: what the run trained and was tested on.",
        "- experts: experts per MoE layer (`a/b`: layers differ); `-`: dense model.",
        "- size: all parameters of the model.",
        "- active params: parameters one token passes through (per MoE layer its router and the experts it "
        "is sent to); equal to size for a dense model.",
        "- highest acc (epoch): best test accuracy in percent, and the epoch it was reached.",
        "- test images: the size of the test set behind the accuracy.",
        f"- t_epoch: the first epoch whose test accuracy reached {threshold} (`-`: never).",
        "- Training Time (60,000 images): seconds to train on 60,000 images at the run's median training "
        "throughput (images/s over its epochs; evaluation and checkpoints not counted), summary "
        "`train_time_60k_s`: one epoch of a 60,000-image training set, comparable across datasets.",
        "- Inference Time (60,000 images): seconds to classify 60,000 images at the run's median test-set "
        "throughput, summary `inference_time_60k_s`.",
        f"- `{NA}`: the run did not record the value.",
    ]


def results_table(runs: Iterable[RunLike], threshold: float | None = None) -> str:
    """Markdown results table for ``runs`` (RunResult objects or run directories), with notes on
    incomplete runs, on mixed datasets (also a :class:`ReportWarning`) and on every column.
    `threshold` (percent) of the t_epoch column; None: each run's own (its summary's, else 75).

    Deterministic: rows follow the given order; the text ends with a newline.
    """
    runs = [r if isinstance(r, RunResult) else load_run(r) for r in runs]
    labels = distinct_labels(runs)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(ALIGN) + "|"]
    for run, label in zip(runs, labels):
        lines.append("| " + " | ".join(_cell(c) for c in format_row(run, threshold, label)) + " |")
    notes = []
    datasets = datasets_of(runs)
    if len(datasets) > 1:
        msg = (f"the runs used {len(datasets)} different datasets ({', '.join(datasets)}): accuracies and "
               f"times are not comparable across them")
        warnings.warn(msg, ReportWarning, stacklevel=2)
        notes.append(f"- **Note:** {msg}.")
    for run, label in zip(runs, labels):
        if not run.complete:
            n = len(run.metrics)
            notes.append(f"- {_cell(label)} {INCOMPLETE}: no {SUMMARY_FILE}; values computed "
                         f"from {METRICS_FILE} ({n} epoch{'' if n == 1 else 's'} logged).")
    if notes:
        lines += ["", *notes]
    lines += ["", "Columns:", "", *column_notes(_threshold_text(runs, labels, threshold))]
    return "\n".join(lines) + "\n"
