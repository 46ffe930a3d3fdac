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


def save_model(model: VisionTransformer, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vitmoe model checkpoint (metadata format {raw.get('format')!r}, expected {FORMAT!r})")
    return {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> VisionTransformer:
    """Rebuild the model a checkpoint was saved from and load its weights (strictly).

    Overrides change non-structural fields (e.g. `eval_mode`, `capacity_factor_eval`).
    """
    meta = read_metadata(path)
    cfg = ViTConfig(**meta["config"]).replace(**overrides)
    model = VisionTransformer(cfg)
    model.load_state_dict(load_file(str(path), device=str(map_location)), strict=True)
    return model.to(map_location)
