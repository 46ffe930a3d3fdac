"""Learned top-k router (Switch for k=1, GShard-style top-k for k>1). Formulas: REFERENCE.md s.3."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Router, Routing, register_router

NOISE_POLICIES = ("none", "jitter", "gaussian")


def load_balancing_loss(probs_TE: Tensor, first_choice_T: Tensor) -> Tensor:
    """Switch Transformer balance loss `E * sum_i f_i * P_i` (1.0 at perfect balance).

    f_i: fraction of tokens whose first choice is i; P_i: mean router probability of i.
    """
    T, E = probs_TE.shape
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, first_choice_T, torch.ones_like(first_choice_T, dtype=probs_TE.dtype))
    return E * torch.dot(counts_E / T, probs_TE.mean(0))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@register_router("switch", "topk")
class TopKRouter(Router):
    """Linear router without bias, computed in fp32 whatever the autocast state.

    noise: "jitter" multiplies the router input by U(1-eps, 1+eps); "gaussian" adds
    N(0, (1/E)^2) to the logits. Both only in training.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        noise: str = "none",
        jitter_eps: float = 0.01,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if noise not in NOISE_POLICIES:
            raise ValueError(f"router noise must be one of {NOISE_POLICIES}, got {noise!r}")
        self.num_experts, self.top_k, self.noise, self.jitter_eps = num_experts, top_k, noise, jitter_eps
        self.aux_weights = {"balance": balance_loss_weight, "z": z_loss_weight}
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x_BND: Tensor) -> Routing:
        x_TD = x_BND.reshape(-1, x_BND.shape[-1])
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and self.noise == "jitter":
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            logits_TE = F.linear(x_TD, self.weight.float())
            if self.training and self.noise == "gaussian":
                logits_TE = logits_TE + torch.randn_like(logits_TE) / self.num_experts**2
            probs_TE = logits_TE.softmax(dim=-1)
            gates_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
            if self.top_k > 1:
                gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
            aux = {
                "balance": load_balancing_loss(probs_TE, experts_TK[:, 0]),
                "z": router_z_loss(logits_TE),
            }
        return Routing(gates_TK, experts_TK, probs_TE, None, aux)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, noise={self.noise}"


