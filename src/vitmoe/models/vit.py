"""Vision Transformer (Dosovitskiy et al. 2021) whose blocks take their MLP as a class (dense Mlp,
MoEMlp, SoftMoE or ResidualMoE: ViTConfig.mlp_layer picks it); `share_blocks` builds WideNet.
With `tokenizer="conv"`, `pool="seq"` (and optionally `pos_embed="none"`) it is a Compact
Convolutional Transformer (Hassani et al. 2021).

Shapes: B batch, C channels, N tokens, D width, h heads, d head width.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe import EVAL_MODES, MoELayer, collect_moe_outputs, find_moe_layers
from .budget import check_buildable
from .config import ViTConfig
from .droppath import DropPath, drop_path_rates
from .mlp import Mlp
from .seqpool import SeqPool
from .tokenizer import ConvTokenizer


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        if x_BCHW.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x_BCHW.shape[-2:])}")
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)  # (B, N, D)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, drop: float) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with two plain matmuls (the softmax accumulates in fp32 inside).

    For bf16/fp16 on a CPU: PyTorch's fused CPU kernel ran forward+backward 3-5x slower than
    this (e.g. 249 against 47 ms at 256 x 12 heads x 65 tokens x 25, BENCHMARKS.md s.1), while
    in fp32 the fused kernel is as fast or faster and stays in use.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    with torch.autocast("cpu", enabled=False):  # a bf16 softmax; an fp32 one costs casts 4x its own time
        probs = F.dropout(scores.softmax(dim=-1), drop)
    return probs @ v


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, d)
        drop = self.attn_drop if self.training else 0.0
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            o = _explicit_attention(q, k, v, drop)
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, D)))


class Block(nn.Module):
    """Pre-norm transformer block. `mlp_layer` is any class with Mlp's constructor contract.

    `attn` / `mlp`: existing modules to use instead of building new ones (WideNet shares one
    of each across blocks; the LayerNorms stay per block).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        mlp_layer: type[nn.Module] = Mlp,
        mlp_kwargs: dict | None = None,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_eps: float = 1e-5,
        attn: nn.Module | None = None,
        mlp: nn.Module | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn if attn is not None else Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp if mlp is not None else mlp_layer(
            in_features=dim, hidden_features=mlp_hidden, act_layer=nn.GELU, drop=drop, **(mlp_kwargs or {}))
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.drop(self.mlp(self.norm2(x))))


class ModelOutput(NamedTuple):
    """What `VisionTransformer.forward(x, return_aux=True)` produced."""

    logits: Tensor
    aux_loss: Tensor
    """Weighted sum of every auxiliary term of every MoE layer: add it to the task loss (0-d;
    zero for a dense model and in evaluation)."""
    aux_terms: dict[str, Tensor]
    """Each term unweighted and detached, averaged over the MoE layers (for logging)."""
    moe_stats: dict[str, dict[str, Tensor]]
    """Per MoE layer: expert load [E], dropped_frac, router entropy, ... (detached device tensors).
    A shared (WideNet) layer reports the load summed over its calls, rates averaged."""


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = cfg = config.validate()
        check_buildable(cfg)  # arithmetic on the config: a model too large for memory fails before allocating
        D = cfg.embed_dim
        # One of the two tokenizers; the patch one keeps its name so older checkpoints load.
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D) if cfg.tokenizer == "patch" else None
        self.tokenizer = (ConvTokenizer(cfg.img_size, cfg.in_chans, D, cfg.conv_layers, cfg.conv_kernel)
                          if cfg.tokenizer == "conv" else None)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.pool == "cls" else None
        self.pos_embed = (nn.Parameter(torch.zeros(1, cfg.pos_embed_rows or cfg.num_tokens, D))
                          if cfg.pos_embed == "learned" else None)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        blocks: list[Block] = []
        for i, rate in enumerate(drop_path_rates(cfg.drop_path_rate, cfg.depth)):
            layer, kwargs = cfg.mlp_layer(i)
            shared = dict(attn=blocks[0].attn, mlp=blocks[0].mlp) if cfg.share_blocks and blocks else {}
            blocks.append(Block(D, cfg.num_heads, cfg.mlp_hidden, mlp_layer=layer, mlp_kwargs=kwargs,
                                qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                                norm_eps=cfg.norm_eps, drop_path=rate, **shared))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.seq_pool = SeqPool(D) if cfg.pool == "seq" else None
        if cfg.head == "mlp":
            self.head = nn.Sequential(nn.Linear(D, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, cfg.num_classes))
        else:
            self.head = nn.Sequential(nn.Linear(D, cfg.num_classes))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        if self.config.head_init == "zero":
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def forward_features(self, x_BCHW: Tensor) -> Tensor:
        x = (self.patch_embed if self.patch_embed is not None else self.tokenizer)(x_BCHW)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, : x.shape[1]]
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x_BCHW: Tensor, return_aux: bool = False) -> Tensor | ModelOutput:
        """Logits [B, classes]; with `return_aux`, a ModelOutput that also holds the MoE layers'
        auxiliary loss (to add to the task loss) and statistics of this forward."""
        if not return_aux:
            return self._logits(x_BCHW)
        with collect_moe_outputs(self) as moe:
            logits = self._logits(x_BCHW)
        return ModelOutput(logits, moe.aux_loss(logits.device), moe.aux_terms(), moe.stats())

    def _logits(self, x_BCHW: Tensor) -> Tensor:
        x = self.forward_features(x_BCHW)
        if self.cls_token is not None:
            pooled = x[:, 0]
        elif self.seq_pool is not None:
            pooled = self.seq_pool(x)
        else:
            pooled = x.mean(dim=1)
        return self.head(pooled)

    def moe_modules(self) -> list[tuple[str, MoELayer]]:
        """Every MoE layer once (a shared WideNet layer under its first block's name), including
        the MoE branch inside a residual MoE."""
        return find_moe_layers(self)

    def set_eval_mode(self, mode: str) -> None:
        """Evaluation mode of randomly routed layers: merged, random or ensemble."""
        if mode not in EVAL_MODES:
            raise ValueError(f"eval mode must be one of {EVAL_MODES}, got {mode!r}")
        for _, m in self.moe_modules():
            m.eval_mode = mode
        self.config = self.config.replace(moe={"eval_mode": mode})
