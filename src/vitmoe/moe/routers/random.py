"""Random routing (AdaMix / THOR, and the source project's RRM): no parameters, no balance loss.

granularity "batch": one draw per layer per forward, shared by every token (the public
AdaMix code and the source project); "sample": one draw per image; "token": one per token.
Draws are uniform over experts; with top_k > 1 each token gets k distinct experts, gate 1/k.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Router, Routing, register_router

GRANULARITIES = ("batch", "sample", "token")


@register_router("random")
class RandomRouter(Router):
    has_distribution = False

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, granularity: str = "batch", **_unused):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"random_granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.granularity = num_experts, top_k, granularity
        self.aux_weights = {}
        self.generator: torch.Generator | None = None
        """Optional source of draws (distributed runs give every rank of a group the same one)."""

    def _draw(self, groups: int, device: torch.device) -> Tensor:
        """k distinct uniform experts for each of `groups` groups: [groups, K]."""
        gen = self.generator
        if self.top_k == 1:
            return torch.randint(self.num_experts, (groups, 1), device=device, generator=gen)
        scores = torch.rand(groups, self.num_experts, device=device, generator=gen)
        return scores.topk(self.top_k, dim=-1).indices

    def forward(self, x_BND: Tensor, capacity: int | None = None) -> Routing:
        B, N = x_BND.shape[0], x_BND.shape[1]
        T, K, device = B * N, self.top_k, x_BND.device
        gates_TK = torch.full((T, K), 1.0 / K, device=device)
        if self.granularity == "batch":
            choice_1K = self._draw(1, device)
            single = choice_1K[0, 0] if K == 1 else None
            return Routing(gates_TK, choice_1K.expand(T, K), single_expert=single)
        if self.granularity == "sample":
            experts_TK = self._draw(B, device).repeat_interleave(N, dim=0)
        else:
            experts_TK = self._draw(T, device)
        return Routing(gates_TK, experts_TK)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, granularity={self.granularity}"
