"""Expert parallelism: each MoE layer's experts split over the K ranks of an expert-parallel group.

Rank layout for world size W and EP size K: EP groups are contiguous blocks of K ranks
({0..K-1}, {K..2K-1}, ...); the ranks holding the same experts ("replicas": r, r+K, r+2K, ...)
average those experts' gradients. Dense parameters are averaged over all W ranks (by DDP).

Token copies travel with `all_to_all_single`: counts first (so every rank knows how many rows
it receives from each peer), then the rows, and the results come back the same way. The
collectives carry autograd, so gradients return to the rank that owns each token.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from .dispatch import Dispatch

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")
"""The per-expert parameters of GroupedExperts: stacked [E, ...], split along dim 0 over an EP group."""


@dataclass(frozen=True)
class ExpertParallel:
    size: int
    rank: int
    """This process's position inside its EP group."""
    group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    """The ranks holding the same experts as this one."""

    def local_range(self, num_experts: int) -> tuple[int, int]:
        if num_experts % self.size:
            raise ValueError(f"{num_experts} experts cannot be split over ep_size={self.size} ranks: "
                             f"the expert count of every MoE layer must be a multiple of ep_size")
        n = num_experts // self.size
        return self.rank * n, n


def init_expert_parallel(ep_size: int, timeout: timedelta | None = None) -> ExpertParallel:
    """Create the EP and replica process groups (every rank must call this, in the same order).
    `timeout`: how long a collective of these groups waits for a silent peer; give the world's
    (`init_process_group`'s): `new_group` does not inherit it and waits 30 minutes by default, so a
    frozen peer would hang the exchange long after the rest of the job gave up."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide the world size {world}")
    ep_group = replica_group = None
    for g in range(world // ep_size):
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        pg = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            ep_group = pg
    for i in range(ep_size):
        ranks = list(range(i, world, ep_size))
        pg = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            replica_group = pg
    return ExpertParallel(ep_size, rank % ep_size, ep_group, replica_group)


def expert_parallel_apply(experts: Callable[..., Tensor], x_SD: Tensor, d: Dispatch, ep: ExpertParallel,
                          capacity: int | None) -> Tensor:
    """Send kept copies to the ranks owning their experts, run them, bring results back: [S, O]."""
    K, E = ep.size, d.kept_E.numel()
    El = E // K
    recv_counts = torch.empty_like(d.kept_E)
    dist.all_to_all_single(recv_counts, d.kept_E.contiguous(), group=ep.group)  # [K sources x El experts]
    # Variable-size exchange: the split sizes must be known on the host.
    send_splits = d.kept_E.view(K, El).sum(1).tolist()
    recv_counts_KE = recv_counts.view(K, El)
    recv_splits = recv_counts_KE.sum(1).tolist()
    n_send = sum(send_splits)

    x_recv = all_to_all_single_autograd(x_SD[:n_send].contiguous(), recv_splits, send_splits, ep.group)
    # Rows arrive grouped by source, then by expert; the grouped matmul wants them by expert.
    local_expert_R = torch.repeat_interleave(torch.arange(El, device=x_SD.device).repeat(K), recv_counts)
    order_R = torch.argsort(local_expert_R, stable=True)
    y_sorted = experts(x_recv.index_select(0, order_R), recv_counts_KE.sum(0), local_expert_R[order_R],
                       None if capacity is None else capacity * K)
    y_recv = torch.empty_like(y_sorted).index_copy(0, order_R, y_sorted)
    y_back = all_to_all_single_autograd(y_recv, send_splits, recv_splits, ep.group)
    pad = y_back.new_zeros(x_SD.shape[0] - n_send, y_back.shape[-1])  # dropped copies: zero
    return torch.cat([y_back, pad])


@torch.no_grad()
def gather_experts(t: Tensor, ep: ExpertParallel) -> Tensor:
    """This rank's [El, ...] slice -> the whole [E, ...] tensor, on every rank of the EP group."""
    out = t.new_empty((t.shape[0] * ep.size, *t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in newer torch
    gather(out, t.contiguous(), group=ep.group)
    return out
