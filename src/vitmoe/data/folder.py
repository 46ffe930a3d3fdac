"""Your own images: `folder:PATH` (alias `imagefolder:PATH`).

Layout: `PATH/train/CLASS/*.{png,jpg,jpeg,bmp,webp}` (or `PATH/CLASS/...` without a `train/` folder)
and optionally `PATH/test/CLASS/...` (or `val/`). Without a test folder, a seeded (seed 0, whatever the
run's seed), stratified split puts `round(test_fraction * n)` images of each class in test (at least one
stays in train). Class names are the train folder names, sorted; label = index.

Images are decoded once with Pillow (all-grayscale folders give 1 channel, any colour image makes the
whole dataset RGB; alpha is dropped) and resized (Pillow bilinear, antialiased when shrinking) by the
`resize` policy:

* `stretch` (default): the whole image to `img_size` x `img_size`, the aspect ratio not kept; the
  batches are these images (training: padded random crop and flip). Right for small, square-ish
  images such as CIFAR-like folders.
* `crop`: the shorter side to `stored_side(img_size)` = img_size / 0.875 (256 for 224) and the
  centred square of that side; training batches are random-resized crops of it (Inception's,
  `augment.resized_crop_boxes`) resized to img_size, test batches its centred img_size window: the
  ImageNet recipe ViT/DeiT fine-tune with, so photos are not squashed. (A crop can only see the
  stored square: the ends of the longer side beyond it are not kept.)

The images go into a uint8 cache `PATH/.vitmoe-cache/s{img_size}/` (`crop`: `c{img_size}/`; for a
read-only PATH: under the data directory, see `cache_dir_of`): train.npy, test.npy and their
labels written atomically, then manifest.json. The manifest holds a key of every file's name, class, size and mtime plus the image size, split settings and `skip_bad_images`: an unchanged folder
loads the arrays memory-mapped in well under a second, a changed one is decoded again. Normalisation
statistics come from the training split.

Hostile folders: only regular files are images (a FIFO named `x.png` is refused, or skipped with
`skip_bad_images`, never opened: it would block); an unreadable class folder is an error naming it,
not an empty class; a folder of one class trains with a warning (its accuracy is 100 % by
construction). The cache is never trusted further than it is checked: a `.vitmoe-cache` (or its
`s{N}` folder, or a file in it) that is a link is refused, and every manifest field's type, the
arrays' shapes, dtypes and label range and the class names in order are checked when read back (a
cache that fails is rebuilt). Arrays are written through memory maps whose blocks are reserved
first (`posix_fallocate`), so a full disk is one DiskFullError that leaves no temporary file behind,
never a SIGBUS.

**One builder.** The ranks of a multi-process run start on the same folder at once (torchrun starts
them together; on a shared filesystem, every node's too). A cache is built under an exclusive flock
on `s{img_size}.lock` beside it (removed when the build ends): the first process builds, the others
wait for it (saying whom they wait for) and then read what it wrote. flock is dropped when its holder dies however it dies, so a
crashed build never blocks the next one, which starts over (the crashed one wrote no manifest) and
removes the crashed one's temporary files. The manifest names the process that built it (`built_by`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import socket
import stat
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..fileio import DiskFullError, atomic_write, atomic_write_text, disk_full_message, kind_of
from ..readers import MAX_CONFIG_BYTES, load_json, open_regular
from .info import DatasetError, DatasetInfo, ImageData, folder_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_IMG_SIZE = 32
RESIZE_POLICIES = ("stretch", "crop")
"""How a file becomes a square (module docstring): `stretch` resizes the whole image, aspect ratio not
kept (transformers' ViTImageProcessor); `crop` resizes the shorter side and keeps the centred square
(transformers' processors with `size: {shortest_edge}`, torchvision's Resize(int) + CenterCrop)."""
MAX_CROP_ASPECT = 64
"""`crop` policy: images longer than this many times their width (or wider than tall) are refused
(or skipped with skip_bad_images): a 100000x1 image would otherwise be resized to 25.6M x 256."""
CROP_FRACTION = 0.875
"""`crop` policy: the evaluation window's share of the shorter side (224 of 256, ImageNet's)."""


def stored_side(img_size: int, resize: str) -> int:
    """The side a folder's images are cached at: img_size for `stretch`, img_size / CROP_FRACTION
    rounded for `crop` (224 -> 256, 32 -> 37)."""
    return int(round(img_size / CROP_FRACTION)) if resize == "crop" else img_size
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
    special: list[str] | None = None  # image names that are not regular files (FIFOs, devices), with skip_bad


def list_images(folder: Path, where: str | None = None) -> list[Path]:
    """The image files under `folder` (by extension, IMAGE_EXTS), recursively, sorted; hidden files and
    folders (a `.vitmoe-cache`) skipped. A folder that cannot be listed is a DatasetError (os.walk would
    skip it, and a class would look empty); `where` names the dataset in it."""
    def fail(e: OSError) -> None:
        raise DatasetError(f"{where or 'images'}: cannot read folder {e.filename}: {e.strerror}") from None

    out = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    return sorted(out)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def scan_folder(root: Path, skip_bad: bool = False) -> FolderScan:
    """List the images (names, sizes, mtimes; nothing decoded) and check the layout. An image name
    that is not a regular file (a FIFO, a device) is an error, or with `skip_bad` listed in `special`."""
    where = f"folder dataset {root}"
    if not root.is_dir():
        raise DatasetError(f"{where}: {'not a directory' if root.exists() else 'does not exist'} "
                           f"(expected {root}/train/CLASS/*.png|jpg|jpeg|bmp|webp)")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if train_dir == root and test_dir is not None:
        raise DatasetError(f"{where}: has {test_dir.name}/ but no train/ folder (expected {root}/train/CLASS/*)")
    try:
        class_dirs = _class_dirs(train_dir)
    except OSError as e:
        raise DatasetError(f"{where}: cannot read folder {train_dir}: {e.strerror}") from None
    if not class_dirs:
        raise DatasetError(f"{where}: no images: no class folders in {train_dir} "
                           f"(expected {train_dir}/CLASS/*.png|jpg|jpeg|bmp|webp)")
    classes = [d.name for d in class_dirs]
    files: list[tuple[str, int, str | None, int, int]] = []
    special: list[str] = []

    def add(folder: Path, label: int, split: str | None) -> None:
        found = list_images(folder, where)
        if not found:
            raise DatasetError(f"{where}: class folder {folder} holds no images ({', '.join(IMAGE_EXTS)})")
        for p in found:
            try:
                st = p.stat()
            except OSError as e:
                raise DatasetError(f"{where}: cannot read {p}: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):  # opening a FIFO would block until someone writes to it
                if not skip_bad:
                    raise DatasetError(f"{where}: {p} is {kind_of(st.st_mode)}, not an image file (remove it, or "
                                       "pass --skip-bad-images)")
                special.append(p.relative_to(root).as_posix())
                continue
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
    return FolderScan(root, classes, files, test_dir is not None, special)


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


def decode_image(path: Path, img_size: int, gray: bool, resize: str = "stretch", window: int | None = None) -> np.ndarray:
    """One image as uint8 [C, img_size, img_size] (Pillow: convert, then antialiased bilinear resize):
    `stretch` resizes the whole image; `crop` resizes the shorter side to img_size (the longer to
    int(img_size * long / short), as transformers' processors compute it) and keeps a centred square.
    `window`: the side of the centred crop that will be taken from the square later; the square is
    placed so that this window is the resized image's own centred one (one-step centre crops, as in
    transformers and torchvision, put it (L - window) // 2 from the edge, which a centred square's
    centred window misses by a pixel when img_size - window is odd)."""
    from PIL import Image

    with open_regular(path, "image") as f, Image.open(f) as im:  # a file swapped for a FIFO never blocks
        if im.mode.startswith("I") or im.mode == "F":
            # 16/32-bit and float images: Pillow's convert to 8 bits clips at 255 instead of scaling.
            im = _to_8bit(im)
        im = im.convert("L" if gray else "RGB")
        if resize == "crop":
            w, h = im.size
            size = (img_size, int(img_size * h / w)) if w <= h else (int(img_size * w / h), img_size)
            if max(size) > MAX_CROP_ASPECT * img_size:  # the resize would hold long x img_size pixels
                raise ValueError(f"{w}x{h} pixels: an aspect ratio beyond {MAX_CROP_ASPECT}:1, which the crop "
                                 f"policy would resize to {size[0]}x{size[1]} before cutting its centre")
            im = im.resize(size, Image.Resampling.BILINEAR)
            c = window or img_size
            left, top = ((n - c) // 2 - (img_size - c) // 2 for n in size)
            im = im.crop((left, top, left + img_size, top + img_size))
        else:
            im = im.resize((img_size, img_size), Image.Resampling.BILINEAR)
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

    with open_regular(path, "image") as f, Image.open(f) as im:
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


def _key(scan: FolderScan, img_size: int, test_fraction: float, skip_bad: bool, resize: str) -> str:
    spec = {"version": CACHE_VERSION, "img_size": img_size, **({"resize": resize} if resize != "stretch" else {}),
            "files": scan.files, "classes": scan.classes,
            "test_fraction": None if scan.has_test else float(test_fraction), "split_seed": SPLIT_SEED,
            "skip_bad_images": bool(skip_bad), **({"special": scan.special} if scan.special else {})}
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


CACHE_FILES = ("manifest.json", "train.npy", "test.npy", "train-labels.npy", "test-labels.npy")


def _check_cache_dir(cache: Path, base: Path) -> None:
    """Refuse a cache reached through a link (`base`, every folder below it down to `cache`, and the
    cache's files): vitmoe deletes and rewrites files there, which must never be somewhere else."""
    below = cache.relative_to(base).parts
    parts = [base] + [base.joinpath(*below[:i + 1]) for i in range(len(below))]
    for p in parts + [cache / f for f in CACHE_FILES]:
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise DatasetError(f"image cache {p} cannot be used: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise DatasetError(f"image cache {p} is a symbolic link: vitmoe writes and deletes files in its cache, "
                               "so it never follows one there; remove the link")
        wanted = stat.S_ISDIR if p in parts else stat.S_ISREG
        if not wanted(st.st_mode):
            raise DatasetError(f"image cache {p} is {kind_of(st.st_mode)}, not the "
                               f"{'folder' if p in parts else 'file'} vitmoe writes there; remove it")


def _remove_stale_temps(cache: Path) -> None:
    """Temporary files of builds whose process is gone (killed, or a disk that filled before this
    version reserved its blocks): they would keep the disk full."""
    for p in cache.glob(".*"):
        fields = p.name.split(".")
        pid = next((int(f) for f in fields[2:] if f.isdigit()), None)
        if pid is None or not (p.name.startswith(".all.") or p.name.endswith(".tmp")) or not p.is_file():
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid() or p.name.startswith(".all.")  # our own leftovers are stale too
        except ProcessLookupError:
            alive = False
        except PermissionError:  # another user's live process
            alive = True
        if not alive:
            p.unlink(missing_ok=True)


def _reserved_array(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """A new uint8 .npy file mapped for writing, its disk blocks reserved before the first write: a
    write through a map onto a full disk kills the process with SIGBUS, a reservation that fails is
    an ENOSPC OSError here (the caller removes the file)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            os.posix_fallocate(f.fileno(), 0, size)  # glibc writes zeros where the filesystem cannot reserve
    return arr


def _build(scan: FolderScan, img_size: int, test_fraction: float, skip_bad: bool, cache: Path, key: str,
           resize: str = "stretch", window: int | None = None) -> dict:
    """Decode the folder into `cache` at side `img_size` (the stored side) with the `resize` policy
    (`window`: the evaluation crop's side, see decode_image)."""
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
    _remove_stale_temps(cache)
    # no manifest while the arrays are rewritten: an interrupted build is never taken for an older valid one
    (cache / "manifest.json").unlink(missing_ok=True)
    all_path = cache / f".all.{os.getpid()}.npy"
    shape = (len(paths), chans, img_size, img_size)
    needed = 2 * math.prod(shape)  # the decoded images, then the same again split into train and test
    arr = None
    try:
        arr = _reserved_array(all_path, shape)
        for i, p in enumerate(tqdm(paths, desc=f"decoding {root.name}", unit="img", disable=None, leave=False)):
            if i in bad:
                continue
            try:
                arr[i] = decode_image(p, img_size, gray, resize, window)
            except Exception as e:  # noqa: BLE001
                if not skip_bad:
                    raise _bad(where, p, e) from None
                bad.add(i)
        good = np.array([i for i in range(len(paths)) if i not in bad], dtype=np.int64)
        if good.size == 0:
            raise DatasetError(f"{where}: no readable images ({len(bad) + len(scan.special or [])} skipped)")
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
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(disk_full_message(f"the image cache of {root}", cache, needed), cache) from None
        raise
    finally:
        del arr
        all_path.unlink(missing_ok=True)
    skipped = sorted([scan.files[i][0] for i in bad] + list(scan.special or []))
    manifest = {"key": key, "version": CACHE_VERSION, "root": str(root), "img_size": img_size, "resize": resize,
                "in_chans": chans,
                "classes": scan.classes, "mean": mean, "std": std, "skipped": skipped,
                "train": int(train_idx.size), "test": int(test_idx.size), "built_by": _me()}
    atomic_write_text(cache / "manifest.json", json.dumps(manifest, indent=1))  # last: the cache is now valid
    return manifest


def _write_split(cache: Path, split: str, arr: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> None:
    def write_images(tmp: str) -> None:
        out = _reserved_array(tmp, (len(rows),) + arr.shape[1:])
        for s in range(0, len(rows), _CHUNK):
            out[s:s + _CHUNK] = arr[rows[s:s + _CHUNK]]
        out.flush()
        del out

    atomic_write(cache / f"{split}.npy", write_images, size=int(len(rows) * np.prod(arr.shape[1:])))

    def write_labels(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, labels)

    atomic_write(cache / f"{split}-labels.npy", write_labels)


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


@contextlib.contextmanager
def _build_lock(cache: Path):
    """Held while `cache` is checked and built: one builder, the others wait (module docstring). The lock
    file is removed when the build ends, so nothing is left beside the cache; a waiter that then holds
    a removed file opens the name again (as vitmoe.rundir's RunLock does)."""
    path = cache.parent / f"{cache.name}.lock"
    said = False
    while True:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise DatasetError(f"cannot create the image cache lock {path}: {e.strerror} (choose another place "
                               f"with --data-dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not said:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
                print(f"vitmoe: waiting for {holder} to build the image cache {cache}", file=sys.stderr, flush=True)
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # the builder we waited for removed this file: take the name's current one
    try:
        with contextlib.suppress(OSError):  # who builds, for those who wait (the lock holds without it)
            me = _me()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {me['pid']} on {me['host']}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still held: a process that opened it finds it removed and opens the name again
        os.close(fd)  # drops the lock


def _finite_list(v, n: int, positive: bool = False) -> bool:
    return (isinstance(v, list) and len(v) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
        for x in v))


def _read_manifest(cache: Path, key: str, scan: FolderScan | None = None, img_size: int | None = None) -> dict | None:
    """The cache's manifest if the cache is valid for `key` (and the folder `scan` at `img_size`), else
    None (it is rebuilt). Everything read back is checked: the manifest's field types, the class names
    in order, every array's dtype, shape, length and label range; files must be regular files."""
    try:
        manifest = load_json(cache / "manifest.json", "image cache manifest", MAX_CONFIG_BYTES * 64)
    except (OSError, ValueError):  # PathError included: a broken manifest means a rebuild
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None
    chans, classes = manifest.get("in_chans"), manifest.get("classes")
    counts = [manifest.get(split) for split in ("train", "test")]
    ok = (manifest.get("version") == CACHE_VERSION and chans in (1, 3)
          and (img_size is None or manifest.get("img_size") == img_size)
          and isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
          and (scan is None or classes == scan.classes)
          and _finite_list(manifest.get("mean"), chans if chans in (1, 3) else -1)
          and _finite_list(manifest.get("std"), chans if chans in (1, 3) else -1, positive=True)
          and isinstance(manifest.get("skipped"), list) and all(isinstance(x, str) for x in manifest["skipped"])
          and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts))
    if not ok:
        return None
    side = manifest.get("img_size")
    try:
        for split, n in zip(("train", "test"), counts):
            for part in ("", "-labels"):
                if not stat.S_ISREG(os.lstat(cache / f"{split}{part}.npy").st_mode):
                    return None
            images = np.load(cache / f"{split}.npy", mmap_mode="r")  # never pickles (allow_pickle=False)
            labels = np.load(cache / f"{split}-labels.npy", mmap_mode="r")
            if images.dtype != np.uint8 or images.shape != (n, chans, side, side):
                return None
            if labels.dtype.kind not in "iu" or labels.shape != (n,):
                return None
            if n and not (0 <= int(labels.min()) and int(labels.max()) < len(classes)):
                return None
    except (OSError, ValueError, TypeError):
        return None
    return manifest


def _writable(folder: Path) -> bool:
    """Whether the cache can live in `folder` (an existing cache there, or a folder we may write to)."""
    cache = folder / CACHE_DIR
    if os.path.islink(cache):  # refused when used (_check_cache_dir), never written through
        return True
    try:
        cache.mkdir(exist_ok=True)
    except OSError:  # read-only folder or filesystem
        return False
    return os.access(cache, os.W_OK)


def cache_dir_of(root: Path, img_size: int, data_dir: str | os.PathLike[str] | None = None,
                 resize: str = "stretch") -> Path:
    """`PATH/.vitmoe-cache/s{img_size}` (`crop`: `c{img_size}`), or, when PATH cannot be written, a folder of its own under the
    data directory (`--data-dir`, `$DATA`, `./data`): `folder-cache/NAME-HASH/s{img_size}`. A cache
    reached through a symbolic link is refused (DatasetError)."""
    if _writable(root):
        cache = root / CACHE_DIR / f"{resize[0]}{img_size}"
        _check_cache_dir(cache, root / CACHE_DIR)
        return cache
    from .sources import resolve_data_dir

    tag = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    base = resolve_data_dir(data_dir) / "folder-cache"
    cache = base / f"{root.name or 'root'}-{tag}" / f"{resize[0]}{img_size}"
    _check_cache_dir(cache, base)
    return cache


_MEMO: dict[tuple, tuple[str, FolderData]] = {}


def prepare_folder(name: str, img_size: int | None = None, test_fraction: float | None = None,
                   skip_bad_images: bool = False, rescan: bool = True,
                   data_dir: str | os.PathLike[str] | None = None, resize: str | None = None) -> FolderData:
    """Scan the folder, load its cache (or decode and write it) and return both splits and the info.
    `resize`: RESIZE_POLICIES (None: stretch), see the module docstring.

    `rescan=False` returns this process's last result for the same options without listing the folder
    again (for metadata lookups); loading for training rescans, so a changed folder is never missed."""
    root = Path(os.path.abspath(folder_path(name)))
    img_size = DEFAULT_IMG_SIZE if img_size is None else int(img_size)
    test_fraction = DEFAULT_TEST_FRACTION if test_fraction is None else float(test_fraction)
    resize = resize or "stretch"
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"folder resize must be one of {', '.join(RESIZE_POLICIES)}, got {resize!r}")
    side = stored_side(img_size, resize)
    opts = (str(root), img_size, test_fraction, bool(skip_bad_images), resize)
    if not rescan and opts in _MEMO:
        return _MEMO[opts][1]
    scan = scan_folder(root, skip_bad_images)
    key = _key(scan, img_size, test_fraction, skip_bad_images, resize)
    if opts in _MEMO and _MEMO[opts][0] == key:
        return _MEMO[opts][1]
    cache = cache_dir_of(root, img_size, data_dir, resize)
    manifest = _read_manifest(cache, key, scan, side)
    if manifest is None:
        with _build_lock(cache):
            manifest = _read_manifest(cache, key, scan, side)  # built meanwhile by the one we waited for
            if manifest is None:
                try:
                    manifest = _build(scan, side, test_fraction, skip_bad_images, cache, key, resize, img_size)
                except PermissionError as e:
                    raise DatasetError(f"folder dataset {root}: cannot write the image cache {cache}: {e.strerror} "
                                       f"(choose another place with --data-dir)") from None
    if manifest["skipped"]:
        warnings.warn(f"folder dataset {root}: skipped {len(manifest['skipped'])} unreadable image(s) "
                      f"(--skip-bad-images), e.g. {manifest['skipped'][0]}", stacklevel=2)
    if len(manifest["classes"]) == 1:
        warnings.warn(f"folder dataset {root} has one class ({manifest['classes'][0]}): every prediction is that "
                      "class, so test accuracy is 100 % whatever the model learns; add a folder per class",
                      stacklevel=2)
    info = DatasetInfo(name=f"folder:{root}", num_classes=len(manifest["classes"]), in_chans=manifest["in_chans"],
                       img_size=img_size, mean=tuple(manifest["mean"]), std=tuple(manifest["std"]),
                       crop_padding=max(1, img_size // 8), hflip=True, classes=list(manifest["classes"]),
                       stored_size=side if resize == "crop" else None, train_images=int(manifest["train"]))
    splits = {}
    for split in ("train", "test"):
        # copy-on-write map: writable for torch without touching the file, pages read on demand
        images = torch.from_numpy(np.load(cache / f"{split}.npy", mmap_mode="c"))
        labels = torch.from_numpy(np.load(cache / f"{split}-labels.npy").astype(np.int64))
        splits[split] = ImageData(images, labels, info)
    data = FolderData(info, splits["train"], splits["test"], list(manifest["skipped"]), cache)
    _MEMO[opts] = (key, data)
    return data
