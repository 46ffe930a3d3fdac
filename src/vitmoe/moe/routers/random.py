"""Random routing (AdaMix, Wang et al. 2022; THOR, Zuo et al. 2022; the source project's RRM):
no parameters, no balance loss.

granularity "batch": one draw per layer per forward, shared by every token (the public
AdaMix code and the source project); "sample": one draw per image; "token": one per token.
Draws are uniform over experts; with top_k > 1 each token gets k distinct experts, gate 1/k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from ...validation import Fields
from .options import Options
from .base import Router, Routing, register_router

if TYPE_CHECKING:
    from ..config import MoEConfig

GRANULARITIES = ("batch", "sample", "token")


@dataclass
class RandomOptions(Options):
    random_granularity: str = "batch"
    """Router "random": one draw per forward ("batch"), per image ("sample") or per token ("token")."""

    def check(self, f: Fields, experts: Sequence[int]) -> None:
        super().check(f, experts)
        f.choice("random_granularity", GRANULARITIES)


@register_router("random")
class RandomRouter(Router):
    has_distribution = False
    random_routes = True
    options = (RandomOptions,)

    def __init__(self, dim: int, num_experts: int, config: "MoEConfig"):
        super().__init__(dim, num_experts, config)
        self.granularity = config.random_granularity
        self.generator: torch.Generator | None = None
        """Optional source of draws (distributed runs give every rank of a group the same one)."""
        self.fixed_expert: int | None = None
        """Analysis only (per-expert accuracy): route every token to this expert instead of drawing."""

    @classmethod
    def router_params(cls, dim: int, num_experts: int, config: "MoEConfig") -> int:
        return 0  # draws, scores nothing

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
        if self.fixed_expert is not None:
            single = torch.tensor(self.fixed_expert, device=device)
            return Routing(gates_TK=torch.ones(T, 1, device=device), experts_TK=single.expand(T, 1), single_expert=single)
        if self.granularity == "batch":
            choice_1K = self._draw(1, device)
            single = choice_1K[0, 0] if K == 1 else None
            return Routing(gates_TK=gates_TK, experts_TK=choice_1K.expand(T, K), single_expert=single)
        if self.granularity == "sample":
            experts_TK = self._draw(B, device).repeat_interleave(N, dim=0)
        else:
            experts_TK = self._draw(T, device)
        return Routing(gates_TK=gates_TK, experts_TK=experts_TK)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, granularity={self.granularity}"


def seed_random_routers(model: nn.Module, seed: int, device: torch.device) -> dict[str, torch.Generator]:
    """Give every random router its own generator, seeded alike on every rank, so all ranks draw the
    same routes (one expert per layer per forward for the whole global batch, as in one process).
    Returns the generators by router name (their states go into training checkpoints)."""
    gens = {}
    # The MoE layers that hold a random router, in module order as find_moe_layers lists them (the
    # seeds and checkpoint keys follow it), found without importing the layers the routers sit below.
    layers = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "router", None), RandomRouter)]
    for i, (name, layer) in enumerate(layers):
        g = torch.Generator(device=device)
        g.manual_seed(seed * 1000003 + i)
        layer.router.generator = g
        gens[name] = g
    return gens
