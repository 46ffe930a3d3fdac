"""Atomic file writes: every file vitmoe writes appears whole or not at all.

The writer produces a temp file in the target's directory (same filesystem), which is
fsynced and renamed over the target; on any error the temp file is removed. The file gets the
permissions a plain `open(path, "w")` would give (0666 minus the umask), whatever the writer
used (safetensors creates its files 0600). A full disk is a `DiskFullError` naming the file, the
free space and the size needed (the temp file is removed; the previous file is untouched).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

TMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """No space left on the device while writing: one message naming the file or directory, the
    free space there and the size needed (errno is ENOSPC)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(errno.ENOSPC, message, None if path is None else str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message, self.filename)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, also as the writers that lose the errno report it (safetensors' Rust I/O error)."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def format_bytes(n: int | float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full_message(what: str, where: str | os.PathLike, needed: int | None, written: int | None = None) -> str:
    free = free_bytes(where)
    need = (f"{format_bytes(needed)} needed" if needed else
            f"more than the {format_bytes(written)} written before it filled" if written else "more needed")
    return (f"no space left on device writing {what}: {format_bytes(free) if free is not None else 'unknown'} "
            f"free in {where}, {need}")


@contextlib.contextmanager
def reporting_disk_full(path: str | os.PathLike, needed: int | None = None):
    """Turn a raw ENOSPC raised inside the block into a DiskFullError naming `path`."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        path = Path(path)
        raise DiskFullError(disk_full_message(str(path), path.parent, needed), path) from e


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only there)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Permissions of a new directory: 0777 minus the umask."""
    return 0o777 & ~current_umask()


def temp_path_for(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], size: int | None = None) -> Path:
    """Call `write(tmp_path)` (safetensors, torch.save, savefig all take a path), then rename.
    `size` (bytes, when known) goes into the message of a full disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        write(str(tmp))
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = None
        with contextlib.suppress(OSError):
            written = os.path.getsize(tmp)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(disk_full_message(str(path), path.parent, size, written), path) from e
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
