"""The data a TrainConfig trains on: its dataset's info (built-in, or a `folder:PATH` of your own images,
see `vitmoe.data.folder`), the image side the model sees, the checks of the data fields, and the loaders.

`img_size` (a TrainConfig field) is the side of the images the model sees. For a folder dataset it is
the size the images are decoded and cached at (default 32). For a built-in dataset None keeps the
dataset's own size; another value makes the loaders resize every batch on the device (bilinear,
antialiased, after augmentation, before normalisation), e.g. 224 for a pretrained ViT on CIFAR's 32x32.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import yaml

from ..data import DATASETS, DatasetError, DatasetInfo, canonical_name, get_info, is_folder
from ..validation import Fields

if TYPE_CHECKING:
    from .config import TrainConfig

DATASET_CHOICES = ", ".join(DATASETS) + ", folder:PATH"
# Largest image side accepted (a typo such as 22400 would otherwise allocate gigabytes per batch).
MAX_IMG_SIZE = 4096


def folder_options(cfg: "TrainConfig") -> dict[str, Any]:
    """The options a folder dataset is read with ({} for a built-in one)."""
    if not is_folder(cfg.dataset):
        return {}
    return {"img_size": cfg.img_size, "test_fraction": cfg.folder_test_fraction,
            "skip_bad_images": cfg.skip_bad_images}


def dataset_info(cfg: "TrainConfig") -> DatasetInfo:
    """The dataset's info (a folder is scanned, and decoded into its cache the first time)."""
    options = folder_options(cfg)
    return get_info(cfg.dataset, **(dict(options, data_dir=cfg.data_dir) if options else {}))


def input_size(cfg: "TrainConfig") -> int:
    """The image side the model sees: `img_size` when set, else the dataset's."""
    return int(cfg.img_size) if cfg.img_size is not None else dataset_info(cfg).img_size


def check_data_fields(cfg: "TrainConfig", f: Fields) -> None:
    """dataset, data_dir, img_size, folder_test_fraction, skip_bad_images, stream_above_mb, norm_mean/std."""
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
            v = yaml.safe_load(v)
        except yaml.YAMLError:
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


def load_split(cfg: "TrainConfig", split: str):
    from ..data import load_dataset

    return load_dataset(cfg.dataset, split, cfg.data_dir, **folder_options(cfg))


def build_loaders(cfg: "TrainConfig", dist, device, train=None, test=None):
    """(train loader, test loader): the splits (given, or loaded), normalised with the run's statistics
    (the overrides, else the training split's), resized to the model's side when it differs from the
    data's, on the device, or streamed from host memory when the split is above `stream_above_mb`."""
    from ..data import make_loader

    train = train if train is not None else load_split(cfg, "train")
    test = test if test is not None else load_split(cfg, "test")
    mean, std = cfg.normalization()
    limit = float(cfg.stream_above_mb) * 1e6
    common = dict(seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, mean=mean, std=std,
                  resize_to=cfg.resolved_model_config().img_size, stream_above_bytes=limit)
    train_loader = make_loader(train, cfg.batch_size, device, train=True, augment=cfg.augment,
                               augment_policy=cfg.augment_policy if cfg.augment else "none", **common)
    test_loader = make_loader(test, cfg.eval_batch_size or cfg.batch_size, device, train=False, augment=False,
                              **common)
    return train_loader, test_loader


def class_metadata(cfg: "TrainConfig") -> dict[str, Any]:
    """A folder dataset's class names (label order), saved in checkpoints and the summary for
    `vitmoe eval` and `vitmoe report`; {} for a built-in dataset (its names are in `DATASETS`)."""
    return {"classes": list(dataset_info(cfg).classes)} if is_folder(cfg.dataset) else {}


def data_notes(loader) -> list[str]:
    """What the run log says about how the training images reach the model (empty when nothing unusual)."""
    from ..data import StreamingLoader

    notes = []
    if loader.resize_to is not None:
        side = loader.info.img_size
        notes.append(f"images resized {side}x{side} -> {loader.resize_to}x{loader.resize_to} on the device")
    if isinstance(loader, StreamingLoader):
        notes.append("training images streamed from host memory (above stream_above_mb)")
    return notes
