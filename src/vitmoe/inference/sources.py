"""What a MODEL argument names, resolved once, and what it says about its inputs and outputs.

A source is any of:

* a vitmoe model file (`.safetensors` written by `vitmoe.save_model`, a checkpoint's
  `model.safetensors` / `ema.safetensors`, `vitmoe merge` / `upcycle` output);
* a run directory (its `latest` or `best` checkpoint, the trained weights or their EMA), a
  checkpoint directory, or a run's `checkpoints/latest` / `checkpoints/best` pointer file;
* a `transformers` ViT directory (`config.json` + weights; `vitmoe export --format hf` output),
  with its `preprocessor_config.json` when it has one.

From it come the model, its class names and its `Preprocessing` (vitmoe.data.preprocess): the
model file's `preprocessing` entry (written by every run since it was added); for older files the
dataset's (a built-in one's constants, or a folder's cache statistics); for a `transformers`
directory its image-processor config (ViTImageProcessor's defaults without one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data.preprocess import Preprocessing
from ..models import ModelFileError, VisionTransformer, read_metadata
from ..models.hf import PREPROCESSOR_FILE, is_hf_dir, load_pretrained, read_hf_config
from ..readers import MAX_CONFIG_BYTES, load_json


@dataclass
class ModelSource:
    """A resolved MODEL argument."""

    given: str
    """The argument as written."""
    path: Path
    """The vitmoe model file, or the transformers directory."""
    kind: str
    """"vitmoe" or "transformers"."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The vitmoe file's metadata (vitmoe.models.read_metadata); a transformers directory's config.json."""

    @property
    def run_dir(self) -> Path | None:
        """The run a checkpoint's model file belongs to (RUN/checkpoints/epoch-N/model.safetensors)."""
        from ..rundir import CHECKPOINT_DIR, CONFIG_FILE as RUN_CONFIG

        run = self.path.parent.parent.parent
        ok = self.kind == "vitmoe" and self.path.parent.parent.name == CHECKPOINT_DIR and (run / RUN_CONFIG).is_file()
        return run if ok else None


def resolve_source(source: str | os.PathLike, checkpoint: str = "latest", ema: bool = False,
                   log: Callable[[str], None] | None = None) -> ModelSource:
    """The ModelSource `source` names; `checkpoint` ("latest" / "best") and `ema` pick a run's
    model file (see vitmoe.training.resolve_model_file). FileNotFoundError, CheckpointError or
    ModelFileError naming the path when it is none of the accepted kinds."""
    from ..rundir import is_run_dir
    from ..training.checkpoints.checkpoint import resolve_model_file

    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(2, "no model file, run directory or transformers directory here", str(p))
    if is_hf_dir(p) and not is_run_dir(p):
        if ema:
            raise ModelFileError(f"{p} is a transformers directory: it holds no EMA weights (drop --ema)")
        return ModelSource(str(source), p, "transformers", read_hf_config(p))
    path = resolve_model_file(p, log=log, which=checkpoint, weights="ema" if ema else "model")
    return ModelSource(str(source), path, "vitmoe", read_metadata(path))


def load_source_model(src: ModelSource, map_location: Any = "cpu", **overrides: Any) -> VisionTransformer:
    """The model of a resolved source (`overrides`: non-structural ViTConfig fields)."""
    from ..models.io import load_model as load_file

    if src.kind == "transformers":
        return load_pretrained(src.path, **overrides).to(map_location)
    return load_file(src.path, map_location=map_location, **overrides)


def load_model(source: str | os.PathLike, map_location: Any = "cpu", *, checkpoint: str = "latest",
               ema: bool = False, **overrides: Any) -> VisionTransformer:
    """The model any source names: a vitmoe model file, a run, checkpoint or pointer, or a
    `transformers` ViT directory (`vitmoe.load_model`; `vitmoe.models.load_model` reads files only).

    Args:
        source: see the module docstring.
        map_location: device of the returned model.
        checkpoint: a run directory's "latest" or "best" checkpoint.
        ema: its EMA weights (runs trained with --ema-decay).
        overrides: non-structural ViTConfig fields, e.g. `moe={"eval_mode": "ensemble"}`.
    """
    return load_source_model(resolve_source(source, checkpoint, ema), map_location, **overrides)


