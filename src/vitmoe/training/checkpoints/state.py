"""TrainState: how far a run has come, as one value.

The loop advances it; a checkpoint saves it (`as_checkpoint`), `--resume` reads it back
(`from_checkpoint`), and the summary reads it, so none of them reaches into the Trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps taken."""
    best_acc: float = -1.0
    """Best test accuracy so far (with EMA on, the better of both models'); -1 before the first epoch."""
    best_epoch: int | None = None
    best_model: str = "model"
    """Which weights reached `best_acc`: "model" or "ema"."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One metrics row per completed epoch."""
    stopped_by_budget: bool = False
    """The time budget ended the run (summary: stopped_by_budget)."""
    last_good: Path | None = None
    """The newest checkpoint written or resumed from (named when a non-finite loss stops the run)."""

    @property
    def budget_used_s(self) -> float:
        """Training seconds used, summed over epochs and resumes (what the time budget counts)."""
        return sum(r["epoch_time_s"] for r in self.history)

    def after_epoch(self, row: dict[str, Any], acc: float, which: str) -> tuple["TrainState", bool]:
        """The state once epoch `row["epoch"]` has run and scored `acc` with weights `which`, and
        whether that is a new best."""
        is_best = acc > self.best_acc
        best = dict(best_acc=acc, best_epoch=row["epoch"], best_model=which) if is_best else {}
        return replace(self, epoch=row["epoch"], history=[*self.history, row], **best), is_best

    def as_checkpoint(self) -> dict[str, Any]:
        """The entries of state.pt that are the run's progress (the optimizer and RNGs are the loop's)."""
        return {"epoch": self.epoch, "step": self.step, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "best_model": self.best_model, "history": self.history}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], last_good: Path | None = None) -> "TrainState":
        """The progress a checkpoint's state.pt recorded (`as_checkpoint`; older ones lack best_model)."""
        return cls(epoch=int(saved["epoch"]), step=int(saved["step"]), best_acc=float(saved["best_acc"]),
                   best_epoch=saved["best_epoch"], best_model=str(saved.get("best_model", "model")),
                   history=list(saved.get("history", [])), last_good=last_good)
