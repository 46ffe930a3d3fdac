"""Per-epoch training meters kept on the device: the loop adds to them without a host sync; they
are read at log points (the first non-finite step) and at the end of the epoch, reduced over
ranks and turned into the training columns of the metrics row."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed.context import DistContext
from .step import StepOutput


class EpochMeters:
    def __init__(self, device: torch.device, step: int, forwards_per_step: int):
        self.forwards_per_step = forwards_per_step
        self.loss_sum = torch.zeros((), device=device)
        self.aux_sum = torch.zeros((), device=device)
        self.cons_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.seen = torch.zeros((), device=device, dtype=torch.int64)
        self.aux_terms: dict[str, Tensor] = {}
        self.loads: dict[str, Tensor] = {}
        self.dropped: dict[str, Tensor] = {}
        self.entropy: dict[str, Tensor] = {}
        self.step_dev = torch.full((), step, device=device, dtype=torch.int64)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        self.steps = 0

    @torch.no_grad()
    def update(self, out: StepOutput, y: Tensor, global_n: int, world_size: int) -> None:
        """Add one step. Loss sums are scaled back from the step's global-batch share.

        `train_acc` counts argmax(logits) == y, the batch's own labels, also for a batch mixed by
        mixup / CutMix (vitmoe.data.mix): its targets blend each image's label with its partner's,
        and the accuracy is counted against the primary label only (the image's own)."""
        self.steps += 1
        self.step_dev += 1
        bad = ~torch.isfinite(out.total.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.step_dev, self.first_bad)
        self.loss_sum += out.loss.detach() * (global_n / world_size)
        self.aux_sum += out.aux.detach() * y.numel()
        if out.consistency is not None:
            self.cons_sum += out.consistency.detach() * (global_n / world_size)
        self.correct += (out.logits.detach().argmax(-1) == y).sum()
        self.seen += y.numel()
        for p in out.passes:  # loads sum over both passes (work done); rates average
            for k, v in p.aux_terms.items():
                self.aux_terms[k] = self.aux_terms.get(k, 0) + v
            for name, st in p.moe_stats.items():
                self.loads[name] = self.loads.get(name, 0) + st["load"]
                self.dropped[name] = self.dropped.get(name, 0) + st["dropped_frac"]
                if "entropy" in st:
                    self.entropy[name] = self.entropy.get(name, 0) + st["entropy"]

    def first_bad_step(self) -> int:
        """The first step (1-based, counted over the run) whose loss was NaN/inf, or -1. Syncs."""
        return int(self.first_bad)

    def reduce(self, dist: DistContext) -> dict[str, Any]:
        """The epoch's training columns over all ranks (a collective: every rank calls it)."""
        packed = torch.stack([self.loss_sum.double(), self.aux_sum.double(), self.cons_sum.double(),
                              self.correct.double(), self.seen.double()])
        dist.all_reduce_sum(packed)
        loss_total, aux_total, cons_total, correct_n, seen_n = packed.tolist()
        n = max(seen_n, 1.0)
        passes = max(self.steps * self.forwards_per_step, 1)
        # Per-rank means of rates and terms, then their mean over ranks; loads are counts: summed.
        rate = lambda d: {k: dist.mean_over_ranks(float(v) / passes) for k, v in d.items()}  # noqa: E731
        return {
            "images": seen_n,
            "train_loss": loss_total / n,
            "train_acc": 100.0 * correct_n / n,
            "aux_loss": aux_total / n,
            "aux_terms": rate(self.aux_terms),
            "expert_load": {k: [float(c) for c in dist.all_reduce_sum(v.clone()).tolist()]
                            for k, v in self.loads.items()},
            "dropped_frac": rate(self.dropped),
            "router_entropy": rate(self.entropy),
            "forwards_per_step": self.forwards_per_step,
            "consistency_loss": cons_total / n if self.forwards_per_step > 1 else None,
            "steps_in_epoch": self.steps,
        }
