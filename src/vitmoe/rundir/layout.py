"""What a run directory is and who may write it: the names of its files and checkpoint folders,
the lock of the one process writing it, and whether `--out` may take a folder.

* **The names.** Every name vitmoe writes in a run directory::

      RUN/config.yaml      the resolved TrainConfig (RunSpec.save_yaml)
      RUN/metrics.jsonl    one JSON object per epoch (`epoch` and `test_acc` required)
      RUN/summary.json     the run's final numbers (rewritten every epoch)
      RUN/checkpoints/     epoch-NNNN/ folders and the `latest` / `best` pointers
                           (vitmoe.training.checkpoints writes and verifies them)
      RUN/.vitmoe.lock     held (flock) by the process writing the run
      RUN/launcher.log     launcher and worker tracebacks of a failed multi-process run

* **The lock.** The process that writes a run (rank 0 of a multi-process run) holds
  `flock(LOCK_EX)` on `RUN/.vitmoe.lock` from before its first write until the run ends; the file
  holds the holder's pid, host and start time as one line of JSON. A second writer (another
  `vitmoe train --out RUN`, or `--resume RUN` of a running run) fails at once, naming that pid.
  The OS drops the lock when its process dies, however it dies, so a killed run never leaves a
  stale lock (a leftover file is ignored; a clean end removes it). Readers (`vitmoe eval`,
  `vitmoe report`) take no lock: every file of a run is written atomically or appended to.
  flock locks belong to an open file description: two opens in one process exclude each other too.
  **Handover.** A restarted job (an elastic restart, `vitmoe.training.restart`) takes the lock of
  the attempt that failed: its writer is dead, so the lock is free, or it is dying (a worker left
  on a lost node fails within dist_timeout_s of losing its peers), so the new writer waits for it
  (`acquire(wait_s=...)`) instead of failing; two writers never hold it at once.
* **The folder.** `check_run_dir` accepts a directory that does not exist, is empty (or holds only
  vitmoe's lock file and launcher.log), or is a vitmoe run (`is_run_dir`, or a checkpoint);
  a fresh run refuses a run that has a checkpoint (resume it instead). Anything else is somebody's
  folder: refused, unless `force`, and even then vitmoe never replaces a file it did not write
  (config.yaml, metrics.jsonl, summary.json, checkpoints/, tensorboard/ must be absent; its
  lock file and launcher.log are only ever added to). The filesystem root, system folders
  (`fileio.system_folder`), a path under a file and a folder inside another run's checkpoints/ are
  always refused.

Importing this module does not import torch (the report reads runs without it).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import stat
import time
from datetime import datetime
from pathlib import Path


CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".vitmoe.lock"
LAUNCHER_LOG = "launcher.log"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_DIR, TENSORBOARD_DIR, LOCK_FILE, LAUNCHER_LOG)
"""Every name vitmoe writes in a run directory."""
LATEST, BEST = "latest", "best"
"""The pointer files in checkpoints/ naming the newest complete checkpoint and the best one."""
POINTERS = (LATEST, BEST)
EPOCH_DIR_RE = re.compile(r"^epoch-(\d+)$")


def epoch_dir_name(epoch: int) -> str:
    """The checkpoint folder of `epoch`: epoch-0005 (zero-padded so names sort by epoch)."""
    return f"epoch-{epoch:04d}"


def all_epoch_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint folder of a run (complete or not), oldest first."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := EPOCH_DIR_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    """The run directory holds a checkpoint folder, usable or not (a run lives there)."""
    return bool(all_epoch_dirs(run_dir))


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a vitmoe run: a config.yaml with a `model:` key (small enough to be
    ours) beside a checkpoints/ folder or a metrics.jsonl."""
    path = Path(path)
    config = path / CONFIG_FILE
    try:
        if not config.is_file():
            return False
    except OSError:
        return False
    if not ((path / CHECKPOINT_DIR).is_dir() or (path / METRICS_FILE).is_file()):
        return False
    try:
        from ..readers import load_yaml

        data = load_yaml(config)  # bounded: size, aliases, regular files (a FIFO never blocks)
    except Exception:  # noqa: BLE001 - unreadable: not a run of ours
        return False
    return isinstance(data, dict) and "model" in data


