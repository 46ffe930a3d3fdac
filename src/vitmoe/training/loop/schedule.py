"""Learning-rate schedule: linear warm-up, then cosine (or constant), stepped per iteration; its
cycles after a resume that changed the epochs; `LRSchedule`, the run's multiplier per step."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..config.train_config import RESUME_SCHEDULES, TrainConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine", min_ratio: float = 0.0,
              min_progress: float = 0.0) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based).

    Warm-up ramps linearly from 1/(warmup+1) to 1; cosine then decays to `min_ratio` at
    `total_steps`. `min_progress` (in [0, 1]) is a floor on the cosine's progress: a run with a
    time budget passes the fraction of the budget used, so the decay ends with the budget when
    that comes before `total_steps`. Warm-up stays counted in steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max((step - warmup_steps) / span, min_progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))




def extend_cycles(cycles: list[int], total_steps: int, mode: str) -> list[int]:
    """The LR cycles after a resume that plans `total_steps` steps in all.

    `cycles` are step boundaries [0, end_1, ..., end_n]: cycle i runs from cycles[i] to
    cycles[i+1] with its own warm-up and cosine; a new run has one cycle, [0, total_steps].
    "stretch" moves the end of the last cycle to `total_steps` (one cosine over the new total:
    extending a finished run raises the lr again, to where the longer cosine would be).
    "restart" keeps the planned cycles and, when `total_steps` goes past the last one, adds a
    new cycle over the added steps (a fresh warm-up and cosine, SGDR-style). Shortening a plan
    moves its end back in both modes.
    """
    if mode not in RESUME_SCHEDULES:
        raise ValueError(f"resume schedule must be one of {RESUME_SCHEDULES}, got {mode!r}")
    if mode == "restart" and total_steps > cycles[-1]:
        return [*cycles, total_steps]
    return [*(b for b in cycles[:-1] if b < total_steps), total_steps]


def cyclic_lr_factor(step: int, cycles: list[int], warmup_steps: int, schedule: str = "cosine",
                     min_ratio: float = 0.0, min_progress: float = 0.0) -> float:
    """`lr_factor` within the cycle of `cycles` (see `extend_cycles`) that holds `step`; the
    time-budget floor `min_progress` applies to the last cycle. One cycle [0, total] is exactly
    `lr_factor(step, total, ...)`."""
    i = len(cycles) - 2
    while i > 0 and step < cycles[i]:
        i -= 1
    start, end = cycles[i], cycles[i + 1]
    last = i == len(cycles) - 2
    return lr_factor(step - start, end - start, warmup_steps, schedule, min_ratio,
                     min_progress=min_progress if last else 0.0)


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
