"""Periodic averaging of randomly routed experts during training (merge_every).

A randomly routed layer's experts are interchangeable: no router learns to tell them apart, and
evaluation merges them into their mean (AdaMix, Wang et al. 2022). Averaging them during training
as well, every N optimizer steps, treats the experts as replicas that each saw other batches and
averages them like local SGD / federated averaging does its workers (McMahan et al. 2017), the
weight averaging behind model soups (Wortsman et al. 2022): right after an averaging step every
expert equals the mean, so the merged model is exactly the MoE model at that point.

The optimizer's moments of those tensors (Adam's exp_avg and exp_avg_sq, every state tensor of the
parameter's shape) are averaged over the expert dimension the same way, so the experts continue
from one common state rather than from moments of weights that no longer exist. It runs on the
device with no host read. With expert parallelism each rank holds a slice of the experts: the
mean is the all_reduce of the slices' sums over the EP group divided by the expert count (the
other EP groups hold identical copies of their slices and compute the same).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...moe import MoEMlp, find_moe_layers
from ...moe.parallel import EXPERT_PARAMS


class ExpertAverager:
    """`averager.after_step(step)` averages the experts when `step` (optimizer steps so far) is a
    multiple of `every`; `average()` does it now."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int):
        if every < 1:
            raise ValueError(f"ExpertAverager: every must be >= 1 optimizer steps, got {every}")
        self.every, self.optimizer = int(every), optimizer
        self.layers = [m for _, m in find_moe_layers(model) if isinstance(m, MoEMlp) and m.router.random_routes]
        if not self.layers:
            raise ValueError("ExpertAverager: the model has no randomly routed MoE layer (router 'random')")

    def after_step(self, step: int) -> bool:
        """Average when `step` is a multiple of `every`; whether it did."""
        if step % self.every:
            return False
        self.average()
        return True

    @torch.no_grad()
    def average(self) -> None:
        for layer in self.layers:
            experts = layer.experts
            for p in (getattr(experts, k) for k in EXPERT_PARAMS):
                state = self.optimizer.state.get(p, {})
                for t in [p, *(v for v in state.values() if isinstance(v, Tensor) and v.shape == p.shape)]:
                    t.copy_(self._mean(t, experts).expand_as(t))

    @staticmethod
    def _mean(t: Tensor, experts) -> Tensor:
        if not experts.sharded:
            return t.mean(0, keepdim=True)  # what merged evaluation computes, to the last bit
        total = t.sum(0, keepdim=True)
        dist.all_reduce(total, group=experts.ep.group)
        return total / (t.shape[0] * experts.ep.size)
