"""Fashion-MNIST from IDX files (raw or .gz), with strict header / size validation of the decompressed content."""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import torch

from ..readers import open_regular
from . import download as dl
from .info import DATASETS, DatasetError, ImageData
from .sources import describe, resolve_data_dir, search_roots

NAME = "fashion-mnist"
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian package dataset-fashion-mnist
SUBDIRS = (".", "fashion-mnist", "FashionMNIST/raw")  # layouts used by hand installs and by torchvision
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE = 28

# Official release (HTTPS mirror on GitHub). The md5s identify the published .gz files and are only
# checked on a fresh download: locally provided .gz files (e.g. Debian's) are recompressed, so for those
# the decompressed IDX content is what gets validated.
DOWNLOAD_BASE = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
DOWNLOAD_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


# Far above Fashion-MNIST's 70,000 images: a header that announces more is corrupt or hostile.
MAX_ITEMS = 10_000_000


def _read_idx(path: Path, header_format: str, item_bytes) -> tuple[tuple[int, ...], bytes]:
    """(header fields, body) of an IDX file, reading no more than the header announces.

    The header is read first and the body is read up to its announced size plus one byte, so a
    small .gz that inflates to gigabytes (a gzip bomb) is rejected after a few kilobytes of work.
    `item_bytes(header)` checks the header and gives (count, bytes per item, what they are).
    """
    header_len = struct.calcsize(header_format)
    try:
        # regular files only (vitmoe.readers): a FIFO in the data folder would block the reader
        with open_regular(path, NAME) as raw, (gzip.GzipFile(fileobj=raw) if path.suffix == ".gz"
                                               else contextlib.nullcontext(raw)) as fh:
            head = fh.read(header_len)
            if len(head) < header_len:
                raise DatasetError(f"{NAME}: {path} is truncated: {len(head)} bytes is shorter than the "
                                   f"{header_len}-byte IDX header")
            header = struct.unpack(header_format, head)
            n, per_item, what_items = item_bytes(header)
            if not 0 <= n <= MAX_ITEMS:
                raise DatasetError(f"{NAME}: {path} is corrupt: its header announces {n} items "
                                   f"(allowed: 0 to {MAX_ITEMS:,})")
            expected = n * per_item
            body = fh.read(expected + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DatasetError(f"{NAME}: {path} is truncated or corrupt: {exc}") from exc
    if len(body) < expected:
        raise DatasetError(f"{NAME}: {path} is truncated: header says {what_items} but the file holds {len(body)}")
    if len(body) > expected:  # not read further: a bomb's size is never measured
        raise DatasetError(f"{NAME}: {path} is corrupt (trailing data): header says {what_items} but the file "
                           f"holds more")
    return header, body


def read_idx_images(path: Path) -> np.ndarray:
    """Images [N, 28, 28] uint8 from an IDX3 file; header, dimensions and exact byte count are checked."""
    def check(header):
        magic, n, rows, cols = header
        if magic != IMAGE_MAGIC:
            raise DatasetError(f"{NAME}: {path} has magic number {magic}, expected {IMAGE_MAGIC} (IDX3 uint8 images)")
        if (rows, cols) != (SIDE, SIDE):
            raise DatasetError(f"{NAME}: {path} holds {rows}x{cols} images, expected {SIDE}x{SIDE}")
        return n, rows * cols, f"{n} images of {rows}x{cols} ({n * rows * cols} bytes)"

    (_, n, rows, cols), body = _read_idx(path, ">iiii", check)
    return np.frombuffer(body, dtype=np.uint8).reshape(n, rows, cols)


def read_idx_labels(path: Path, num_classes: int = 10) -> np.ndarray:
    """Labels [N] int64 from an IDX1 file; header, exact byte count and label range are checked."""
    def check(header):
        magic, n = header
        if magic != LABEL_MAGIC:
            raise DatasetError(f"{NAME}: {path} has magic number {magic}, expected {LABEL_MAGIC} (IDX1 uint8 labels)")
        return n, 1, f"{n} labels"

    _, body = _read_idx(path, ">ii", check)
    labels = np.frombuffer(body, dtype=np.uint8).astype(np.int64)
    if labels.size and labels.max() >= num_classes:
        raise DatasetError(f"{NAME}: {path} has label {labels.max()} outside 0..{num_classes - 1}")
    return labels


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def candidate_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories that may hold the IDX files, in search order."""
    dirs: list[Path] = []
    for root in search_roots(data_dir):
        dirs.extend(root / sub if sub != "." else root for sub in SUBDIRS)
    # System directories hold the files directly; dedupe in case one is also passed explicitly.
    dirs.extend(Path(d) for d in SYSTEM_DIRS if Path(d) not in dirs)
    return dirs


def _read_pair(images_path: Path, labels_path: Path) -> ImageData:
    info = DATASETS[NAME]
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path, info.num_classes)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{NAME}: {images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    return ImageData(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels), info)


def _download(target: Path, split: str) -> tuple[Path, Path]:
    paths = []
    with dl.download_scope(target) as scope:  # on failure: nothing it created stays behind
        for stem in FILES[split]:
            fname = f"{stem}.gz"
            paths.append(scope.add(dl.download_file(DOWNLOAD_BASE + fname, target / fname, md5=DOWNLOAD_MD5[fname])))
    return paths[0], paths[1]


def locate_fashion_mnist(
    split: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[Path, Path]:
    """(images, labels) files of a split: the first directory holding both (raw or .gz), else downloaded."""
    image_stem, label_stem = FILES[split]
    dirs = candidate_dirs(data_dir)
    for directory in dirs:
        images_path, labels_path = _find(directory, image_stem), _find(directory, label_stem)
        if images_path is not None and labels_path is not None:
            return images_path, labels_path

    message = (
        f"{NAME}: {image_stem}[.gz] and {label_stem}[.gz] not found; searched {describe(dirs)}. "
        f"Put the four IDX files from {DOWNLOAD_BASE} into one of these directories "
        f"(choose one with --data-dir or $DATA), or install the Debian package dataset-fashion-mnist"
    )
    if not download:
        raise DatasetError(message + "; download=False, so nothing was fetched")
    target = resolve_data_dir(data_dir) / "fashion-mnist"
    try:
        return _download(target, split)
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetError(message + f"; downloading to {target} failed: {getattr(exc, 'reason', exc)}") from exc


def load_fashion_mnist(
    split: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> ImageData:
    """Read a Fashion-MNIST split from the first directory holding both of its IDX files (raw or .gz)."""
    return _read_pair(*locate_fashion_mnist(split, data_dir, download))


def _idx_header(path: Path, size: int) -> tuple[tuple[int, ...], int]:
    """The first `size` header bytes as big-endian ints and the decompressed length, without reading the data:
    raw files by their size, .gz files by the gzip trailer (ISIZE, the length mod 2**32)."""
    try:
        if path.suffix == ".gz":
            with open_regular(path, NAME) as f, gzip.GzipFile(fileobj=f) as fh:
                raw = fh.read(size)
            with open_regular(path, NAME) as fh:
                fh.seek(-4, os.SEEK_END)
                length = struct.unpack("<I", fh.read(4))[0]
        else:
            with open_regular(path, NAME) as fh:
                raw = fh.read(size)
            length = path.stat().st_size
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DatasetError(f"{NAME}: {path} is truncated or corrupt: {exc}") from exc
    if len(raw) < size:
        raise DatasetError(f"{NAME}: {path} is truncated: {len(raw)} bytes is shorter than the {size}-byte IDX header")
    return struct.unpack(f">{size // 4}i", raw), length


def check_fashion_mnist(data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> None:
    """Make sure both splits' IDX files are there (downloading them as `load_fashion_mnist` would) with
    valid headers, sizes and matching counts, without decoding the images."""
    for split in ("train", "test"):
        images_path, labels_path = locate_fashion_mnist(split, data_dir, download)
        (magic, n, rows, cols), length = _idx_header(images_path, 16)
        if magic != IMAGE_MAGIC or (rows, cols) != (SIDE, SIDE) or (length - 16) % 2**32 != (n * rows * cols) % 2**32:
            read_idx_images(images_path)  # decodes the file and raises the precise error
        (magic, n_labels), length = _idx_header(labels_path, 8)
        if magic != LABEL_MAGIC or (length - 8) % 2**32 != n_labels % 2**32:
            read_idx_labels(labels_path)
        if n != n_labels:
            raise DatasetError(f"{NAME}: {images_path} holds {n} images but {labels_path} holds {n_labels} labels")
