"""Checkpoint verification: the manifest written last into every checkpoint (size and sha256 of
its files) and the checks readers run before using one.

A checkpoint written before manifests existed is checked as far as it can be: its files are
present, its model file is as long as its safetensors header announces, its state loads.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, Iterable

from ...fileio import PathError
from ...readers import MAX_CONFIG_BYTES, load_json, open_regular, safetensors_header
from .safe_state import STATE_FILE, CheckpointError, load_state

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "vitmoe-checkpoint-1"
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE)
EMA_FILE = "ema.safetensors"
# Files a checkpoint may hold besides CHECKPOINT_FILES (the weights' EMA, training.recipe.ema): a full
# check verifies each one the manifest records or the directory holds, so a damaged EMA is never
# resumed from; readers of the model file alone (eval, merge) do not need it.
OPTIONAL_FILES = (EMA_FILE,)


class HashingFile:
    """A write-only file wrapper that hashes and counts what passes through (what torch.save wrote)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def file_digest(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open_regular(path, "checkpoint file") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def check_safetensors(path: Path) -> None:
    """The file is a whole safetensors file: its size is what its header announces."""
    try:
        with open_regular(path, "checkpoint file") as f:
            head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header, _, size = safetensors_header(path, "checkpoint file", within_file=False)  # bounded
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    except PathError as e:
        if "truncated" in str(e):
            raise CheckpointError(f"{path} is truncated: not a whole safetensors file") from None
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is truncated or damaged: {size:,} bytes where its header announces "
                              f"{8 + n + end:,}")


def read_manifest(d: Path) -> dict[str, Any] | None:
    """The files the manifest records ({name: {size, sha256}}); None when there is no manifest."""
    path = d / MANIFEST_FILE
    try:
        manifest = load_json(path, "checkpoint manifest", MAX_CONFIG_BYTES)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # PathError: not JSON, too large, not a regular file
        raise CheckpointError(f"{path} is damaged ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{path} is not a vitmoe checkpoint manifest (format {MANIFEST_FORMAT!r})")
    return files


def check_entry(path: Path, entry: Any, hash_it: bool = True) -> None:
    if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
        raise CheckpointError(f"{path.parent / MANIFEST_FILE} does not record {path.name}")
    try:
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path} is {size:,} bytes where {MANIFEST_FILE} records {entry['size']:,} "
                                  "(truncated or overwritten)")
        if hash_it and file_digest(path)[1] != entry["sha256"]:
            raise CheckpointError(f"{path} does not match the sha256 {MANIFEST_FILE} records (damaged or replaced)")
    except OSError as e:  # unreadable: skip to an older checkpoint like any other damage
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None


def verify_checkpoint(ckpt_dir: str | os.PathLike, files: Iterable[str] = CHECKPOINT_FILES,
                      load_legacy_state: bool = True) -> None:
    """Raise CheckpointError naming the file and what is wrong unless `files` of the checkpoint
    verify: their sizes and sha256 match its manifest; without one (written before manifests
    existed), the files are present and loadable. Checking every CHECKPOINT_FILES also checks the
    OPTIONAL_FILES the manifest records or the directory holds."""
    d, files = Path(ckpt_dir), tuple(files)
    full = set(CHECKPOINT_FILES) <= set(files)
    if full:
        files += tuple(name for name in OPTIONAL_FILES if name not in files and (d / name).exists())
    for name in files:
        if not (d / name).is_file():
            raise CheckpointError(f"{d / name} is missing")
    recorded = read_manifest(d)
    for name in OPTIONAL_FILES if full and recorded is not None else ():
        if name in recorded and name not in files:
            raise CheckpointError(f"{d / name} is missing")
    if recorded is None:
        for name in (MODEL_FILE, *OPTIONAL_FILES):
            if name in files:
                check_safetensors(d / name)
        if STATE_FILE in files and load_legacy_state:
            load_state(d)
        return
    for name in files:
        check_entry(d / name, recorded.get(name))


def checkpoint_problem(ckpt_dir: str | os.PathLike, files: Iterable[str] = CHECKPOINT_FILES) -> str | None:
    """What is wrong with a checkpoint (one line), or None when it verifies."""
    try:
        verify_checkpoint(ckpt_dir, files)
    except CheckpointError as e:
        return str(e)
    return None
