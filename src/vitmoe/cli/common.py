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
    from ..inference import ImageInputError
    from ..models import ConfigError, ModelFileError
    from ..training.checkpoints.checkpoint import CheckpointError
    from ..training.launch import WorkerUserError
    from ..rundir import RunDirError

    return (CLIError, ConfigError, DatasetError, RunDirError, CheckpointError, FileNotFoundError, WorkerUserError,
            ModelFileError, DiskFullError, ImageInputError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' layout; each flag's help states its own default (flags default to
    None so that only flags actually given override the config)."""


def echo(msg: str = "") -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"vitmoe: warning: {msg}", file=sys.stderr, flush=True)


def model_file(source, which: str = "latest", ema: bool = False):
    """The model file `source` (a file, run or checkpoint directory) means, as
    add_checkpoint_options chose; says so when a run's best accuracy was its EMA's and the raw weights are read."""
    import json
    from pathlib import Path

    from ..training import resolve_model_file

    path = resolve_model_file(source, log=warn, which=which, weights="ema" if ema else "model")
    if which == "best" and not ema and Path(source).is_dir():
        try:
            best = json.loads((Path(source) / "summary.json").read_text()).get("best_model")
        except (OSError, ValueError, AttributeError):
            best = None
        if best == "ema":
            warn(f"the best test accuracy of {source} was its EMA's: pass --ema to read ema.safetensors")
    return path
