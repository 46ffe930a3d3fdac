"""Your own images: `folder:PATH` (alias `imagefolder:PATH`).

Layout: `PATH/train/CLASS/*.{png,jpg,jpeg,bmp,webp}` (or `PATH/CLASS/...` without a `train/` folder)
and optionally `PATH/test/CLASS/...` (or `val/`). Without a test folder, a seeded (seed 0, whatever the
run's seed), stratified split puts `round(test_fraction * n)` images of each class in test (at least one
stays in train). Class names are the train folder names, sorted; label = index.

Images are decoded once with Pillow (all-grayscale folders give 1 channel, any colour image makes the
whole dataset RGB; alpha is dropped), resized to `img_size` x `img_size` (Pillow bilinear, antialiased
when shrinking; the aspect ratio is not kept) into a uint8 cache `PATH/.vitmoe-cache/s{img_size}/`
(for a read-only PATH: under the data directory, see `cache_dir_of`): train.npy, test.npy and their
labels written atomically, then manifest.json. The manifest holds a key of every file's name, class, size and mtime plus the image size, split settings and `skip_bad_images`: an unchanged folder
loads the arrays memory-mapped in well under a second, a changed one is decoded again. Normalisation
statistics come from the training split.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write, atomic_write_text
from .info import DatasetError, DatasetInfo, ImageData, folder_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_IMG_SIZE = 32
DEFAULT_TEST_FRACTION = 0.2
SPLIT_SEED = 0
CACHE_DIR = ".vitmoe-cache"
CACHE_VERSION = 1
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_CHUNK = 4096  # images per chunk when copying / computing statistics


@dataclass
class FolderScan:
    root: Path
    classes: list[str]
    files: list[tuple[str, int, str | None, int, int]]  # (path relative to root, label, split or None, size, mtime_ns)
    has_test: bool


def list_images(folder: Path) -> list[Path]:
    """The image files under `folder` (by extension, IMAGE_EXTS), recursively, sorted; hidden files and
    folders (a `.vitmoe-cache`) skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    return sorted(out)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def scan_folder(root: Path) -> FolderScan:
    """List the images (names, sizes, mtimes; nothing decoded) and check the layout."""
    where = f"folder dataset {root}"
    if not root.is_dir():
        raise DatasetError(f"{where}: {'not a directory' if root.exists() else 'does not exist'} "
                           f"(expected {root}/train/CLASS/*.png|jpg|jpeg|bmp|webp)")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if train_dir == root and test_dir is not None:
        raise DatasetError(f"{where}: has {test_dir.name}/ but no train/ folder (expected {root}/train/CLASS/*)")
    class_dirs = _class_dirs(train_dir)
    if not class_dirs:
        raise DatasetError(f"{where}: no images: no class folders in {train_dir} "
                           f"(expected {train_dir}/CLASS/*.png|jpg|jpeg|bmp|webp)")
    classes = [d.name for d in class_dirs]
    files: list[tuple[str, int, str | None, int, int]] = []

    def add(folder: Path, label: int, split: str | None) -> None:
        found = list_images(folder)
        if not found:
            raise DatasetError(f"{where}: class folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
        for p in found:
            try:
                st = p.stat()
            except OSError as e:
                raise DatasetError(f"{where}: cannot read {p}: {e.strerror}") from None
            files.append((p.relative_to(root).as_posix(), label, split, int(st.st_size), int(st.st_mtime_ns)))

    for label, d in enumerate(class_dirs):
        add(d, label, "train" if test_dir is not None else None)
    if test_dir is not None:
        test_dirs = _class_dirs(test_dir)
        if not test_dirs:
            raise DatasetError(f"{where}: no images: no class folders in {test_dir}")
        for d in test_dirs:
            if d.name not in classes:
                raise DatasetError(f"{where}: test class folder {d} is not a training class "
                                   f"(classes in {train_dir}: {', '.join(classes)})")
            add(d, classes.index(d.name), "test")
    return FolderScan(root, classes, files, test_dir is not None)


def split_indices(labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: within each class a shuffle puts round(fraction * n_c) (at most n_c - 1)
    in test. Sorted indices (train, test)."""
    gen = torch.Generator().manual_seed(seed)
    test: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        perm = torch.randperm(len(members), generator=gen).numpy()
        k = min(int(round(test_fraction * len(members))), len(members) - 1)
        test.append(members[perm[:k]])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels)), test_idx).astype(np.int64), test_idx


def decode_image(path: Path, img_size: int, gray: bool) -> np.ndarray:
    """One image as uint8 [C, img_size, img_size] (Pillow: convert, then antialiased bilinear resize)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode.startswith("I") or im.mode == "F":
            # 16/32-bit and float images: Pillow's convert to 8 bits clips at 255 instead of scaling.
            im = _to_8bit(im)
        im = im.convert("L" if gray else "RGB").resize((img_size, img_size), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if gray else a.transpose(2, 0, 1)


def _to_8bit(im):
    """An "I;16*", "I" or "F" image as 8-bit "L": 16-bit ranges scaled by 255/65535, floats in [0, 1]
    by 255 (other float ranges clipped to [0, 255])."""
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        a = a * 255.0 if a.size and a.min() >= 0 and a.max() <= 1 else a
    else:
        a = a / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _image_mode(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return im.mode


@dataclass
class FolderData:
    info: DatasetInfo
    train: ImageData
    test: ImageData
    skipped: list[str]
    cache_dir: Path

    def split(self, split: str) -> ImageData:
        return self.train if split == "train" else self.test


def _key(scan: FolderScan, img_size: int, test_fraction: float, skip_bad: bool) -> str:
    spec = {"version": CACHE_VERSION, "img_size": img_size, "files": scan.files, "classes": scan.classes,
            "test_fraction": None if scan.has_test else float(test_fraction), "split_seed": SPLIT_SEED,
            "skip_bad_images": bool(skip_bad)}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def _stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    c = images.shape[1]
    total, sq, n = np.zeros(c), np.zeros(c), 0
    for s in range(0, len(images), _CHUNK):
        x = np.asarray(images[s:s + _CHUNK], dtype=np.float64) / 255.0
        total += x.sum(axis=(0, 2, 3))
        sq += (x * x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean * mean, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) if s > 1e-6 else 1.0 for s in std]


def _bad(where: str, path: Path, exc: BaseException) -> DatasetError:
    text = " ".join(str(exc).split())  # one line, whatever the decoder wrote
    return DatasetError(f"{where}: cannot read image {path}: {type(exc).__name__}: {text} "
                        f"(fix or remove it, or pass --skip-bad-images)")


def _build(scan: FolderScan, img_size: int, test_fraction: float, skip_bad: bool, cache: Path, key: str) -> dict:
    from tqdm import tqdm

    root, where = scan.root, f"folder dataset {scan.root}"
    paths = [root / f[0] for f in scan.files]
    bad: set[int] = set()
    gray = True
    for i, p in enumerate(paths):
        try:
            gray = gray and _image_mode(p) in GRAY_MODES
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken file
            if not skip_bad:
                raise _bad(where, p, e) from None
            bad.add(i)
    chans = 1 if gray else 3
    cache.mkdir(parents=True, exist_ok=True)
    # no manifest while the arrays are rewritten: an interrupted build is never taken for an older valid one
    (cache / "manifest.json").unlink(missing_ok=True)
    all_path = cache / f".all.{os.getpid()}.npy"
    arr = np.lib.format.open_memmap(all_path, mode="w+", dtype=np.uint8, shape=(len(paths), chans, img_size, img_size))
    try:
        for i, p in enumerate(tqdm(paths, desc=f"decoding {root.name}", unit="img", disable=None, leave=False)):
            if i in bad:
                continue
            try:
                arr[i] = decode_image(p, img_size, gray)
            except Exception as e:  # noqa: BLE001
                if not skip_bad:
                    raise _bad(where, p, e) from None
                bad.add(i)
        good = np.array([i for i in range(len(paths)) if i not in bad], dtype=np.int64)
        if good.size == 0:
            raise DatasetError(f"{where}: no readable images ({len(bad)} skipped)")
        labels = np.array([scan.files[i][1] for i in good], dtype=np.int64)
        if scan.has_test:
            is_test = np.array([scan.files[i][2] == "test" for i in good])
            train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        else:
            train_idx, test_idx = split_indices(labels, test_fraction)
        for what, idx in (("train", train_idx), ("test", test_idx)):
            if idx.size == 0:
                raise DatasetError(f"{where}: no {what} images (test_fraction {test_fraction:g}; "
                                   f"{len(good)} readable images)")
            missing = sorted(set(range(len(scan.classes))) - set(labels[idx].tolist()))
            if what == "train" and missing:
                raise DatasetError(f"{where}: class {scan.classes[missing[0]]!r} has no readable training images")
            _write_split(cache, what, arr, good[idx], labels[idx])
        mean, std = _stats(np.load(cache / "train.npy", mmap_mode="r"))
    finally:
        del arr
        all_path.unlink(missing_ok=True)
    manifest = {"key": key, "version": CACHE_VERSION, "root": str(root), "img_size": img_size, "in_chans": chans,
                "classes": scan.classes, "mean": mean, "std": std, "skipped": [scan.files[i][0] for i in sorted(bad)],
                "train": int(train_idx.size), "test": int(test_idx.size)}
    atomic_write_text(cache / "manifest.json", json.dumps(manifest, indent=1))  # last: the cache is now valid
    return manifest


def _write_split(cache: Path, split: str, arr: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> None:
    def write_images(tmp: str) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows),) + arr.shape[1:])
        for s in range(0, len(rows), _CHUNK):
            out[s:s + _CHUNK] = arr[rows[s:s + _CHUNK]]
        out.flush()
        del out

    atomic_write(cache / f"{split}.npy", write_images, size=int(len(rows) * np.prod(arr.shape[1:])))
    def write_labels(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, labels)

    atomic_write(cache / f"{split}-labels.npy", write_labels)


def _read_manifest(cache: Path, key: str) -> dict | None:
    try:
        manifest = json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and manifest.get("key") == key and all(
        (cache / f).is_file() for f in ("train.npy", "test.npy", "train-labels.npy", "test-labels.npy"))
    if ok:  # another build with other options may have rewritten the arrays since: counts must agree
        try:
            ok = all(len(np.load(cache / f"{split}{part}.npy", mmap_mode="r")) == manifest.get(split)
                     for split in ("train", "test") for part in ("", "-labels"))
        except (OSError, ValueError):
            ok = False
    return manifest if ok else None


def _writable(folder: Path) -> bool:
    """Whether the cache can live in `folder` (an existing cache there, or a folder we may write to)."""
    try:
        (folder / CACHE_DIR).mkdir(exist_ok=True)
    except OSError:  # read-only folder or filesystem
        return False
    return os.access(folder / CACHE_DIR, os.W_OK)


def cache_dir_of(root: Path, img_size: int, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """`PATH/.vitmoe-cache/s{img_size}`, or, when PATH cannot be written, a folder of its own under the
    data directory (`--data-dir`, `$DATA`, `./data`): `folder-cache/NAME-HASH/s{img_size}`."""
    if _writable(root):
        return root / CACHE_DIR / f"s{img_size}"
    from .sources import resolve_data_dir

    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return resolve_data_dir(data_dir) / "folder-cache" / f"{root.name or 'root'}-{tag}" / f"s{img_size}"


_MEMO: dict[tuple, tuple[str, FolderData]] = {}


def prepare_folder(name: str, img_size: int | None = None, test_fraction: float | None = None,
                   skip_bad_images: bool = False, rescan: bool = True,
                   data_dir: str | os.PathLike[str] | None = None) -> FolderData:
    """Scan the folder, load its cache (or decode and write it) and return both splits and the info.

    `rescan=False` returns this process's last result for the same options without listing the folder
    again (for metadata lookups); loading for training rescans, so a changed folder is never missed."""
    root = Path(os.path.abspath(folder_path(name)))
    img_size = DEFAULT_IMG_SIZE if img_size is None else int(img_size)
    test_fraction = DEFAULT_TEST_FRACTION if test_fraction is None else float(test_fraction)
    opts = (str(root), img_size, test_fraction, bool(skip_bad_images))
    if not rescan and opts in _MEMO:
        return _MEMO[opts][1]
    scan = scan_folder(root)
    key = _key(scan, img_size, test_fraction, skip_bad_images)
    if opts in _MEMO and _MEMO[opts][0] == key:
        return _MEMO[opts][1]
    cache = cache_dir_of(root, img_size, data_dir)
    manifest = _read_manifest(cache, key)
    if manifest is None:
        try:
            manifest = _build(scan, img_size, test_fraction, skip_bad_images, cache, key)
        except PermissionError as e:
            raise DatasetError(f"folder dataset {root}: cannot write the image cache {cache}: {e.strerror} "
                               f"(choose another place with --data-dir)") from None
    if manifest["skipped"]:
        warnings.warn(f"folder dataset {root}: skipped {len(manifest['skipped'])} unreadable image(s) "
                      f"(--skip-bad-images), e.g. {manifest['skipped'][0]}", stacklevel=2)
    info = DatasetInfo(name=f"folder:{root}", num_classes=len(manifest["classes"]), in_chans=manifest["in_chans"],
                       img_size=img_size, mean=tuple(manifest["mean"]), std=tuple(manifest["std"]),
                       crop_padding=max(1, img_size // 8), hflip=True, classes=list(manifest["classes"]))
    splits = {}
    for split in ("train", "test"):
        # copy-on-write map: writable for torch without touching the file, pages read on demand
        images = torch.from_numpy(np.load(cache / f"{split}.npy", mmap_mode="c"))
        labels = torch.from_numpy(np.load(cache / f"{split}-labels.npy").astype(np.int64))
        splits[split] = ImageData(images, labels, info)
    data = FolderData(info, splits["train"], splits["test"], list(manifest["skipped"]), cache)
    _MEMO[opts] = (key, data)
    return data
