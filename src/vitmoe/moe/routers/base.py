"""What every router returns, and the registry that lets a layer pick a router by name.

Shape legend (shared by all of vitmoe.moe): B batch, N tokens per image, D model width,
H expert hidden width, E experts, T = B*N tokens, K experts per token (top-k),
S = T*K token copies, C capacity (slots per expert).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from torch import Tensor, nn


class Routing(NamedTuple):
    gates_TK: Tensor
    """Combine weight of each token copy (float32)."""
    experts_TK: Tensor
    """Expert id of each token copy (int64)."""
    probs_TE: Tensor | None = None
    """Router probabilities, for statistics (None for routers without a distribution)."""
    single_expert: Tensor | None = None
    """0-d expert id when every token of the forward goes to that one expert with gate 1
    (batch-granular random routing): the layer then skips dispatch altogether."""
    aux: dict[str, Tensor] | None = None
    """Unweighted auxiliary loss terms of this forward, by name."""


class Router(nn.Module):
    """Base class: `forward(x_BND) -> Routing`. Routing policy is the only thing a router owns."""

    num_experts: int
    top_k: int
    aux_weights: dict[str, float]
    """Weight of each auxiliary term this router can produce."""
    has_distribution: bool = True
    """False for routers that choose without scoring tokens (random): no balance loss, and
    their models are merged for inference."""


ROUTERS: dict[str, Callable[..., Router]] = {}


def register_router(*names: str):
    def wrap(cls):
        for name in names:
            ROUTERS[name] = cls
        return cls

    return wrap
