"""CIFAR-10 / CIFAR-100 from the official python-pickle archives (optionally downloaded, md5-verified)."""

from __future__ import annotations

import os
import pickle
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..readers import open_regular
from . import download as dl
from .info import DATASETS, DatasetError, ImageData
from .sources import describe, resolve_data_dir, search_roots


@dataclass(frozen=True)
class CifarSource:
    url: str
    md5: str
    archive: str  # file name of the .tar.gz
    folder: str  # top-level folder inside the archive
    splits: dict[str, tuple[str, ...]]  # split -> pickle files, concatenated in this order
    label_key: str


CIFAR_SOURCES: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        label_key="labels",
    ),
    "cifar100": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        splits={"train": ("train",), "test": ("test",)},
        label_key="fine_labels",
    ),
}

PIXELS = 3 * 32 * 32


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else, so a dataset file cannot execute code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written by numpy 1.x (the official archives)
        ("numpy._core.multiarray", "_reconstruct"),  # pickles written by numpy 2.x
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles of bytes written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")
        return super().find_class(module, name)


def _read_batch(path: Path, name: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(
            f"{name}: {path} is missing: the folder {path.parent} is incomplete "
            f"(delete it so the archive is extracted or downloaded again)"
        )
    try:
        with open_regular(path, name) as fh:  # regular files only: a FIFO would block the reader
            # latin1: the official pickles were written by Python 2 and hold byte strings.
            entry = _ArrayUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # EOFError, UnpicklingError, ValueError from a cut numpy buffer, ...
        raise DatasetError(f"{name}: {path} is truncated or corrupt: {type(exc).__name__}: {exc}") from exc
    if not isinstance(entry, dict):
        raise DatasetError(f"{name}: {path} is not a CIFAR batch (a {type(entry).__name__}, expected a dict)")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise DatasetError(f"{name}: {path} is not a CIFAR batch (keys {sorted(entry)}; need 'data', {label_key!r})")

    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise DatasetError(f"{name}: {path} holds data {data.dtype} {data.shape}, expected uint8 [N, {PIXELS}]")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{name}: {path} holds {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{name}: {path} has labels outside 0..{num_classes - 1}")
    # Rows are the 1024 red, then green, then blue values, each row-major: exactly CHW.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_folder(folder: Path, name: str, split: str) -> ImageData:
    source = CIFAR_SOURCES[name]
    info = DATASETS[name]
    parts = [_read_batch(folder / f, name, source.label_key, info.num_classes) for f in source.splits[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), info)


def _missing_message(name: str, roots: list[Path]) -> str:
    s = CIFAR_SOURCES[name]
    return (
        f"{name}: dataset not found; searched {describe(roots)} for the folder {s.folder}/ "
        f"(with {', '.join(s.splits['train'] + s.splits['test'])}) or the archive {s.archive}. "
        f"To install it by hand, download {s.url} (md5 {s.md5}) and put the .tar.gz, or its extracted "
        f"{s.folder}/ folder, into one of those directories (choose one with --data-dir or $DATA)"
    )


def locate_cifar(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """The extracted CIFAR folder: found, extracted from a local archive, or downloaded (md5-verified)."""
    source = CIFAR_SOURCES[name]
    roots = search_roots(data_dir)

    for root in roots:
        if (root / source.folder).is_dir():
            return root / source.folder

    # An archive placed by hand (offline machines): verify it like a download before trusting it.
    for root in roots:
        archive = root / source.archive
        if archive.is_file():
            got = dl.md5sum(archive)
            if got != source.md5:
                raise DatasetError(f"{name}: {archive} has md5 {got}, expected {source.md5} (incomplete or wrong file)")
            return dl.extract_folder(archive, root, source.folder)

    if not download:
        raise DatasetError(_missing_message(name, roots) + "; download=False, so nothing was fetched")

    target = resolve_data_dir(data_dir)
    archive = target / source.archive
    try:
        # A failed download removes what it created (the folder too), so no empty ./data shadows later searches.
        with dl.download_scope(target) as scope:
            scope.add(dl.download_file(source.url, archive, md5=source.md5))
            return dl.extract_folder(archive, target, source.folder)
    except (urllib.error.URLError, OSError) as exc:  # URLError, timeouts, connection resets, disk errors
        reason = getattr(exc, "reason", exc)
        raise DatasetError(
            _missing_message(name, roots) + f"; downloading {source.url} to {archive} failed: {reason}"
        ) from exc


def load_cifar(name: str, split: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> ImageData:
    """Read a CIFAR split, extracting a local archive or downloading (md5-verified) when needed."""
    return _read_folder(locate_cifar(name, data_dir, download), name, split)


def check_cifar(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Make sure every batch file of both splits is there (downloading/extracting as `load_cifar` would)
    and not empty, without unpickling the data; returns the folder."""
    source = CIFAR_SOURCES[name]
    folder = locate_cifar(name, data_dir, download)
    for split in ("train", "test"):
        for fname in source.splits[split]:
            path = folder / fname
            if not path.is_file():
                raise DatasetError(
                    f"{name}: {path} is missing: the folder {folder} is incomplete "
                    f"(delete it so the archive is extracted or downloaded again)"
                )
            if path.stat().st_size == 0:
                raise DatasetError(f"{name}: {path} is empty (delete the folder so it is extracted or downloaded again)")
    return folder
