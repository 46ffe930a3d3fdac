"""The results table of the source project, as markdown.

Columns (as published by switch-vit)::

    | model | experts | size | highest acc (epoch) | t_epoch |
    | Training Time (60,000 images) | Inference Time (60,000 images) |

* ``experts``: ``-`` for a dense model;
* ``size``: parameter count with thousands separators;
* ``highest acc (epoch)``: best test accuracy in percent, 2 decimals, and its epoch;
* ``t_epoch``: first epoch whose test accuracy reached the threshold, ``-`` if never;
* times: seconds to train on / classify 60,000 images, 2 decimals.

A value that is unavailable (e.g. the inference time of a run killed before it wrote
``summary.json``) is written ``n/a``; such runs are marked ``(incomplete)`` and explained
in a note under the table.  Row order is the order of ``runs``.
"""
from __future__ import annotations

import os
from typing import Iterable, Union

from .runs import DEFAULT_THRESHOLD, METRICS_FILE, SUMMARY_FILE, RunResult, load_run

__all__ = ["results_table", "HEADER", "format_row"]

HEADER = ("model", "experts", "size", "highest acc (epoch)", "t_epoch",
          "Training Time (60,000 images)", "Inference Time (60,000 images)")
ALIGN = ("---", ":---:", ":---:", ":---:", ":---:", ":---:", ":---:")
NA = "n/a"
INCOMPLETE = "(incomplete)"

RunLike = Union[RunResult, str, os.PathLike]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _seconds(x: float | None) -> str:
    return NA if x is None else f"{x:.2f}"


def _experts(x: int | tuple[int, ...] | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, tuple):
        return "/".join(str(v) for v in x)
    return str(x)


def format_row(run: RunResult, threshold: float = DEFAULT_THRESHOLD) -> list[str]:
    """The seven cells of ``run``'s row (unescaped)."""
    name = run.name if run.complete else f"{run.name} {INCOMPLETE}"
    size = NA if run.params is None else f"{run.params:,}"
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
    return [name, _experts(run.experts), size, best, t_epoch,
            _seconds(run.train_time_60k_s), _seconds(run.inference_time_60k_s)]


def results_table(runs: Iterable[RunLike], threshold: float = DEFAULT_THRESHOLD) -> str:
    """Markdown results table for ``runs`` (RunResult objects or run directories).

    Deterministic: rows follow the given order; the text ends with a newline.
    """
    runs = [r if isinstance(r, RunResult) else load_run(r) for r in runs]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(ALIGN) + "|"]
    for run in runs:
        lines.append("| " + " | ".join(_cell(c) for c in format_row(run, threshold)) + " |")
    notes = []
    for run in runs:
        if not run.complete:
            n = len(run.metrics)
            notes.append(f"- {_cell(run.name)} {INCOMPLETE}: no {SUMMARY_FILE}; values computed "
                         f"from {METRICS_FILE} ({n} epoch{'' if n == 1 else 's'} logged).")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
