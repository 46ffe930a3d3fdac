"""The data a TrainConfig trains on: its dataset's info (built-in, or a `folder:PATH` of your own images,
see `vitmoe.data.folder`), the image side the model sees and the checks of the data fields (the
loaders are built from the resolved RunSpec: loop.loaders).

`img_size` (a TrainConfig field) is the side of the images the model sees. For a folder dataset it is
the size the images are decoded and cached at (default 32). For a built-in dataset None keeps the
dataset's own size; another value makes the loaders resize every batch on the device (bilinear,
antialiased, after augmentation, before normalisation), e.g. 224 for a pretrained ViT on CIFAR's 32x32.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ...readers import yaml_value

from ...data import DatasetError, DatasetInfo, canonical_name, dataset_choices, get_info, is_folder
from ...data.folder import RESIZE_POLICIES
from ...validation import Fields

if TYPE_CHECKING:
    from .train_config import TrainConfig

DATASET_CHOICES = dataset_choices()
# Largest image side accepted (a typo such as 22400 would otherwise allocate gigabytes per batch).
MAX_IMG_SIZE = 4096


def folder_options(cfg: "TrainConfig") -> dict[str, Any]:
    """The options a folder dataset is read with ({} for a built-in one)."""
    if not is_folder(cfg.dataset):
        return {}
    return {"img_size": cfg.img_size, "test_fraction": cfg.folder_test_fraction,
            "skip_bad_images": cfg.skip_bad_images, "resize": cfg.folder_resize}


def saved_folder_options(saved: dict[str, Any], img_size: int) -> dict[str, Any]:
    """`folder_options` of a run from its config.yaml as read back (`saved`; fields it lacks take
    their defaults, `img_size` the model's side): how evaluation and prediction read its folder."""
    return {"img_size": saved.get("img_size") or img_size, "test_fraction": saved.get("folder_test_fraction"),
            "skip_bad_images": bool(saved.get("skip_bad_images", False)),
            "resize": saved.get("folder_resize") or "stretch"}


def dataset_info(cfg: "TrainConfig") -> DatasetInfo:
    """The dataset's info (a folder is scanned, and decoded into its cache the first time)."""
    options = folder_options(cfg)
    return get_info(cfg.dataset, **(dict(options, data_dir=cfg.data_dir) if options else {}))


def input_size(cfg: "TrainConfig") -> int:
    """The image side the model sees: `img_size` when set, else the dataset's."""
    return int(cfg.img_size) if cfg.img_size is not None else dataset_info(cfg).img_size


def check_data_fields(cfg: "TrainConfig", f: Fields) -> None:
    """dataset, data_dir, img_size, folder_test_fraction, skip_bad_images, folder_resize, stream_above_mb,
    norm_mean/std."""
    try:
        cfg.dataset = canonical_name(cfg.dataset)
    except DatasetError as e:
        f.fail("dataset", f"one of {DATASET_CHOICES} ({e})" if "folder" in str(cfg.dataset).lower()
               else f"one of {DATASET_CHOICES}")
    if cfg.data_dir is not None:
        cfg.data_dir = str(cfg.data_dir)
    f.integer("img_size", 1, MAX_IMG_SIZE, optional=True)
    f.number("folder_test_fraction", 0.0, 1.0, strict_lo=True, strict_hi=True)
    f.boolean("skip_bad_images")
    f.choice("folder_resize", RESIZE_POLICIES)
    f.number("stream_above_mb", 0.0)
    for name, positive in (("norm_mean", False), ("norm_std", True)):
        check_channels(cfg, f, name, positive)


def check_channels(cfg: "TrainConfig", f: Fields, name: str, positive: bool) -> None:
    """norm_mean / norm_std: None, or one finite number per channel (one number for all)."""
    v = getattr(cfg, name)
    if v is None:
        return
    in_chans = dataset_info(cfg).in_chans
    if isinstance(v, str):
        try:
            v = yaml_value(v, name)
        except ValueError:  # bounded (vitmoe.readers): refused below as not a list of numbers
            pass
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    ok = isinstance(v, (list, tuple)) and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in v)
    if ok:
        v = [float(c) for c in v]
        if len(v) == 1 and in_chans > 1:
            v = v * in_chans
        ok = len(v) == in_chans and all(math.isfinite(c) and (c > 0 or not positive) for c in v)
    f.need(ok, name, f"null (the dataset's) or {in_chans} {'positive ' if positive else ''}number(s), one "
                     f"per channel of {cfg.dataset} (or one for all channels)")
    setattr(cfg, name, v)
