"""Parameter and FLOP accounting (what `vitmoe info` prints)."""
from __future__ import annotations

from dataclasses import dataclass

from .config import ViTConfig


@dataclass
class ModelInfo:
    total_params: int
    active_params_per_token: int
    """Parameters a token touches: each MoE layer counts its router and top_k experts."""
    merged_params: int
    """Parameters after merge_experts (every MoE MLP becomes one dense MLP, routers dropped)."""
    forward_flops_per_image: int
    """Multiply-adds x 2 of one image's forward pass (matmuls and convolutions only)."""


def model_info(cfg: ViTConfig) -> ModelInfo:
    cfg.validate()
    D, H, L, N = cfg.embed_dim, cfg.mlp_hidden, cfg.depth, cfg.num_tokens
    patch = cfg.in_chans * cfg.patch_size**2 * D + D
    embed = patch + (D if cfg.pool == "cls" else 0) + (cfg.pos_embed_rows or N) * D
    attn = (3 * D * D + (3 * D if cfg.qkv_bias else 0)) + D * D + D
    norms = 2 * 2 * D
    mlp = D * H + H + H * D + D
    head = (D * cfg.head_hidden + cfg.head_hidden + cfg.head_hidden * cfg.num_classes + cfg.num_classes
            if cfg.head == "mlp" else D * cfg.num_classes + cfg.num_classes)
    base = embed + L * (attn + norms) + 2 * D + head  # everything but the MLPs
    moe = dict(zip(cfg.moe_block_indices(), cfg.experts_per_moe_block()))
    router = (lambda e: D * e) if cfg.router != "random" else (lambda e: 0)
    total = base + sum(e * mlp + router(e) if i in moe else mlp for i in range(L) for e in [moe.get(i, 1)])
    active = base + sum(cfg.top_k * mlp + router(e) if i in moe else mlp for i in range(L) for e in [moe.get(i, 1)])

    P = cfg.num_patches
    flops = 2 * P * cfg.in_chans * cfg.patch_size**2 * D
    per_block = 2 * N * (4 * D * D) + 2 * 2 * N * N * D  # projections, then QK^T and AV
    for i in range(L):
        k = cfg.top_k if i in moe else 1
        per_mlp = k * 2 * N * 2 * D * H + (2 * N * D * moe[i] if i in moe and cfg.router != "random" else 0)
        flops += per_block + per_mlp
    flops += 2 * (D * cfg.head_hidden + cfg.head_hidden * cfg.num_classes if cfg.head == "mlp" else D * cfg.num_classes)
    return ModelInfo(total, active, base + L * mlp, flops)
