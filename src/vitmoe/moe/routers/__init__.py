"""Routers by name (ROUTERS), each declaring what the rest of vitmoe asks of it (see base.Router).

Import order is registration order, which sets the order of MoEConfig's fields (to_dict,
config.yaml): the shared scoring group and top-k's first, then random routing's.
"""
from .options import Options
from .base import (
    OPTION_GROUPS, ROUTERS, Copies, Router, Routing, join_option_group, on_new_option_group, register_router,
    router_class,
)
from .topk import SECOND_POLICIES, TopKOptions, TopKRouter, load_balancing_loss
from .random import GRANULARITIES, RandomOptions, RandomRouter, seed_random_routers
from .expert_choice import ExpertChoiceRouter
from .image import IMAGE_POOLS, ImageOptions, ImageRouter, routing_labels, superclass_loss
from .scoring import NOISE_POLICIES, ScoringOptions, router_logits, router_z_loss

__all__ = [
    "ROUTERS", "OPTION_GROUPS", "Options", "Router", "Routing", "Copies", "register_router", "router_class",
    "join_option_group", "on_new_option_group", "RandomRouter", "TopKRouter",
    "ExpertChoiceRouter", "ImageRouter", "ImageOptions", "routing_labels", "superclass_loss", "IMAGE_POOLS", "GRANULARITIES", "NOISE_POLICIES", "SECOND_POLICIES", "load_balancing_loss",
    "router_z_loss", "router_logits", "seed_random_routers", "ScoringOptions", "TopKOptions", "RandomOptions",
]
