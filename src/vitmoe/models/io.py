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
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vitmoe model checkpoint (metadata format {raw.get('format')!r}, expected {FORMAT!r})")
    return {k: (v if k == "format" else json.loads(v)) for k, v in raw.items()}


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> VisionTransformer:
    """Rebuild the model a checkpoint was saved from and load its weights (strictly).

    Overrides change non-structural fields (e.g. `eval_mode`, `capacity_factor_eval`).
    """
    meta = read_metadata(path)
    cfg = ViTConfig.from_dict(meta["config"]).replace(**overrides)
    model = VisionTransformer(cfg)
    model.load_state_dict(load_file(str(path), device=str(map_location)), strict=True)
    return model.to(map_location)
