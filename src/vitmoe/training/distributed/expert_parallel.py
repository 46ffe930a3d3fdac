"""Expert parallelism as the trainer sees it: shard a model's experts over an EP group, reduce and
clip their gradients, and move whole-expert state in and out of checkpoints.

Layout (vitmoe.moe.parallel): EP groups are contiguous blocks of ep_size ranks; the ranks holding
the same experts ("replicas") average those experts' gradients; dense parameters are averaged over
all ranks by DDP. Checkpoints hold every expert in global order, so any world size can resume.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...moe import MoEMlp, SoftMoE, find_moe_layers
from ...moe.parallel import EXPERT_PARAMS, ExpertParallel, gather_experts


def _sharded_layers(model: nn.Module, every_name: bool = False):
    """(state-dict prefix, layer) of every MoE layer whose experts are split over ranks."""
    return [(f"{name}." if name else "", m) for name, m in find_moe_layers(model, every_name) if m.experts.sharded]


@torch.no_grad()
def shard_experts(model: nn.Module, ep: ExpertParallel) -> None:
    """Keep only this rank's experts in every MoE layer (built whole, identically, on every rank,
    so shared-init experts stay identical copies and independent ones stay distinct).

    Routed layers (MoEMlp, any router including expert choice) are supported; Soft MoE is not:
    every expert sees a slot of every image, so there is no sparse exchange to split.
    """
    soft = [name for name, m in find_moe_layers(model) if isinstance(m, SoftMoE)]
    if soft and ep.size > 1:
        raise ValueError(f"expert parallelism does not support Soft MoE layers ({', '.join(soft)}): "
                         "train router='soft' models data-parallel (ep_size=1)")
    for _, m in find_moe_layers(model):
        if not isinstance(m, MoEMlp):
            continue
        start, n = ep.local_range(m.num_experts)
        for p in EXPERT_PARAMS:
            old = getattr(m.experts, p)
            setattr(m.experts, p, nn.Parameter(old[start:start + n].clone(), requires_grad=old.requires_grad))
        m.experts.ep = ep


def expert_param_names(model: nn.Module) -> list[str]:
    """State-dict names of the sharded expert parameters (DDP must not average them)."""
    return [f"{prefix}experts.{p}" for prefix, _ in _sharded_layers(model) for p in EXPERT_PARAMS]


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state with every expert gathered in global order: one file for any world size."""
    state = model.state_dict()
    for prefix, m in _sharded_layers(model, every_name=True):
        for p in EXPERT_PARAMS:
            state[f"{prefix}experts.{p}"] = gather_experts(getattr(m.experts, p).detach(), m.experts.ep)
    return state


def local_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Slice a whole-expert state (from full_state_dict or a checkpoint) for this rank's model."""
    state = dict(state)
    for prefix, m in _sharded_layers(model, every_name=True):
        start, n = m.experts.ep.local_range(m.num_experts)
        for p in EXPERT_PARAMS:
            key = f"{prefix}experts.{p}"
            state[key] = state[key][start:start + n]
    return state


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, world_size: int) -> None:
    """Average expert gradients the way DDP averages dense ones.

    Each rank's expert gradient already sums the contributions of its EP group's tokens (the
    all-to-all carried them back); summing over the replicas covers every rank, and dividing
    by the world size matches DDP's mean over ranks.
    """
    for _, m in _sharded_layers(model):
        ep = m.experts.ep
        for p in EXPERT_PARAMS:
            g = getattr(m.experts, p).grad
            if g is None:
                continue
            if world_size // ep.size > 1:
                dist.all_reduce(g, group=ep.replica_group)
            g.div_(world_size)


def _sharded_expert_params(model: nn.Module) -> dict[int, tuple[nn.Parameter, ExpertParallel]]:
    out = {}
    for _, m in _sharded_layers(model):
        for p in EXPERT_PARAMS:
            param = getattr(m.experts, p)
            out[id(param)] = (param, m.experts.ep)
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
    def gather(v, param: Tensor, ep: ExpertParallel):
        return gather_experts(v, ep) if _is_expert_shaped(v, param) else v

    return _map_expert_state(optimizer.state_dict(), optimizer, model, gather)


def local_optimizer_state(sd: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """Slice a whole-expert optimizer state (full_optimizer_state or any world size) for this rank."""
    def slice_(v, param: Tensor, ep: ExpertParallel):
        n = param.shape[0]
        whole = isinstance(v, Tensor) and v.ndim and v.shape[0] == n * ep.size and v.shape[1:] == param.shape[1:]
        return v[ep.rank * n:(ep.rank + 1) * n] if whole else v

    return _map_expert_state(sd, optimizer, model, slice_)


def _map_expert_state(sd: dict, optimizer: torch.optim.Optimizer, model: nn.Module, convert) -> dict:
    """`sd` with `convert(value, param, ep)` applied to every state entry of a sharded expert parameter."""
    index = _optimizer_index(optimizer)
    state = dict(sd["state"])
    for pid, (param, ep) in _sharded_expert_params(model).items():
        i = index.get(pid)
        if i is not None and i in state:
            state[i] = {k: convert(v, param, ep) for k, v in state[i].items()}
    return {**sd, "state": state}


def _is_expert_shaped(v, param: Tensor) -> bool:
    return isinstance(v, Tensor) and v.shape == param.shape
