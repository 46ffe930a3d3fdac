"""Deterministic seeds derived from (seed, epoch, ...) and generators placed on the data's device."""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed; nearby inputs (epoch 3 vs 4) give unrelated streams.

    Pure Python and platform independent, so every rank and every resumed run computes the same value.
    """
    z = 0x243F6A8885A308D3  # arbitrary non-zero start (pi digits)
    for part in parts:
        z = _splitmix64(z ^ (int(part) & _MASK64))
    return z & ((1 << 63) - 1)


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A torch.Generator on `device` (random draws must come from a generator on the tensor's device)."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
