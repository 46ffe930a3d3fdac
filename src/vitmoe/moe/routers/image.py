"""Per-image routing (Mobile V-MoE, Daxberger et al. 2023, "Mobile V-MoEs: Scaling Down Vision
Transformers via Sparse Mixture-of-Experts"): every token of an image goes to the expert(s) chosen
for the whole image.

The router scores one pooled vector per image (the mean of the layer's input tokens, or the class
token), picks the top-k experts with gates renormalised over the k (GShard), and computes the
Switch balance loss and the z-loss over images. A routing row then stands for an image's N tokens
(`Routing.tokens_per_row`): dispatch sorts B*k image copies instead of B*N*k token copies, capacity
counts images (an expert over capacity drops whole images, never part of one), and every expert's
matmul gets whole images' rows.

Super-class guidance (Mobile V-MoE): with `superclasses`, a map from each class to an
expert, the router is also trained to send each image to its class's expert, by a cross-entropy of
the router's softmax against that expert (`superclass` auxiliary term, weight `superclass_weight`),
so that classes the model confuses share an expert (`vitmoe eval RUN --superclasses E` groups the
classes from a trained model's confusion matrix). The labels reach the router only in training, through
`routing_labels`; evaluation and inference route as always, from the image alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    superclasses: list[int] | None = None
    """Router "image": the expert of each class (a list, one entry per class, in [0, experts)), to
    guide the router in training (Mobile V-MoE's super-classes); None: no guidance."""
    superclass_weight: float = 1.0
    """Weight of the router's cross-entropy against the super-class expert (with `superclasses`)."""

    def check(self, f: Fields, experts: Sequence[int]) -> None:
        super().check(f, experts)
        f.choice("image_pool", IMAGE_POOLS)
        f.number("superclass_weight", 0.0)
        classes = self.superclasses
        if classes is None:
            return
        f.need(self.router == "image", "superclasses", "null unless router is 'image' (it guides the per-image router)")
        bound = min(experts) if experts else None
        f.need(isinstance(classes, (list, tuple)) and len(classes) > 0
               and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 and (bound is None or e < bound)
                       for e in classes),
               "superclasses", "a list with one expert index per class, each an integer in "
               + (f"[0, {bound})" if bound else "[0, experts)"))
        self.superclasses = list(classes)


@register_router("image")
class ImageRouter(LinearRouter):
    """Linear router without bias over one pooled vector per image, in fp32 whatever the autocast
    state; top-k of the softmax, gates renormalised over the k for k > 1."""

    options = (ScoringOptions, TopKOptions, ImageOptions)
    routes_images = True

    def __init__(self, dim: int, num_experts: int, config: "MoEConfig"):
        weights = {"balance": config.balance_loss_weight, "z": config.z_loss_weight}
        if config.superclasses is not None:
            weights["superclass"] = config.superclass_weight
        super().__init__(dim, num_experts, config, weights)
        self.pool, self.priority = config.image_pool, config.priority
        expert_of_class = None if config.superclasses is None else torch.tensor(config.superclasses)
        # Rebuilt from the config: checkpoints and exports stay as without guidance.
        self.register_buffer("expert_of_class", expert_of_class, persistent=False)
        self.labels: Tensor | None = None
        """This training batch's labels [B] (or soft targets [B, classes]) while `routing_labels` runs."""

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
            if self.labels is not None and self.expert_of_class is not None:
                aux["superclass"] = superclass_loss(logits_BE, self.labels, self.expert_of_class)
            priority_B = probs_BE.detach().amax(dim=-1) if self.priority == "score" else None
        return Routing(gates_TK=gates_BK, experts_TK=experts_BK, probs_TE=probs_BE, aux=aux, priority_T=priority_B,
                       tokens_per_row=x_BND.shape[1])

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, pool={self.pool}, noise={self.noise}"


def superclass_loss(logits_BE: Tensor, labels: Tensor, expert_of_class: Tensor) -> Tensor:
    """Mean over images of the cross-entropy of softmax(logits) against each image's super-class
    expert: `labels` [B] class indices, or [B, classes] soft targets (mixup / CutMix), whose mass
    on each class goes to that class's expert."""
    if labels.shape[0] != logits_BE.shape[0]:
        raise ValueError(f"super-class guidance: {labels.shape[0]} labels for {logits_BE.shape[0]} images routed; "
                         "routing_labels must hold the labels of the batch the model is called on")
    if labels.dim() == 1:
        return F.cross_entropy(logits_BE, expert_of_class[labels])
    # F.cross_entropy takes class probabilities too: each class's mass moved to its expert.
    onehot_CE = F.one_hot(expert_of_class, logits_BE.shape[-1]).to(logits_BE.dtype)
    return F.cross_entropy(logits_BE, labels.to(logits_BE.dtype) @ onehot_CE)


def guided_routers(model: nn.Module) -> list[ImageRouter]:
    """The per-image routers of `model` that super-class guidance trains."""
    return [m for m in model.modules() if isinstance(m, ImageRouter) and m.expert_of_class is not None]


@contextlib.contextmanager
def routing_labels(model: nn.Module, labels: Tensor) -> Iterator[None]:
    """Give the guided routers of `model` this batch's labels ([B] classes or [B, classes] soft
    targets) for the forward passes run inside the block; nothing happens without guided routers."""
    routers = guided_routers(model)
    for router in routers:
        router.labels = labels
    try:
        yield
    finally:
        for router in routers:
            router.labels = None
