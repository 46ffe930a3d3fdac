"""Shared pieces of the subcommands: the error type the entry point turns into `vitmoe: error: ...`."""
from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A user error: printed as one line `vitmoe: error: ...`, exit status 2."""


ERROR_CHARS = 2000
"""An error line is cut here (a message quoting a 10 MB argument stays one readable line)."""


def error_line(message: object) -> str:
    """`vitmoe: error: MESSAGE` on one line, whatever the message holds (a parser's multi-line
    text, a long value): whitespace runs become one space, and it is cut at ERROR_CHARS."""
    text = " ".join(str(message).split())
    if len(text) > ERROR_CHARS:
        text = text[: ERROR_CHARS - 3] + "..."
    return f"vitmoe: error: {text}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one `vitmoe: error:` line (exit 2), like every other error;
    the usage is a `--help` away."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        self.exit(2, error_line(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)") + "\n")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix (bad value, missing file or data): no traceback."""
    from ..data import DatasetError
    from ..fileio import DiskFullError, PathError
    from ..inference import ImageInputError
    from ..models import ConfigError, ModelFileError
    from ..training.checkpoints.checkpoint import CheckpointError
    from ..training.launch import WorkerUserError
    from ..rundir import RunDirError

    return (CLIError, ConfigError, DatasetError, RunDirError, CheckpointError, FileNotFoundError, WorkerUserError,
            ModelFileError, DiskFullError, ImageInputError, PathError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' layout; each flag's help states its own default (flags default to
    None so that only flags actually given override the config)."""


def echo(msg: str = "") -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"vitmoe: warning: {msg}", file=sys.stderr, flush=True)


def analysis_dir(source, path):
    """Where a command writes its analysis of `source` (a run, a checkpoint or a model file; `path` its
    model file) by default: RUN/analysis for anything of a run (never inside its checkpoints/), else
    an `analysis` folder beside the model file."""
    from pathlib import Path

    from ..rundir import is_run, run_owning

    if Path(source).is_dir() and is_run(Path(source)):
        return Path(source) / "analysis"
    owner = run_owning(Path(path))
    return (owner[0] if owner else Path(path).parent) / "analysis"


def model_file(source, which: str = "latest", ema: bool = False):
    """The model file `source` (a file, run or checkpoint directory) means, as
    add_checkpoint_options chose; says so when a run's best accuracy was its EMA's and the raw weights are read."""
    from pathlib import Path

    from ..readers import load_json
    from ..training import resolve_model_file

    path = resolve_model_file(source, log=warn, which=which, weights="ema" if ema else "model")
    if which == "best" and not ema and Path(source).is_dir():
        try:
            best = load_json(Path(source) / "summary.json", "summary").get("best_model")
        except (OSError, ValueError, AttributeError):  # PathError included: only a note depends on it
            best = None
        if best == "ema":
            warn(f"the best test accuracy of {source} was its EMA's: pass --ema to read ema.safetensors")
    return path
