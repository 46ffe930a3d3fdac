"""The dataset registry (`DATASETS` by canonical name, their `ALIASES`, `canonical_name`,
`builtin_name`, `dataset_choices`), dataset metadata (`DatasetInfo`), the in-memory split
(`ImageData`) and `DatasetError`. Every place that names, parses or lists datasets (the config
checks, the command-line flags, the report table) reads it from here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset is missing, truncated or corrupt; the message names the file or the directories searched."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: shape, normalisation statistics and augmentation policy."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]
    crop_padding: int  # zero padding of the random crop (0 = no crop)
    hflip: bool  # whether horizontal flips preserve the label
    classes: list[str] = field(default_factory=list)
    stored_size: int | None = None
    """Side of the stored images when they are larger than `img_size` (a folder cached with
    `folder_resize: crop`): every batch is an img_size crop of them, random-resized in training
    (`augment.resized_crop_boxes`, which replaces the padded crop), centred otherwise."""

    train_images: int | None = None
    """Images in the training split, where known before loading it (folders: from the cache)."""

    @property
    def stored_side(self) -> int:
        """The side of the images as held in an ImageData split."""
        return self.stored_size or self.img_size

    def __post_init__(self) -> None:
        if self.stored_size is not None and self.stored_size < self.img_size:
            raise ValueError(f"{self.name}: stored_size {self.stored_size} is smaller than img_size {self.img_size}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({self.in_chans})")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")


@dataclass
class ImageData:
    """One split held entirely in memory: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        info = self.info
        expected = (info.in_chans, info.stored_side, info.stored_side)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or tuple(self.images.shape[1:]) != expected:
            raise ValueError(
                f"{info.name}: images must be uint8 [N, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {self.images.dtype} {list(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{info.name}: labels must be int64 [{self.images.shape[0]}], "
                f"got {self.labels.dtype} {list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# `fine_label_names` of cifar-100-python/meta (alphabetical, index = label).
CIFAR100_CLASSES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split()

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        name="cifar10", num_classes=10, in_chans=3, img_size=32,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        crop_padding=4, hflip=True, classes=CIFAR10_CLASSES,
    ),
    "cifar100": DatasetInfo(
        name="cifar100", num_classes=100, in_chans=3, img_size=32,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        crop_padding=4, hflip=True, classes=CIFAR100_CLASSES,
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist", num_classes=10, in_chans=1, img_size=28,
        mean=(0.2860,), std=(0.3530,),
        crop_padding=2, hflip=True, classes=FASHION_MNIST_CLASSES,
    ),
    # Statistics of the fixed digits train split (pinned by a test). No flips: a mirrored 2, 3, 7... is not a digit.
    "digits": DatasetInfo(
        name="digits", num_classes=10, in_chans=1, img_size=8,
        mean=(0.3060,), std=(0.3763,),
        crop_padding=1, hflip=False, classes=[str(i) for i in range(10)],
    ),
}


ALIASES: dict[str, str] = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}
"""Other spellings of the built-in datasets, matched after lower-casing and '_' -> '-' (so
fashion_mnist, FashionMNIST and CIFAR_10 are accepted too)."""


def builtin_name(name: str) -> str | None:
    """The `DATASETS` key that `name` spells (case-insensitive, '_' for '-', `ALIASES`), or None."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    return key if key in DATASETS else None


def dataset_choices(sep: str = ", ") -> str:
    """The accepted dataset names, for messages and --help: every built-in one, then folder:PATH."""
    return sep.join([*DATASETS, "folder:PATH"])


def is_folder(name: str) -> bool:
    """Whether `name` is a `folder:PATH` dataset (your own images)."""
    return folder_path(name) is not None


def get_info(name: str) -> DatasetInfo:
    """Look up a built-in dataset by name (case-insensitive, '_' accepted for '-'); unknown names list the
    allowed ones. `vitmoe.data.get_info` also takes `folder:PATH`."""
    key = canonical_name(name)
    if key not in DATASETS:
        raise DatasetError(f"{name}: a folder dataset has no fixed info; use vitmoe.data.get_info")
    return DATASETS[key]


FOLDER_PREFIXES = ("folder:", "imagefolder:")


def folder_path(name: str) -> Path | None:
    """The folder of a `folder:PATH` / `imagefolder:PATH` dataset name (None for other names)."""
    text = str(name).strip()
    for prefix in FOLDER_PREFIXES:
        if text.lower().startswith(prefix):
            rest = text[len(prefix):].strip()
            if not rest:
                raise DatasetError(f"dataset {name!r}: give the folder, e.g. folder:/data/my-images")
            return Path(rest).expanduser()
    return None


def canonical_name(name: str) -> str:
    """Normalise a user-supplied dataset name to a `DATASETS` key or raise `DatasetError` listing the choices.
    `folder:PATH` / `imagefolder:PATH` become `folder:ABSOLUTE_PATH` (the spelling a run's config saves,
    so `vitmoe eval` finds the folder from anywhere)."""
    path = folder_path(name)
    if path is not None:
        return f"folder:{os.path.abspath(path)}"
    key = builtin_name(name)
    if key is None:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}, or folder:PATH "
                           f"(your own images in PATH/train/CLASS/*.png|jpg)")
    return key


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split