# -- what the source says about its outputs and inputs -----------------------------------------------
def class_names(src: ModelSource, num_classes: int) -> list[str] | None:
    """The class names recorded for the model's outputs (a vitmoe file's `classes`, else its
    built-in dataset's; a transformers directory's id2label), if there is one distinct name per output."""
    from ..data import DATASETS, canonical_name

    meta, names = src.metadata, None
    if src.kind == "transformers":
        labels = meta.get("id2label")
        if isinstance(labels, dict):
            try:
                names = [str(labels[k]) for k in sorted(labels, key=int)]
            except (ValueError, TypeError):
                names = None
    else:
        names = meta.get("classes")
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            names = None
            dataset = meta.get("dataset")
            if isinstance(dataset, str):
                try:
                    names = list(DATASETS[canonical_name(dataset)].classes)
                except (ValueError, KeyError):  # DatasetError is a ValueError: an unknown or folder dataset
                    names = None
    return names if names and len(names) == num_classes and len(set(names)) == len(names) else None


def preprocessing_of_source(src: ModelSource, model: VisionTransformer,
                            log: Callable[[str], None] | None = None) -> Preprocessing:
    """How images are fed to the source's model (see the module docstring for where it comes from).
    ModelFileError naming the file and what is missing when the source does not say."""
    if src.kind == "transformers":
        return _hf_preprocessing(src.path, model)
    meta, cfg = src.metadata, model.config
    if "preprocessing" in meta:
        try:
            pre = Preprocessing.from_dict(meta["preprocessing"])
        except ValueError as e:
            raise ModelFileError(f"{src.path}: metadata entry 'preprocessing' is not valid: {e}") from None
        if (pre.channels, pre.input_size) != (cfg.in_chans, cfg.img_size):
            raise ModelFileError(f"{src.path}: metadata entry 'preprocessing' gives {pre.channels}-channel "
                                 f"{pre.input_size}x{pre.input_size} inputs, but the model takes {cfg.in_chans}-channel "
                                 f"{cfg.img_size}x{cfg.img_size} ones")
        return pre
    return _dataset_preprocessing(src, model, log)


def _dataset_preprocessing(src: ModelSource, model: VisionTransformer,
                           log: Callable[[str], None] | None) -> Preprocessing:
    """A model file written before `preprocessing` was recorded: its dataset's, as training read it."""
    from ..data import DatasetError, get_info, is_folder
    from ..data.preprocess import preprocessing_of
    from ..rundir import CONFIG_FILE as RUN_CONFIG, read_config

    meta, cfg = src.metadata, model.config
    dataset = meta.get("dataset")
    if not isinstance(dataset, str):
        raise ModelFileError(f"{src.path} records neither its preprocessing (metadata entry 'preprocessing') nor its "
                             "dataset: save it with vitmoe.save_model(model, path, metadata={'preprocessing': "
                             "Preprocessing(...).to_dict()}) or pass a Preprocessing to vitmoe.load_classifier")
    saved = read_config(src.run_dir / RUN_CONFIG) if src.run_dir is not None else {}
    try:
        options = {}
        if is_folder(dataset):
            from ..training.config.data import saved_folder_options

            options = dict(saved_folder_options(saved, cfg.img_size), data_dir=saved.get("data_dir"))
        info = get_info(dataset, **options)
    except DatasetError as e:
        raise ModelFileError(f"{src.path} does not record its preprocessing and its dataset cannot be read for it: "
                             f"{e}") from None
    norm = meta.get("normalization") or {}
    mean, std = norm.get("mean", info.mean), norm.get("std", info.std)
    if log is not None and is_folder(dataset):
        log(f"{src.path} does not record its preprocessing (written by an older vitmoe): normalising with the "
            f"statistics of {dataset}'s cache")
    return preprocessing_of(info, mean, std, cfg.img_size)


# transformers' ViTImageProcessor defaults (IMAGENET_STANDARD_MEAN / STD, bilinear resize).
_HF_DEFAULT_MEAN, _HF_DEFAULT_STD = 0.5, 0.5
_PIL_BILINEAR = 2


