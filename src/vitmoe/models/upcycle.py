"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE ViT that starts from a trained dense ViT.

`upcycle(dense, **overrides)` builds the dense model's config with MoE settings applied and
copies the weights: every non-MLP weight as it is, and in each MoE block every expert a copy of
that block's dense MLP (`fc1.weight` [H, D] is expert `w1[e]` [D, H] transposed, `fc2.weight`
[D, H] is `w2[e]` [H, D] transposed, biases as they are). Routers start at zero weights, so
every expert has probability 1/E for every token (a balanced start). What the model computes at
initialisation then follows from the gates (dropless capacity assumed; a dropped copy adds 0):

* random routing (any granularity, any k; eval merged, random or ensemble) and top-k with
  k >= 2 (gates renormalised to sum to 1): exactly the dense model;
* switch (top-1): gate p_max = max_e softmax(router(x))_e times the dense MLP output, i.e.
  1/E times it with the zero router (the Switch gate is not renormalised); the block's residual
  keeps the rest. Upcycling into switch routing therefore starts from a different function
  (the MLP branch scaled by 1/E); top-k with k >= 2 does not;
* expert choice and Soft MoE get the copied experts but no identity guarantee (ties among
  equal router scores decide which tokens an expert takes; Soft MoE's slot logits keep their
  own initialisation);
* residual MoE (PR-MoE): the dense branch is a copy of the MLP as well and the mixing layer
  starts at zero (0.5 / 0.5), so it is the dense model whenever the MoE branch is.

Two ways to make the experts differ from the start, both seeded (a CPU generator, so the result
does not depend on the device): `noise_std` adds N(0, noise_std^2) to every expert weight, and
Drop-Upcycling (Nakamura et al. 2025, `drop_upcycling=r`) re-initialises, independently for
each expert, round(r * H) randomly chosen hidden units: their columns of w1, their rows of w2
and their b1 entries are drawn from a normal distribution with the mean and standard deviation
of the dense layer's weights (of `fc1.weight`, `fc2.weight`, `fc1.bias` respectively).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import Tensor

from ..moe import MoEConfig, find_moe_layers
from ..validation import ConfigError
from .config import ViTConfig, normalize_keys
from .vit import VisionTransformer

DEFAULTS: dict[str, Any] = {"moe_layers": "every_other", "num_experts": 8, "moe": {"router": "topk", "top_k": 2}}
"""What `upcycle` applies unless told otherwise: every other block (Komatsuzaki et al. upcycle
every other MLP), 8 experts, top-2 routing with renormalised gates (dropless: the upcycled model
computes exactly the dense model at initialisation). The `moe` defaults apply field by field: a
given MoE field replaces only itself, except that choosing a router other than "topk" drops the
default top_k=2 (switch, expert choice and soft routing are top-1; random routing defaults to 1).
A whole `moe=MoEConfig(...)` replaces them all."""

ARCH_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_hidden", "tokenizer", "patch_size", "conv_layers",
               "conv_kernel", "in_chans", "qkv_bias", "pool", "head", "head_hidden", "share_blocks", "pos_embed",
               "pos_embed_rows")
"""Fields that shape the weights upcycling copies: they must be equal in the dense and the MoE model."""

_MLP = re.compile(r"(blocks\.\d+\.mlp)(\.moe)?")


def architecture_diff(source: ViTConfig, target: ViTConfig, fields: tuple[str, ...] = ARCH_FIELDS,
                      names: tuple[str, str] = ("source", "target")) -> list[str]:
    """'FIELD SOURCE_VALUE (source) vs TARGET_VALUE (target)' for every field in `fields` that
    differs (head_hidden only for MLP heads, patch_size only for patch tokenizers, conv_* only for
    conv tokenizers: unused fields shape nothing); `names` labels the two models."""
    diff = []
    for name in fields:
        a, b = getattr(source, name), getattr(target, name)
        if name == "head_hidden" and source.head == target.head == "linear":
            continue
        if (name == "patch_size" and source.tokenizer == target.tokenizer == "conv"
                or name in ("conv_layers", "conv_kernel") and source.tokenizer == target.tokenizer == "patch"):
            continue
        if a != b:
            diff.append(f"{name} {a!r} ({names[0]}) vs {b!r} ({names[1]})")
    return diff


