"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"):
every expert takes its top-C tokens.

Router scores are softmax over experts (fp32), as for top-k; then each expert picks the C
tokens of the whole batch with the highest score for it, so a token is taken by 0..E
experts and every expert processes exactly C copies: balanced by construction, no balance
loss (only the z-loss, which keeps logits small). C comes from the layer (its capacity
factor is the mean number of experts per token). A token no expert takes gets zero from
the MoE branch; the block's residual carries it, as for dropped copies.

Because the choice is over all B*N tokens of the batch, an image's output depends on the
other images of its batch, in evaluation too (a known property of expert choice).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from ...validation import Fields
from .base import Copies, Routing, register_router
from .scoring import LinearRouter, ScoringOptions, router_z_loss

if TYPE_CHECKING:
    from ..config import MoEConfig


@register_router("expert_choice")
class ExpertChoiceRouter(LinearRouter):
    chooses_tokens = True
    options = (ScoringOptions,)

    def __init__(self, dim: int, num_experts: int, config: "MoEConfig"):
        super().__init__(dim, num_experts, config, {"z": config.z_loss_weight})

    @classmethod
    def check_config(cls, f: Fields, experts: Sequence[int]) -> None:
        f.need(f.obj.top_k == 1, "top_k", "1 for router 'expert_choice' (its capacity factor sets experts per token)")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            f.need(bool(getattr(f.obj, name)), name, "a positive factor for router 'expert_choice' "
                   "(each expert takes ceil(factor * tokens / experts) tokens; set both capacity_factor_train "
                   "and capacity_factor_eval, e.g. 1 for switch's compute or 2 as Zhou et al. 2022)")

    @classmethod
    def run_label(cls, config: "MoEConfig") -> str:
        return "ec"

    @classmethod
    def experts_per_token(cls, num_experts: int, config: "MoEConfig") -> float:
        # The capacity factor is the mean number of experts per token (at most every expert).
        return min(config.capacity_factor_eval, num_experts)

    def forward(self, x_BND: Tensor, capacity: int | None = None) -> Routing:
        T, E = x_BND.shape[0] * x_BND.shape[1], self.num_experts
        if capacity is None:
            raise ValueError("router 'expert_choice' needs a capacity (set capacity_factor_train/eval > 0)")
        C = min(capacity, T)  # an expert cannot take more tokens than there are
        with torch.autocast(device_type=x_BND.device.type, enabled=False):
            logits_TE = self.logits(x_BND)
            probs_TE = logits_TE.softmax(dim=-1)
            gate_EC, token_EC = probs_TE.t().topk(C, dim=-1)
        expert_S = torch.arange(E, device=x_BND.device).repeat_interleave(C)
        copies = Copies(token_EC.reshape(-1), expert_S, gate_EC.reshape(-1))
        return Routing(probs_TE=probs_TE, aux={"z": router_z_loss(logits_TE)}, copies=copies)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, noise={self.noise}"
