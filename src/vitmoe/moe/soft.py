"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts"): every expert sees weighted averages of tokens.

Per image, with logits `X Phi` ([N, M], M = E * slots_per_expert slots):
  dispatch = softmax over tokens  -> slot m is a convex combination of the N tokens,
  combine  = softmax over slots   -> token n's output is a convex combination of slot outputs,
  slots_m = sum_n dispatch[n, m] x_n,   y_n = sum_m combine[n, m] expert_{m // s}(slots_m).
Nothing is dropped, there is no balance loss, and the layer is permutation-equivariant over
tokens (attention-like). Slots of an image mix only that image's tokens. The experts are
the same stacked GroupedExperts as the routed layer; each expert's B*s slots are one group
of its grouped matmul. Legend in vitmoe.moe.routers.base.

The paper's l2-normalisation of X and Phi (for very wide models) is not applied.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..validation import Fields
from .base_layer import MoELayer
from .config import MoEConfig, resolve_config
from .experts import GroupedExperts
from .routers import Router, register_router


class SoftMoE(MoELayer):
    """`[B, N, D] -> [B, N, D]`, with the dense Mlp's constructor contract.

    Args:
        in_features, hidden_features, out_features, act_layer, drop: as the dense Mlp's.
        num_experts: experts of this layer.
        config: the MoE settings (this layer reads slots_per_expert, expert_init, dispatch);
            keyword arguments override its fields.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        *,
        num_experts: int = 4,
        config: MoEConfig | None = None,
        **options,
    ):
        config = resolve_config(config, options, num_experts, router=SOFT)
        super().__init__(num_experts, config)
        self.slots_per_expert = s = config.slots_per_expert
        # LeCun-normal, as in the paper: with LayerNormed inputs the logits start at unit scale.
        self.phi = nn.Parameter(torch.randn(in_features, num_experts * s) * in_features**-0.5)
        self.experts = GroupedExperts(num_experts, in_features, hidden_features, out_features,
                                      act_layer, drop, init=config.expert_init, dispatch_path=config.dispatch)

    def weights(self, x_BND: Tensor) -> tuple[Tensor, Tensor]:
        """(dispatch_BNM, combine_BNM): softmax of the same logits over tokens, and over slots.

        Computed in fp32 (float64 for float64 inputs) whatever the autocast state, like a router.
        """
        dtype = torch.promote_types(x_BND.dtype, torch.float32)
        with torch.autocast(device_type=x_BND.device.type, enabled=False):
            logits_BNM = x_BND.to(dtype) @ self.phi.to(dtype)
            return logits_BNM.softmax(dim=1), logits_BNM.softmax(dim=2)

    def forward_bnd(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        E, s = self.num_experts, self.slots_per_expert
        dispatch_BNM, combine_BNM = (w.to(x_BND.dtype) for w in self.weights(x_BND))
        slots_BMD = dispatch_BNM.transpose(1, 2) @ x_BND
        # Slot m belongs to expert m // s: regroup rows by expert, [E * B * s, D].
        rows = B * s
        slots_SD = slots_BMD.view(B, E, s, D).transpose(0, 1).reshape(E * rows, D)
        counts_E = torch.full((E,), rows, dtype=torch.int64, device=x_BND.device)
        expert_S = torch.arange(E, device=x_BND.device).repeat_interleave(rows)
        y_SO = self.experts(slots_SD, counts_E, expert_S, rows)
        y_BMO = y_SO.view(E, B, s, -1).transpose(0, 1).reshape(B, E * s, -1)
        # Recording: each token's expert is the one owning the slot that weighs it most.
        record = {"expert_T": (dispatch_BNM.argmax(dim=2) // s).reshape(B * N)} if self.recording else None
        self._report({}, counts_E.float(), torch.zeros((), device=x_BND.device), routing=record)
        return combine_BNM @ y_BMO

    def extra_repr(self) -> str:
        return f"slots_per_expert={self.slots_per_expert}"


SOFT = "soft"


@register_router(SOFT)
class SoftRouting(Router):
    """Router "soft": the declaration of the SoftMoE layer, whose routing (the logits phi, the
    dispatch and combine weights) cannot be split from it. It lives here because SoftMoE is built
    on MoEConfig, which the routers package comes before; the class is never instantiated."""

    layer = SoftMoE
    mergeable = False  # slot mixing is no MLP: no dense layer computes it
    routes_tokens = False  # every expert processes slots of every image

    def __init__(self, *args, **kwargs):
        raise TypeError("router 'soft' has no router module: it is the SoftMoE layer (built by ViTConfig.mlp_layer)")

    @classmethod
    def check_config(cls, f: Fields, experts: Sequence[int]) -> None:
        f.need(f.obj.top_k == 1, "top_k", "1 for router 'soft' (every token mixes every expert)")

    @classmethod
    def run_label(cls, config: MoEConfig) -> str:
        return "soft-moe"

    @classmethod
    def describe(cls, config: MoEConfig) -> str:
        return "Soft MoE"

    @classmethod
    def router_params(cls, dim: int, num_experts: int, config: MoEConfig) -> int:
        return dim * num_experts * config.slots_per_expert  # phi: a logit per slot

    @classmethod
    def experts_per_token(cls, num_experts: int, config: MoEConfig) -> float:
        return num_experts  # each token's output mixes every slot

    @classmethod
    def layer_flops(cls, tokens: int, dim: int, hidden: int, num_experts: int, config: MoEConfig) -> int:
        M = num_experts * config.slots_per_expert
        # Logits, slots = dispatch^T X, combine @ outputs, and every slot through its expert.
        return 2 * tokens * dim * M * 3 + M * 2 * 2 * dim * hidden
