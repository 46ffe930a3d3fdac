from .base import ROUTERS, Router, Routing, register_router
from .random import GRANULARITIES, RandomRouter
from .topk import NOISE_POLICIES, TopKRouter, load_balancing_loss, router_z_loss

__all__ = [
    "ROUTERS", "Router", "Routing", "register_router", "RandomRouter", "TopKRouter",
    "GRANULARITIES", "NOISE_POLICIES", "load_balancing_loss", "router_z_loss",
]
