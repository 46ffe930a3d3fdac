"""The optimizer: AdamW or Adam, with weight decay on matrices only (the lr schedule is `schedule`).

`adam_kwargs(params)` picks torch's fastest correct Adam/AdamW implementation for the params, and
`fastest_adam` builds the optimizer with it (also for users' own loops): the fused kernel (one pass
over weight, gradient and both moments) wherever torch has one, else the multi-tensor (foreach)
path. torch's default on CPU is the per-tensor for-loop, several passes per tensor: 36 ms against
5 ms a step for 16 experts' weights on a 2-core CPU (benchmarks/bench_optimizer.py). All three
compute the same update; they differ by float rounding only (tests/test_optimizer.py).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

from ..config.train_config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_1d: bool) -> list[dict[str, Any]]:
    """Weight decay on matrices (and stacked expert weights) only: not on biases, norms, pos/cls tokens."""
    if not no_decay_1d or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = (p.ndim <= 1 or name in ("pos_embed", "cls_token") or leaf.startswith("b")
                and name.split(".")[-2] == "experts")  # expert biases b1/b2 are [E, H]
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# torch.optim.optimizer._foreach_supported_types: a tensor subclass (DTensor, ...) takes the for-loop.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def adam_kwargs(params: torch.nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> dict[str, bool]:
    """The keyword arguments that select the fastest correct implementation of torch.optim.Adam /
    AdamW for `params` (a module, a list of tensors or a list of param groups):
    `torch.optim.AdamW(params, lr=..., **adam_kwargs(params))`.

    {"fused": True} when every param is a plain floating-point tensor on a device with fused
    optimizer kernels: torch's own rule (torch.optim.optimizer._default_to_fused_or_foreach with
    torch.utils._foreach_utils._get_fused_kernels_supported_devices: cpu, cuda, mps, xpu, ... ;
    float64, float32, bf16 and fp16 alike). Else {"foreach": True} where the multi-tensor ops run
    (torch's foreach devices, plus the CPU: its foreach fallback still beats the for-loop, which is
    torch's CPU default), else {"foreach": False}, the per-tensor for-loop.
    """
    if isinstance(params, torch.nn.Module):
        params = list(params.parameters())
    elif not isinstance(params, (list, tuple)):
        raise TypeError(f"adam_kwargs needs a module or a list of parameters or param groups, not a "
                        f"{type(params).__name__} (an iterator would be used up): pass list(...) of it")
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    plain = all(type(p) in _PLAIN_TYPES for p in tensors)
    if plain and all(p.device.type in _get_fused_kernels_supported_devices() and torch.is_floating_point(p)
                     for p in tensors):
        return {"fused": True}
    foreach_devices = {"cpu", *_get_foreach_kernels_supported_devices()}
    return {"foreach": plain and all(p.device.type in foreach_devices for p in tensors)}


def fastest_adam(params: torch.nn.Module | list, cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                 **kwargs: Any) -> torch.optim.Optimizer:
    """`cls(params, **kwargs)` (torch.optim.AdamW or Adam) in the implementation `adam_kwargs`
    picks, made safe to use fused: `keep_implementation_on_load`, and after every fused step the
    params' version counters are bumped. The fused kernels write the weights without bumping them
    (foreach and the for-loop do), so anything that notices in-place changes by `_version` would
    miss the step: autograd's saved-tensor check, and vitmoe's merged-expert cache
    (GroupedExperts.forward_merged), which would evaluate the weights of before the step."""
    if isinstance(params, torch.nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    optimizer = cls(params, **kwargs, **adam_kwargs(params))
    if any(g.get("fused") for g in optimizer.param_groups):
        optimizer.register_step_post_hook(_bump_versions)
    return keep_implementation_on_load(optimizer)


def _bump_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    torch.autograd.graph.increment_version([p for g in optimizer.param_groups if g.get("fused") for p in g["params"]])


def keep_implementation_on_load(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer.load_state_dict` keep this optimizer's implementation (fused / foreach).

    torch's load_state_dict takes every group setting from the saved state, the implementation
    flags included: a checkpoint written by a foreach optimizer would silently turn a fused one
    back into foreach (and a fused checkpoint would turn fused on where it may not run). The
    implementation belongs to the process, the moments and step counts to the checkpoint; each
    step count is put where a fresh state of this implementation keeps it (fused: float32 on the
    param's device; otherwise on the CPU, as torch puts it)."""
    chosen = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]

    def restore_impl(opt: torch.optim.Optimizer) -> None:
        for group, impl in zip(opt.param_groups, chosen):
            group.update(impl)
            on_device = bool(group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor):
                    where = p.device if on_device else torch.device("cpu")
                    dtype = torch.float32 if on_device else step.dtype
                    opt.state[p]["step"] = step.to(device=where, dtype=dtype)

    optimizer.register_load_state_dict_post_hook(restore_impl)
    return optimizer


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_1d)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return fastest_adam(groups, cls, lr=cfg.lr, betas=tuple(cfg.betas))
