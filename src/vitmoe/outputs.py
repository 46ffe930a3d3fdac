"""Where a command may write: one policy for every command that writes a file or a folder (train
--out, merge, upcycle, export, analyze --out, eval's capacity curve, report --out, sweep, demo).

Checked before any work, each violation one `PathError` naming the flag, the path and what to do:

* **Never replace a file without --force.** An existing regular file is replaced only with the
  command's `--force`; anything else (a folder where a file belongs, a device node, a FIFO, a
  socket, a symbolic link) is never replaced (`fileio.check_write_target`).
* **Never a run's own files**, even with --force: the files a run directory is made of
  (`rundir.RUN_FILES`), anything inside its `checkpoints/` or `tensorboard/`, and the names that
  would change what the folder is read as (a `model.safetensors` or `ema.safetensors` beside
  `checkpoints/` makes `vitmoe eval RUN` read it instead of the checkpoints; a `config.json` makes
  it a transformers directory). Nor the command's own input.
* **Never a system folder**, even with --force (`fileio.system_folder`: `/usr`, `/etc`, ... and
  files directly in `/`, `/home`, `/tmp`, ...).
* **An output under an existing file** is one error naming that file.

Writes themselves are atomic (`fileio.atomic_write`: temp file in the same folder, renamed; removed
on any error, a full disk included).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .fileio import PathError, check_write_target, file_in_the_way, system_folder
from .rundir.layout import SHADOWING_FILES, is_run, run_owning

def _refuse_protected(path: Path, flag: str, folder: bool) -> None:
    where = system_folder(path, folder=folder)
    if where is not None:
        raise PathError(f"{flag} {path}: vitmoe never writes into the system folder {where}, even with --force; "
                        "choose a folder of your own")
    owner = run_owning(path)
    if owner is not None:
        run, what = owner
        raise PathError(f"{flag} {path} would replace {what} of the run {run}: a run's files are written by its "
                        "trainer only, even with --force; choose a path outside the run (e.g. beside it)")
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise PathError(f"{flag} {path}: {blocker} is a file, not a folder; choose another path")


def check_output_file(path: str | os.PathLike, flag: str, force: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise PathError unless the command may write the file `path` (module docstring): `flag` names it
    in messages (e.g. "OUT", "--out"); `inputs` are files the command reads (never its output)."""
    path = Path(path)
    _refuse_protected(path, flag, folder=False)
    if os.path.isdir(path) and not os.path.islink(path):
        raise PathError(f"{flag} {path} is a directory: give a file name, e.g. {path / 'model.safetensors'}")
    for source in inputs:
        if os.path.lexists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise PathError(f"{flag} {path} is the command's input {source}: choose another file")
    try:
        check_write_target(path)
    except PathError as e:
        raise PathError(f"{flag} {e}") from None
    if os.path.lexists(path) and not force:
        raise PathError(f"{flag} {path} already exists: pass --force to replace it, or choose another name")
    return path


def check_output_folder(path: str | os.PathLike, flag: str, names: Iterable[str] = (), force: bool = False,
                        inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise PathError unless the command may write the files `names` into the folder `path` (made if
    missing). A folder that is a run may receive files only in a subfolder: `path` inside a run's
    checkpoints/ or the run itself with a shadowing name are refused as `check_output_file` says."""
    path = Path(path)
    _refuse_protected(path, flag, folder=True)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise PathError(f"{flag} {path} is {'a file' if os.path.isfile(path) else 'not a folder'}: give a folder")
    for name in names:
        check_output_file(path / name, flag, force=force, inputs=inputs)
    return path


__all__ = ["check_output_file", "check_output_folder", "run_owning", "is_run", "SHADOWING_FILES", "PathError"]
