"""Entry point of the `vitmoe` console script (and `python -m vitmoe`)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from . import demo, eval as eval_cmd, info, merge, report, train
from .common import HelpFormatter, user_errors

SUBCOMMANDS = (train, eval_cmd, merge, info, report, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitmoe",
        description="Vision Transformers with Mixture-of-Experts MLPs: train, evaluate, merge experts, report.",
        formatter_class=HelpFormatter,
        epilog="Run `vitmoe COMMAND --help` for the options of a command. Quick start (offline, a few minutes "
               "on a CPU): `vitmoe demo`.",
    )
    parser.add_argument("--version", action="version", version=f"vitmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..runtime import keep_freed_memory

    keep_freed_memory()  # our own process only; see vitmoe.runtime
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"{e.strerror}: {e.filename}"
        print(f"vitmoe: error: {msg}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("vitmoe: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - only the NaN stop and a failed worker are expected here
        from ..training.launch import WorkerFailedError
        from ..training.trainer import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            print(f"vitmoe: error: {e}", file=sys.stderr, flush=True)
            return 3
        if isinstance(e, WorkerFailedError):
            print(f"vitmoe: error: {e}", file=sys.stderr, flush=True)
            return 4
        raise


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
