"""One training step: forward with the losses, backward, expert-gradient reduction, clipping,
optimizer and lr-scheduler step.

With soft targets (a batch mixed by mixup / CutMix, vitmoe.data.mix) the cross-entropy is taken
against them (fp32; the targets already carry the label smoothing), in both passes of consistency
regularisation alike. With `freeze` (freeze_unrouted) experts that got no token keep their weights
and optimizer moments through the optimizer step (training.recipe.freeze).

fp32, bf16 and fp16 take the same path: the GradScaler is enabled only for fp16 (loss scaling;
disabled, its scale/unscale_/update do nothing and its step is the optimizer's step).
Per-image routers with super-class guidance see the batch's labels (or soft targets) during the
forward passes (vitmoe.moe.routers.image.routing_labels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models import ModelOutput
from ...moe import routing_labels
from ..distributed import expert_parallel
from ..config.train_config import TrainConfig
from ..evaluation.precision import autocast_context, resolve_amp
from ..recipe.freeze import UnroutedFreeze
from .losses import soft_cross_entropy, symmetric_kl


@dataclass
class StepOutput:
    """What one step computed (losses are sums over this rank's images times the step's `scale`)."""

    logits: Tensor
    """Logits of the first forward pass (the accuracy counts these)."""
    loss: Tensor
    """Cross-entropy (with consistency: the mean of both passes' cross-entropies)."""
    aux: Tensor
    """The model's weighted auxiliary loss (with consistency: the mean of both passes')."""
    consistency: Tensor | None
    """The symmetric KL between the two passes (None with one pass)."""
    total: Tensor
    """What was back-propagated: loss + aux + consistency_weight * consistency."""
    passes: list[ModelOutput]
    """Each forward pass's output (unweighted aux terms and per-layer MoE statistics)."""


class TrainStep:
    """`step(x, y, scale)` trains on one batch and returns its StepOutput. `scale` turns this rank's
    loss sums into its share of the global-batch mean (world_size / global batch size)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, forward: Callable[..., ModelOutput],
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 device: torch.device, world_size: int, expert_parallel_group=None):
        self.cfg, self.model, self.forward = cfg, model, forward
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.world_size, self.ep = device, world_size, expert_parallel_group
        self.amp = resolve_amp(cfg.amp, device)  # once, not per step ("auto" -> bf16 or off)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        self.freeze = UnroutedFreeze(model, optimizer, world_size) if cfg.freeze_unrouted else None

    def __call__(self, x: Tensor, y: Tensor, scale: float, targets: Tensor | None = None) -> StepOutput:
        out = self.losses(x, y, scale, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.total).backward()
        if self.ep is not None:  # sharded experts: DDP leaves their gradients to us
            expert_parallel.reduce_expert_grads(self.model, self.world_size)
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            self.clip_grad_norm(self.cfg.grad_clip)
        saved = self.freeze.snapshot(out.passes) if self.freeze is not None else None
        self.scaler.step(self.optimizer)
        if saved is not None:
            self.freeze.restore(saved, out.passes)
        self.scaler.update()
        self.scheduler.step()
        return out

    def losses(self, x: Tensor, y: Tensor, scale: float, targets: Tensor | None = None) -> StepOutput:
        """The forward pass (two with consistency regularisation, each drawing its own random
        routes) and every loss term; `targets`: soft targets [b, classes] replacing `y` in the loss."""
        cfg = self.cfg
        passes = []
        for _ in range(cfg.forwards_per_step):
            # Super-class guidance (moe.superclasses) trains per-image routers on the labels.
            with autocast_context(self.amp, self.device), routing_labels(self.model, y if targets is None else targets):
                passes.append(self.forward(x, return_aux=True))
        if targets is None:
            ce = [F.cross_entropy(p.logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="sum") * scale
                  for p in passes]
        else:
            ce = [soft_cross_entropy(p.logits, targets, reduction="sum") * scale for p in passes]
        if len(passes) == 1:
            loss, aux, consistency = ce[0], passes[0].aux_loss, None
            total = loss + aux
        else:
            loss = 0.5 * (ce[0] + ce[1])  # the cross-entropy of both passes, averaged (THOR)
            aux = 0.5 * (passes[0].aux_loss + passes[1].aux_loss)
            consistency = symmetric_kl(passes[0].logits, passes[1].logits, stopgrad=cfg.consistency_stopgrad,
                                       reduction="sum") * scale
            total = loss + aux + cfg.consistency_weight * consistency
        return StepOutput(passes[0].logits, loss, aux, consistency, total, passes)

    def clip_grad_norm(self, max_norm: float) -> None:
        if self.ep is not None:
            expert_parallel.clip_grad_norm_(self.model, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):  # {} or None when saved without fp16
            self.scaler.load_state_dict(state["scaler"])
