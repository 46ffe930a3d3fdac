"""Experts that received no token in a step are left exactly as they were (freeze_unrouted).

Adam(W) moves every parameter in every step. An expert no token reached has a zero gradient (plus
Adam's L2 term), yet its moments decay, its update is the stale momentum m / (sqrt(v) + eps), and
AdamW's decoupled weight decay shrinks it: with random routing of one expert per batch, most
experts drift in most steps without having seen data. With freeze_unrouted the rows of those
experts in the stacked parameters (w1, b1, w2, b2) and in every optimizer state tensor of the same
shape (exp_avg, exp_avg_sq, ...) are put back after optimizer.step(); the experts that got tokens
keep the plain step. Adam's step count (its bias correction) is one number per stacked tensor, so
it still counts the step for every expert of the layer.

No host sync: every expert tensor and its moments are copied before the step (memory: one more
copy of the experts and their moments while the step runs), and restored with torch.where on a
per-expert mask made on the device from the layer's load of the step (token copies per expert,
summed over the step's forward passes and over all ranks, so every replica of an expert decides
alike; with expert parallelism each rank takes the rows of the experts it holds).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models import ModelOutput
from ..moe import MoEMlp, find_moe_layers
from ..moe.parallel import EXPERT_PARAMS

# (parameter, its values before the step, {state key: value before the step})
Saved = list[tuple[nn.Parameter, Tensor, dict[str, Tensor]]]


class UnroutedFreeze:
    """`saved = freeze.snapshot()` before optimizer.step(), `freeze.restore(saved, passes)` after."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int = 1):
        # Routed layers only: Soft MoE gives every expert slots in every step.
        self.layers = [(name, m) for name, m in find_moe_layers(model) if isinstance(m, MoEMlp)]
        self.optimizer, self.world_size = optimizer, world_size

    def _moments(self, p: nn.Parameter) -> dict[str, Tensor]:
        state = self.optimizer.state.get(p, {})
        return {k: v for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape}

    @torch.no_grad()
    def snapshot(self) -> list[tuple[str, MoEMlp, Saved]]:
        return [(name, m, [(p, p.detach().clone(), {k: v.clone() for k, v in self._moments(p).items()})
                           for p in (getattr(m.experts, k) for k in EXPERT_PARAMS)])
                for name, m in self.layers]

    def routed(self, name: str, layer: MoEMlp, passes: list[ModelOutput]) -> Tensor | None:
        """Bool [experts this rank holds]: got at least one token copy in the step, on any rank."""
        loads = [p.moe_stats[name]["load"] for p in passes if name in p.moe_stats]
        if not loads:
            return None
        load = torch.stack(loads).sum(0).float()
        if self.world_size > 1:
            dist.all_reduce(load)
        if layer.experts.sharded:
            start, n = layer.experts.ep.local_range(layer.num_experts)
            load = load[start:start + n]
        return load > 0

    @torch.no_grad()
    def restore(self, saved: list[tuple[str, MoEMlp, Saved]], passes: list[ModelOutput]) -> None:
        for name, layer, tensors in saved:
            routed = self.routed(name, layer, passes)
            if routed is None:
                continue
            for p, before, moments in tensors:
                keep = routed.view(-1, *([1] * (p.ndim - 1)))
                p.copy_(torch.where(keep, p, before))
                for k, v in self._moments(p).items():
                    # A moment created by this step (the first one) was zeros before it.
                    old = moments.get(k)
                    v.copy_(torch.where(keep, v, old if old is not None else torch.zeros_like(v)))
