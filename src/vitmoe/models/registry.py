"""Named presets: `create_model(name, **overrides)` and `list_models()`."""
from __future__ import annotations

import copy
from typing import Any, Callable

from ..moe import MoEConfig
from ..validation import ConfigError, divisors_text
from .config import ViTConfig, normalize_keys
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
    """The preset's config with overrides applied and validated.

    A new width without a head count keeps the preset's head width (d 300 with 12 heads of 25:
    d 400 gets 16 heads); a width it does not divide is an error that names the valid counts.
    """
    if name not in _PRESETS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    preset = _PRESETS[name][0]()
    overrides = normalize_keys(overrides)
    width = overrides.get("embed_dim")
    if width is not None and "num_heads" not in overrides and isinstance(width, int) and width != preset.embed_dim:
        head_dim = preset.embed_dim // preset.num_heads
        if width % head_dim:
            raise ConfigError(
                f"model field embed_dim={width} does not keep preset {name!r}'s head width {head_dim} "
                f"({preset.num_heads} heads of d {preset.embed_dim}): choose the head count with --heads "
                f"(model.num_heads), {divisors_text(width)}")
        overrides["num_heads"] = width // head_dim
    return preset.replace(**overrides).validate()


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


# --- the source project's models (switch-vit, HPML course project) ---------------------------------------
@register_model("vit", "the source project's dense ViT: d 300, 12 layers, 12 heads, MLP 1024, patch 4, MLP head 3072")
def _vit() -> ViTConfig:
    return ViTConfig()


@register_model("switch_vit", "vit with a switch (top-1) MoE MLP in every block, 32 experts, dropless")
def _switch_vit() -> ViTConfig:
    return ViTConfig(moe_layers="all", num_experts=32, moe=MoEConfig(router="switch"))


@register_model("random_vit", "vit with 4 randomly routed experts per block (one per layer per forward), merged at eval")
def _random_vit() -> ViTConfig:
    return ViTConfig(moe_layers="all", num_experts=4,
                     moe=MoEConfig(router="random", random_granularity="batch", eval_mode="merged"))


# --- ColossalAI's ViT-MoE CIFAR-10 example (examples/images/vit/moe) -----------------------------------------
def _lite(depth: int = 6, moe_layers: Any = "none", num_experts: Any = 4, share_blocks: bool = False,
          **moe: Any) -> ViTConfig:
    """ViT-Lite shape and the recipe's common settings: mean pooling (no class token), a
    zero-initialised linear head, dropout 0.1 (projections and attention), LayerNorm eps 1e-6,
    capacity 1.25 train / 2.0 eval with at least 4 slots per expert."""
    return ViTConfig(
        img_size=32, patch_size=4, embed_dim=256, depth=depth, num_heads=4, mlp_hidden=512,
        pool="mean", head="linear", head_init="zero", drop_rate=0.1, attn_drop_rate=0.1, norm_eps=1e-6,
        moe_layers=moe_layers, num_experts=num_experts, share_blocks=share_blocks,
        moe=MoEConfig(capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=4, **moe),
    )


_PYRAMID = dict(moe_layers=[1, 3, 5], num_experts=[4, 4, 8])


@register_model("vit_lite6", "ViT-Lite 6/4: depth 6, d 256, 4 heads, MLP 512, patch 4, mean pooling, zero linear head (dense)")
def _vit_lite6() -> ViTConfig:
    return _lite(6)


@register_model("vit_lite7", "ViT-Lite 7/4: vit_lite6 with depth 7 (dense)")
def _vit_lite7() -> ViTConfig:
    return _lite(7)


@register_model("vit_moe_lite6", "vit_lite6 with top-2 MoE (Gaussian noise std 1/E^2) in blocks 1, 3, 5 with [4, 4, 8] experts")
def _vit_moe_lite6() -> ViTConfig:
    return _lite(6, **_PYRAMID, router="topk", top_k=2, router_noise="gaussian")


@register_model("pr_moe_lite6", "ColossalAI's ViT-MoE Lite6 PR-MoE: vit_moe_lite6's pyramid as residual MoE "
                "(dense MLP branch mixed per token), top-1 with jitter")
def _pr_moe_lite6() -> ViTConfig:
    return _lite(6, **_PYRAMID, residual=True, router="switch", top_k=1, router_noise="jitter")


@register_model("widenet_tiny", "WideNet: one attention, router and expert set shared by 6 blocks (own LayerNorms), "
                "d 256, 4 heads, MLP 512, 4 experts top-2 with Gaussian noise; the vit_lite6 shape, our choice "
                "(the reference names WideNet-tiny without its shape)")
def _widenet_tiny() -> ViTConfig:
    return _lite(6, moe_layers="all", num_experts=4, share_blocks=True, router="topk", top_k=2, router_noise="gaussian")


# --- other routing schemes on the same shape (not trained by the ColossalAI example) ----
@register_model("ec_moe_lite6", "vit_moe_lite6 with expert-choice routing (each expert takes its top "
                "ceil(cf * tokens / E) tokens; cf 1.25 train / 2.0 eval)")
