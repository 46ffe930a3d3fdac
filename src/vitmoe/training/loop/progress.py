"""What a run shows while it trains: a tqdm bar per epoch and optional TensorBoard scalars."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


class Progress:
    """tqdm bar per epoch, only on the main rank and only when stdout is a terminal."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def postfix(self, **kw) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def open_tensorboard(run_dir: Path, log: Callable[[str], None]):
    """A SummaryWriter under RUN/tensorboard, or None (with a note) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        log("tensorboard: not installed (pip install tensorboard); logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
