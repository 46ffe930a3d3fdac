"""Atomic file writes: every file vitmoe writes appears whole or not at all.

The writer produces a temp file in the target's directory (same filesystem), which is
fsynced and renamed over the target; on any error the temp file is removed. The file gets the
permissions a plain `open(path, "w")` would give (0666 minus the umask), whatever the writer
used (safetensors creates its files 0600). A full disk is a `DiskFullError` naming the file, the
free space and the size needed (the temp file is removed; the previous file is untouched).

What a write may replace is checked here too (`check_write_target`): only a regular file, never a
symbolic link, device, FIFO or socket (a rename would put our file where the device node was),
and a path under an existing file is one `PathError`. Which paths a *command* may write (its
--force, a run's own files, system folders) is `vitmoe.outputs`' policy, built on these checks.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable

TMP_SUFFIX = ".tmp"

SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
                "/usr")
"""Folders of the operating system: nothing vitmoe makes is ever written inside them."""
SYSTEM_FOLDERS = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var")
"""Folders that hold everybody's folders: vitmoe writes into a folder below them, never into them."""


class PathError(ValueError):
    """A path given by a user or named in a file cannot be used as it is (a special file or a link
    where a regular file belongs, a file in the way of a folder, a system folder, a file too large or
    not text): one line naming the path and what is allowed."""


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


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The existing non-folder (a file, or a link to one) that `path` would have to lie under; None
    when every existing ancestor of `path` is a folder."""
    path = Path(os.path.abspath(path))
    p = _nearest_existing(path.parent)
    return None if os.path.isdir(p) else p


def system_folder(path: str | os.PathLike, folder: bool = False) -> str | None:
    """The system folder (SYSTEM_TREES, SYSTEM_FOLDERS) that writing `path` would write into, or None.
    `folder`: `path` is an output folder (it may not be one of SYSTEM_FOLDERS itself); else a file
    (it may not lie directly in one of them). Links are resolved: /bin -> /usr/bin is still /usr."""
    real = os.path.realpath(path)
    where = real if folder else os.path.dirname(real)
    for tree in SYSTEM_TREES:
        if real == tree or real.startswith(tree + os.sep):
            return tree
    return where if where in SYSTEM_FOLDERS else None


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def check_write_target(path: str | os.PathLike) -> Path:
    """Raise PathError unless a file may be (re)placed at `path`: nothing there, or a regular file
    (not a link: replacing one would not write where it points, and a device node or FIFO must never
    be swapped for a file); its folder exists or can be made (no file in the way)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None  # a file in the way: said below
    except OSError as e:
        raise PathError(f"cannot write {path}: {e.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise PathError(f"cannot write {path}: it is {kind_of(st.st_mode)}; vitmoe writes regular files only "
                        "(choose another name)")
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise PathError(f"cannot write {path}: {blocker} is a file, not a folder")
    return path


def open_append(path: str | os.PathLike, binary: bool = False):
    """`path` opened for appending (created if missing): a regular file only, never through a link
    (appending would write where it points) and never blocking on a FIFO."""
    path = check_write_target(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        raise PathError(f"cannot append to {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise PathError(f"cannot append to {path}: it is {kind_of(mode)}; vitmoe writes regular files only")
    return os.fdopen(fd, "ab" if binary else "a", **({} if binary else {"encoding": "utf-8"}))


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], size: int | None = None) -> Path:
    """Call `write(tmp_path)` (safetensors, torch.save, savefig all take a path), then rename.
    `size` (bytes, when known) goes into the message of a full disk. Only a regular file is ever
    replaced (`check_write_target`)."""
    path = check_write_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(disk_full_message(str(path), path.parent, size), path) from None
        raise PathError(f"cannot make the folder of {path}: {e.strerror}") from None
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
