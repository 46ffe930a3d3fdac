"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"), per sample as in
timm and CCT: in training, each image skips a residual branch with probability `rate`, and the
images that keep it scale it by 1 / (1 - rate) so its expected value is unchanged.

`drop_path_rates` is the schedule: rates rising linearly from 0 at the first block to `rate` at
the last (timm, CCT), since early blocks compute features every later one needs.
"""
from __future__ import annotations

from torch import Tensor, nn


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Block i's rate: rate * i / (depth - 1); a single block gets 0, as torch.linspace(0, rate, 1)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """`x` [B, ...] with whole samples zeroed at `rate` and the rest divided by 1 - rate in training;
    `x` itself otherwise. The keep mask is drawn on x's device (no host synchronisation)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"
