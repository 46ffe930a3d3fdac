"""The training-time budget (`TrainConfig.time_budget_s`): seconds of training used, summed over
epochs and resumes, checked after every step on the host clock (no device sync)."""
from __future__ import annotations

from ..distributed.context import DistContext


class TimeBudget:
    def __init__(self, limit_s: float | None, dist: DistContext, log_every: int):
        self.limit_s, self.dist, self.log_every = limit_s, dist, log_every
        self.used_s = 0.0
        self._before = 0.0

    def fraction(self) -> float:
        """Share of the budget used, in [0, 1] (0 without a budget); the cosine follows it."""
        return min(1.0, self.used_s / self.limit_s) if self.limit_s else 0.0

    def exhausted(self) -> bool:
        return self.limit_s is not None and self.used_s >= self.limit_s

    def begin_epoch(self) -> None:
        self._before = self.used_s

    def over_after_step(self, elapsed: float, step: int) -> bool:
        """After a step, `elapsed` seconds into the epoch: is the budget used up? The host may be a
        few queued steps ahead of a GPU. Several ranks must stop at the same step, so they compare
        their mean clock, at log points only (every `log_every` steps; 0: at epoch ends)."""
        if self.limit_s is None:
            return False
        if self.dist.distributed:
            if not (self.log_every and step % self.log_every == 0):
                return False
            elapsed = self.dist.mean_over_ranks(elapsed)
        self.used_s = self._before + elapsed
        return self.used_s >= self.limit_s

    def end_epoch(self, train_time_s: float) -> bool:
        """Count the epoch's training time (the ranks' mean); True when that used the budget up."""
        self.used_s = self._before + self.dist.mean_over_ranks(train_time_s)
        return self.exhausted()
