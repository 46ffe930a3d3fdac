"""ViTConfig: every knob of a model, validated in one place with errors that name the field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from ..moe import DISPATCH_PATHS, EVAL_MODES, EXPERT_INITS, LAYER_ROUTERS, MoEMlp, SoftMoE
from ..moe.routers import GRANULARITIES, NOISE_POLICIES, SECOND_POLICIES
from .mlp import Mlp
from .residual import ResidualMoE


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names the field and what is."""


@dataclass
class ViTConfig:
    # --- the transformer ---
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 300
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 1024
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    norm_eps: float = 1e-5
    pool: str = "cls"
    """"cls" (class token) or "mean" (mean of all tokens)."""
    head: str = "mlp"
    """"mlp" (Linear-GELU-Linear, the source project's head) or "linear"."""
    head_hidden: int = 3072
    head_init: str = "default"
    """"default" or "zero" (zero-initialised last head layer, as in the ColossalAI recipe)."""
    pos_embed_rows: int | None = None
    """Rows of the positional table; None sizes it to the token count (see README on 12,798,490)."""
    share_blocks: bool = False
    """WideNet: one attention and one MLP layer (dense or MoE: router and experts) shared by
    every block; each block keeps its own two LayerNorms."""

    # --- which blocks are MoE, and how ---
    moe_layers: Any = "none"
    """"none", "all", "every_other" (blocks 1, 3, 5, ...), "last:K", or a list of block indices."""
    num_experts: Any = 4
    """An int for every MoE block, or one int per MoE block (a pyramid)."""
    router: str = "switch"
    """"switch", "topk", "random", "expert_choice" (MoEMlp with that router) or "soft" (SoftMoE)."""
    top_k: int = 1
    capacity_factor_train: float | None = None
    capacity_factor_eval: float | None = None
    min_capacity: int = 0
    expert_init: str = "shared"
    eval_mode: str = "merged"
    random_granularity: str = "batch"
    router_noise: str = "none"
    jitter_eps: float = 0.01
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    second_policy: str = "all"
    """Top-2 only: "all" (always send the second copy), "sampling" (send with probability
    2 * gate2, GShard), "random" (send if gate2 > second_threshold). See TopKRouter."""
    second_threshold: float = 0.0
    slots_per_expert: int = 1
    """Soft MoE slots per expert."""
    moe_residual: bool = False
    """PR-MoE's residual MoE: a dense MLP branch next to each MoE layer, mixed per token."""
    dispatch: str = "auto"

    # ------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def replace(self, **overrides: Any) -> "ViTConfig":
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown model field(s) {unknown}; allowed: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.pool == "cls" else 0)

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
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"model field {name}={getattr(self, name)!r} is not allowed: {allowed}")

        def choice(name: str, options) -> None:
            need(getattr(self, name) in options, name, f"one of {list(options)}")

        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                     "num_heads", "mlp_hidden", "head_hidden"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "a positive integer")
        need(self.img_size % self.patch_size == 0, "patch_size", f"must divide img_size={self.img_size}")
        need(self.embed_dim % self.num_heads == 0, "num_heads", f"must divide embed_dim={self.embed_dim}")
        for name in ("drop_rate", "attn_drop_rate"):
            need(0.0 <= getattr(self, name) < 1.0, name, "a probability in [0, 1)")
        need(self.norm_eps > 0, "norm_eps", "a positive number")
        choice("pool", ("cls", "mean"))
        choice("head", ("mlp", "linear"))
        choice("head_init", ("default", "zero"))
        need(self.pos_embed_rows is None or self.pos_embed_rows >= self.num_tokens, "pos_embed_rows",
             f"None or at least the token count {self.num_tokens}")

        spec = self.moe_layers
        if isinstance(spec, str):
            ok = spec in ("none", "all", "every_other")
            if spec.startswith("last:"):
                tail = spec.split(":", 1)[1]
                ok = tail.isdigit() and 1 <= int(tail) <= self.depth
            need(ok, "moe_layers", f'"none", "all", "every_other", "last:K" (1 <= K <= depth={self.depth}) or a list of block indices')
        else:
            need(isinstance(spec, (list, tuple)) and len(set(spec)) == len(spec)
                 and all(isinstance(i, int) and 0 <= i < self.depth for i in spec),
                 "moe_layers", f"distinct block indices in [0, {self.depth})")
        blocks = self.moe_block_indices()
        if isinstance(self.num_experts, (list, tuple)):
            need(len(self.num_experts) == len(blocks), "num_experts",
                 f"one count per MoE block ({len(blocks)} blocks: {blocks}) or a single int")
        experts = self.experts_per_moe_block()
        need(all(isinstance(e, int) and e >= 1 for e in experts), "num_experts", "positive integers")
        choice("router", LAYER_ROUTERS)
        need(isinstance(self.top_k, int) and 1 <= self.top_k <= min(experts or [self.top_k]), "top_k",
             f"an integer in [1, smallest expert count {min(experts or [1])}]")
        need(self.router != "switch" or self.top_k == 1, "top_k", "1 for router 'switch' (use router 'topk' for k > 1)")
        need(self.router not in ("expert_choice", "soft") or self.top_k == 1, "top_k",
             f"1 for router {self.router!r} (expert choice: the capacity factor sets experts per token; "
             "soft: every token mixes every expert)")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            v = getattr(self, name)
            need(v is None or v >= 0, name, "None or 0 (dropless), or a positive factor")
        if self.router == "expert_choice" and blocks:
            for name in ("capacity_factor_train", "capacity_factor_eval"):
                need(bool(getattr(self, name)), name, "a positive factor for router 'expert_choice' "
                     "(each expert takes ceil(factor * tokens / experts) tokens)")
        need(self.min_capacity >= 0, "min_capacity", "an integer >= 0")
        choice("second_policy", SECOND_POLICIES)
        need(self.second_policy == "all" or (self.router == "topk" and self.top_k == 2), "second_policy",
             f"'all' unless router is 'topk' with top_k=2 (router={self.router!r}, top_k={self.top_k})")
        need(0.0 <= self.second_threshold <= 1.0, "second_threshold", "a gate value in [0, 1]")
        need(isinstance(self.slots_per_expert, int) and self.slots_per_expert >= 1, "slots_per_expert",
             "a positive integer")
        need(isinstance(self.moe_residual, bool) and (not self.moe_residual or bool(blocks)), "moe_residual",
             "a bool, True only with MoE blocks (moe_layers is 'none')")
        need(isinstance(self.share_blocks, bool), "share_blocks", "a bool")
        if self.share_blocks:
            need(blocks in ([], list(range(self.depth))), "moe_layers",
                 "'none' or every block ('all') with share_blocks=True: the blocks share one MLP layer")
            need(len(set(experts)) <= 1, "num_experts", "one count with share_blocks=True (one shared expert set)")
        choice("expert_init", EXPERT_INITS)
        choice("eval_mode", EVAL_MODES)
        choice("random_granularity", GRANULARITIES)
        choice("router_noise", NOISE_POLICIES)
        need(0 <= self.jitter_eps < 1, "jitter_eps", "a number in [0, 1)")
        need(self.balance_loss_weight >= 0, "balance_loss_weight", "a number >= 0")
        need(self.z_loss_weight >= 0, "z_loss_weight", "a number >= 0")
        choice("dispatch", DISPATCH_PATHS)
        return self

    def moe_kwargs(self, num_experts: int) -> dict[str, Any]:
        """Keyword arguments of MoEMlp for one block."""
        return dict(
            num_experts=num_experts, router=self.router, top_k=self.top_k,
            capacity_factor_train=self.capacity_factor_train, capacity_factor_eval=self.capacity_factor_eval,
            min_capacity=self.min_capacity, expert_init=self.expert_init, eval_mode=self.eval_mode,
            random_granularity=self.random_granularity, router_noise=self.router_noise,
            jitter_eps=self.jitter_eps, balance_loss_weight=self.balance_loss_weight,
            z_loss_weight=self.z_loss_weight, second_policy=self.second_policy,
            second_threshold=self.second_threshold, dispatch=self.dispatch,
        )

    def mlp_layer(self, block: int) -> tuple[type[nn.Module], dict[str, Any]]:
        """Block `block`'s MLP class and keyword arguments: the one place where the config picks
        dense Mlp, routed MoEMlp or SoftMoE (by `router`), wrapped in ResidualMoE if asked."""
        experts = dict(zip(self.moe_block_indices(), self.experts_per_moe_block()))
        if block not in experts:
            return Mlp, {}
        if self.router == "soft":
            layer, kwargs = SoftMoE, dict(num_experts=experts[block], slots_per_expert=self.slots_per_expert,
                                          expert_init=self.expert_init, dispatch=self.dispatch)
        else:
            layer, kwargs = MoEMlp, self.moe_kwargs(experts[block])
        if self.moe_residual:
            return ResidualMoE, dict(moe_layer=layer, **kwargs)
        return layer, kwargs
