"""Crash-safe training checkpoints.

Layout of `RUN/checkpoints/`:

    epoch-0005/model.safetensors   weights + model config (vitmoe.save_model; loadable by vitmoe.load_model)
    epoch-0005/state.pt            optimizer, scheduler, RNG states, epoch, step, best accuracy, history
    latest                         text file naming the newest complete checkpoint directory
    best                           text file naming the checkpoint with the best test accuracy

A checkpoint is written into a hidden temporary directory (`.tmp-*`), fsynced, renamed into
place, and only then is `latest` atomically replaced (temp file + os.replace). Killing the
process at any moment leaves `latest` naming a complete checkpoint; leftover `.tmp-*`
directories are ignored and removed by the next save.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_write_text, dir_mode
from ..models import save_model

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
_EPOCH_RE = re.compile(r"^epoch-(\d+)$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory that follows the umask (tempfile.mkdtemp would make it 0700)."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir(mode=dir_mode())
            return path
        except FileExistsError:
            continue


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_pointer(ckdir: Path, name: str, target: str) -> None:
    atomic_write_text(ckdir / name, target + "\n")


def _read_pointer(ckdir: Path, name: str) -> str | None:
    try:
        return (ckdir / name).read_text().strip() or None
    except FileNotFoundError:
        return None


def _complete(d: Path) -> bool:
    return (d / MODEL_FILE).is_file() and (d / STATE_FILE).is_file()


def epoch_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := _EPOCH_RE.match(p.name)) and p.is_dir() and _complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike, which: str = "latest") -> Path | None:
    """The checkpoint directory `latest` (or `best`) names; falls back to the newest complete one."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    target = _read_pointer(ckdir, which)
    if target and _complete(ckdir / target):
        return ckdir / target
    dirs = epoch_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    epoch: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    keep: int = 1,
    is_best: bool = False,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `epoch-NNNN` atomically, point `latest` (and `best`) at it, prune old ones.

    `model_state` replaces `model.state_dict()` (expert-parallel runs pass the gathered state)."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    tmp = _make_temp_dir(ckdir, f".tmp-{name}-")
    try:
        save_model(model, tmp / MODEL_FILE, metadata=metadata, state_dict=model_state)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        final = ckdir / name
        if final.exists():  # re-saving an epoch (e.g. after a resume): move the old one aside first
            trash = _make_temp_dir(ckdir, f".tmp-old-{name}-")
            os.rename(final, trash / name)
        os.rename(tmp, final)
        _fsync_path(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(ckdir, "latest", name)
    if is_best:
        _write_pointer(ckdir, "best", name)
    prune(run_dir, keep)
    return final


def prune(run_dir: str | os.PathLike, keep: int = 1) -> None:
    """Remove all but the newest `keep` checkpoints (and the one `best` names) and stale temp dirs."""
    ckdir = Path(run_dir) / CHECKPOINT_DIR
    protect = {_read_pointer(ckdir, "latest"), _read_pointer(ckdir, "best")}
    dirs = epoch_dirs(run_dir)
    protect.update(p.name for p in dirs[-keep:])
    for p in ckdir.iterdir():
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif _EPOCH_RE.match(p.name) and p.is_dir() and p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


def load_state(ckpt_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(ckpt_dir) / STATE_FILE
    try:
        # Our own file (RNG states include numpy/python objects, so not weights_only).
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"no training state at {path}") from None


def read_weights(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's whole-model state (every expert, whatever world size wrote it)."""
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt_dir) / MODEL_FILE), device=str(device))


def resolve_model_file(path: str | os.PathLike) -> Path:
    """A model .safetensors file itself, or a run directory / checkpoint directory -> its latest model file."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            return p / MODEL_FILE
        ck = latest_checkpoint(p)
        if ck is not None:
            return ck / MODEL_FILE
        raise CheckpointError(f"{p} holds no checkpoint (looked for {MODEL_FILE} and {CHECKPOINT_DIR}/latest)")
    raise CheckpointError(f"{p} does not exist")
