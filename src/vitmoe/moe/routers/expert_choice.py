"""Expert-choice routing (Zhou et al. 2022, REFERENCE.md s.3): every expert takes its top-C tokens.

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

import torch
from torch import Tensor, nn

from .base import Copies, Router, Routing, register_router
from .topk import router_logits, router_z_loss


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    chooses_tokens = True

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, noise: str = "none", jitter_eps: float = 0.01,
                 z_loss_weight: float = 1e-3, **_unused):
        super().__init__()
        if top_k != 1:
            raise ValueError(f"router 'expert_choice' takes top_k=1 (its capacity factor sets experts per token), got {top_k}")
        self.num_experts, self.top_k, self.noise, self.jitter_eps = num_experts, 1, noise, jitter_eps
        self.aux_weights = {"z": z_loss_weight}
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x_BND: Tensor, capacity: int | None = None) -> Routing:
        T, E = x_BND.shape[0] * x_BND.shape[1], self.num_experts
        if capacity is None:
            raise ValueError("router 'expert_choice' needs a capacity (set capacity_factor_train/eval > 0)")
        C = min(capacity, T)  # an expert cannot take more tokens than there are
        with torch.autocast(device_type=x_BND.device.type, enabled=False):
            logits_TE = router_logits(x_BND, self.weight, self.noise, self.jitter_eps, self.training)
            probs_TE = logits_TE.softmax(dim=-1)
            gate_EC, token_EC = probs_TE.t().topk(C, dim=-1)
        expert_S = torch.arange(E, device=x_BND.device).repeat_interleave(C)
        copies = Copies(token_EC.reshape(-1), expert_S, gate_EC.reshape(-1))
        return Routing(None, None, probs_TE, aux={"z": router_z_loss(logits_TE)}, copies=copies)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, noise={self.noise}"
