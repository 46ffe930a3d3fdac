"""The model a TrainConfig trains: its ViTConfig (preset < dataset shape < overrides), its display
label and expert counts, the expert-parallel size check, and how model overrides are spelled
(nested `moe`, old flat names, the removed aux_loss_weight)."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping

from ...models import ViTConfig, list_models, model_config
from ...models.config import normalize_keys
from ...moe import MoEConfig, router_class
from ...validation import ConfigError, Fields
from .data import dataset_info

if TYPE_CHECKING:
    from .train_config import TrainConfig


def resolve_model_config(cfg: "TrainConfig") -> ViTConfig:
    """The model's validated ViTConfig: the `cfg.model` preset < the dataset's image shape and
    classes (the side: `cfg.img_size` when set, see `config.data`) < `cfg.model_config` overrides
    (< `cfg.eval_mode`). Without a `patch_size` override the preset's patch is used, or the largest
    size below it that divides the image side."""
    info = dataset_info(cfg)
    side = int(cfg.img_size) if cfg.img_size is not None else info.img_size
    overrides: dict[str, Any] = {k: (dict(v) if k == "moe" else v) for k, v in cfg.model_config.items()}
    for key, value in (("img_size", side), ("in_chans", info.in_chans), ("num_classes", info.num_classes)):
        if key in overrides and _as_int(overrides[key]) != value:
            fix = (f"set the training field img_size={overrides[key]} instead (the loader resizes the images)"
                   if key == "img_size" else "leave it out, the dataset sets it")
            raise ConfigError(f"model field {key}={overrides[key]!r} conflicts with dataset {cfg.dataset} "
                              f"({key} {value}); {fix}")
        overrides[key] = value
    if "patch_size" not in overrides:
        try:
            patch = model_config(cfg.model).patch_size
        except ConfigError as e:
            raise ConfigError(f"model={cfg.model!r}: {e}") from None
        while side % patch:
            patch -= 1
        overrides["patch_size"] = patch
    if cfg.eval_mode is not None:
        overrides["moe"] = {**overrides.get("moe", {}), "eval_mode": cfg.eval_mode}
    try:
        return model_config(cfg.model, **overrides)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(("model field", "unknown model", "unknown MoE"))
                          else f"model_config: {msg}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model_config: {e}") from None


def _as_int(value: Any) -> Any:
    """`value` as an int when it spells one (YAML may hand over "32" or 32.0), else unchanged."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return int(f) if f.is_integer() and not isinstance(value, bool) else value


def model_label(cfg: ViTConfig) -> str:
    """vit, switch-vit, topK-vit, random-vit, ec-vit (expert choice), soft-moe-vit ("cct" instead
    of "vit" for a convolutional tokenizer: cct, switch-cct, ...); "pr-" for a residual (PR-MoE)
    layer, "widenet-" for blocks sharing one layer (WideNet)."""
    family = "cct" if getattr(cfg, "tokenizer", "patch") == "conv" else "vit"
    if not cfg.moe_block_indices():
        return family
    label = f"{router_class(cfg.moe.router).run_label(cfg.moe)}-{family}"
    if cfg.moe.residual:
        label = "pr-" + label
    if cfg.share_blocks:
        label = "widenet-" + label
    return label


def experts_of(cfg: ViTConfig) -> int | list[int] | None:
    """Experts per MoE layer: one int when every layer has the same count, the list otherwise, None if dense."""
    experts = cfg.experts_per_moe_block()
    if not experts:
        return None
    return experts[0] if len(set(experts)) == 1 else experts


def check_ep_size(ep_size: int, world_size: int) -> None:
    """Expert-parallel groups must tile the world."""
    if world_size % ep_size:
        raise ConfigError(f"ep_size={ep_size} is not allowed: it must divide the number of processes ({world_size}); "
                          f"resuming on fewer processes? pass --ep-size with a divisor of {world_size} (checkpoints "
                          f"hold every expert, so any world size and ep_size can continue a run)")


# The auxiliary-loss weights of the model, which the removed TrainConfig.aux_loss_weight multiplied.
_AUX_TERM_WEIGHTS = ("balance_loss_weight", "z_loss_weight")


def set_model_field(model_config: dict[str, Any], key: str, value: Any) -> None:
    """Apply one model override (`depth`, `moe.top_k`, `moe: {...}`, or an old flat MoE name)."""
    for k, v in normalize_keys({key: value}).items():
        if k == "moe":
            if not isinstance(v, Mapping):
                raise ConfigError(f"model field moe={v!r} is not allowed: a mapping of MoE fields")
            for sub, w in v.items():
                set_model_field(model_config, f"moe.{sub}", w)
        elif k.startswith("moe."):
            model_config["moe"] = {**model_config.get("moe", {}), k[4:]: v}
        else:
            model_config[k] = v


class _Value:
    """One loose value checked with `Fields` (the removed aux_loss_weight, a weight being folded)."""

    def __init__(self, name: str, value: Any):
        setattr(self, name, value)


def fold_aux_loss_weight(overrides: dict[str, Any], model: str, value: Any) -> None:
    """The removed TrainConfig.aux_loss_weight multiplied the model's weighted auxiliary total: 1
    is ignored; another value is multiplied into moe.balance_loss_weight and moe.z_loss_weight of
    the `overrides` (model_config; the `model` preset's weights unless they set them), so an old
    recipe trains the same. Both with a FutureWarning."""
    weight = _Value("aux_loss_weight", value)
    Fields(weight).number("aux_loss_weight", 0.0)
    w = weight.aux_loss_weight
    if w == 1.0:
        warnings.warn("aux_loss_weight is deprecated and ignored: each auxiliary loss has one weight, "
                      "model.moe.balance_loss_weight and model.moe.z_loss_weight", FutureWarning, stacklevel=4)
        return
    preset = model_config(model).moe if model in list_models() else MoEConfig()
    moe = overrides.setdefault("moe", {})
    for name in _AUX_TERM_WEIGHTS:
        term = _Value(name, moe.get(name, getattr(preset, name)))
        Fields(term, "model.moe.").number(name, 0.0)
        moe[name] = getattr(term, name) * w
    folded = ", ".join(f"model.moe.{name}={moe[name]:g}" for name in _AUX_TERM_WEIGHTS)
    warnings.warn(f"aux_loss_weight is deprecated: aux_loss_weight={w:g} is folded into the per-term weights "
                  f"({folded}); set those instead", FutureWarning, stacklevel=4)