SHADOWING_FILES = ("model.safetensors", "ema.safetensors", "config.json", "model.safetensors.index.json",
                   "pytorch_model.bin")
"""Names that change what a run directory is read as (a checkpoint folder, a transformers directory)."""
RUN_INTERNALS = (CHECKPOINT_DIR, TENSORBOARD_DIR)
"""Folders of a run that only its trainer writes."""


def is_run(folder: Path) -> bool:
    """A folder vitmoe trains in: a run (config and records), one with checkpoints, or one held by a trainer
    now (a run that has not written its config yet)."""
    try:
        return folder.is_dir() and (is_run_dir(folder) or has_checkpoint(folder) or (folder / LOCK_FILE).is_file())
    except OSError:
        return False


def run_owning(path: Path) -> tuple[Path, str] | None:
    """(run, what) when writing `path` would write a run's own file: its records, its checkpoints or
    tensorboard logs, or a name that shadows them; else None."""
    real = Path(os.path.realpath(path))
    if real.name in (*RUN_FILES, *SHADOWING_FILES) and is_run(real.parent):
        return real.parent, f"its own {real.name}"
    for folder in real.parents:
        if folder.name in RUN_INTERNALS and is_run(folder.parent):
            return folder.parent, f"its {folder.name}/"
    return None


_LEFTOVERS = {LOCK_FILE, LAUNCHER_LOG}  # what a run that never started may leave: the folder is still empty
_HOLDER_WAIT_S = 1.0  # a lock just taken is written within microseconds; a momentary probe is gone as fast


class RunDirError(ValueError):
    """The run directory cannot be used: it already holds a run (and --resume was not given),
    another process is writing it, or it is a folder vitmoe did not make."""


def _open(path: Path, flags: int) -> int | None:
    """A descriptor of the regular file `path` (never through a symlink, never blocking on a FIFO);
    None when it does not exist and `flags` do not create it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        if flags & os.O_CREAT:
            raise RunDirError(f"cannot create the run lock {path}: its directory is gone") from None
        return None
    except OSError as e:
        raise RunDirError(f"cannot use the run lock {path}: {e.strerror} (a vitmoe run directory has "
                          f"{LOCK_FILE} as a plain file)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a hard link would let us overwrite another file
        os.close(fd)
        raise RunDirError(f"cannot use the run lock {path}: not a regular file of its own "
                          f"({'hard-linked' if stat.S_ISREG(st.st_mode) else 'not a regular file'})")
    return fd


def _holder(fd: int) -> str:
    """The lock holder's line, as written by `RunLock.acquire` ('' while it is being written)."""
    with contextlib.suppress(OSError):
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    return ""


def describe_holder(text: str) -> str:
    """'pid 123 on host, started 2025-01-01T12:00:00+00:00' from a lock file's line."""
    try:
        h = json.loads(text)
        return f"pid {int(h['pid'])} on {h['host']}, started {h['started']}"
    except (ValueError, TypeError, KeyError):
        return "a process that has not said who it is"


def in_use_error(run_dir: Path, holder: str) -> RunDirError:
    return RunDirError(f"run directory {run_dir} is in use by another vitmoe process ({describe_holder(holder)}); "
                       "wait for it to end (or stop it) or choose another --out")


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """The line of the process holding `run_dir`'s lock, or None when nobody holds it. Creates
    nothing; never takes the lock for longer than the probe."""
    path = Path(run_dir) / LOCK_FILE
    fd = _open(path, os.O_RDONLY)
    if fd is None:
        return None
    try:
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = _holder(fd)
                if text or time.monotonic() > deadline:
                    return text or "?"
                time.sleep(0.02)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)


