"""A set of E two-layer MLP experts stored stacked, computed with one grouped matmul per layer.

Weights are `[E, D, H]` / `[E, H, D]` (input-major, so `x @ w` needs no transpose) with
biases `[E, H]` / `[E, D]`. Legend in vitmoe.moe.routers.base.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import Dispatch

EXPERT_INITS = ("shared", "independent")
DISPATCH_PATHS = ("auto", "grouped", "padded")


def grouped_mm_supported(x: Tensor) -> bool:
    """Whether `torch._grouped_mm` runs this dtype on this device.

    On CUDA it needs bf16 and a Hopper-class GPU; the CPU build runs fp32/bf16/fp16 (not fp64:
    the padded path serves float64, which the reference tests use).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        init: str = "shared",
        dispatch_path: str = "auto",
    ):
        super().__init__()
        if init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {init!r}")
        if dispatch_path not in DISPATCH_PATHS:
            raise ValueError(f"dispatch must be one of {DISPATCH_PATHS}, got {dispatch_path!r}")
        E, D, H, O = num_experts, in_features, hidden_features, out_features or in_features
        self.num_experts, self.init, self.dispatch_path = E, init, dispatch_path
        self.w1 = nn.Parameter(torch.empty(E, D, H))
        self.b1 = nn.Parameter(torch.empty(E, H))
        self.w2 = nn.Parameter(torch.empty(E, H, O))
        self.b2 = nn.Parameter(torch.empty(E, O))
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self._merged_cache: tuple[tuple, tuple[Tensor, ...]] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # ViT's Linear init (truncated normal 0.02, zero bias). "shared" draws one expert and
        # copies it, so averaging the experts later starts from a meaningful point (AdaMix).
        for w in (self.w1, self.w2):
            if self.init == "shared":
                w.copy_(nn.init.trunc_normal_(torch.empty_like(w[0]), std=0.02).expand_as(w))
            else:
                nn.init.trunc_normal_(w, std=0.02)
        self.b1.zero_()
        self.b2.zero_()

    # --- routed computation -------------------------------------------------------------
    def forward(self, x_TD: Tensor, d: Dispatch, capacity: int | None) -> Tensor:
        """Run every kept copy through its expert; returns [S, O] in dispatch order."""
        x_SD = x_TD[d.token_S]
        use_grouped = self.dispatch_path == "grouped" or (
            self.dispatch_path == "auto" and grouped_mm_supported(x_SD)
        )
        if use_grouped:
            return self._grouped(x_SD, d)
        return self._padded(x_SD, d, capacity)

    def _grouped(self, x_SD: Tensor, d: Dispatch) -> Tensor:
        # Dropped copies sit after every kept one; folding them into the last group keeps the
        # offsets static (they are computed, then zeroed by their gate).
        offs_E = torch.cumsum(d.kept_E, 0)
        offs_E[-1] = x_SD.shape[0]
        offs_E = offs_E.to(torch.int32)
        w1, w2 = self.w1.to(x_SD.dtype), self.w2.to(x_SD.dtype)
        h_SH = torch._grouped_mm(x_SD, w1, offs=offs_E) + self.b1.to(x_SD.dtype)[d.expert_S]
        h_SH = self.drop(self.act(h_SH))
        return torch._grouped_mm(h_SH, w2, offs=offs_E) + self.b2.to(x_SD.dtype)[d.expert_S]

    def _padded(self, x_SD: Tensor, d: Dispatch, capacity: int | None) -> Tensor:
        E = self.num_experts
        # Dropless needs the largest queue as the padded length: a host sync, the price of
        # this fallback path (the grouped path has none).
        C = capacity if capacity is not None else max(int(d.kept_E.max()), 1)
        # Slot e*C + pos for kept copies; dropped copies land in one spare row, discarded.
        slot_S = torch.where(d.slot_S < C, d.expert_S * C + d.slot_S, torch.full_like(d.slot_S, E * C))
        buf = x_SD.new_zeros(E * C + 1, x_SD.shape[-1]).index_copy_(0, slot_S, x_SD)
        x_ECD = buf[: E * C].view(E, C, -1)
        w1, w2 = self.w1.to(x_SD.dtype), self.w2.to(x_SD.dtype)
        h_ECH = torch.baddbmm(self.b1.to(x_SD.dtype).unsqueeze(1), x_ECD, w1)
        h_ECH = self.drop(self.act(h_ECH))
        y_ECO = torch.baddbmm(self.b2.to(x_SD.dtype).unsqueeze(1), h_ECH, w2)
        y_rows = torch.cat([y_ECO.reshape(E * C, -1), y_ECO.new_zeros(1, y_ECO.shape[-1])])
        return y_rows[slot_S]

    def forward_single(self, x_TD: Tensor, expert: Tensor) -> Tensor:
        """Every token through one expert chosen on the device (0-d index): dense cost."""
        w1 = self.w1.index_select(0, expert.view(1))[0]
        w2 = self.w2.index_select(0, expert.view(1))[0]
        b1 = self.b1.index_select(0, expert.view(1))[0]
        b2 = self.b2.index_select(0, expert.view(1))[0]
        return self._dense(x_TD, w1, b1, w2, b2)

    def forward_all(self, x_TD: Tensor) -> Tensor:
        """Every token through every expert: [E, T, O] (ensemble evaluation)."""
        h_ETH = torch.baddbmm(self.b1.unsqueeze(1).to(x_TD.dtype), x_TD.expand(self.num_experts, -1, -1), self.w1.to(x_TD.dtype))
        h_ETH = self.drop(self.act(h_ETH))
        return torch.baddbmm(self.b2.unsqueeze(1).to(x_TD.dtype), h_ETH, self.w2.to(x_TD.dtype))

    def _dense(self, x_TD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        # F.linear wants [out, in]; a transposed view costs nothing.
        h = self.drop(self.act(F.linear(x_TD, w1.t(), b1)))
        return F.linear(h, w2.t(), b2)

    # --- merging ------------------------------------------------------------------------
    def merged_weights(self, weights_E: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(w1 [D, H], b1 [H], w2 [H, O], b2 [O]): the weighted average of the experts.

        Uniform weights by default. Linear layers average exactly only when the same
        average is applied to both layers of every expert (that is what "merging" means:
        AdaMix's weight averaging), not to their outputs.
        """
        params = (self.w1, self.b1, self.w2, self.b2)
        if weights_E is None:
            return tuple(p.mean(0) for p in params)  # type: ignore[return-value]
        w = (weights_E / weights_E.sum()).to(self.w1.dtype)
        return tuple(torch.tensordot(w, p, dims=1) for p in params)  # type: ignore[return-value]

    def forward_merged(self, x_TD: Tensor) -> Tensor:
        """Inference through the uniformly merged expert, cached until the weights change."""
        params = (self.w1, self.b1, self.w2, self.b2)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            merged = self.merged_weights()
        else:
            # Optimizer steps and load_state_dict bump the version counter in place.
            key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
            if self._merged_cache is None or self._merged_cache[0] != key:
                with torch.no_grad():
                    self._merged_cache = (key, self.merged_weights())
            merged = self._merged_cache[1]
        return self._dense(x_TD, *(m.to(x_TD.dtype) for m in merged))

    def extra_repr(self) -> str:
        E, D, H = self.w1.shape
        return f"experts={E}, in={D}, hidden={H}, out={self.w2.shape[-1]}, init={self.init}"
