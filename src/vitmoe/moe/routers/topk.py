"""Learned top-k router (Switch for k=1, GShard-style top-k for k>1). Formulas: REFERENCE.md s.3."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Router, Routing, register_router

NOISE_POLICIES = ("none", "jitter", "gaussian")
SECOND_POLICIES = ("all", "sampling", "random")


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


def router_logits(x_BND: Tensor, weight_ED: Tensor, noise: str, jitter_eps: float, training: bool) -> Tensor:
    """fp32 logits [T, E] of a bias-free linear router, with the training-time noise policy.

    Call inside an autocast-disabled region. "jitter" multiplies the router input by
    U(1-eps, 1+eps); "gaussian" adds N(0, std=1/E^2) to the logits (the ColossalAI recipe's
    NormalNoiseGenerator, REFERENCE.md s.2). Both only in training.
    """
    x_TD = x_BND.reshape(-1, x_BND.shape[-1]).float()
    if training and noise == "jitter":
        x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - jitter_eps, 1 + jitter_eps)
    logits_TE = F.linear(x_TD, weight_ED.float())
    if training and noise == "gaussian":
        logits_TE = logits_TE + torch.randn_like(logits_TE) / weight_ED.shape[0] ** 2
    return logits_TE


@register_router("switch", "topk")
class TopKRouter(Router):
    """Linear router without bias, computed in fp32 whatever the autocast state.

    Top-k gates are renormalised to sum to 1 over the k choices (GShard). For k=2,
    `second_policy` decides whether the second copy is sent at all:
      "all":      always;
      "sampling": GShard's random routing, keep if 2 * gate2 > U(0, 1) (gate2 <= 0.5 after
                  renormalisation, so it is kept with probability 2 * gate2); training only,
                  evaluation keeps every second copy so that it is deterministic;
      "random":   keep if gate2 > `second_threshold` (deterministic despite the name,
                  which follows the option names of the reference systems).
    As in GShard's algorithm the renormalisation happens before the decision: a token whose
    second copy is not sent keeps its first gate p1 / (p1 + p2), it is not rescaled to 1.
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
        second_policy: str = "all",
        second_threshold: float = 0.0,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if noise not in NOISE_POLICIES:
            raise ValueError(f"router noise must be one of {NOISE_POLICIES}, got {noise!r}")
        if second_policy not in SECOND_POLICIES:
            raise ValueError(f"second_policy must be one of {SECOND_POLICIES}, got {second_policy!r}")
        if second_policy != "all" and top_k != 2:
            raise ValueError(f"second_policy {second_policy!r} needs top_k=2, got top_k={top_k}")
        self.num_experts, self.top_k, self.noise, self.jitter_eps = num_experts, top_k, noise, jitter_eps
        self.second_policy, self.second_threshold = second_policy, second_threshold
        self.aux_weights = {"balance": balance_loss_weight, "z": z_loss_weight}
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x_BND: Tensor, capacity: int | None = None) -> Routing:
        with torch.autocast(device_type=x_BND.device.type, enabled=False):
            logits_TE = router_logits(x_BND, self.weight, self.noise, self.jitter_eps, self.training)
            probs_TE = logits_TE.softmax(dim=-1)
            gates_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
            if self.top_k > 1:
                gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
            aux = {
                "balance": load_balancing_loss(probs_TE, experts_TK[:, 0]),
                "z": router_z_loss(logits_TE),
            }
            keep_TK = self._keep_second(gates_TK.detach())
        return Routing(gates_TK, experts_TK, probs_TE, None, aux, keep_TK)

    def _keep_second(self, gates_TK: Tensor) -> Tensor | None:
        if self.second_policy == "all" or (self.second_policy == "sampling" and not self.training):
            return None
        gate2_T = gates_TK[:, 1]
        if self.second_policy == "sampling":
            keep2_T = 2 * gate2_T > torch.rand_like(gate2_T)
        else:
            keep2_T = gate2_T > self.second_threshold
        return torch.stack([torch.ones_like(keep2_T), keep2_T], dim=1)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, noise={self.noise}"
                + (f", second_policy={self.second_policy}" if self.second_policy != "all" else ""))
