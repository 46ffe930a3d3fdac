"""Mixture-of-Experts MLP layer: routers, dispatch, grouped experts."""
from .dispatch import Dispatch, combine, dispatch, expert_capacity
from .experts import DISPATCH_PATHS, EXPERT_INITS, GroupedExperts, grouped_mm_supported
from .layer import EVAL_MODES, MoEMlp
from .routers import ROUTERS, RandomRouter, Router, Routing, TopKRouter, load_balancing_loss, router_z_loss

__all__ = [
    "MoEMlp", "GroupedExperts", "Router", "Routing", "TopKRouter", "RandomRouter", "ROUTERS",
    "dispatch", "combine", "expert_capacity", "Dispatch", "load_balancing_loss", "router_z_loss",
    "EVAL_MODES", "EXPERT_INITS", "DISPATCH_PATHS", "grouped_mm_supported",
]
