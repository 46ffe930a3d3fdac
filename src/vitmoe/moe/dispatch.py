"""Token dispatch: order token copies by expert, apply capacity, and combine results back.

Everything here has static shapes given (S, E, C), so nothing waits on the device: no
`.item()`, no data-dependent sizes. Legend in vitmoe.moe.routers.base.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .routers.base import Copies, Routing


def expert_capacity(tokens: int, top_k: int, num_experts: int, factor: float | None, minimum: int = 0) -> int | None:
    """C = ceil(factor * tokens * k / E), at least `minimum`, at most `tokens`; None means dropless.

    An expert never receives more than `tokens` copies (a token sends each of its k copies to a
    different expert), so any larger C drops nothing and only sizes buffers: capping it makes every
    finite factor work (1e18 overflowed after a whole epoch) with the same result."""
    if not factor:
        return None
    share = factor * top_k / num_experts
    if share >= 1:  # also where factor * tokens would overflow a float
        return tokens
    return min(max(math.ceil(share * tokens), minimum), tokens)


class Dispatch(NamedTuple):
    token_S: Tensor
    """Source token of each copy, in expert-sorted order (kept copies first, then the rest)."""
    gate_S: Tensor
    """Gate of each sorted copy; 0 for dropped or unsent copies, so they contribute nothing."""
    expert_S: Tensor
    """Expert of each sorted copy (a valid id for every copy, kept or not)."""
    kept_E: Tensor
    """Copies each expert processes (after capacity), int64 [E]."""
    load_E: Tensor
    """Copies routed to each expert (before capacity), float32 [E]."""
    dropped: Tensor
    """Number of copies dropped for capacity (0-d); unsent copies (`keep_TK`) are not counted."""


def topk_copies(gates_TK: Tensor, experts_TK: Tensor, keep_TK: Tensor | None = None) -> tuple[Copies, Tensor | None]:
    """The [T, K] layout as a flat list, copy s = k*T + t: all first choices queue before any
    second choice (GShard), so capacity drops fall on lower-priority copies first."""
    T, K = experts_TK.shape
    token_S = torch.arange(T, device=experts_TK.device).repeat(K)
    copies = Copies(token_S, experts_TK.t().reshape(T * K), gates_TK.t().reshape(T * K))
    return copies, None if keep_TK is None else keep_TK.t().reshape(T * K)


def dispatch(gates_TK: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None,
             keep_TK: Tensor | None = None, priority_T: Tensor | None = None) -> Dispatch:
    """`priority_T`: queue each choice level's copies by descending priority (Batch Prioritized
    Routing) instead of by token position; ties keep position order."""
    copies, keep_S = topk_copies(gates_TK, experts_TK, keep_TK)
    if priority_T is not None and capacity is not None:  # dropless keeps every copy anyway
        T, K = experts_TK.shape
        order_T = torch.argsort(priority_T, descending=True, stable=True)
        order_S = (order_T + T * torch.arange(K, device=order_T.device).unsqueeze(1)).reshape(-1)
        copies = Copies(*(c.index_select(0, order_S) for c in copies))
        keep_S = None if keep_S is None else keep_S.index_select(0, order_S)
    return dispatch_copies(copies, num_experts, capacity, keep_S)


def dispatch_routing(routing: Routing, num_experts: int, capacity: int | None) -> Dispatch:
    """Either routing layout: the router's flat copies, or its [T, K] choices. `capacity` counts
    the router's rows (images for per-image routing); the result lists tokens."""
    if routing.copies is not None:
        return dispatch_copies(routing.copies, num_experts, capacity)
    d = dispatch(routing.gates_TK, routing.experts_TK, num_experts, capacity, routing.keep_TK, routing.priority_T)
    return expand_rows(d, routing.tokens_per_row)


def expand_rows(d: Dispatch, n: int) -> Dispatch:
    """The dispatch of rows that each stand for `n` consecutive tokens (per-image routing) as the
    dispatch of those tokens: row r becomes tokens r*n .. r*n+n-1, in place, so kept rows stay first
    and grouped by expert. Sorting B*k rows instead of B*N*k copies is what makes it cheap."""
    if n == 1:
        return d
    token_S = (d.token_S.unsqueeze(1) * n + torch.arange(n, device=d.token_S.device)).reshape(-1)
    return Dispatch(token_S, d.gate_S.repeat_interleave(n), d.expert_S.repeat_interleave(n), d.kept_E * n,
                    d.load_E * n, d.dropped * n)


def dispatch_copies(copies: Copies, num_experts: int, capacity: int | None, keep_S: Tensor | None = None) -> Dispatch:
    """Sort copies by expert (stable: earlier copies have priority), keep at most `capacity`
    per expert. Rows of the result: kept copies grouped by expert, then every other copy."""
    token_S, expert_S, gate_S = copies
    S, E, device = expert_S.numel(), num_experts, expert_S.device
    # Unsent copies sort into a spare bin E behind every expert: X = E + 1 bins.
    key_S = expert_S if keep_S is None else torch.where(keep_S, expert_S, torch.full_like(expert_S, E))
    order_S = torch.argsort(key_S, stable=True)
    key_sorted = key_S[order_S]
    count_X = torch.zeros(E + 1, dtype=torch.int64, device=device).scatter_add_(0, key_S, torch.ones_like(key_S))
    start_X = torch.cumsum(count_X, 0) - count_X
    pos_S = torch.arange(S, device=device) - start_X[key_sorted]
    load_E = count_X[:E]

    # Kept copies keep the expert order; the others move behind all kept ones, so every
    # expert's rows stay contiguous for the grouped matmul. Dropless: every sent copy fits.
    cap = S if capacity is None else capacity
    keep_sorted = (pos_S < cap) & (key_sorted < E)
    kept_E = load_E.clamp(max=cap)
    n_kept = kept_E.sum()
    kept_start_X = torch.cumsum(count_X.clamp(max=cap), 0) - count_X.clamp(max=cap)
    rest_rank_S = torch.cumsum((~keep_sorted).long(), 0) - 1
    dest_S = torch.where(keep_sorted, kept_start_X[key_sorted] + pos_S, n_kept + rest_rank_S)
    perm_S = torch.empty_like(order_S).scatter_(0, dest_S, order_S)

    gate_P = gate_S[perm_S]
    gate_P = torch.where(torch.arange(S, device=device) < n_kept, gate_P, torch.zeros_like(gate_P))
    dropped = load_E.sum() - n_kept
    return Dispatch(token_S[perm_S], gate_P, expert_S[perm_S], kept_E, load_E.float(), dropped)


def combine(y_SD: Tensor, d: Dispatch, tokens: int) -> Tensor:
    """Sum each token's copies weighted by their gates: [S, D] -> [T, D]."""
    weighted_SD = y_SD * d.gate_S.to(y_SD.dtype).unsqueeze(-1)
    out_TD = torch.zeros(tokens, y_SD.shape[-1], dtype=y_SD.dtype, device=y_SD.device)
    return out_TD.index_add_(0, d.token_S, weighted_SD)
