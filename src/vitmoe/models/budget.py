"""The size check before a model is built: its parameters, counted from the config alone
(`model_info`, arithmetic only), against the memory this process may use, and against the tensors a
file actually holds when the config comes from a file.

A width of 10**9 from `--set`, a model file whose 2 kB config claims a million blocks, or a
transformers `config.json` with `hidden_size: 100000` beside a small weights file are each one
ConfigError / ModelFileError naming the fields, instead of minutes of allocation ending in an
out-of-memory traceback or a kill.
"""
from __future__ import annotations

import os

from ..fileio import format_bytes
from ..validation import ConfigError
from .config import ViTConfig
from .info import model_info

BYTES_PER_PARAMETER = 4
"""Weights are built in float32."""
SIZE_FIELDS = ("embed_dim", "depth", "mlp_hidden", "num_experts", "img_size", "patch_size", "num_classes",
               "head_hidden")
"""The fields that set a model's size, named in the messages."""


def available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable, or less when a cgroup (a
    container, a job scheduler) caps the memory; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (OSError, ValueError, AttributeError):
            return None
    return min(found)


def size_fields(cfg: ViTConfig) -> str:
    shown = [n for n in SIZE_FIELDS if (n != "num_experts" or cfg.is_moe) and (n != "head_hidden" or cfg.head == "mlp")]
    return ", ".join(f"{name}={getattr(cfg, name)}" for name in shown)


def check_buildable(cfg: ViTConfig, where: str = "model") -> int:
    """The number of parameters of `cfg` (validated), or ConfigError when their float32 weights alone
    exceed the memory available (training needs several times more: gradients, optimizer moments,
    activations)."""
    params = model_info(cfg).total_params
    need = params * BYTES_PER_PARAMETER
    free = available_memory()
    if free is not None and need > free:
        raise ConfigError(f"{where}: {params:,} parameters need {format_bytes(need)} for their weights alone, more "
                          f"than the {format_bytes(free)} of memory available; make the model smaller "
                          f"({size_fields(cfg)})")
    return params


def file_mismatch(cfg: ViTConfig, elements: int, source: str, optional_head: bool = False) -> str | None:
    """Why a file's tensors (`elements` values in all) cannot hold the parameters its config describes,
    or None: checked before the model is built, so a config that claims far more than its file holds
    is refused at once. `optional_head`: the file may lack the classifier (a transformers ViTModel)."""
    params = model_info(cfg).total_params
    if optional_head:
        params -= cfg.embed_dim * cfg.num_classes + cfg.num_classes
    if params > elements:
        return (f"{source}: its config describes a model of {params:,} parameters ({size_fields(cfg)}), but its "
                f"tensors hold {elements:,} values: the config does not match the weights")
    return None


__all__ = ["available_memory", "check_buildable", "file_mismatch", "BYTES_PER_PARAMETER"]
