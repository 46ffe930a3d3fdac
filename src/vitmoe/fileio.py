"""Atomic file writes: every file vitmoe writes appears whole or not at all.

The writer produces a temp file in the target's directory (same filesystem), which is
fsynced and renamed over the target; on any error the temp file is removed. The file gets the
permissions a plain `open(path, "w")` would give (0666 minus the umask), whatever the writer
used (safetensors creates its files 0600).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, Callable

TMP_SUFFIX = ".tmp"


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


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` (safetensors, torch.save, savefig all take a path), then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        write(str(tmp))
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
