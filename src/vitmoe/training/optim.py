"""The optimizer (AdamW/Adam with weight-decay groups) and its per-step learning-rate schedule."""
from __future__ import annotations

from typing import Any, Callable

import torch

from .config import TrainConfig
from .schedule import cyclic_lr_factor, extend_cycles


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


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_1d)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


class LRSchedule:
    """The lr multiplier per optimizer step: warm-up then cosine (or constant) over each cycle of
    `cycles` (one cycle [0, total_steps] unless a resume restarted it, see `schedule.extend_cycles`).
    `budget_fraction()` is the time budget's share used (0 without a budget): the cosine of the
    last cycle follows it when it is ahead of the steps."""

    def __init__(self, cfg: TrainConfig, total_steps: int, warmup_steps: int, budget_fraction: Callable[[], float]):
        self.total_steps = total_steps
        self.cycles = [0, total_steps]
        self.warmup_steps = warmup_steps
        self.schedule = cfg.schedule
        self.min_ratio = cfg.min_lr / cfg.lr
        self.budget_fraction = budget_fraction

    def __call__(self, step: int) -> float:
        return cyclic_lr_factor(step, self.cycles, self.warmup_steps, self.schedule, self.min_ratio,
                                min_progress=self.budget_fraction())

    def resume(self, saved_cycles: list[int], mode: str, scheduler: torch.optim.lr_scheduler.LambdaLR,
               step: int) -> bool:
        """Continue a checkpoint's cycles under this run's total steps (`extend_cycles`, `mode` is
        TrainConfig.resume_schedule). True when the plan changed: the optimizer's lr is then set to
        the new plan's at `step` (it holds the old plan's, which the next step would otherwise use)."""
        self.cycles = extend_cycles(list(saved_cycles), self.total_steps, mode)
        if self.cycles == list(saved_cycles):
            return False
        reset_lr(scheduler, step)
        return True


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function: LambdaLR would save a callable object's attributes in its state_dict.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))


def reset_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Set every group's lr to the schedule's value at `step` (after the schedule changed on resume,
    so the next step does not use the lr the old schedule left in the optimizer)."""
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
