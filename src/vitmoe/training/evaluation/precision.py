"""Mixed precision: the autocast region of an `amp` mode, the one the training step and the
evaluation share (fp16's loss scaling is the step's own: loop.step)."""
from __future__ import annotations

import contextlib

import torch


def autocast_context(amp: str, device: torch.device):
    """The autocast region of an `amp` mode: "off" (fp32), "bf16" or "fp16"."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
