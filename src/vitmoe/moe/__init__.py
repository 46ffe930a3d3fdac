"""Mixture-of-Experts MLP layers: routers, dispatch, grouped experts (with the per-machine table of
the faster expert computation, kernel_table), routed and soft layers."""
from .base_layer import MoELayer, find_moe_layers
from .collect import MoECollector, collect_moe_outputs
from .config import EVAL_MODES, LAYER_ROUTERS, MoEConfig
from .dispatch import Dispatch, combine, dispatch, dispatch_copies, dispatch_routing, expert_capacity
from .experts import DISPATCH_PATHS, EXPERT_INITS, GroupedExperts, grouped_mm_supported
from .layer import MoEMlp
from .routers import (
    ROUTERS, SECOND_POLICIES, Copies, ExpertChoiceRouter, Options, RandomRouter, Router, Routing, TopKRouter,
    load_balancing_loss, register_router, router_class, router_z_loss, routing_labels, seed_random_routers,
)
from .soft import SoftMoE, SoftRouting

__all__ = [
    "MoEConfig", "MoELayer", "MoEMlp", "SoftMoE", "GroupedExperts", "Router", "Routing", "Copies", "TopKRouter",
    "RandomRouter", "ExpertChoiceRouter", "SoftRouting", "ROUTERS", "register_router", "router_class", "LAYER_ROUTERS", "SECOND_POLICIES", "Options", "dispatch",
    "dispatch_copies", "dispatch_routing", "combine", "expert_capacity", "Dispatch", "load_balancing_loss",
    "router_z_loss", "EVAL_MODES", "EXPERT_INITS", "DISPATCH_PATHS", "grouped_mm_supported",
    "find_moe_layers", "collect_moe_outputs", "MoECollector", "seed_random_routers", "routing_labels",
]
