"""Residual MoE (the residual half of PR-MoE, Rajbhandari et al. 2022): a dense MLP next to the MoE layer.

`out = c0 * moe(x) + c1 * mlp(x)`, with per-token `c = softmax(Linear(D, 2)(x))`. The dense
branch has the MoE experts' hidden width and sees every token, so tokens an expert drops
(zero from the MoE branch) still get an MLP output.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..moe import MoEMlp
from .mlp import Mlp


class ResidualMoE(nn.Module):
    """`[B, N, D] -> [B, N, D]`, with the dense Mlp's constructor contract; `moe_layer` is the
    MoE branch's class (MoEMlp or SoftMoE), built with the remaining keyword arguments."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        *,
        moe_layer: type[nn.Module] = MoEMlp,
        **moe_kwargs,
    ):
        super().__init__()
        self.moe = moe_layer(in_features, hidden_features, out_features, act_layer, drop, **moe_kwargs)
        self.mlp = Mlp(in_features, hidden_features, out_features, act_layer, drop)
        self.coef = nn.Linear(in_features, 2)

    def forward(self, x_BND: Tensor) -> Tensor:
        c_BN2 = self.coef(x_BND).softmax(dim=-1)
        return c_BN2[..., :1] * self.moe(x_BND) + c_BN2[..., 1:] * self.mlp(x_BND)