def upcycled_config(dense: ViTConfig, **overrides: Any) -> ViTConfig:
    """The dense config with MoE settings applied: `overrides` (ViTConfig fields, `moe={...}`,
    `"moe.top_k"`) on top of `DEFAULTS`. Raises ConfigError when the result has no MoE block or
    changes a field in `ARCH_FIELDS`, img_size or num_classes."""
    if dense.is_moe:
        raise ConfigError(f"upcycle: the source model is already MoE (MoE blocks {dense.moe_block_indices()}); "
                          "upcycle a dense model (vitmoe.merge_experts gives one)")
    overrides = normalize_keys(overrides)
    given: dict[str, Any] = {}  # the MoE fields given, flat
    for k, v in overrides.items():
        if k == "moe" and isinstance(v, Mapping):
            given.update(v)
        elif k.startswith("moe."):
            given[k[4:]] = v
    moe_defaults = dict(DEFAULTS["moe"])
    if given.get("router", moe_defaults["router"]) != moe_defaults["router"]:
        moe_defaults.pop("top_k")
    full = {k: v for k, v in DEFAULTS.items() if k != "moe" and k not in overrides}
    if isinstance(overrides.get("moe"), MoEConfig):  # a whole config: dotted fields still apply on top
        full.update(overrides)
    else:
        full["moe"] = {**moe_defaults, **given}
        full.update({k: v for k, v in overrides.items() if k != "moe" and not k.startswith("moe.")})
    cfg = dense.replace(**full).validate()
    if not cfg.is_moe:
        raise ConfigError(f"upcycle: moe_layers={cfg.moe_layers!r} makes no block of depth {cfg.depth} MoE; "
                          "choose e.g. moe_layers='all'")
    diff = architecture_diff(dense, cfg, ARCH_FIELDS + ("img_size", "num_classes"))
    if diff:
        raise ConfigError(f"upcycle: the MoE model must keep the dense model's shape: {'; '.join(diff)}")
    return cfg


@torch.no_grad()
def upcycle(dense: VisionTransformer, config: ViTConfig | None = None, *, noise_std: float = 0.0,
            drop_upcycling: float = 0.0, seed: int = 0, **overrides: Any) -> VisionTransformer:
    """An MoE VisionTransformer initialised from `dense` (see the module docstring).

    `config`: the MoE model's whole config (else `upcycled_config(dense.config, **overrides)`,
    e.g. `upcycle(vit, moe_layers="all", num_experts=8, moe={"router": "switch"})`).
    The result has `dense`'s dtype, device and train/eval mode; the global RNG is untouched.
    """
    if config is not None and overrides:
        raise TypeError("upcycle: give either config or keyword overrides, not both")
    cfg = config.validate() if config is not None else upcycled_config(dense.config, **overrides)
    diff = architecture_diff(dense.config, cfg, ARCH_FIELDS + ("img_size", "num_classes"))
    if diff:
        raise ConfigError(f"upcycle: the MoE model must keep the dense model's shape: {'; '.join(diff)}")
    ref = next(dense.parameters())
    with torch.random.fork_rng(devices=[]):  # the MoE model's own random init is overwritten anyway
        model = VisionTransformer(cfg)
    model.to(device=ref.device, dtype=ref.dtype)
    load_upcycled(model, dense.state_dict(), noise_std=noise_std, drop_upcycling=drop_upcycling, seed=seed)
    return model.train(dense.training)


