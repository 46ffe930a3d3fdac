"""Shared pieces of the subcommands: the error type the entry point turns into `vitmoe: error: ...`."""
from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A user error: printed as one line `vitmoe: error: ...`, exit status 2."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix (bad value, missing file or data): no traceback."""
    from ..data import DatasetError
    from ..fileio import DiskFullError
    from ..models import ConfigError, ModelFileError
    from ..training.checkpoint import CheckpointError
    from ..training.launch import WorkerUserError
    from ..training.trainer import RunDirError

    return (CLIError, ConfigError, DatasetError, RunDirError, CheckpointError, FileNotFoundError, WorkerUserError,
            ModelFileError, DiskFullError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' layout; each flag's help states its own default (flags default to
    None so that only flags actually given override the config)."""


def echo(msg: str = "") -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"vitmoe: warning: {msg}", file=sys.stderr, flush=True)
