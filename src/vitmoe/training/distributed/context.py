"""DistContext: who this process is in a (possibly) multi-process run.

Single-process defaults everywhere; the trainer only asks the context to reduce tensors and
to say whether this rank writes files and prints (`is_main`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    is_main: bool = True
    restart: int = 0
    """Elastic restarts before this attempt (TORCHELASTIC_RESTART_COUNT): > 0 continues a failed attempt's run."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (a no-op in one process)."""
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def mean_over_ranks(self, value: float) -> float:
        """The mean of a host number over ranks (the number itself in one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        return float(self.all_reduce_sum(t)) / self.world_size

    def first_over_ranks(self, step: int) -> int:
        """The smallest non-negative `step` over ranks, -1 when no rank has one (a collective)."""
        if not self.distributed:
            return step
        none = 2**62
        t = torch.tensor([step if step >= 0 else none], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t) if int(t) < none else -1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": CUDA when available (GPU `local_rank`), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            from ...models import ConfigError

            raise ConfigError("device='cuda' is not allowed: no CUDA device is available (use auto or cpu)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wrap_ddp(model: torch.nn.Module, device: torch.device, ignore: list[str] = ()) -> torch.nn.Module:
    """DistributedDataParallel around `model`, leaving the parameters named in `ignore` (sharded
    experts, reduced over their replicas by the training step) and the buffers (per-rank usage
    counters) to the caller. Every parameter gets a gradient each step (expert weights are stacked
    tensors; a random route's index_select back-propagates a zero-filled gradient to the others)."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    with warnings.catch_warnings():  # its own advice: keep False for rank-local buffers
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
