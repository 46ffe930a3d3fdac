"""What every MoE layer shares, whatever decides which expert sees what (routers or soft slots).

A layer reports what its forward produced (auxiliary losses, statistics) to the collectors of the
`collect_moe_outputs` blocks (vitmoe.moe.collect) running around it, and to nobody otherwise:
nothing is kept on the layer between forwards except the `usage` counts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .collect import MoECollector
    from .config import MoEConfig


class MoELayer(nn.Module):
    num_experts: int

    def __init__(self, num_experts: int, config: "MoEConfig"):
        super().__init__()
        self.num_experts, self.config = num_experts, config
        self.eval_mode = config.eval_mode
        """How a layer without a learned router evaluates (merged, random or ensemble)."""
        self.register_buffer("usage", torch.zeros(num_experts), persistent=False)
        """Token copies routed to each expert in training (for usage-weighted merging)."""
        self._collectors: list[MoECollector] = []
        """The running `collect_moe_outputs` blocks (nested blocks each get every record)."""

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., out], as nn.Linear takes it: [B, N, D] is B images of N tokens (what
        per-image routing and Soft MoE's slots read as an image); [T, D] is one sequence of T tokens;
        more leading axes are images too ([A, B, N, D]: A * B images)."""
        if x.dim() == 3:
            return self.forward_bnd(x)
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} takes [..., dim] inputs, as nn.Linear, got shape {list(x.shape)}")
        x_BND = x.reshape(1, -1, x.shape[-1]) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])
        return self.forward_bnd(x_BND).reshape(*x.shape[:-1], -1)

    def forward_bnd(self, x_BND: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def aux_weights(self) -> dict[str, float]:
        """Weight of each auxiliary term the layer produces."""
        return {}

    @torch.no_grad()
    def _statistics(self, load_E: Tensor, dropped_frac: Tensor, probs_TE: Tensor | None,
                    extra: dict[str, Tensor] | None) -> dict[str, Tensor]:
        stats = {"load": load_E.detach(), "dropped_frac": dropped_frac.detach()}
        if probs_TE is not None:
            stats["entropy"] = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
        stats.update(extra or {})
        return stats

    @property
    def recording(self) -> bool:
        """Whether a running collector asked for per-token routing (`collect_moe_outputs(record=True)`):
        layers then also report where each token went, and compute it only then."""
        return any(c.record for c in self._collectors)

    def _report(self, aux: dict[str, Tensor] | None, load_E: Tensor, dropped_frac: Tensor,
                probs_TE: Tensor | None = None, extra: dict[str, Tensor] | None = None,
                routing: dict[str, Tensor] | None = None) -> None:
        """Hand this forward's unweighted auxiliary terms and statistics (device tensors: reading
        them, and so syncing, is the caller's choice) to the running collector; `routing` (only
        when recording): per-token tensors, e.g. `expert_T`, the expert each token went to."""
        if self.training:
            with torch.no_grad():
                self.usage += load_E
        if self._collectors:
            stats = self._statistics(load_E, dropped_frac, probs_TE, extra)
            for collector in self._collectors:
                collector.add(self, aux or {}, stats, routing if collector.record else None)


def find_moe_layers(model: nn.Module, every_name: bool = False) -> list[tuple[str, MoELayer]]:
    """(name, layer) of every MoE layer in `model`, in module order ("" when `model` is one itself).

    A layer shared by several blocks (WideNet) comes once, under its first block's name, unless
    `every_name`: then once per name, as its state-dict keys do.
    """
    return [(name, m) for name, m in model.named_modules(remove_duplicate=not every_name) if isinstance(m, MoELayer)]
