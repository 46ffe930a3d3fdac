"""Per-image routing (Mobile V-MoE, Daxberger et al. 2023, "Mobile V-MoEs: Scaling Down Vision
Transformers via Sparse Mixture-of-Experts"): every token of an image goes to the expert(s) chosen
for the whole image.

The router scores one pooled vector per image (the mean of the layer's input tokens, or the class
token), picks the top-k experts with gates renormalised over the k (GShard), and computes the
Switch balance loss and the z-loss over images. A routing row then stands for an image's N tokens
(`Routing.tokens_per_row`): dispatch sorts B*k image copies instead of B*N*k token copies, capacity
counts images (an expert over capacity drops whole images, never part of one), and every expert's
matmul gets whole images' rows. Mobile V-MoE's super-class guidance of the router is not built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from ...validation import Fields
from .base import Routing, register_router
from .options import Options
from .scoring import LinearRouter, ScoringOptions, router_z_loss
from .topk import TopKOptions, load_balancing_loss

if TYPE_CHECKING:
    from ..config import MoEConfig

IMAGE_POOLS = ("mean", "cls")


@dataclass
class ImageOptions(Options):
    image_pool: str = "mean"
    """Router "image": what the router scores for an image, the mean of the layer's input tokens
    ("mean") or its first token ("cls": the class token, for models with pool 'cls')."""

    def check(self, f: Fields, experts: Sequence[int]) -> None:
        super().check(f, experts)
        f.choice("image_pool", IMAGE_POOLS)


@register_router("image")
class ImageRouter(LinearRouter):
    """Linear router without bias over one pooled vector per image, in fp32 whatever the autocast
    state; top-k of the softmax, gates renormalised over the k for k > 1."""

    options = (ScoringOptions, TopKOptions, ImageOptions)
    routes_images = True

    def __init__(self, dim: int, num_experts: int, config: "MoEConfig"):
        super().__init__(dim, num_experts, config, {"balance": config.balance_loss_weight, "z": config.z_loss_weight})
        self.pool, self.priority = config.image_pool, config.priority

    @classmethod
    def run_label(cls, config: "MoEConfig") -> str:
        return f"image-top{config.top_k}"

    @classmethod
    def describe(cls, config: "MoEConfig") -> str:
        return f"per-image top-{config.top_k} MoE"

    @classmethod
    def layer_flops(cls, tokens: int, dim: int, hidden: int, num_experts: int, config: "MoEConfig") -> int:
        # Each token passes its image's k experts; the router scores one vector per image.
        return config.top_k * 2 * tokens * 2 * dim * hidden + 2 * cls.router_params(dim, num_experts, config)

    def forward(self, x_BND: Tensor, capacity: int | None = None) -> Routing:
        with torch.autocast(device_type=x_BND.device.type, enabled=False):
            x_BND = x_BND.to(torch.promote_types(x_BND.dtype, torch.float32))
            pooled_B1D = x_BND[:, :1] if self.pool == "cls" else x_BND.mean(dim=1, keepdim=True)
            logits_BE = self.logits(pooled_B1D)
            probs_BE = logits_BE.softmax(dim=-1)
            gates_BK, experts_BK = probs_BE.topk(self.top_k, dim=-1)
            if self.top_k > 1:
                gates_BK = gates_BK / gates_BK.sum(dim=-1, keepdim=True)
            aux = {"balance": load_balancing_loss(probs_BE, experts_BK[:, 0]), "z": router_z_loss(logits_BE)}
            priority_B = probs_BE.detach().amax(dim=-1) if self.priority == "score" else None
        return Routing(gates_TK=gates_BK, experts_TK=experts_BK, probs_TE=probs_BE, aux=aux, priority_T=priority_B,
                       tokens_per_row=x_BND.shape[1])

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, pool={self.pool}, noise={self.noise}"
