"""What learned routers share: fp32 logits of a bias-free linear map, the training-time noise, the z-loss,
and LinearRouter, the base that holds them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...validation import Fields
from .base import Router
from .options import Options

NOISE_POLICIES = ("none", "jitter", "gaussian")


@dataclass
class ScoringOptions(Options):
    router_noise: str = "none"
    """Training-time noise of learned routers: "none"; "jitter" multiplies the router input by
    U(1 - jitter_eps, 1 + jitter_eps) (Switch Transformer); "gaussian" adds N(0, (1/E^2)^2) to the
    logits (ColossalAI's NormalNoiseGenerator, used by its ViT-MoE recipe)."""
    jitter_eps: float = 0.01
    z_loss_weight: float = 1e-3
    """Weight of the router z-loss (ST-MoE, Zoph et al. 2022: 1e-3)."""

    def check(self, f: Fields, experts: Sequence[int]) -> None:
        super().check(f, experts)
        f.choice("router_noise", NOISE_POLICIES)
        f.number("jitter_eps", 0.0, 1.0, strict_hi=True)
        f.number("z_loss_weight", 0.0)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_logits(x_BND: Tensor, weight_ED: Tensor, noise: str, jitter_eps: float, training: bool) -> Tensor:
    """fp32 logits [T, E] of a bias-free linear router (float64 for a float64 input), with the
    training-time noise policy.

    Call inside an autocast-disabled region: routing decisions in bf16 flip on ties and rounding.
    """
    dtype = torch.promote_types(x_BND.dtype, torch.float32)
    x_TD = x_BND.reshape(-1, x_BND.shape[-1]).to(dtype)
    if training and noise == "jitter":
        x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - jitter_eps, 1 + jitter_eps)
    logits_TE = F.linear(x_TD, weight_ED.to(dtype))
    if training and noise == "gaussian":
        logits_TE = logits_TE + torch.randn_like(logits_TE) / weight_ED.shape[0] ** 2
    return logits_TE


class LinearRouter(Router):
    """Base of the learned routers: a bias-free Linear(dim, E) weight (truncated normal, std 0.02),
    the noise policy, and the weight of each auxiliary term the subclass produces (`aux_weights`)."""

    def __init__(self, dim: int, num_experts: int, config, aux_weights: dict[str, float]):
        super().__init__(dim, num_experts, config)
        self.noise, self.jitter_eps = config.router_noise, config.jitter_eps
        self._weights = aux_weights
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    @property
    def aux_weights(self) -> dict[str, float]:
        return self._weights

    def logits(self, x_BND: Tensor) -> Tensor:
        """[rows, E] fp32 logits of the rows of `x_BND` (see router_logits)."""
        return router_logits(x_BND, self.weight, self.noise, self.jitter_eps, self.training)