def _ec_moe_lite6() -> ViTConfig:
    return _lite(6, **_PYRAMID, router="expert_choice")


@register_model("soft_moe_lite6", "vit_moe_lite6 with Soft MoE layers (1 slot per expert, no dropping, no aux loss)")
def _soft_moe_lite6() -> ViTConfig:
    return _lite(6, **_PYRAMID, router="soft", slots_per_expert=1)


# --- Compact Convolutional Transformers (Hassani et al. 2021), sized for 32x32 and 28x28 images ----------------
def _cct(depth: int, embed_dim: int, num_heads: int, mlp_hidden: int, conv_layers: int, moe_layers: Any = "none",
         num_experts: Any = 4, **moe: Any) -> ViTConfig:
    """CCT-depth/3xconv_layers with the CCT code's model settings: a 3x3 convolutional tokenizer,
    sequence pooling, a learned positional table, a linear head, no dropout but 0.1 on attention,
    stochastic depth 0.1 and bias-free qkv (CCT's attention has none: its published sizes, e.g.
    3.76M for CCT-7/3x1, count none). The dataset sets img_size and in_chans."""
    return ViTConfig(
        img_size=32, tokenizer="conv", conv_layers=conv_layers, conv_kernel=3, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_hidden=mlp_hidden, qkv_bias=False, pool="seq", pos_embed="learned", head="linear",
        drop_rate=0.0, attn_drop_rate=0.1, drop_path_rate=0.1, moe_layers=moe_layers, num_experts=num_experts,
        moe=MoEConfig(**moe),
    )


_CCT_SHAPES = {
    "cct_2_3x2": (dict(depth=2, embed_dim=128, num_heads=2, mlp_hidden=128, conv_layers=2),
                  "CCT-2/3x2: two 3x3 conv tokenizer layers, d 128, depth 2, 2 heads, MLP 128"),
    "cct_7_3x2": (dict(depth=7, embed_dim=256, num_heads=4, mlp_hidden=512, conv_layers=2),
                  "CCT-7/3x2: two 3x3 conv tokenizer layers, d 256, depth 7, 4 heads, MLP 512"),
    "cct_7_3x1": (dict(depth=7, embed_dim=256, num_heads=4, mlp_hidden=512, conv_layers=1),
                  "CCT-7/3x1: cct_7_3x2 with one conv layer (4x the tokens)"),
}
_CCT_COMMON = "sequence pooling, learned positions, linear head, attention dropout 0.1, stochastic depth 0.1 (dense)"
_CCT_CAPACITY = dict(capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=4)  # as the Lite presets


def _cct_moe_variants(depth: int) -> dict[str, tuple[dict[str, Any], str]]:
    """MoE in every other block (Switch Transformer, GShard); for depth 2 that is block 1 alone."""
    blocks = list(range(1, depth, 2))
    where = f"block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}"
    pyramid = [4] * (len(blocks) - 1) + [8]  # pr_moe_lite6's [4, 4, 8] at depth 7: more experts late
    return {
        "switch": (dict(moe_layers="every_other", num_experts=8, router="switch", **_CCT_CAPACITY),
                   f"switch (top-1) MoE MLPs of 8 experts in {where}, capacity 1.25 train / 2.0 eval (min 4)"),
        "top2": (dict(moe_layers="every_other", num_experts=8, router="topk", top_k=2, **_CCT_CAPACITY),
                 f"top-2 MoE MLPs of 8 experts in {where}, capacity 1.25 train / 2.0 eval (min 4)"),
        "random": (dict(moe_layers="every_other", num_experts=4, router="random", random_granularity="batch",
                        eval_mode="merged", expert_init="shared"),
                   f"4 randomly routed experts (one per layer per forward, shared init) in {where}, merged at eval"),
        # Explicit blocks, as pr_moe_lite6: a pyramid's counts belong to given blocks.
        "pr": (dict(moe_layers=blocks, num_experts=pyramid, residual=True, router="switch", top_k=1,
                    router_noise="jitter", **_CCT_CAPACITY),
               f"PR-MoE as pr_moe_lite6: residual MoE (dense MLP branch mixed per token) in {where} with "
               f"{pyramid} experts, top-1 with jitter"),
    }


for _name, (_shape, _what) in _CCT_SHAPES.items():
    register_model(_name, f"{_what}; {_CCT_COMMON}")(lambda s=_shape: _cct(**s))
for _name in ("cct_2_3x2", "cct_7_3x2"):
    _shape = _CCT_SHAPES[_name][0]
    for _suffix, (_moe, _what) in _cct_moe_variants(_shape["depth"]).items():
        # A fresh copy per call: the block and expert lists must not be shared between configs.
        register_model(f"{_name}_{_suffix}", f"{_name} with {_what}")(lambda s=_shape, m=_moe: _cct(**s, **copy.deepcopy(m)))
