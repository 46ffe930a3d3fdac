"""ViTConfig: every knob of a model, validated in one place with errors that name the field.

MoE settings are one nested MoEConfig (`moe`); which blocks are MoE and how many experts each
has stay here, since a pyramid gives every MoE block its own count.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from torch import nn

from ..moe import MoEConfig, MoEMlp, router_class
from ..validation import ConfigError, Fields, divisors_text, show
from .mlp import Mlp
from .residual import ResidualMoE
from .tokenizer import conv_tokenizer_layers

MAX_DEPTH = 1024
"""Blocks: the deepest published ViTs have 48-80; validating and building a million (a config that
says so) would take minutes of Python before any memory check could refuse it."""
MAX_CONV_LAYERS = 16
"""Conv tokenizer layers: each at least halves the image side (stride-2 max-pool), 2**16 pixels."""

# The flat spellings the MoE fields had before they moved into `moe` (commit 67b4dc0): accepted
# with a FutureWarning in 0.x. Fields added since (priority, ...) never had one: a flat spelling
# of those is an error that names the nested one.
LEGACY_MOE_FIELDS = {**{name: name for name in (
    "router", "top_k", "capacity_factor_train", "capacity_factor_eval", "min_capacity", "expert_init", "eval_mode",
    "random_granularity", "router_noise", "jitter_eps", "balance_loss_weight", "z_loss_weight", "second_policy",
    "second_threshold", "slots_per_expert", "dispatch")}, "moe_residual": "residual"}


@dataclass
class ViTConfig:
    # --- the transformer ---
    img_size: int = 32
    tokenizer: str = "patch"
    """"patch" (non-overlapping patch_size x patch_size patches, one linear map) or "conv" (CCT's
    convolutional tokenizer, tokenizer.py; patch_size is then unused)."""
    patch_size: int = 4
    conv_layers: int = 1
    """Conv -> ReLU -> max-pool stages of the "conv" tokenizer (each halves the side)."""
    conv_kernel: int = 3
    """Kernel of every "conv" tokenizer layer (stride max(1, k//2 - 1), padding max(1, k//2))."""
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 300
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 1024
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    """Stochastic depth (droppath.py): block i drops each image's residual branches with
    probability drop_path_rate * i / (depth - 1) in training."""
    norm_eps: float = 1e-5
    pool: str = "cls"
    """"cls" (class token), "mean" (mean of all tokens) or "seq" (CCT's sequence pooling: a
    learned softmax-weighted sum of the tokens, seqpool.py)."""
    head: str = "mlp"
    """"mlp" (Linear-GELU-Linear, the source project's head) or "linear"."""
    head_hidden: int = 3072
    head_init: str = "default"
    """"default" or "zero" (zero-initialised last head layer, as in the ColossalAI recipe)."""
    pos_embed: str = "learned"
    """"learned" (a positional table added to the tokens) or "none" (the tokens' order is left
    to the convolutional tokenizer's overlap, as CCT can do)."""
    pos_embed_rows: int | None = None
    """Rows of the positional table; None sizes it to the token count (see README on 12,798,490)."""
    share_blocks: bool = False
    """WideNet (Xue et al. 2022): one attention and one MLP layer (dense or MoE: router and
    experts) shared by every block; each block keeps its own two LayerNorms."""

    # --- which blocks are MoE, and how ---
    moe_layers: Any = "none"
    """"none", "all", "every_other" (blocks 1, 3, 5, ...), "last:K", or a list of block indices."""
    num_experts: Any = 4
    """An int for every MoE block, or one int per MoE block (a pyramid)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Everything else about the MoE layers (router, top_k, capacities, losses, ...)."""

    # ------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def replace(self, **overrides: Any) -> "ViTConfig":
        """A copy with `overrides` applied. MoE fields go as `moe={...}` (merged into the current
        MoEConfig) or `moe=MoEConfig(...)`, dotted as `"moe.top_k"`, or in the old flat spelling
        (`top_k=2`, with a FutureWarning)."""
        own, moe = {}, {}
        for key, value in normalize_keys(overrides).items():
            if key == "moe":
                if isinstance(value, MoEConfig):
                    own["moe"] = value
                elif isinstance(value, Mapping):
                    moe.update(value)
                else:
                    raise ConfigError(f"model field moe={value!r} is not allowed: a mapping of MoE fields")
            elif key.startswith("moe."):
                moe[key[4:]] = value
            else:
                own[key] = value
        new = dataclasses.replace(self, **own)
        return dataclasses.replace(new, moe=new.moe.replace(**moe)) if moe else new

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "moe"}
        d["moe"] = self.moe.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ViTConfig":
        """From `to_dict()` output, a YAML mapping, or an older flat checkpoint config."""
        return cls().replace(**dict(data))

    @property
    def token_grid(self) -> int:
        """Side of the square grid of image tokens."""
        if self.tokenizer == "conv":
            return conv_tokenizer_layers(self.img_size, self.in_chans, self.embed_dim, self.conv_layers,
                                         self.conv_kernel)[-1].pooled_side
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Image tokens (patches, or positions of the conv tokenizer's last map)."""
        return self.token_grid ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.pool == "cls" else 0)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_block_indices())

    def moe_block_indices(self) -> list[int]:
        spec, depth = self.moe_layers, self.depth
        if spec in (None, "none", False):
            return []
        if spec == "all":
            return list(range(depth))
        if spec == "every_other":
            return list(range(1, depth, 2))
        if isinstance(spec, str) and spec.startswith("last:"):
            k = int(spec.split(":", 1)[1])
            return list(range(depth - k, depth))
        return sorted(int(i) for i in spec)

    def experts_per_moe_block(self) -> list[int]:
        blocks = self.moe_block_indices()
        if isinstance(self.num_experts, (list, tuple)):
            return [int(e) for e in self.num_experts]
        return [int(self.num_experts)] * len(blocks)

    def validate(self) -> "ViTConfig":
        """A checked copy (YAML strings coerced to the fields' types); ConfigError names the field."""
        new = copy.deepcopy(self)
        new._check(Fields(new, "model field "))
        return new

    def _check(self, f: Fields) -> None:
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim",
                     "num_heads", "mlp_hidden", "head_hidden", "conv_kernel"):
            f.integer(name, 1)  # sizes are bounded by memory (models.budget), checked before building
        f.integer("depth", 1, MAX_DEPTH)
        f.integer("conv_layers", 1, MAX_CONV_LAYERS)
        f.choice("tokenizer", ("patch", "conv"))
        f.need(self.tokenizer != "patch" or self.img_size % self.patch_size == 0, "patch_size",
               f"must divide img_size={self.img_size}")
        f.need(self.embed_dim % self.num_heads == 0, "num_heads",
               lambda: f"a divisor of embed_dim={self.embed_dim}: {divisors_text(self.embed_dim)} (flag --heads)")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            f.number(name, 0.0, 1.0, strict_hi=True)
        f.number("norm_eps", 0.0, strict_lo=True)
        f.boolean("qkv_bias")
        f.choice("pool", ("cls", "mean", "seq"))
        f.choice("head", ("mlp", "linear"))
        f.choice("head_init", ("default", "zero"))
        f.choice("pos_embed", ("learned", "none"))
        f.integer("pos_embed_rows", self.num_tokens, optional=True)
        f.need(self.pos_embed_rows is None or self.pos_embed == "learned", "pos_embed_rows",
               "null with pos_embed='none' (there is no positional table)")
        f.boolean("share_blocks")

        spec = self.moe_layers
        if isinstance(spec, str):
            ok = spec in ("none", "all", "every_other")
            if spec.startswith("last:"):
                tail = spec.split(":", 1)[1]
                ok = tail.isdigit() and 1 <= int(tail) <= self.depth
            f.need(ok, "moe_layers", f'"none", "all", "every_other", "last:K" (1 <= K <= depth={self.depth}) '
                                     "or a list of block indices")
        else:
            f.need(isinstance(spec, (list, tuple)) and len(set(spec)) == len(spec)
                   and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.depth for i in spec),
                   "moe_layers", f"distinct block indices in [0, {self.depth})")
        blocks = self.moe_block_indices()
        if isinstance(self.num_experts, (list, tuple)):
            f.need(len(self.num_experts) == len(blocks), "num_experts",
                   f"one count per MoE block ({len(blocks)} blocks: {blocks}) or a single int")
        else:
            f.integer("num_experts", 1)
        f.need(all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in
                   (self.num_experts if isinstance(self.num_experts, (list, tuple)) else [self.num_experts])),
               "num_experts", "positive integers")
        experts = self.experts_per_moe_block()
        if self.share_blocks:
            f.need(blocks in ([], list(range(self.depth))), "moe_layers",
                   "'none' or every block ('all') with share_blocks=True: the blocks share one MLP layer")
            f.need(len(set(experts)) <= 1, "num_experts", "one count with share_blocks=True (one shared expert set)")
        f.need(isinstance(self.moe, MoEConfig), "moe", "a MoEConfig")
        self.moe = self.moe.validate(experts, prefix="model field moe.")
        moe_fields = Fields(self.moe, "model field moe.")
        moe_fields.need(not self.moe.residual or bool(blocks), "residual", "False when no block is MoE (moe_layers is 'none')")
        moe_fields.need(self.moe.image_pool != "cls" or self.pool == "cls", "image_pool",
                        f"'mean' unless the model has a class token (pool is {self.pool!r}, not 'cls')")
        moe_fields.need(self.moe.superclasses is None or len(self.moe.superclasses) == self.num_classes,
                        "superclasses", f"one expert per class: a list of num_classes={self.num_classes} entries")
        moe_fields.need(self.moe.superclasses is None or bool(blocks), "superclasses",
                        "null when no block is MoE (moe_layers is 'none')")

    def mlp_layer(self, block: int) -> tuple[type[nn.Module], dict[str, Any]]:
        """Block `block`'s MLP class and keyword arguments: the one place where the config picks
        dense Mlp, or the layer `moe.router` declares (MoEMlp routing with it, or SoftMoE), wrapped
        in ResidualMoE if asked."""
        experts = dict(zip(self.moe_block_indices(), self.experts_per_moe_block()))
        if block not in experts:
            return Mlp, {}
        layer = router_class(self.moe.router).layer or MoEMlp
        kwargs = dict(num_experts=experts[block], config=self.moe)
        if self.moe.residual:
            return ResidualMoE, dict(moe_layer=layer, **kwargs)
        return layer, kwargs


