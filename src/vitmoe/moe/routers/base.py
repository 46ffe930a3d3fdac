"""What every router returns, what it declares to the rest of vitmoe, and the registry of routers by name.

A router is one file: its class routes tokens and declares everything the rest of the package
would otherwise ask by comparing `MoEConfig.router` to a name (the run label, the parameter and
FLOP accounting, whether its experts can be merged, its option group, ...). It joins with
`@register_router("name")` (public as `vitmoe.moe.register_router`); nothing outside
vitmoe.moe.routers tests router names.

Shape legend (shared by all of vitmoe.moe): B batch, N tokens per image, D model width,
H expert hidden width, E experts, T = B*N tokens, K experts per token (top-k),
S token copies (T*K for top-k routing), C capacity (slots per expert),
M = E * slots-per-expert soft slots per image (Soft MoE).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple, Sequence

from torch import Tensor, nn

from ...validation import ConfigError, Fields
from .options import Options

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
    tokens_per_row: int = 1
    """Tokens each row of the [T, K] fields stands for: N for per-image routing, whose rows are
    images and every one of an image's N consecutive tokens follows its row."""


class Router(nn.Module):
    """Base class: `forward(x_BND, capacity=None) -> Routing`. Routing policy is all a router owns.

    Built from the layer's whole MoEConfig (`Router(dim, num_experts, config)`), each router reads
    the fields it uses. `capacity` is the per-expert slot count the layer allows this forward;
    routers that pick tokens per expert (expert choice) fill exactly that many, the others ignore it.

    The class attributes and classmethods below are the router's declaration: what models/,
    training/ and cli/ ask of the router named in an MoEConfig (`router_class(name)`), so that a
    new router is one file. The defaults describe a learned, bias-free linear router that sends
    each token to `top_k` experts of a routed MoEMlp layer.
    """

    options: ClassVar[tuple[type[Options], ...]] = ()
    """The option groups (dataclasses of MoEConfig fields) this router reads; registering the router
    makes their fields MoEConfig fields (`model.moe.FIELD=...`). Shared groups may be listed by
    several routers."""
    random_routes: ClassVar[bool] = False
    """True when routes are drawn at random, so the experts stay interchangeable: consistency
    regularisation (two passes, two routes) and periodic expert averaging need it."""
    mergeable: ClassVar[bool] = True
    """Whether merge_experts (and a warm start into a dense model) may replace the layer by the
    average of its experts. False where no dense MLP computes the layer (Soft MoE's slot mixing)."""
    routes_tokens: ClassVar[bool] = True
    """True when each token goes to some experts, so an expert can get no tokens in a step
    (freeze_unrouted acts on those). False when every expert works on every image (Soft MoE)."""
    routes_images: ClassVar[bool] = False
    """True when the router decides per image (its Routing has `tokens_per_row` = N): capacity then
    counts images, so an expert over capacity drops whole images."""
    layer: ClassVar[type[nn.Module] | None] = None
    """The MoE layer class built for this router; None: MoEMlp, which builds this router. A router
    whose routing cannot be split from its layer (Soft MoE) names its layer here."""

    @classmethod
    def run_label(cls, config: "MoEConfig") -> str:
        """Run-label prefix for this config, the router's name unless it says otherwise (the family
        follows: switch-vit, top2-cct)."""
        return config.router

    @classmethod
    def describe(cls, config: "MoEConfig") -> str:
        """The MoE layer in words, for messages ("switch MoE"; `vitmoe upcycle` prints "upcycled ... into DESC")."""
        return f"{config.router} MoE"

    @classmethod
    def router_for_top_k(cls, name: str, top_k: int) -> str:
        """The router to use when a preset routed by `name` is asked for `top_k` experts per token
        (`vitmoe upcycle --model switch_vit --top-k 2`): `name` itself unless it is top-1 only."""
        return name

    @classmethod
    def router_params(cls, dim: int, num_experts: int, config: "MoEConfig") -> int:
        """Parameters of one layer's router (its scores for every token): a bias-free Linear(dim, E)."""
        return dim * num_experts

    @classmethod
    def experts_per_token(cls, num_experts: int, config: "MoEConfig") -> float:
        """Experts a token passes through in evaluation, on average (active parameters and FLOPs)."""
        return config.top_k

    @classmethod
    def layer_flops(cls, tokens: int, dim: int, hidden: int, num_experts: int, config: "MoEConfig") -> int:
        """Multiply-adds x 2 of one MoE layer (router and experts, no residual branch) for one image
        of `tokens` tokens: the router scores every token, each token passes its experts' MLPs."""
        k = cls.experts_per_token(num_experts, config)
        return round(k * 2 * tokens * 2 * dim * hidden) + 2 * tokens * cls.router_params(dim, num_experts, config)

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
"""Every value MoEConfig.router allows, by name, in registration order. Add with register_router."""
OPTION_GROUPS: list[type[Options]] = []
"""The registered routers' option groups, in the order they were first declared (MoEConfig's
field order follows it)."""
_group_listeners: list[Callable[[type[Options]], None]] = []


def register_router(*names: str):
    """Class decorator: `@register_router("name", ...)` makes `MoEConfig(router="name")` build this
    router, and its option groups' fields MoEConfig fields. A name is registered once."""
    def wrap(cls: type[Router]) -> type[Router]:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"register_router: {cls!r} is not a subclass of vitmoe.moe.Router")
        taken = [name for name in names if name in ROUTERS and ROUTERS[name] is not cls]
        if taken or not names:
            raise ValueError(f"register_router: router name(s) {taken} already registered "
                             f"({', '.join(ROUTERS)})" if taken else "register_router: give at least one name")
        for group in cls.options:
            if group not in OPTION_GROUPS:
                join_option_group(group)
        for name in names:
            ROUTERS[name] = cls
        return cls

    return wrap


def join_option_group(group: type[Options]) -> None:
    """Add an option group to MoEConfig's fields (a router's `options` do this when it registers)."""
    if not (dataclasses.is_dataclass(group) and issubclass(group, Options)):
        raise TypeError(f"option group {group!r} is not a dataclass subclassing vitmoe.moe.Options")
    OPTION_GROUPS.append(group)
    for listener in _group_listeners:  # MoEConfig, once it exists (vitmoe.moe.config)
        listener(group)


def on_new_option_group(listener: Callable[[type[Options]], None]) -> None:
    """Call `listener(group)` for every option group registered from now on."""
    _group_listeners.append(listener)


def router_class(name: str) -> type[Router]:
    """The registered router `name`; ConfigError naming the registered ones otherwise."""
    if name not in ROUTERS:
        raise ConfigError(f"unknown router {name!r}; registered: {', '.join(ROUTERS)}")
    return ROUTERS[name]
