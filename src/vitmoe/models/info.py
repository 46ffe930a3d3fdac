"""Parameter and FLOP accounting (what `vitmoe info` prints)."""
from __future__ import annotations

from dataclasses import dataclass

from ..moe import router_class
from .config import ViTConfig
from .tokenizer import conv_tokenizer_layers


@dataclass
class ModelInfo:
    total_params: int
    """Unique parameters (WideNet's shared attention and MLP layer count once)."""
    active_params_per_token: int
    """Parameters a token touches: each MoE layer counts its router and top_k experts; expert
    choice counts capacity_factor_eval experts (its mean per token, rounded), Soft MoE every
    expert (each token's output mixes all slots). With shared blocks each parameter counts once,
    as if a token met the same experts in every block (a lower bound)."""
    merged_params: int
    """Parameters after merge_experts (every MoE MLP becomes one dense MLP, routers dropped;
    shared blocks are unshared). Where merging is refused (residual and Soft MoE, see
    `mergeable`) the model is deployed as it is, so this equals total_params."""
    forward_flops_per_image: int
    """Multiply-adds x 2 of one image's forward pass (matmuls and convolutions only)."""
    mergeable: bool = True
    """Whether merge_experts accepts this model."""
    routing_flops_per_image: int = 0
    """Of forward_flops_per_image, the routers' (their scores; Soft MoE's dispatch and combine)."""
    expert_flops_share: float = 0.0
    """The share of forward_flops_per_image spent in experts (their MLPs; routers not included):
    with k and the MoE placement, what decides whether experts can pay (arXiv 2605.15484)."""


def model_info(cfg: ViTConfig) -> ModelInfo:
    cfg = cfg.validate()
    D, H, L, N = cfg.embed_dim, cfg.mlp_hidden, cfg.depth, cfg.num_tokens
    if cfg.tokenizer == "conv":  # bias-free convolutions
        convs = conv_tokenizer_layers(cfg.img_size, cfg.in_chans, D, cfg.conv_layers, cfg.conv_kernel)
        tokenizer = sum(c.in_chans * c.out_chans * c.kernel**2 for c in convs)
        tokenizer_flops = sum(2 * c.conv_side**2 * c.in_chans * c.out_chans * c.kernel**2 for c in convs)
    else:
        tokenizer = cfg.in_chans * cfg.patch_size**2 * D + D
        tokenizer_flops = 2 * cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * D
    pos = (cfg.pos_embed_rows or N) * D if cfg.pos_embed == "learned" else 0
    embed = tokenizer + (D if cfg.pool == "cls" else 0) + pos
    attn = (3 * D * D + (3 * D if cfg.qkv_bias else 0)) + D * D + D
    norms = 2 * 2 * D
    mlp = D * H + H + H * D + D
    head = (D * cfg.head_hidden + cfg.head_hidden + cfg.head_hidden * cfg.num_classes + cfg.num_classes
            if cfg.head == "mlp" else D * cfg.num_classes + cfg.num_classes)
    head += D + 1 if cfg.pool == "seq" else 0  # the sequence pooling's Linear(D, 1)
    moe = dict(zip(cfg.moe_block_indices(), cfg.experts_per_moe_block()))
    m, residual = cfg.moe, cfg.moe.residual
    router = router_class(m.router)  # declares its own parameters, experts per token and FLOPs
    k_of = lambda e: router.experts_per_token(e, m)  # noqa: E731
    scorer = lambda e: router.router_params(D, e, m)  # noqa: E731
    res = mlp + D * 2 + 2 if residual else 0  # dense branch and its Linear(D, 2) mixing weights

    def mlp_params(i: int, active: bool) -> int:
        if i not in moe:
            return mlp
        e = moe[i]
        return round((k_of(e) if active else e) * mlp) + scorer(e) + res

    blocks = [0] if cfg.share_blocks else range(L)
    # Everything but the MLPs: embeddings, attention(s), every block's LayerNorms, final norm, head.
    base = embed + len(blocks) * attn + L * norms + 2 * D + head
    total = base + sum(mlp_params(i, False) for i in blocks)
    active = base + sum(mlp_params(i, True) for i in blocks)
    mergeable = not residual and router.mergeable
    merged = embed + L * (attn + norms + mlp) + 2 * D + head if mergeable else total

    flops, expert_flops, routing_flops = tokenizer_flops, 0, 0
    per_block = 2 * N * (4 * D * D) + 2 * 2 * N * N * D  # projections, then QK^T and AV
    for i in range(L):  # shared blocks share weights, not work: every block computes
        if i not in moe:
            per_mlp = 2 * N * 2 * D * H
        else:
            per_mlp = router.layer_flops(N, D, H, moe[i], m)
            routing = router.layer_flops(N, D, 0, moe[i], m)  # the experts' work is linear in H: the rest
            expert_flops += per_mlp - routing
            routing_flops += routing
        if i in moe and residual:
            per_mlp += 2 * N * 2 * D * H + 2 * N * D * 2
        flops += per_block + per_mlp
    flops += 2 * (D * cfg.head_hidden + cfg.head_hidden * cfg.num_classes if cfg.head == "mlp" else D * cfg.num_classes)
    if cfg.pool == "seq":  # a score per token, then the weighted sum over tokens
        flops += 2 * N * D + 2 * N * D
    return ModelInfo(total, active, merged, flops, mergeable, routing_flops, expert_flops / flops)
