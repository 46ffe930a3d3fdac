from .base import ROUTERS, Copies, Router, Routing, register_router
from .expert_choice import ExpertChoiceRouter
from .random import GRANULARITIES, RandomOptions, RandomRouter, seed_random_routers
from .scoring import NOISE_POLICIES, ScoringOptions, router_logits, router_z_loss
from .topk import SECOND_POLICIES, TopKOptions, TopKRouter, load_balancing_loss

__all__ = [
    "ROUTERS", "Router", "Routing", "Copies", "register_router", "RandomRouter", "TopKRouter",
    "ExpertChoiceRouter", "GRANULARITIES", "NOISE_POLICIES", "SECOND_POLICIES", "load_balancing_loss",
    "router_z_loss", "router_logits", "seed_random_routers", "ScoringOptions", "TopKOptions", "RandomOptions",
]