@torch.no_grad()
def load_upcycled(model: VisionTransformer, dense_state: Mapping[str, Tensor], *, noise_std: float = 0.0,
                  drop_upcycling: float = 0.0, seed: int = 0) -> None:
    """Load a dense ViT's state dict (same shape as `model` but for the MLPs) into MoE `model`:
    experts from the block's MLP, routers and residual mixers at zero. Strict: any tensor the
    dense state cannot supply, or does not use, is a ValueError naming it."""
    if not 0.0 <= float(drop_upcycling) <= 1.0:
        raise ValueError(f"drop_upcycling must be a fraction in [0, 1], got {drop_upcycling!r}")
    if not float(noise_std) >= 0.0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    own = model.state_dict()
    moe_names = [name for name, _ in find_moe_layers(model, every_name=True)]
    new: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in dense_state:
            raise ValueError(f"upcycle: the dense state has no {key!r}")
        used.add(key)
        return dense_state[key]

    for key, target in own.items():
        layer = next((n for n in moe_names if key.startswith(n + ".")), None)
        if layer is not None:
            m = _MLP.fullmatch(layer)
            if m is None:
                raise ValueError(f"upcycle: MoE layer {layer!r} is not a block's MLP")
            mlp, leaf = m.group(1), key[len(layer) + 1:]
            value = _expert_value(leaf, mlp, take, target)
        elif key in dense_state:
            value = take(key)
        else:
            m = re.fullmatch(r"(blocks\.\d+\.mlp)\.(mlp\.(.+)|coef\.(weight|bias))", key)
            if m is None:
                raise ValueError(f"upcycle: nothing in the dense state gives {key!r}")
            value = take(f"{m.group(1)}.{m.group(3)}") if m.group(3) else torch.zeros_like(target)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"upcycle: {key} needs shape {tuple(target.shape)}, the dense state gives {tuple(value.shape)}")
        new[key] = value
    unused = sorted(set(dense_state) - used)
    if unused:
        raise ValueError(f"upcycle: the dense state's {unused[:3]}{' ...' if len(unused) > 3 else ''} have no place "
                         "in the MoE model")
    model.load_state_dict(new, strict=True)
    if drop_upcycling > 0 or noise_std > 0:
        gen = torch.Generator().manual_seed(int(seed))
        for _, layer in find_moe_layers(model):
            if drop_upcycling > 0:
                drop_upcycle_(layer.experts, drop_upcycling, gen)
            if noise_std > 0:
                for w in (layer.experts.w1, layer.experts.w2):
                    w.add_(torch.randn(w.shape, generator=gen, dtype=torch.float64).mul_(noise_std).to(w))


def _expert_value(leaf: str, mlp: str, take, target: Tensor) -> Tensor:
    """The value of an MoE layer's tensor `leaf` (experts.w1, router.weight, ...) from the dense MLP `mlp`."""
    E = target.shape[0]
    if leaf == "experts.w1":
        return take(f"{mlp}.fc1.weight").t().unsqueeze(0).expand(E, -1, -1)
    if leaf == "experts.b1":
        return take(f"{mlp}.fc1.bias").unsqueeze(0).expand(E, -1)
    if leaf == "experts.w2":
        return take(f"{mlp}.fc2.weight").t().unsqueeze(0).expand(E, -1, -1)
    if leaf == "experts.b2":
        return take(f"{mlp}.fc2.bias").unsqueeze(0).expand(E, -1)
    if leaf == "router.weight":
        return torch.zeros_like(target)  # uniform router probabilities: a balanced start
    if leaf == "phi":
        return target  # Soft MoE slot logits: no dense counterpart, keep their initialisation
    raise ValueError(f"upcycle: no rule for MoE tensor {leaf!r} of {mlp}")


@torch.no_grad()
def drop_upcycle_(experts, rate: float, generator: torch.Generator) -> list[Tensor]:
    """Drop-Upcycling in place on GroupedExperts whose experts are copies of one dense MLP: for each
    expert, round(rate * H) hidden units drawn without replacement get fresh w1 columns, w2 rows
    and b1 entries from N(mean, std) of the dense (expert 0's) weights. Returns each expert's
    re-initialised unit indices."""
    w1, b1, w2 = experts.w1, experts.b1, experts.w2
    E, D, H = w1.shape
    k = int(round(rate * H))
    stats = [(p[0].double().mean(), p[0].double().std() if p[0].numel() > 1 else p.new_zeros(()).double())
             for p in (w1, w2, b1)]

    def draw(shape, which: int) -> Tensor:
        mean, std = stats[which]
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * std.cpu() + mean.cpu()).to(w1)

    chosen = []
    for e in range(E):
        idx = torch.randperm(H, generator=generator)[:k].to(w1.device)
        w1[e][:, idx] = draw((D, k), 0)
        w2[e][idx, :] = draw((k, w2.shape[-1]), 1)
        b1[e][idx] = draw((k,), 2)
        chosen.append(idx)
    return chosen
