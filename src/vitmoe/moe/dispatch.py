"""Token dispatch: order token copies by expert, apply capacity, and combine results back.

Everything here has static shapes given (T, K, E, C), so nothing waits on the device: no
`.item()`, no data-dependent sizes. Legend in vitmoe.moe.routers.base.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def expert_capacity(tokens: int, top_k: int, num_experts: int, factor: float | None, minimum: int = 0) -> int | None:
    """C = ceil(factor * tokens * k / E), at least `minimum`; None means dropless."""
    if not factor:
        return None
    return max(math.ceil(factor * tokens * top_k / num_experts), minimum)


class Dispatch(NamedTuple):
    token_S: Tensor
    """Source token of each copy, in expert-sorted order (kept copies first, then dropped)."""
    gate_S: Tensor
    """Gate of each sorted copy; 0 for dropped copies, so they contribute nothing."""
    expert_S: Tensor
    """Expert of each sorted copy."""
    kept_E: Tensor
    """Copies each expert processes (after capacity), int64 [E]."""
    load_E: Tensor
    """Copies routed to each expert (before capacity), float32 [E]."""
    dropped: Tensor
    """Number of dropped copies (0-d)."""


def dispatch(gates_TK: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None) -> Dispatch:
    T, K = experts_TK.shape
    S, E, device = T * K, num_experts, experts_TK.device
    # Copy s = k*T + t: all first choices queue before any second choice (GShard), so
    # capacity drops fall on lower-priority copies first.
    expert_S = experts_TK.t().reshape(S)
    gate_S = gates_TK.t().reshape(S)
    token_S = torch.arange(T, device=device).repeat(K)

    order_S = torch.argsort(expert_S, stable=True)
    expert_sorted = expert_S[order_S]
    load_E = torch.zeros(E, dtype=torch.int64, device=device).scatter_add_(0, expert_S, torch.ones_like(expert_S))
    start_E = torch.cumsum(load_E, 0) - load_E
    pos_S = torch.arange(S, device=device) - start_E[expert_sorted]

    if capacity is None:
        kept_E = load_E
        perm_S = order_S
        dropped = torch.zeros((), dtype=torch.int64, device=device)
    else:
        # Kept copies keep the expert order; dropped ones move behind all kept ones, so
        # every expert's rows stay contiguous for the grouped matmul.
        keep_S = pos_S < capacity
        kept_E = load_E.clamp(max=capacity)
        kept_start_E = torch.cumsum(kept_E, 0) - kept_E
        n_kept = kept_E.sum()
        drop_rank_S = torch.cumsum((~keep_S).long(), 0) - 1
        dest_S = torch.where(keep_S, kept_start_E[expert_sorted] + pos_S, n_kept + drop_rank_S)
        perm_S = torch.empty_like(order_S).scatter_(0, dest_S, order_S)
        dropped = S - n_kept

    gate_P = gate_S[perm_S]
    if capacity is not None:
        gate_P = torch.where(torch.arange(S, device=device) < n_kept, gate_P, torch.zeros_like(gate_P))
    return Dispatch(token_S[perm_S], gate_P, expert_S[perm_S], kept_E, load_E.float(), dropped)


def combine(y_SD: Tensor, d: Dispatch, tokens: int) -> Tensor:
    """Sum each token's copies weighted by their gates: [S, D] -> [T, D]."""
    weighted_SD = y_SD * d.gate_S.to(y_SD.dtype).unsqueeze(-1)
    out_TD = torch.zeros(tokens, y_SD.shape[-1], dtype=y_SD.dtype, device=y_SD.device)
    return out_TD.index_add_(0, d.token_S, weighted_SD)
