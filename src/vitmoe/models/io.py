"""Model checkpoints: safetensors weights with the model config in the file's metadata.

Expert weights are stored whole (`[E, D, H]` per layer, global expert order), so a file
does not depend on how a run split experts over processes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..fileio import atomic_write
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file: {e}") from e
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a vitmoe model checkpoint (metadata format {raw.get('format')!r}, "
                             f"expected {FORMAT!r})")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = value if key == "format" else json.loads(value)
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{path}: metadata entry {key!r} is not JSON ({e.msg})") from None
    if not isinstance(meta.get("config"), dict):
        raise ModelFileError(f"{path}: metadata entry 'config' must be a JSON object of model fields, "
                             f"got {type(meta.get('config')).__name__}")
    return meta


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> VisionTransformer:
    """Rebuild the model a checkpoint was saved from and load its weights (strictly).

    Overrides change non-structural fields (e.g. `eval_mode`, `capacity_factor_eval`).
    """
    meta = read_metadata(path)
    try:
        cfg = ViTConfig.from_dict(meta["config"]).replace(**overrides)
        model = VisionTransformer(cfg)
    except ValueError as e:  # ConfigError included: the recorded config is not a valid model
        raise ModelFileError(f"{path}: its recorded model config is not valid: {e}") from None
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{path} is truncated or corrupt: {e}") from None
    check_tensors(path, model, tensors)
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location)


def check_tensors(path: str | os.PathLike, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The file's tensors are exactly the model's (names and shapes), or a ModelFileError that says
    what differs: e.g. a 2-expert checkpoint offered to a 4-expert model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = [f"{k} {tuple(tensors[k].shape)} (model: {expected[k]})" for k in expected
              if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or extra or shapes:
        parts = ([f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}"] if extra else []) + \
                ([f"shape of {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}"] if shapes else [])
        raise ModelFileError(f"{path}: tensors do not match the model its config describes: {', '.join(parts)}")
