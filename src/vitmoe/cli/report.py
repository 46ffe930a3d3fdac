"""`vitmoe report RUN_DIR...`: the results table and plots of finished (or killed) runs."""
from __future__ import annotations

import argparse
import warnings

from .common import HelpFormatter, echo, warn


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="results table and plots from run directories", formatter_class=HelpFormatter,
        description="Write results.md (the source project's results table plus dataset, active parameters and "
                    "test-set size, every column explained under it), accuracy.png and expert_load_<run>.png "
                    "into --out and print the table. Runs of several seeds of one configuration add mean ± 95 %% "
                    "CI columns; an MoE configuration with a dense twin among the runs (trained the same way, "
                    "FLOPs within 5 %%) adds the verdict against it, vs_dense.png and vs_dense_gap.png. Runs of "
                    "several datasets in one table get a warning.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (from vitmoe train/demo)")
    p.add_argument("--out", default="report", help="output directory")
    p.add_argument("--threshold", type=float, default=None,
                   help="accuracy (percent) of the t_epoch column and the plot's threshold line (default: each run's "
                        "own threshold, from its summary; 75 for runs that do not record one)")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier report in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..outputs import check_output_folder
    from ..report import ReportWarning, RunFormatError, load_run, make_report, report_files
    from .common import CLIError

    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        raise CLIError(f"not a run directory: {', '.join(missing)}")
    if args.threshold is not None and not 0 <= args.threshold <= 100:
        raise CLIError(f"--threshold {args.threshold}: must be a percentage in [0, 100]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportWarning)
        try:
            runs = [load_run(r) for r in args.runs]
            check_output_folder(args.out, "--out", names=report_files(runs), force=getattr(args, "force", False))
            files = make_report(runs, args.out, threshold=args.threshold)
        except RunFormatError as e:
            raise CLIError(str(e)) from None
    for w in caught:  # e.g. runs of several datasets in one table, a killed run, a truncated metrics line
        if issubclass(w.category, ReportWarning):
            warn(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    echo(files.markdown)
    echo(f"wrote {', '.join(str(p) for p in files.paths)}")
    return 0