def _hf_preprocessing(path: Path, model: VisionTransformer) -> Preprocessing:
    """A ViTImageProcessor config (preprocessor_config.json) as a Preprocessing; the processor's
    defaults at the model's side when the directory has none."""
    cfg, file = model.config, path / PREPROCESSOR_FILE
    chans = cfg.in_chans
    if not file.is_file():
        return Preprocessing(cfg.img_size, chans, (_HF_DEFAULT_MEAN,) * chans, (_HF_DEFAULT_STD,) * chans, cfg.img_size)
    try:
        p = load_json(file, "preprocessor config", MAX_CONFIG_BYTES)  # bounded, a regular file, one-line errors
    except (OSError, ValueError) as e:  # PathError (a ValueError) included
        raise ModelFileError(f"{file} is not a readable JSON file: {e}") from None
    if not isinstance(p, dict):
        raise ModelFileError(f"{file} must hold a JSON object")

    def unsupported(name: str, why: str) -> ModelFileError:
        return ModelFileError(f"{file}: field {name}={p.get(name)!r} {why}; vitmoe predicts with a bilinear resize "
                              "(of the whole image, or of its shorter side followed by a centre crop), a rescale by "
                              "1/255 and a normalisation only")

    # Missing fields take the processor's own defaults, which differ by processor (an integer size is
    # a shortest edge for BitImageProcessor, its default resample bicubic, its mean/std CLIP's, ...):
    # vitmoe knows ViTImageProcessor's, so any other processor must spell out what it does.
    kind = str(p.get("image_processor_type") or "ViTImageProcessor")
    vit = kind.removesuffix("Fast") == "ViTImageProcessor"
    if not vit:
        missing = [k for k in ("size", "resample", "image_mean", "image_std", "do_center_crop") if k not in p]
        if missing:
            raise ModelFileError(f"{file}: {kind} without {', '.join(missing)}: vitmoe knows ViTImageProcessor's "
                                 "defaults only; write these fields into the file")
    size = p.get("size", {"height": cfg.img_size, "width": cfg.img_size})
    if isinstance(size, int):
        size = {"height": size, "width": size} if vit else {"shortest_edge": size}
    crop = None
    if p.get("do_center_crop"):
        if "crop_size" not in p and not vit:
            raise ModelFileError(f"{file}: {kind} with do_center_crop and no crop_size: write the crop size into the file")
        crop = p.get("crop_size", {"height": cfg.img_size, "width": cfg.img_size})
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        if not isinstance(crop, dict) or crop.get("height") != crop.get("width") or not isinstance(crop.get("height"), int):
            raise unsupported("crop_size", "is not a square crop (height = width)")
        crop = crop["height"]
    if not p.get("do_resize", True) or not isinstance(size, dict):
        raise unsupported("size", "is not a resize")
    if isinstance(size.get("shortest_edge"), int) and len(size) == 1 and crop is not None:
        side, resize = size["shortest_edge"], "crop"  # e.g. BitImageProcessor, CLIPImageProcessor
    elif size.get("height") == size.get("width") and isinstance(size.get("height"), int):
        side, resize = size["height"], "stretch"
    else:
        raise unsupported("size", "is neither a square resize (height = width) nor a shortest_edge resize followed "
                          "by a centre crop")
    if p.get("resample", _PIL_BILINEAR) != _PIL_BILINEAR:
        raise unsupported("resample", "is not bilinear (2)")
    if p.get("do_rescale", True) is False or abs(float(p.get("rescale_factor", 1 / 255)) * 255 - 1) > 1e-6:
        raise unsupported("rescale_factor", "is not 1/255")
    mean, std = p.get("image_mean", _HF_DEFAULT_MEAN), p.get("image_std", _HF_DEFAULT_STD)
    if not p.get("do_normalize", True):
        mean, std = 0.0, 1.0
    mean = [float(mean)] * chans if isinstance(mean, (int, float)) else [float(v) for v in mean]
    std = [float(std)] * chans if isinstance(std, (int, float)) else [float(v) for v in std]
    if chans == 1 and len(mean) == 3 and len(set(mean)) == 1 and len(set(std)) == 1:
        mean, std = mean[:1], std[:1]
    try:
        return Preprocessing(side, chans, tuple(mean), tuple(std), cfg.img_size, resize=resize,
                             crop=crop if crop is not None and crop != side else None)
    except ValueError as e:
        raise ModelFileError(f"{file}: {e}") from None


__all__ = ["ModelSource", "resolve_source", "load_source_model", "load_model", "class_names",
           "preprocessing_of_source"]
