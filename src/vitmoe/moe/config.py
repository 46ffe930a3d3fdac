"""MoEConfig: every setting of an MoE layer, in one dataclass, checked once.

The fields come from option groups that live beside the code that reads them (ExpertOptions in
experts.py, and every registered router's `options`: ScoringOptions in routers/scoring.py,
TopKOptions in routers/topk.py, RandomOptions in routers/random.py, ...) plus the layer-level
fields below; MoEConfig inherits them all, so one object describes a layer whole and is passed
whole to it. A router registered later (outside the package) adds its groups to the class then
(`_join`). Per-layer expert counts stay in ViTConfig (pyramids give each MoE block its own count).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..validation import ConfigError, Fields
from .experts import ExpertOptions
from .routers.options import Options
from .routers import OPTION_GROUPS, ROUTERS, on_new_option_group, router_class

EVAL_MODES = ("merged", "random", "ensemble")
LAYER_ROUTERS = ROUTERS.keys()
"""Every value of MoEConfig.router (a live view of the registry: routers registered later count)."""


# Groups first declared last come first in the bases, so that fields list in declaration order.
@dataclass
class MoEConfig(ExpertOptions, *reversed(OPTION_GROUPS)):
    router: str = "switch"
    """A registered router (vitmoe.moe.ROUTERS): "switch", "topk", "random", "expert_choice" (MoEMlp
    with that router), "soft" (the SoftMoE layer), or one added with vitmoe.moe.register_router."""
    top_k: int = 1
    """Experts per token (routers switch, topk, random)."""
    capacity_factor_train: float | None = None
    """Capacity C = ceil(factor * tokens * top_k / experts) per expert in training; None or 0:
    dropless. Copies past an expert's capacity are dropped (zero output)."""
    capacity_factor_eval: float | None = None
    min_capacity: int = 0
    eval_mode: str = "merged"
    """Layers without a learned router (random): "merged" runs the uniform average of the
    experts (dense cost), "random" keeps drawing routes, "ensemble" averages all experts' outputs."""
    slots_per_expert: int = 1
    """Soft MoE (router "soft"): slots each expert processes per image."""
    residual: bool = False
    """PR-MoE's residual MoE (Rajbhandari et al. 2022, DeepSpeed-MoE): a dense MLP branch next to
    each MoE layer, mixed per token."""

    @classmethod
    def field_names(cls) -> list[str]:
        """The layer-level fields first, then each option group's."""
        names = [f.name for f in dataclasses.fields(cls)]
        own = [n for n in names if n in MoEConfig.__annotations__]
        return own + [n for n in names if n not in own]

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    def replace(self, **overrides: Any) -> "MoEConfig":
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown MoE field(s) {unknown}; allowed: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MoEConfig":
        return cls().replace(**dict(data))

    def validate(self, experts: Sequence[int] = (), prefix: str = "moe.") -> "MoEConfig":
        """A checked copy (YAML strings coerced to the fields' types). `experts`: the expert
        count of every MoE layer it will configure (bounds top_k)."""
        new = copy.copy(self)
        f = Fields(new, prefix)
        new.check(f, list(experts))
        return new

    def check(self, f: Fields, experts: Sequence[int]) -> None:
        f.choice("router", LAYER_ROUTERS)
        f.integer("top_k", 1)
        smallest = min(experts) if experts else self.top_k
        f.need(self.top_k <= smallest, "top_k", f"an integer in [1, smallest expert count {smallest}]")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            f.number(name, 0.0, optional=True)
        f.integer("min_capacity", 0)
        f.choice("eval_mode", EVAL_MODES)
        f.integer("slots_per_expert", 1)
        f.boolean("residual")
        super().check(f, experts)
        router_class(self.router).check_config(f, experts)


def _join(group: type[Options]) -> None:
    """Make a group registered after MoEConfig was built (a router defined outside the package)
    part of it, as if it had been a base from the start. Dataclass fields are fixed when the
    class is made, so the class is re-made in place: the group goes in the bases after ExpertOptions
    (its fields just before the experts'), and @dataclass writes __init__, __repr__ and __eq__ again over the new field list.
    Configs made before keep working: a new field's default is a class attribute."""
    clash = sorted(set(MoEConfig.field_names()) & {f.name for f in dataclasses.fields(group)})
    if clash:
        raise ConfigError(f"option group {group.__name__}: field(s) {clash} are already MoEConfig fields")
    MoEConfig.__bases__ = (MoEConfig.__bases__[0], group, *MoEConfig.__bases__[1:])
    for name in ("__init__", "__repr__", "__eq__", "__hash__", "__match_args__"):
        if name in MoEConfig.__dict__:
            delattr(MoEConfig, name)
    dataclass(MoEConfig)


on_new_option_group(_join)


def resolve_config(config: MoEConfig | None, options: Mapping[str, Any], num_experts: int,
                   router: str | None = None) -> MoEConfig:
    """A layer's checked config: `config` (default MoEConfig()) with keyword `options` applied."""
    config = (config or MoEConfig()).replace(**options)
    if router is not None and config.router != router:
        config = config.replace(router=router)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError(f"num_experts={num_experts!r} is not allowed: a positive integer")
    return config.validate([num_experts], prefix="")
