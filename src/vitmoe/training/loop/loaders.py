"""The loaders of a run: its splits (given, or loaded), normalised and resized as its RunSpec says,
on the device or streamed from host memory; and what the run log says about that."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.data import folder_options

if TYPE_CHECKING:
    from ..config.spec import RunSpec


def load_split(cfg, split: str):
    """One split of the run's dataset (`cfg`: its TrainConfig)."""
    from ...data import load_dataset

    return load_dataset(cfg.dataset, split, cfg.data_dir, **folder_options(cfg))


def build_loaders(spec: "RunSpec", dist, device, train=None, test=None):
    """(train loader, test loader): the splits (given, or loaded), normalised with the run's statistics
    (the overrides, else the training split's), resized to the model's side when it differs from the
    data's, on the device, or streamed from host memory when the split is above `stream_above_mb`."""
    from ...data import make_loader

    cfg = spec.config
    train = train if train is not None else load_split(cfg, "train")
    test = test if test is not None else load_split(cfg, "test")
    mean, std = spec.mean, spec.std
    limit = float(cfg.stream_above_mb) * 1e6
    common = dict(seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, mean=mean, std=std,
                  resize_to=spec.model.img_size, stream_above_bytes=limit)
    train_loader = make_loader(train, cfg.batch_size, device, train=True, augment=cfg.augment,
                               augment_policy=cfg.augment_policy if cfg.augment else "none", **common)
    test_loader = make_loader(test, cfg.eval_batch_size or cfg.batch_size, device, train=False, augment=False,
                              **common)
    return train_loader, test_loader


def data_notes(loader) -> list[str]:
    """What the run log says about how the training images reach the model (empty when nothing unusual)."""
    from ...data import StreamingLoader

    notes = []
    if loader.resize_to is not None:
        side = loader.info.img_size
        notes.append(f"images resized {side}x{side} -> {loader.resize_to}x{loader.resize_to} on the device")
    if isinstance(loader, StreamingLoader):
        notes.append("training images streamed from host memory (above stream_above_mb)")
    return notes
