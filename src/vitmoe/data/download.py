"""Network fetch with md5 verification, atomic placement and safe tar extraction."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

from ..fileio import atomic_write
from .info import DatasetError

# Indirection so tests (and offline runs) can replace the network layer.
urlopen = urllib.request.urlopen

CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest`, verifying `md5` when given.

    The body is streamed to a temporary file in the destination directory and renamed only once complete
    and verified, so an interrupted or corrupted download never leaves a file under the final name
    (and concurrent ranks downloading the same file cannot observe each other's partial data).
    Network errors propagate (`urllib.error.URLError`, `OSError`); a checksum mismatch raises `DatasetError`.
    """
    dest = Path(dest)

    def fetch(tmp: str) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with open(tmp, "wb") as out, urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise DatasetError(
                f"md5 mismatch for {url}: expected {md5}, got {digest.hexdigest()} (download corrupt or tampered; "
                f"nothing was written to {dest})"
            )

    return atomic_write(dest, fetch)


class DownloadScope:
    """What one download created: the directories made for it and the files fetched into them."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.created: list[Path] = []  # deepest first
        self.files: list[Path] = []

    def add(self, path: Path) -> Path:
        """Register a file this download wrote (removed on failure when it lies in a created directory)."""
        self.files.append(Path(path))
        return Path(path)

    def undo(self) -> None:
        created = {os.path.abspath(d) for d in self.created}
        for f in self.files:
            if os.path.abspath(f.parent) in created:
                with contextlib.suppress(OSError):
                    f.unlink()
        for d in self.created:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty: never removes what another process put there


@contextlib.contextmanager
def download_scope(directory: str | os.PathLike):
    """Create `directory` (and missing parents) for a download; if the body raises, remove the files it
    registered in directories it created and then those directories, so a failed download leaves no
    empty or half-filled `./data/...` folder behind to shadow the real data in later searches.
    Files fetched into a directory that already existed stay (each is whole and verified)."""
    scope = DownloadScope(Path(directory))
    p = scope.directory
    while not p.exists() and p != p.parent and str(p) not in ("", "."):
        scope.created.append(p)
        p = p.parent
    scope.directory.mkdir(parents=True, exist_ok=True)
    try:
        yield scope
    except BaseException:
        scope.undo()
        raise


def _check_member(member: tarfile.TarInfo, folder: str, archive: Path) -> None:
    """Allow only plain files/dirs strictly inside `folder/` (no absolute paths, `..`, links or devices)."""
    path = PurePosixPath(member.name)
    parts = path.parts
    if path.is_absolute() or ".." in parts or not parts or parts[0] != folder:
        raise DatasetError(f"{archive}: refusing to extract unexpected path {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise DatasetError(f"{archive}: refusing to extract non-regular member {member.name!r}")


def extract_folder(archive: Path, root: Path, folder: str) -> Path:
    """Extract a `.tar.gz` whose members all live under `folder/` to `root/folder`; returns that path.

    Extraction happens in a temporary sibling directory that is renamed into place at the end, so a crash
    mid-way never leaves a half-populated dataset folder that a later run would trust.
    """
    root = Path(root)
    target = root / folder
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, folder, archive)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp_dir, members=members, filter="data")
                else:  # pragma: no cover - Python without PEP 706 backport; members were validated above
                    tar.extractall(tmp_dir, members=members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetError(f"{archive} is truncated or corrupt: {exc}") from exc
        if not (tmp_dir / folder).is_dir():
            raise DatasetError(f"{archive} does not contain the folder {folder}/")
        try:
            os.replace(tmp_dir / folder, target)
        except OSError:
            # Another process won the race and already placed a complete folder; keep theirs.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target
