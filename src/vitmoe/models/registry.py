"""Named presets: `create_model(name, **overrides)` and `list_models()`."""
from __future__ import annotations

from typing import Any, Callable

from .config import ConfigError, ViTConfig
from .vit import VisionTransformer

_PRESETS: dict[str, tuple[Callable[[], ViTConfig], str]] = {}


def register_model(name: str, description: str):
    def wrap(fn: Callable[[], ViTConfig]) -> Callable[[], ViTConfig]:
        _PRESETS[name] = (fn, description)
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_PRESETS)


def describe_models() -> dict[str, str]:
    return {name: _PRESETS[name][1] for name in list_models()}


def model_config(name: str, **overrides: Any) -> ViTConfig:
    """The preset's config with overrides applied and validated."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _PRESETS[name][0]().replace(**overrides).validate()


def create_model(name: str, checkpoint: str | None = None, **overrides: Any) -> VisionTransformer:
    """Build a preset, e.g. `create_model("switch_vit", num_experts=64, num_classes=100)`.

    With `checkpoint`, load its weights; the checkpoint's own config must match the preset's
    structure (a merged checkpoint loads as "vit" with its width and classes as overrides).
    """
    model = VisionTransformer(model_config(name, **overrides))
    if checkpoint is not None:
        from .io import load_model

        loaded = load_model(checkpoint)
        try:
            model.load_state_dict(loaded.state_dict(), strict=True)
        except RuntimeError as e:
            raise ConfigError(f"checkpoint {checkpoint} does not fit preset {name!r} with {overrides}: "
                              f"use vitmoe.load_model({str(checkpoint)!r}) to rebuild it as saved ({e})") from e
    return model


# --- the source project's models (REFERENCE.md s.1) ---------------------------------------
@register_model("vit", "the source project's dense ViT: d 300, 12 layers, 12 heads, MLP 1024, patch 4, MLP head 3072")
def _vit() -> ViTConfig:
    return ViTConfig()


@register_model("switch_vit", "vit with a switch (top-1) MoE MLP in every block, 32 experts, dropless")
def _switch_vit() -> ViTConfig:
    return ViTConfig(moe_layers="all", num_experts=32, router="switch")


@register_model("random_vit", "vit with 4 randomly routed experts per block (one per layer per forward), merged at eval")
def _random_vit() -> ViTConfig:
    return ViTConfig(moe_layers="all", num_experts=4, router="random", random_granularity="batch", eval_mode="merged")
