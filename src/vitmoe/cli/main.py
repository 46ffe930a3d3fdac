"""Entry point of the `vitmoe` console script (and `python -m vitmoe`)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from .. import __version__
from . import analyze, bench, demo, eval as eval_cmd, export, info, merge, predict, report, sweep, train, upcycle
from .common import ArgumentParser, HelpFormatter, error_line, user_errors

SUBCOMMANDS = (train, eval_cmd, predict, analyze, sweep, merge, upcycle, export, info, report, bench, demo)
LONG_RUNNING = ("train", "sweep", "demo", "eval", "analyze", "bench")
"""Commands that run many forward/backward passes: worth a second start on a better allocator."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="vitmoe",
        description="Vision Transformers with Mixture-of-Experts MLPs: train, evaluate, merge experts, report.",
        formatter_class=HelpFormatter,
        epilog="Run `vitmoe COMMAND --help` for the options of a command. Quick start (offline, "
               f"{demo.DEMO_TIME}): `vitmoe demo`.",
    )
    parser.add_argument("--version", action="version", version=f"vitmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """vitmoe's own warnings (deprecated spellings, report notes) as one line `vitmoe: warning: ...`;
    other libraries' warnings as Python shows them."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep) or category.__module__.startswith("vitmoe"):
        print(f"vitmoe: warning: {message}", file=sys.stderr if file is None else file, flush=True)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    from ..runtime import keep_freed_memory, reexec_with_tcmalloc

    if argv is None and sys.argv[1:2] and sys.argv[1] in LONG_RUNNING:
        # Started as a program (not called from Python): our own process, so we may pick its
        # allocator; the training commands run faster on tcmalloc (vitmoe.runtime).
        reexec_with_tcmalloc([sys.executable, "-m", "vitmoe", *sys.argv[1:]])
    keep_freed_memory()  # our own process only; see vitmoe.runtime
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(error_line(msg), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:  # a command may say what the interruption left (train: how to resume)
        print(f"vitmoe: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - only the NaN stop and a failed worker are expected here
        from ..training.launch import WorkerFailedError
        from ..training.loop.trainer import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            print(error_line(e), file=sys.stderr, flush=True)
            return 3
        if isinstance(e, WorkerFailedError):
            print(error_line(e), file=sys.stderr, flush=True)
            return 4
        raise


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
