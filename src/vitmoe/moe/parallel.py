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

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from .dispatch import Dispatch
from .experts import GroupedExperts

EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


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


def init_expert_parallel(ep_size: int) -> ExpertParallel:
    """Create the EP and replica process groups (every rank must call this, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must be >= 1 and divide the world size {world}")
    ep_group = replica_group = None
    for g in range(world // ep_size):
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            ep_group = pg
    for i in range(ep_size):
        ranks = list(range(i, world, ep_size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            replica_group = pg
    return ExpertParallel(ep_size, rank % ep_size, ep_group, replica_group)


def moe_layers(model: nn.Module, every_name: bool = False):
    """(state-dict key prefix, layer) of every MoEMlp in `model` ("" when it is one itself).

    A layer shared by several blocks (WideNet) comes once, unless `every_name`: then once per
    name, as its state-dict keys do.
    """
    from .layer import MoEMlp

    return [(f"{name}." if name else "", m) for name, m in model.named_modules(remove_duplicate=not every_name)
            if isinstance(m, MoEMlp)]


@torch.no_grad()
def shard_experts(model: nn.Module, ep: ExpertParallel) -> None:
    """Keep only this rank's experts in every MoE layer (built whole, identically, on every rank,
    so shared-init experts stay identical copies and independent ones stay distinct).

    Routed layers (MoEMlp, any router including expert choice) are supported; Soft MoE is not:
    every expert sees a slot of every image, so there is no sparse exchange to split.
    """
    from .soft import SoftMoE

    soft = [name for name, m in model.named_modules() if isinstance(m, SoftMoE)]
    if soft and ep.size > 1:
        raise ValueError(f"expert parallelism does not support Soft MoE layers ({', '.join(soft)}): "
                         "train router='soft' models data-parallel (ep_size=1)")
    for _, m in moe_layers(model):
        start, n = ep.local_range(m.num_experts)
        for p in EXPERT_PARAMS:
            old = getattr(m.experts, p)
            setattr(m.experts, p, nn.Parameter(old[start:start + n].clone(), requires_grad=old.requires_grad))
        m.experts.ep = ep
        m.ep = ep


def expert_param_names(model: nn.Module) -> list[str]:
    return [f"{name}experts.{p}" for name, _ in moe_layers(model) for p in EXPERT_PARAMS]


def expert_parallel_apply(experts: GroupedExperts, x_SD: Tensor, d: Dispatch, ep: ExpertParallel,
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


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state with every expert gathered in global order: one file for any world size."""
    state = model.state_dict()
    for name, m in moe_layers(model, every_name=True):
        ep = getattr(m, "ep", None)
        if ep is not None and ep.size > 1:
            for p in EXPERT_PARAMS:
                state[f"{name}experts.{p}"] = gather_experts(getattr(m.experts, p).detach(), ep)
    return state


def local_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Slice a whole-expert state (from full_state_dict or a checkpoint) for this rank's model."""
    state = dict(state)
    for name, m in moe_layers(model, every_name=True):
        ep = getattr(m, "ep", None)
        if ep is not None and ep.size > 1:
            start, n = ep.local_range(m.num_experts)
            for p in EXPERT_PARAMS:
                key = f"{name}experts.{p}"
                state[key] = state[key][start:start + n]
    return state


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, world_size: int) -> None:
    """Average expert gradients the way DDP averages dense ones.

    Each rank's expert gradient already sums the contributions of its EP group's tokens (the
    all-to-all carried them back); summing over the replicas covers every rank, and dividing
    by the world size matches DDP's mean over ranks.
    """
    for _, m in moe_layers(model):
        ep = getattr(m, "ep", None)
        if ep is None:
            continue
        for p in EXPERT_PARAMS:
            g = getattr(m.experts, p).grad
            if g is None:
                continue
            if world_size // ep.size > 1:
                dist.all_reduce(g, group=ep.replica_group)
            g.div_(world_size)


def _sharded_expert_params(model: nn.Module) -> dict[int, tuple[nn.Parameter, ExpertParallel]]:
    out = {}
    for _, m in moe_layers(model):
        ep = getattr(m, "ep", None)
        if ep is not None and ep.size > 1:
            for p in EXPERT_PARAMS:
                param = getattr(m.experts, p)
                out[id(param)] = (param, ep)
    return out


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """Clip by the norm of the WHOLE model's gradient, experts on other ranks included.

    Each rank would otherwise see a different norm (it holds different experts) and scale its
    dense gradients differently, and the dense replicas would drift apart.
    """
    sharded = _sharded_expert_params(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dense = [g for p, g in ((p, p.grad) for p in model.parameters()) if g is not None and id(p) not in sharded]
    expert = [p.grad for p, _ in sharded.values() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq_dense = torch.zeros((), device=device, dtype=torch.float32)
    sq_expert = torch.zeros((), device=device, dtype=torch.float32)
    if dense:
        sq_dense = torch.stack(torch._foreach_norm(dense)).float().square().sum()
    if expert:
        sq_expert = torch.stack(torch._foreach_norm(expert)).float().square().sum()
    if sharded:
        ep = next(iter(sharded.values()))[1]
        dist.all_reduce(sq_expert, group=ep.group)
    total = (sq_dense + sq_expert).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


def _optimizer_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(param) -> the integer key optimizer.state_dict() uses for it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {id(p): i for i, p in enumerate(params)}


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """optimizer.state_dict() with the per-expert state (Adam moments) gathered like the weights."""
    sd = optimizer.state_dict()
    index = _optimizer_index(optimizer)
    state = dict(sd["state"])
    for pid, (param, ep) in _sharded_expert_params(model).items():
        i = index.get(pid)
        if i is None or i not in state:
            continue
        state[i] = {k: gather_experts(v, ep) if _is_expert_shaped(v, param) else v for k, v in state[i].items()}
    return {**sd, "state": state}


def local_optimizer_state(sd: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """Slice a whole-expert optimizer state (full_optimizer_state or any world size) for this rank."""
    index = _optimizer_index(optimizer)
    state = dict(sd["state"])
    for pid, (param, ep) in _sharded_expert_params(model).items():
        i = index.get(pid)
        if i is None or i not in state:
            continue
        n = param.shape[0]
        start = ep.rank * n
        state[i] = {k: v[start:start + n] if isinstance(v, Tensor) and v.ndim and v.shape[0] == n * ep.size
                    and v.shape[1:] == param.shape[1:] else v for k, v in state[i].items()}
    return {**sd, "state": state}


def _is_expert_shaped(v, param: Tensor) -> bool:
    return isinstance(v, Tensor) and v.shape == param.shape


def seed_random_routers(model: nn.Module, seed: int, device: torch.device) -> dict[str, torch.Generator]:
    """Give every random router its own generator, seeded alike on every rank, so all ranks draw the
    same routes (one expert per layer per forward for the whole global batch, as in one process)."""
    gens = {}
    for i, (name, m) in enumerate(moe_layers(model)):
        if not m.router.has_distribution:
            g = torch.Generator(device=device)
            g.manual_seed(seed * 1000003 + i)
            m.router.generator = g
            gens[name] = g
    return gens
