"""What every MoE layer shares, whatever decides which expert sees what (routers or soft slots).

The model finds its MoE layers by this class (`VisionTransformer.moe_modules()`), reads the
auxiliary losses and statistics they keep, and resets them at the start of each forward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class MoELayer(nn.Module):
    num_experts: int
    eval_mode: str = "merged"

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.aux: dict[str, Tensor] = {}
        """Unweighted auxiliary terms of the calls since the last reset, summed over calls."""
        self.stats: dict[str, Tensor] = {}
        """Detached statistics: load [E] summed over calls; dropped_frac, entropy averaged."""
        self.calls = 0
        """Forward calls since the last reset: 1 for a layer of one block, depth for WideNet's
        shared layer (the model resets every layer at the start of its forward)."""
        self.accumulate = False
        """True when one layer serves several blocks (WideNet): then aux and stats gather every
        call since `reset_calls()`, so the shared layer's loss counts each block's routing."""
        self.register_buffer("usage", torch.zeros(num_experts), persistent=False)
        """Token copies routed to each expert since the last reset (for usage-weighted merging)."""

    @property
    def aux_weights(self) -> dict[str, float]:
        return {}

    def reset_calls(self) -> None:
        self.aux, self.stats, self.calls = {}, {}, 0

    def _record_aux(self, aux: dict[str, Tensor]) -> None:
        if self.accumulate and self.calls:
            self.aux = {k: self.aux[k] + v for k, v in aux.items()}
        else:
            self.aux, self.calls = dict(aux), 0
        self.calls += 1

    @torch.no_grad()
    def _record(self, load_E: Tensor, dropped_frac: Tensor, probs_TE: Tensor | None = None,
                extra: dict[str, Tensor] | None = None) -> None:
        """Call after `_record_aux` of the same forward. Device tensors only: reading them (and
        so syncing) is the trainer's choice."""
        stats = {"load": load_E.detach(), "dropped_frac": dropped_frac.detach()}
        if probs_TE is not None:
            stats["entropy"] = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
        stats.update(extra or {})
        n = self.calls
        if self.accumulate and n > 1 and self.stats:
            # Running mean of the rates over calls; the load is a count, so it sums.
            stats = {k: (self.stats[k] + v if k == "load" else self.stats[k] + (v - self.stats[k]) / n)
                     for k, v in stats.items()}
        self.stats = stats
        if self.training:
            self.usage += load_E

    def weighted_aux_loss(self) -> Tensor | None:
        terms = [self.aux_weights[k] * v for k, v in self.aux.items() if self.aux_weights.get(k)]
        return torch.stack(terms).sum() if terms else None
