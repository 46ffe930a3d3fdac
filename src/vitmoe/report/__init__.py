"""Results report: the source project's results table and figures from run directories.

>>> files = make_report(["runs/vit", "runs/switch-vit"], "report/")   # doctest: +SKIP
>>> print(files.markdown)                                               # doctest: +SKIP

Writes ``results.md`` (the table), ``accuracy.png`` and one ``expert_load_<run>.png``
per MoE run into the output directory, all atomically; where an MoE configuration has a dense
twin among the runs, also the verdict table, ``vs_dense.png`` and ``vs_dense_gap.png``.  Importing this package does
not import matplotlib (nor torch).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

from ..fileio import atomic_write_text
from .groups import group_runs, groups_table
from .plots import expert_load_matrix, latest_expert_load, plot_accuracy, plot_expert_load
from .runs import (DEFAULT_THRESHOLD, ReportWarning, RunFormatError, RunResult,
                   epochs_to_threshold, load_run)
from .table import results_table
from .verdict import nearest_twins, plot_gaps, plot_vs_twins, verdict_table

__all__ = [
    "make_report", "report_files", "ReportFiles", "load_run", "results_table", "RunResult", "RunFormatError",
    "ReportWarning", "epochs_to_threshold", "plot_accuracy", "plot_expert_load",
    "expert_load_matrix", "DEFAULT_THRESHOLD",
]

RESULTS_MD = "results.md"
ACCURACY_PNG = "accuracy.png"
VS_DENSE_PNG = "vs_dense.png"
VS_DENSE_GAP_PNG = "vs_dense_gap.png"


@dataclass
class ReportFiles:
    """What :func:`make_report` wrote."""

    markdown: str                      # the text of results.md
    results_md: Path
    accuracy_png: Path
    # filename-safe, de-duplicated run name -> expert_load_<name>.png
    expert_load_pngs: dict[str, Path] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list, repr=False)
    vs_dense_png: Path | None = None
    """Accuracy against training time of each MoE beside its dense twin (when the runs hold one)."""
    vs_dense_gap_png: Path | None = None
    """MoE minus twin against the share of FLOPs in experts (when the runs hold a twin)."""

    @property
    def paths(self) -> list[Path]:
        return [self.results_md, self.accuracy_png, *self.expert_load_pngs.values(),
                *(p for p in (self.vs_dense_png, self.vs_dense_gap_png) if p)]


def _file_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "run"


def heatmap_stems(runs: list[RunResult]) -> dict[int, str]:
    """{index of a run that gets an expert-load heatmap: its file stem} (filename-safe run names,
    duplicates numbered _2, _3, ...)."""
    stems: dict[int, str] = {}
    for i, run in enumerate(runs):
        if latest_expert_load(run) is None and not run.is_moe:
            continue
        stem, k = _file_stem(run.name), 2
        while stem in stems.values():
            stem, k = f"{_file_stem(run.name)}_{k}", k + 1
        stems[i] = stem
    return stems


def report_files(runs: list[RunResult]) -> list[str]:
    """The names :func:`make_report` may write for `runs` (checked before anything is written)."""
    twins = [VS_DENSE_PNG, VS_DENSE_GAP_PNG] if nearest_twins(group_runs(runs)) else []
    return [RESULTS_MD, ACCURACY_PNG, *twins, *(f"expert_load_{stem}.png" for stem in heatmap_stems(runs).values())]


def make_report(run_dirs: Iterable[Union[str, os.PathLike, RunResult]],
                out_dir: str | os.PathLike, threshold: float | None = None) -> ReportFiles:
    """Load ``run_dirs`` (in order) and write the report into ``out_dir``; `threshold` (percent)
    of the t_epoch column and the plot's line, None: each run's own (from its summary).

    Files: ``results.md`` (results table, notes, figure links), ``accuracy.png`` and
    ``expert_load_<run name>.png`` for every MoE run that logged expert loads (run names
    are made filename-safe; duplicates get ``_2``, ``_3``, ...), and ``vs_dense.png`` and
    ``vs_dense_gap.png`` where an MoE configuration has a dense twin among the runs.  Returns a
    :class:`ReportFiles` with the markdown text and the paths.
    """
    runs = [r if isinstance(r, RunResult) else load_run(r) for r in run_dirs]
    if not runs:
        raise ValueError("make_report: no run directories given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    accuracy_png = plot_accuracy(runs, out / ACCURACY_PNG, threshold=threshold)
    heatmaps: dict[str, Path] = {}
    for i, stem in heatmap_stems(runs).items():
        png = plot_expert_load(runs[i], out / f"expert_load_{stem}.png")
        if png is not None:
            heatmaps[stem] = png

    lines = [results_table(runs, threshold=threshold).rstrip("\n")]  # its notes explain every column
    groups = group_runs(runs)
    if any(len(g.runs) > 1 for g in groups):  # several seeds of one configuration
        lines += ["", "Configurations over their seeds:", "", groups_table(groups).rstrip("\n")]
    twins = nearest_twins(groups)
    if twins:  # a dense configuration of (nearly) the same FLOPs per image as an MoE one
        lines += ["", "Does the MoE pay? Against its dense twin:", "", verdict_table(twins).rstrip("\n")]
        vs_dense = plot_vs_twins(twins, out / VS_DENSE_PNG)
        vs_gap = plot_gaps(twins, out / VS_DENSE_GAP_PNG)
        lines += ["", f"![test accuracy against training time, each MoE beside its twin]({VS_DENSE_PNG})",
                  "", f"![MoE minus twin against the share of FLOPs in experts]({VS_DENSE_GAP_PNG})"]
    else:
        vs_dense = vs_gap = None
    lines += ["", f"![test accuracy per epoch]({ACCURACY_PNG})"]
    for stem, png in heatmaps.items():
        lines += ["", f"![expert load: {stem}]({png.name})"]
    markdown = "\n".join(lines) + "\n"
    results_md = atomic_write_text(out / RESULTS_MD, markdown)
    return ReportFiles(markdown=markdown, results_md=results_md, accuracy_png=accuracy_png,
                       expert_load_pngs=heatmaps, runs=runs, vs_dense_png=vs_dense,
                       vs_dense_gap_png=vs_gap)
