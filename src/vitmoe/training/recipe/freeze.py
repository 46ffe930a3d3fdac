"""Experts that received no token in a step are left exactly as they were (freeze_unrouted).

Adam(W) moves every parameter in every step. An expert no token reached has a zero gradient (plus
Adam's L2 term), yet its moments decay, its update is the stale momentum m / (sqrt(v) + eps), and
AdamW's decoupled weight decay shrinks it: with random routing of one expert per batch, most
experts drift in most steps without having seen data. With freeze_unrouted the rows of those
experts in the stacked parameters (w1, b1, w2, b2) and in every optimizer state tensor of the same
shape (exp_avg, exp_avg_sq, ...) are put back after optimizer.step(); the experts that got tokens
keep the plain step. Adam's step count (its bias correction) is one number per stacked tensor, so
it still counts the step for every expert of the layer.

Which experts got tokens is known after the forward: the layer's load of the step (token copies
per expert, summed over the step's forward passes and over all ranks, so every replica of an
expert decides alike; with expert parallelism each rank takes the rows of the experts it holds).
`snapshot(passes)` reads it before the step and saves what the step may wrongly move:

* on the CPU, where reading the mask costs nothing, only the unrouted experts' rows (index_select,
  put back with index_copy_): the copy is proportional to the experts left out, none when all got
  tokens;
* on other devices every expert tensor and its moments, restored with torch.where on the mask, so
  the step needs no host sync (memory: one more copy of the experts and moments during the step).

`snapshot()` without the passes takes the full copy and reads the loads in `restore`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...models import ModelOutput
from ...moe import MoEMlp, find_moe_layers
from ...moe.parallel import EXPERT_PARAMS


@dataclass
class Saved:
    """One layer's values from before the step: `rows` None means whole tensors (masked restore
    with `routed`, None until restore reads the loads), else the unrouted rows' indices."""

    name: str
    layer: MoEMlp
    tensors: list[tuple[nn.Parameter, Tensor, dict[str, Tensor]]]
    """(parameter, its saved values, {state key: saved values}) for w1, b1, w2, b2."""
    rows: Tensor | None = None
    routed: Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.nbytes for _, before, moments in self.tensors for t in (before, *moments.values()))


def _rows_are_free(routed: Tensor) -> bool:
    """Reading the mask on the host stalls nothing on the CPU; on an accelerator it would wait for
    the forward to finish before the step could be queued."""
    return routed.device.type == "cpu"


class UnroutedFreeze:
    """`saved = freeze.snapshot(passes)` after the forward and before optimizer.step(),
    `freeze.restore(saved, passes)` after it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world_size: int = 1):
        # Routed layers only: Soft MoE gives every expert slots in every step.
        self.layers = [(name, m) for name, m in find_moe_layers(model) if isinstance(m, MoEMlp)]
        self.optimizer, self.world_size = optimizer, world_size

    def _moments(self, p: nn.Parameter) -> dict[str, Tensor]:
        state = self.optimizer.state.get(p, {})
        return {k: v for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape}

    def _params(self, layer: MoEMlp) -> list[nn.Parameter]:
        return [getattr(layer.experts, k) for k in EXPERT_PARAMS]

    @torch.no_grad()
    def snapshot(self, passes: list[ModelOutput] | None = None) -> list[Saved]:
        saved = []
        for name, layer in self.layers:
            routed = self.routed(name, layer, passes) if passes is not None else None
            if passes is not None and routed is None:
                continue  # the layer saw no token this step (not run): nothing to restore
            if routed is not None and _rows_are_free(routed):
                rows = (~routed).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue  # every expert got tokens: the plain step for all
                saved.append(Saved(name, layer, [(p, p.detach().index_select(0, rows),
                                                  {k: v.index_select(0, rows) for k, v in self._moments(p).items()})
                                                 for p in self._params(layer)], rows=rows))
            else:
                saved.append(Saved(name, layer, [(p, p.detach().clone(),
                                                  {k: v.clone() for k, v in self._moments(p).items()})
                                                 for p in self._params(layer)], routed=routed))
        return saved

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
    def restore(self, saved: list[Saved], passes: list[ModelOutput] | None = None) -> None:
        for s in saved:
            if s.rows is not None:
                for p, before, moments in s.tensors:
                    p.index_copy_(0, s.rows, before)
                    for k, v in self._moments(p).items():
                        # A moment created by this step (the first one) was zeros before it.
                        old = moments.get(k)
                        v.index_copy_(0, s.rows, old if old is not None else v.new_zeros((len(s.rows), *v.shape[1:])))
                continue
            routed = s.routed if s.routed is not None else self.routed(s.name, s.layer, passes or [])
            if routed is None:
                continue
            for p, before, moments in s.tensors:
                keep = routed.view(-1, *([1] * (p.ndim - 1)))
                p.copy_(torch.where(keep, p, before))
                for k, v in self._moments(p).items():
                    old = moments.get(k)
                    v.copy_(torch.where(keep, v, old if old is not None else torch.zeros_like(v)))
