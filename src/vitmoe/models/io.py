"""Model checkpoints: safetensors weights with the model config in the file's metadata.

Expert weights are stored whole (`[E, D, H]` per layer, global expert order), so a file
does not depend on how a run split experts over processes.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..fileio import PathError, atomic_write
from ..readers import safetensors_header
from ..validation import show
from .config import ViTConfig
from .vit import VisionTransformer

FORMAT = "vitmoe-model-1"


class ModelFileError(ValueError):
    """A model file cannot be used: not safetensors, not vitmoe's, or its tensors and its recorded
    config disagree. The message names the file."""


def save_model(model: VisionTransformer, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`state_dict` replaces the model's own (expert-parallel runs pass the gathered whole-expert state).

    Every key gets its own tensor: a module shared by several blocks (WideNet) is written once per
    key that names it, because safetensors refuses tensors that share memory, and a file with
    every key loads with a plain strict `load_state_dict`.
    """
    state, seen = {}, set()
    for k, v in (state_dict or model.state_dict()).items():
        v = v.detach().contiguous().cpu()
        ptr = (v.data_ptr(), v.dtype, tuple(v.shape))
        state[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a vitmoe model file, each entry JSON-decoded and the entries vitmoe reads
    (config, dataset, classes, normalization) checked for their types: ModelFileError names the
    entry. Read from the safetensors header alone, within its bounds (`vitmoe.readers`)."""
    return _read_header(path)[0]


def _read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """(metadata as `read_metadata` returns it, {tensor name: shape} of the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    try:
        header, raw, _ = safetensors_header(path, "model file")
    except PathError as e:
        raise ModelFileError(f"{path} is not a readable safetensors file: {e}") from None
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a vitmoe model checkpoint (metadata format {show(raw.get('format'))}, "
                             f"expected {FORMAT!r})")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = value if key == "format" else json.loads(value)
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{path}: metadata entry {show(key)} is not JSON ({e.msg})") from None
        except RecursionError:
            raise ModelFileError(f"{path}: metadata entry {show(key)} is nested too deeply") from None
    if not isinstance(meta.get("config"), dict):
        raise ModelFileError(f"{path}: metadata entry 'config' must be a JSON object of model fields, "
                             f"got {type(meta.get('config')).__name__}")
    problem = metadata_problem(meta)
    if problem:
        raise ModelFileError(f"{path}: metadata entry {problem}")
    return meta, {name: entry["shape"] for name, entry in header.items()}


def metadata_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the entries vitmoe reads back from a model file's metadata, or None:
    `dataset` a name, `classes` distinct names, `normalization` {mean, std} of finite numbers (std
    > 0), one per channel. Written by the trainer; a file from elsewhere may hold anything."""
    dataset, classes, norm = meta.get("dataset"), meta.get("classes"), meta.get("normalization")
    if dataset is not None and not isinstance(dataset, str):
        return f"'dataset' must be a dataset name, got {show(dataset)}"
    if classes is not None and not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
                                    and len(set(classes)) == len(classes)):
        return f"'classes' must be a list of distinct class names, got {show(classes)}"
    if norm is not None:
        ok = isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and norm[k] and all(_finite(v) for v in norm[k]) for k in ("mean", "std"))
        ok = ok and len(norm["mean"]) == len(norm["std"]) and all(v > 0 for v in norm["std"])
        if not ok:
            return (f"'normalization' must be {{mean: [...], std: [...]}}, one finite number per channel (std > 0), "
                    f"got {show(norm)}")
    return None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> VisionTransformer:
    """Rebuild the model a checkpoint was saved from and load its weights (strictly).

    Overrides change non-structural fields (e.g. `eval_mode`, `capacity_factor_eval`). Before any
    weight is allocated, the recorded config is sized against the memory available and built on
    PyTorch's "meta" device (shapes only) to be compared with the tensors the file's header lists: a
    config that claims more than its file holds never allocates.
    """
    meta, shapes = _read_header(path)
    try:
        cfg = ViTConfig.from_dict(meta["config"]).replace(**overrides).validate()
        with torch.device("meta"):
            check_tensors(path, VisionTransformer(cfg), shapes)
        model = VisionTransformer(cfg)
    except ModelFileError:
        raise
    except ValueError as e:  # ConfigError included: the recorded config is not a valid model
        raise ModelFileError(f"{path}: its recorded model config is not valid: {e}") from None
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path} is truncated or corrupt: {e}") from None
    check_tensors(path, model, tensors)
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location)


def check_tensors(path: str | os.PathLike, model: torch.nn.Module, tensors: Mapping[str, Any]) -> None:
    """The file's tensors (or their shapes: a header's) are exactly the model's (names and shapes), or a
    ModelFileError that says what differs: e.g. a 2-expert checkpoint offered to a 4-expert model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [f"{k} {found[k]} (model: {expected[k]})" for k in expected if k in found and found[k] != expected[k]]
    if missing or extra or shapes:
        parts = ([f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"unexpected {[show(k) for k in extra[:3]]}{' ...' if len(extra) > 3 else ''}"] if extra else []) + \
                ([f"shape of {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}"] if shapes else [])
        raise ModelFileError(f"{path}: tensors do not match the model its config describes: {', '.join(parts)}")
