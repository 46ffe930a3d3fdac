from .base import ROUTERS, Copies, Router, Routing, register_router
from .expert_choice import ExpertChoiceRouter
from .random import GRANULARITIES, RandomRouter
from .topk import NOISE_POLICIES, SECOND_POLICIES, TopKRouter, load_balancing_loss, router_z_loss

__all__ = [
    "ROUTERS", "Router", "Routing", "Copies", "register_router", "RandomRouter", "TopKRouter",
    "ExpertChoiceRouter", "GRANULARITIES", "NOISE_POLICIES", "SECOND_POLICIES", "load_balancing_loss",
    "router_z_loss",
]
