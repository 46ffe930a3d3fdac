"""An exponential moving average of the weights (ema_decay), evaluated and saved beside the model.

After every optimizer step, ema <- decay * ema + (1 - decay) * w for every parameter (the stacked
expert tensors included), buffers copied. Polyak-Ruppert averaging in its exponential form, as used
for ViTs by DeiT (Touvron et al. 2021) and timm's ModelEmaV2; like model soups (Wortsman et al.
2022) it averages weights, here along one run. The update is two fused multi-tensor ops
(torch._foreach_mul_ / _foreach_add_) on the device, no host sync.

The average lives in a frozen copy of the model (`ModelEMA.module`), so it is evaluated, merged
(randomly routed layers in eval mode "merged" merge the copy's own experts, which is exactly
`merge_experts` of the EMA weights), saved (`ema.safetensors` in each checkpoint, a model file
`vitmoe.load_model` reads) and resumed like the model. With expert parallelism the copy holds the
same slice of experts as the model (it shares the model's ExpertParallel groups), and checkpoints
gather it with the model's helpers (`expert_parallel.full_state_dict`).

`best` with EMA on: the checkpoint of the epoch whose better model, raw or EMA, has the highest
test accuracy; summary.json's `best_model` says which of its files ("model": model.safetensors,
"ema": ema.safetensors) that is, and keeps both models' own bests.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ... import rundir
from ...data.seeding import derive_seed
from ...moe import find_moe_layers, seed_random_routers
from ..distributed import expert_parallel
from ..evaluation.evaluate import evaluate

# Random eval routes of the copy are drawn from (seed, epoch, this stream): the same after a resume.
_EVAL_STREAM = 7


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1), got {decay}")
        # Shared, not copied: process groups cannot be copied, and the copy's experts are split alike.
        groups = {id(m.experts.ep): m.experts.ep for _, m in find_moe_layers(model)
                  if getattr(m, "experts", None) is not None and m.experts.ep is not None}
        self.module = copy.deepcopy(model, memo=groups)
        self.module.requires_grad_(False).eval()
        self.decay, self.updates = float(decay), 0
        self._pairs(model)
        device = next(model.parameters()).device
        self.route_generators = seed_random_routers(self.module, 0, device)

    def _pairs(self, model: nn.Module) -> None:
        # parameters() and buffers() list shared tensors once, in module order: both lists align.
        self._ema_params, self._params = list(self.module.parameters()), list(model.parameters())
        self._ema_buffers, self._buffers = list(self.module.buffers()), list(model.buffers())

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the model's current weights."""
        torch._foreach_mul_(self._ema_params, self.decay)
        torch._foreach_add_(self._ema_params, self._params, alpha=1.0 - self.decay)
        if self._buffers:
            torch._foreach_copy_(self._ema_buffers, self._buffers)
        self.updates += 1

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Restart the average at the model's weights (a resumed checkpoint that has none)."""
        torch._foreach_copy_(self._ema_params + self._ema_buffers, self._params + self._buffers)
        self.updates = 0

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every expert in global order (a collective with expert parallelism)."""
        return expert_parallel.full_state_dict(self.module)

    def state_dict(self) -> dict[str, Any]:
        """What state.pt keeps beside ema.safetensors."""
        return {"decay": self.decay, "updates": self.updates}

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any] | None) -> None:
        """Whole-expert weights (ema.safetensors) sliced for this rank, and the update count."""
        self.module.load_state_dict(expert_parallel.local_state_dict(self.module, weights), strict=True)
        self.updates = int((state or {}).get("updates", 0))

    def evaluate(self, loader, device: torch.device, amp: str, dist, seed: int, epoch: int) -> dict[str, Any]:
        """The metrics row's EMA columns for `epoch`."""
        for i, g in enumerate(self.route_generators.values()):
            g.manual_seed(derive_seed(seed, epoch, _EVAL_STREAM, i))
        ev = evaluate(self.module, loader, device, amp, dist)
        return {"ema_test_loss": ev["loss"], "ema_test_acc": ev["acc"], "ema_eval_time_s": ev["seconds"]}


def better_model(row: dict[str, Any]) -> tuple[float, str]:
    """(accuracy, "model" or "ema"): the better of a metrics row's two models (the raw one on ties)."""
    ema = row.get("ema_test_acc")
    if ema is not None and ema > row["test_acc"]:
        return ema, "ema"
    return row["test_acc"], "model"


def ema_summary(history: list[dict[str, Any]], best_acc: float, best_epoch: int | None, best_model: str,
                decay: float, threshold: float) -> dict[str, Any]:
    """summary.json's fields with EMA on: `best_*` of both models, and each one's own best."""
    own = rundir.summarize(history, threshold)
    ema_rows = [{"epoch": r["epoch"], "test_acc": r["ema_test_acc"]} for r in history
                if r.get("ema_test_acc") is not None]
    ema = rundir.summarize(ema_rows, threshold) if ema_rows else {"best_acc": None, "best_epoch": None}
    return {"best_acc": best_acc if best_epoch is not None else None, "best_epoch": best_epoch,
            "best_model": best_model, "model_best_acc": own["best_acc"], "model_best_epoch": own["best_epoch"],
            "ema_best_acc": ema["best_acc"], "ema_best_epoch": ema["best_epoch"], "ema_decay": decay}
