"""The run log's dead-expert warning, said when it tells the user something.

* Learned routers only: a random router's expert sees no token in an epoch by chance (batch
  granularity draws one expert per layer per step: an epoch of a few steps cannot reach every
  expert), which says nothing about the experts.
* Experts idle over a whole epoch: no token copy at all (a small share is a balance question,
  which `vitmoe analyze` measures against its --dead-threshold).
* Rate-limited: one line per epoch at most, and only when the idle experts differ from the ones
  last reported, so an expert that stays dead for 300 epochs is reported once, not 300 times.
"""
from __future__ import annotations

from typing import Any, Mapping

from ...models import ViTConfig
from ...moe import router_class


def idle_experts_by_layer(expert_load: Mapping[str, Any] | None) -> dict[str, list[int]]:
    """Per MoE layer, the experts that received no token copy (`expert_load`: a metrics row's)."""
    found = {name: [i for i, c in enumerate(load) if not c > 0] for name, load in (expert_load or {}).items()
             if len(load) > 1}
    return {name: experts for name, experts in found.items() if experts}


class DeadExpertNotes:
    """`note(epoch, expert_load)` -> the warning line of that epoch, or None (see the module docstring)."""

    def __init__(self, model: ViTConfig):
        self.enabled = model.is_moe and not router_class(model.moe.router).random_routes
        self.reported: dict[str, list[int]] = {}

    def note(self, epoch: int, expert_load: Mapping[str, Any] | None) -> str | None:
        if not self.enabled:
            return None
        idle = idle_experts_by_layer(expert_load)
        changed = idle != self.reported
        self.reported = idle
        if not idle or not changed:
            return None
        layers = "; ".join(f"{layer} {experts}" for layer, experts in idle.items())
        return (f"warning: experts that received no token in epoch {epoch} (dead experts): {layers}; "
                "`vitmoe analyze` shows the routing (said again only when this changes)")