def normalize_keys(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Model override keys in today's spelling: old flat MoE names become `moe.NAME` (with a
    FutureWarning); unknown names raise ConfigError listing the allowed ones."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        key = str(key)
        if key in LEGACY_MOE_FIELDS and key not in ViTConfig.__dataclass_fields__:
            new = f"moe.{LEGACY_MOE_FIELDS[key]}"
            warnings.warn(f"model field {key!r} is now {new!r} (the MoE settings moved into model.moe); "
                          f"the old spelling will be removed in a future release", FutureWarning, stacklevel=4)
            key = new
        elif key in MoEConfig.field_names() and key not in ViTConfig.__dataclass_fields__:
            raise ConfigError(f"model field {show(key)} is an MoE field without a flat spelling: write 'moe.{key}' "
                              f"(model.moe.{key}=... on the command line, moe: {{{key}: ...}} in YAML)")
        if key.startswith("moe.") and key[4:] not in MoEConfig.field_names():
            raise ConfigError(f"unknown MoE field {show(key[4:])} (in {show(key)}); allowed: {', '.join(MoEConfig.field_names())}")
        if key != "moe" and not key.startswith("moe.") and key not in ViTConfig.__dataclass_fields__:
            raise ConfigError(f"unknown model field {show(key)}; allowed: {', '.join(ViTConfig.field_names())} "
                              f"(MoE fields as moe.FIELD: {', '.join(MoEConfig.field_names())})")
        out[key] = value
    return out

