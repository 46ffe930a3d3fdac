"""What every router returns, and the registry that lets a layer pick a router by name.

Shape legend (shared by all of vitmoe.moe): B batch, N tokens per image, D model width,
H expert hidden width, E experts, T = B*N tokens, K experts per token (top-k),
S token copies (T*K for top-k routing), C capacity (slots per expert),
M = E * slots-per-expert soft slots per image (Soft MoE).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

from torch import Tensor, nn

from ...validation import Fields

if TYPE_CHECKING:
    from ..config import MoEConfig


class Copies(NamedTuple):
    """A flat list of token copies, for routers whose copies are not one per (token, k):
    expert choice gives each expert C tokens, so a token has 0..E copies."""

    token_S: Tensor
    """Source token of each copy (int64)."""
    expert_S: Tensor
    """Expert of each copy (int64)."""
    gate_S: Tensor
    """Combine weight of each copy (float32)."""


class Routing(NamedTuple):
    gates_TK: Tensor | None = None
    """Combine weight of each token copy (float32). None when `copies` is given."""
    experts_TK: Tensor | None = None
    """Expert id of each token copy (int64). None when `copies` is given."""
    probs_TE: Tensor | None = None
    """Router probabilities, for statistics (None for routers without a distribution)."""
    single_expert: Tensor | None = None
    """0-d expert id when every token of the forward goes to that one expert with gate 1
    (batch-granular random routing): the layer then skips dispatch altogether."""
    aux: dict[str, Tensor] | None = None
    """Unweighted auxiliary loss terms of this forward, by name."""
    keep_TK: Tensor | None = None
    """bool: False for a copy the router decided not to send (top-2 second-expert policies).
    Such a copy takes no capacity, is not counted as load or as dropped, and adds nothing."""
    copies: Copies | None = None
    """The copies as a flat list, instead of the [T, K] layout (expert choice)."""
    priority_T: Tensor | None = None
    """Batch Prioritized Routing: each token's priority (higher keeps its copies first when an
    expert overflows). None: batch position order."""


class Router(nn.Module):
    """Base class: `forward(x_BND, capacity=None) -> Routing`. Routing policy is all a router owns.

    Built from the layer's whole MoEConfig (`Router(dim, num_experts, config)`), each router reads
    the fields it uses. `capacity` is the per-expert slot count the layer allows this forward;
    routers that pick tokens per expert (expert choice) fill exactly that many, the others ignore it.
    """

    has_distribution: bool = True
    """False for routers that choose without scoring tokens (random): no balance loss, and
    their models are merged for inference."""
    chooses_tokens: bool = False
    """True when experts choose tokens (expert choice): the layer must give it a capacity."""

    def __init__(self, dim: int, num_experts: int, config: "MoEConfig"):
        super().__init__()
        self.num_experts, self.top_k = num_experts, config.top_k

    @property
    def aux_weights(self) -> dict[str, float]:
        """Weight of each auxiliary term this router produces (one weight per term)."""
        return {}

    @classmethod
    def check_config(cls, f: Fields, experts: Sequence[int]) -> None:
        """Checks of the whole MoEConfig (`f.obj`) that only hold for this router."""


ROUTERS: dict[str, type[Router]] = {}


def register_router(*names: str):
    def wrap(cls):
        for name in names:
            ROUTERS[name] = cls
        return cls

    return wrap
