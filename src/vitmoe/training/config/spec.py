"""RunSpec: a training run resolved once, before any data is loaded or any process is started.

`resolve(cfg)` checks a TrainConfig (unless it is already a checked copy), names its run directory
when it does not, and derives everything the rest of the run reads: the model's ViTConfig, the
dataset's info, the normalisation, the image side the model sees, a folder dataset's class names
and the run label. The Trainer, the loaders, the summary and the checkpoint metadata take the
RunSpec, so nothing re-derives them and nothing changes them: a run that needs another value
(another `out`, another process count) builds another RunSpec from `cfg.updated(...)`.

`load_config` is the library entry that builds a TrainConfig from a YAML file plus overrides
(what `vitmoe train --config FILE --set ...` and every `vitmoe sweep` member do).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ...data import DatasetInfo, is_folder
from ...data.preprocess import Preprocessing, preprocessing_of
from ...models import ViTConfig
from .data import dataset_info
from .model import experts_of, model_label
from .train_config import TrainConfig


@dataclass(frozen=True)
class RunSpec:
    config: TrainConfig
    """The checked TrainConfig; its `out` names the run directory."""
    model: ViTConfig
    """The model the run trains (preset < dataset shape < overrides < eval_mode)."""
    dataset: DatasetInfo
    """The dataset's info (a folder dataset's: scanned and read from its cache)."""
    mean: tuple[float, ...]
    """Per-channel normalisation the loaders use: the overrides, else the dataset's statistics."""
    std: tuple[float, ...]
    input_size: int
    """The image side the model sees (`img_size` when set, else the dataset's)."""
    classes: tuple[str, ...] | None
    """A folder dataset's class names in label order (None for a built-in one: see vitmoe.data.DATASETS)."""
    label: str
    """Display name: vit, switch-vit, top2-vit, random-vit, ... ("+cr": consistency regularisation)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    @property
    def experts(self) -> int | list[int] | None:
        """Experts per MoE layer (one int when every layer has the same count), None if dense."""
        return experts_of(self.model)

    def class_metadata(self) -> dict[str, Any]:
        """A folder dataset's class names, saved in checkpoints and the summary for `vitmoe eval`
        and `vitmoe report`; {} for a built-in dataset."""
        return {"classes": list(self.classes)} if self.classes is not None else {}

    def norm_metadata(self) -> dict[str, Any]:
        """The normalisation, recorded in checkpoints when it is not the dataset's (for `vitmoe eval`)."""
        if self.config.norm_mean is None and self.config.norm_std is None:
            return {}
        return {"normalization": {"mean": list(self.mean), "std": list(self.std)}}

    def preprocessing(self) -> Preprocessing:
        """How an image file becomes this run's model input (vitmoe.data.preprocess): the test
        split's steps with the run's normalisation and sides."""
        return preprocessing_of(self.dataset, self.mean, self.std, self.input_size)

    def preprocessing_metadata(self) -> dict[str, Any]:
        """Saved in every model file of the run, so prediction and export need neither the dataset
        nor its cache (a folder dataset's statistics live nowhere else outside its cache)."""
        return {"preprocessing": self.preprocessing().to_dict()}

    def save_yaml(self, path: str | os.PathLike) -> None:
        """config.yaml: the fields, plus the resolved model config and the label (read back as
        TrainConfig.from_yaml ignores those two)."""
        import yaml

        from ...fileio import atomic_write_text

        data = self.config.to_dict()
        data["resolved_model_config"] = self.model.to_dict()
        data["name"] = self.label
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def default_out(cfg: TrainConfig) -> str:
    """runs/MODEL-DATASET-TIMESTAMP: the run directory when `out` is not given."""
    return os.path.join("runs", f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve(cfg: TrainConfig) -> RunSpec:
    """The RunSpec of `cfg` (checked here unless it is a copy `validate()` returned; an unset `out`
    gets `default_out`). The model config is the one the check built: it is built once."""
    cfg = cfg if cfg.validated else cfg.validate()
    if cfg.out is None:
        cfg = cfg.with_run(out=default_out(cfg))
    info = dataset_info(cfg)
    mean = tuple(cfg.norm_mean) if cfg.norm_mean is not None else tuple(info.mean)
    std = tuple(cfg.norm_std) if cfg.norm_std is not None else tuple(info.std)
    model = cfg.checked_model
    classes = tuple(info.classes) if is_folder(cfg.dataset) else None
    label = model_label(model) + ("+cr" if cfg.consistency_weight > 0 else "")
    return RunSpec(config=cfg, model=model, dataset=info, mean=mean, std=std, input_size=model.img_size,
                   classes=classes, label=label)


def load_config(config_file: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig (not yet checked: `validate()` or `resolve()` it) from `base` (default: the
    defaults) < the YAML `config_file` < `overrides` (fields, `model.FIELD`, `model.moe.FIELD`;
    values as YAML gives them or typed)."""
    cfg = base if base is not None else TrainConfig()
    if config_file is not None:
        cfg = TrainConfig.from_yaml(config_file, cfg)
    return cfg.updated(overrides or {})
