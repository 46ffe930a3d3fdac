"""Learning-rate schedule: linear warm-up, then cosine (or constant), stepped per iteration."""
from __future__ import annotations

import math


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
