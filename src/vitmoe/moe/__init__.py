"""Mixture-of-Experts MLP layers: routers, dispatch, grouped experts, routed and soft layers."""
from .base_layer import MoELayer
from .dispatch import Dispatch, combine, dispatch, dispatch_copies, dispatch_routing, expert_capacity
from .experts import DISPATCH_PATHS, EXPERT_INITS, GroupedExperts, grouped_mm_supported
from .layer import EVAL_MODES, MoEMlp
from .routers import (
    ROUTERS, SECOND_POLICIES, Copies, ExpertChoiceRouter, RandomRouter, Router, Routing, TopKRouter,
    load_balancing_loss, router_z_loss,
)
from .soft import SoftMoE

LAYER_ROUTERS = (*sorted(ROUTERS), "soft")
"""Every value of ViTConfig.router: the learned/random routers of MoEMlp, and "soft" (SoftMoE)."""

__all__ = [
    "MoELayer", "MoEMlp", "SoftMoE", "GroupedExperts", "Router", "Routing", "Copies", "TopKRouter",
    "RandomRouter", "ExpertChoiceRouter", "ROUTERS", "LAYER_ROUTERS", "SECOND_POLICIES", "dispatch",
    "dispatch_copies", "dispatch_routing", "combine", "expert_capacity", "Dispatch", "load_balancing_loss",
    "router_z_loss", "EVAL_MODES", "EXPERT_INITS", "DISPATCH_PATHS", "grouped_mm_supported",
]
