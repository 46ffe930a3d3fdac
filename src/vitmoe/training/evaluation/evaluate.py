"""Evaluation: test loss and accuracy over a loader, summed on the device and reduced over ranks."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..distributed.context import DistContext, synchronize
from .precision import autocast_context


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off",
             dist: DistContext | None = None) -> dict[str, float]:
    """Test loss and accuracy (percent) over the loader, plus timing (seconds, images/s)."""
    dist = dist or DistContext(device=device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    synchronize(device)
    t0 = time.perf_counter()
    for x, y in loader:
        with autocast_context(amp, device):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum()
        count += y.numel()
    synchronize(device)
    seconds = time.perf_counter() - t0
    packed = torch.stack([loss_sum, correct.double(), count.double()])
    dist.all_reduce_sum(packed)
    loss_sum, correct_n, n = packed.tolist()
    model.train(was_training)
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "acc": 100.0 * correct_n / n, "n": int(n), "seconds": seconds,
            "images_per_s": n / seconds if seconds > 0 else float("nan")}
