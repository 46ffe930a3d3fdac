"""Datasets (cifar10, cifar100, fashion-mnist, digits, your own images as folder:PATH), on-device augmentation (crop/flip, AutoAugment,
RandAugment) and the device-resident loader.

Data is looked for in: the explicit `data_dir`, then `$DATA`, then `./data` (and, for Fashion-MNIST, also
`/usr/share/datasets/fashion-mnist`); `folder:PATH` is read from PATH (see `vitmoe.data.folder`). Downloads (CIFAR, Fashion-MNIST) go to the first of
explicit / `$DATA` / `./data`.
"""

from __future__ import annotations

import os

from .augment import normalize, random_crop, random_hflip
# The `autoaugment` function stays in its module: re-exporting it here would hide the submodule of that name.
from .autoaugment import CIFAR10_POLICY, OpPlan, apply_plan, autoaugment_plan, randaugment, randaugment_plan
from .info import (
    ALIASES, DATASETS, DatasetError, DatasetInfo, ImageData, builtin_name, canonical_name, check_split, dataset_choices,
    is_folder,
)
from .info import get_info as _builtin_info
from .loader import DeviceLoader, StreamingLoader, make_loader
from .preprocess import Preprocessing
from .sources import resolve_data_dir, search_roots

__all__ = [
    "ALIASES",
    "CIFAR10_POLICY",
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "DeviceLoader",
    "ImageData",
    "StreamingLoader",
    "OpPlan",
    "Preprocessing",
    "apply_plan",
    "autoaugment_plan",
    "builtin_name",
    "canonical_name",
    "check_dataset",
    "dataset_choices",
    "get_info",
    "is_folder",
    "make_loader",
    "load_dataset",
    "normalize",
    "random_crop",
    "randaugment",
    "randaugment_plan",
    "random_hflip",
    "resolve_data_dir",
    "search_roots",
]


def get_info(name: str, **folder_options) -> DatasetInfo:
    """A dataset's `DatasetInfo` by name. For `folder:PATH` the folder is scanned and its cache loaded
    (or built) with `folder_options` (img_size, test_fraction, skip_bad_images, resize, data_dir: see
    `vitmoe.data.folder`)."""
    key = canonical_name(name)
    if is_folder(key):
        from .folder import prepare_folder

        return prepare_folder(key, rescan=False, **folder_options).info
    return _builtin_info(key)


def load_dataset(
    name: str, split: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True, **folder_options
) -> ImageData:
    """Load one split ("train" or "test") of a dataset into memory as uint8 [N, C, H, W] + int64 labels.

    Raises `DatasetError` (a ValueError) for unknown names, missing data (naming the directories searched)
    and truncated/corrupt files (naming the file). `download` only applies to cifar10/100 and fashion-mnist.
    `folder:PATH` datasets take `folder_options` (img_size, test_fraction, skip_bad_images, resize) and come
    memory-mapped from their cache (`vitmoe.data.folder`).
    """
    key = canonical_name(name)
    check_split(split)
    if is_folder(key):
        from .folder import prepare_folder

        return prepare_folder(key, data_dir=data_dir, **folder_options).split(split)
    if key in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        return load_cifar(key, split, data_dir, download)
    if key == "fashion-mnist":
        from .fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(split, data_dir, download)
    from .digits import load_digits

    return load_digits(split)


def check_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
                  **folder_options) -> None:
    """Make sure a dataset can be loaded, cheaply: its files are found (or downloaded / extracted, as
    `load_dataset` would) and their presence, headers and sizes are checked without decoding the data.

    The parent of a multi-process run calls this before starting workers, so a missing or broken dataset
    is one `DatasetError` there instead of the same failure in every worker.
    """
    key = canonical_name(name)
    if is_folder(key):  # scanned and decoded once here, so workers only read the cache
        from .folder import prepare_folder

        prepare_folder(key, data_dir=data_dir, **folder_options)
    elif key in ("cifar10", "cifar100"):
        from .cifar import check_cifar

        check_cifar(key, data_dir, download)
    elif key == "fashion-mnist":
        from .fashion_mnist import check_fashion_mnist

        check_fashion_mnist(data_dir, download)
    # digits ships with scikit-learn: nothing to find.
