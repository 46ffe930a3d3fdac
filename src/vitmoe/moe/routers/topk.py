"""Learned top-k router: Switch (Fedus et al. 2021) for k=1, GShard-style top-k (Lepikhin et al. 2020) for k>1."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from ...validation import Fields
from .options import Options
from .base import Routing, register_router
from .scoring import LinearRouter, ScoringOptions, router_z_loss

if TYPE_CHECKING:
    from ..config import MoEConfig

SECOND_POLICIES = ("all", "sampling", "random")
PRIORITIES = ("position", "score")


@dataclass
class TopKOptions(Options):
    balance_loss_weight: float = 0.01
    """Weight of the Switch load-balancing loss (Switch Transformer: alpha = 0.01)."""
    second_policy: str = "all"
    """Top-2 only: "all" (always send the second copy), "sampling" (send with probability
    2 * gate2, GShard), "random" (send if gate2 > second_threshold). See TopKRouter."""
    second_threshold: float = 0.0
    priority: str = "position"
    """Which copies an overflowing expert keeps (first choices always before second choices):
    "position" (earlier tokens of the batch first) or "score" (Batch Prioritized Routing,
    Riquelme et al. 2021, V-MoE: tokens in order of their largest router probability, so the
    tokens the router is surest about survive a small capacity)."""

    def check(self, f: Fields, experts: Sequence[int]) -> None:
        super().check(f, experts)
        f.number("balance_loss_weight", 0.0)
        f.choice("second_policy", SECOND_POLICIES)
        f.need(self.second_policy == "all" or (self.router == "topk" and self.top_k == 2), "second_policy",
               f"'all' unless router is 'topk' with top_k=2 (router={self.router!r}, top_k={self.top_k})")
        f.number("second_threshold", 0.0, 1.0)
        f.choice("priority", PRIORITIES)
        f.need(self.priority == "position" or self.router in ("switch", "topk", "image"), "priority",
               f"'position' unless router is 'switch', 'topk' or 'image' (router={self.router!r} has no scores)")


def load_balancing_loss(probs_TE: Tensor, first_choice_T: Tensor) -> Tensor:
    """Switch Transformer balance loss `E * sum_i f_i * P_i` (1.0 at perfect balance).

    f_i: fraction of tokens whose first choice is i; P_i: mean router probability of i.
    """
    T, E = probs_TE.shape
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, first_choice_T, torch.ones_like(first_choice_T, dtype=probs_TE.dtype))
    return E * torch.dot(counts_E / T, probs_TE.mean(0))


@register_router("switch", "topk")
class TopKRouter(LinearRouter):
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

    Registered twice: "switch" is the top-1 case (top_k must be 1), "topk" any k.
    """

    options = (ScoringOptions, TopKOptions)

    def __init__(self, dim: int, num_experts: int, config: "MoEConfig"):
        super().__init__(dim, num_experts, config, {"balance": config.balance_loss_weight, "z": config.z_loss_weight})
        self.second_policy, self.second_threshold = config.second_policy, config.second_threshold
        self.priority = config.priority

    @classmethod
    def check_config(cls, f: Fields, experts: Sequence[int]) -> None:
        f.need(f.obj.router != "switch" or f.obj.top_k == 1, "top_k",
               "1 for router 'switch' (use router 'topk' for k > 1)")

    @classmethod
    def run_label(cls, config: "MoEConfig") -> str:
        return "switch" if config.router == "switch" else f"top{config.top_k}"

    @classmethod
    def describe(cls, config: "MoEConfig") -> str:
        return "switch MoE" if config.router == "switch" else f"topk top-{config.top_k} MoE"

    @classmethod
    def router_for_top_k(cls, name: str, top_k: int) -> str:
        # Switch is top-1 by definition: top-k with k > 1 is router 'topk'.
        return "topk" if name == "switch" and top_k > 1 else name

    def forward(self, x_BND: Tensor, capacity: int | None = None) -> Routing:
        with torch.autocast(device_type=x_BND.device.type, enabled=False):
            logits_TE = self.logits(x_BND)
            probs_TE = logits_TE.softmax(dim=-1)
            gates_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
            if self.top_k > 1:
                gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
            aux = {
                "balance": load_balancing_loss(probs_TE, experts_TK[:, 0]),
                "z": router_z_loss(logits_TE),
            }
            keep_TK = self._keep_second(gates_TK.detach())
            # V-MoE's priority score: the token's largest routing weight (before renormalisation).
            priority_T = probs_TE.detach().amax(dim=-1) if self.priority == "score" else None
        return Routing(gates_TK=gates_TK, experts_TK=experts_TK, probs_TE=probs_TE, aux=aux, keep_TK=keep_TK,
                       priority_T=priority_T)

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
