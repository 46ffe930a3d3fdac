"""Where datasets are looked for: explicit directory, then `$DATA`, then `./data` (plus per-dataset system dirs)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

DATA_ENV = "DATA"
DEFAULT_DIR = Path("data")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory downloads go to: `data_dir` if given, else `$DATA` if set, else `./data`."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DIR


def search_roots(data_dir: str | os.PathLike[str] | None = None, extra: Iterable[str | Path] = ()) -> list[Path]:
    """All roots to search, in priority order, without duplicates: explicit, `$DATA`, `./data`, then `extra`.

    Every root is searched (not just the first one that is set) so that an explicit `--data-dir` for one
    dataset does not hide another dataset that lives in `$DATA` or in a system directory.
    """
    candidates: list[Path] = []
    if data_dir is not None and str(data_dir) != "":
        candidates.append(Path(data_dir).expanduser())
    env = os.environ.get(DATA_ENV)
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(DEFAULT_DIR)
    candidates.extend(Path(p) for p in extra)

    roots: list[Path] = []
    seen: set[str] = set()
    for path in candidates:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            roots.append(path)
    return roots


def describe(paths: Iterable[Path]) -> str:
    """Render searched directories for error messages (absolute, so a relative `./data` is unambiguous)."""
    return ", ".join(str(Path(os.path.abspath(p))) for p in paths)