class RunLock:
    """`RunLock(run_dir).acquire()` ... `.release()` (or `with RunLock(run_dir):`). Acquiring creates
    the run directory (and its parents) and raises RunDirError naming the holder when the lock is taken."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.0) -> "RunLock":
        """Take the lock; a holder is waited for up to `wait_s` seconds (a restarted job's writer
        waiting for the failed attempt's, see the module docstring), then named in the error."""
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create the run directory {self.run_dir}: {e.strerror}") from None
        start = time.monotonic()
        deadline = start + _HOLDER_WAIT_S
        while True:
            fd = _open(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = _holder(fd)
                os.close(fd)
                now = time.monotonic()
                if text and now - start < wait_s:
                    time.sleep(0.2)  # a dying holder: flock is dropped when its process is gone
                    continue
                if text or now > deadline:
                    error = in_use_error(self.run_dir, text)
                    if wait_s > 0:
                        error = RunDirError(f"{error} (waited {wait_s:g}s for it to stop)")
                    raise error from None
                time.sleep(0.02)  # just taken and not yet written, or a momentary probe
                continue
            # A holder that released meanwhile removed the file we opened: lock the one the name points to.
            try:
                current = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(fd), current):
                break
            os.close(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without the note (a full disk): others then cannot name us
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            # Only the file we hold: another run may have replaced a lock file someone deleted.
            if os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False)):
                os.unlink(self.path)  # still held: whoever opened this file finds it taken, then retries by name
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the last descriptor drops the lock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def check_run_dir(run_dir: str | os.PathLike, resume: bool = False, force: bool = False,
                  check_lock: bool = True) -> None:
    """Raise RunDirError unless `run_dir` may receive this run (see the module docstring).
    `check_lock=False` when the caller holds the lock itself."""
    from ..fileio import file_in_the_way, system_folder

    out = Path(run_dir)
    if out.resolve() == Path(out.resolve().anchor):
        raise RunDirError(f"--out {out} is the filesystem root; choose a directory for the run")
    if (where := system_folder(out, folder=True)) is not None:
        raise RunDirError(f"--out {out}: vitmoe never writes into the system folder {where}; choose a folder "
                          "of your own")
    if (blocker := file_in_the_way(out)) is not None:
        raise RunDirError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
    if (owner := run_owning(out)) is not None:
        raise RunDirError(f"--out {out} would write into {owner[1]} of the run {owner[0]}; choose a folder "
                          "outside that run")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {out} is a file, not a directory; choose another --out")
    if not out.exists():
        return
    if check_lock and (holder := lock_holder(out)) is not None:
        raise in_use_error(out, holder)
    holds_checkpoints = has_checkpoint(out)  # usable or not: a run lives there
    if holds_checkpoints and not resume:
        raise RunDirError(f"run directory {out} already holds a run; resume it with --resume {out} "
                          f"or choose another --out")
    if holds_checkpoints or is_run_dir(out):
        return
    try:
        names = sorted(p.name for p in out.iterdir() if p.name not in _LEFTOVERS)
    except OSError as e:
        raise RunDirError(f"cannot read the run directory {out}: {e.strerror}") from None
    if not names:
        return
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    if not force:
        raise RunDirError(f"--out {out} is not empty and is not a vitmoe run directory (it holds {shown}); "
                          "choose another --out, or add --force to write the run beside those files")
    clash = [n for n in RUN_FILES if n not in _LEFTOVERS and os.path.lexists(out / n)]
    if clash:
        raise RunDirError(f"--out {out} already holds {', '.join(clash)}, not written by vitmoe; --force adds a run "
                          "beside other files but never replaces them: choose another --out")


def lock_run_dir(run_dir: str | os.PathLike, resume: bool = False, force: bool = False,
                 wait_s: float = 0.0) -> RunLock:
    """Take the run directory's lock (waiting up to `wait_s` for a holder, see RunLock.acquire), then
    check it again under the lock (another run may have finished there since the first check); the
    lock is released when the check fails."""
    lock = RunLock(run_dir).acquire(wait_s)
    try:
        check_run_dir(run_dir, resume, force, check_lock=False)
    except BaseException:
        lock.release()
        raise
    return lock


__all__ = ["CONFIG_FILE", "METRICS_FILE", "SUMMARY_FILE", "CHECKPOINT_DIR", "TENSORBOARD_DIR", "LOCK_FILE",
           "LAUNCHER_LOG", "RUN_FILES", "LATEST", "BEST", "POINTERS", "EPOCH_DIR_RE", "epoch_dir_name",
           "all_epoch_dirs", "has_checkpoint", "is_run_dir", "is_run", "run_owning", "SHADOWING_FILES", "RunDirError", "RunLock", "lock_holder",
           "describe_holder", "check_run_dir", "lock_run_dir"]
