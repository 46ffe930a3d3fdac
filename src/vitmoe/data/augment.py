"""Batched on-device augmentation of uint8 image batches [B, C, H, W]: random crop, horizontal flip, normalise.

Each op is a few whole-batch tensor kernels (no per-image Python loop, no PIL/torchvision). Randomness comes
from a torch.Generator that must live on the same device as the batch. The `*_at` / `*_where` variants take
the random draws explicitly so that a distributed loader can draw for the global batch and slice its share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def crop_offsets(n: int, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image (dy, dx) offsets, int64 [n, 2], uniform in [0, 2 * padding], on the generator's device."""
    return torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=generator.device)


def crop_at(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Crop each image of the zero-padded batch at its own offset; output keeps the input's H x W.

    Offset (dy, dx) selects padded[dy:dy+H, dx:dx+W], i.e. a shift by (padding - dy, padding - dx).
    `unfold` exposes all (2p+1)^2 windows as a strided view (no copy); one gather then picks each image's
    window. This measured ~5x faster on CPU than indexing with full row/column grids.
    """
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # constant 0
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # [B, C, 2p+1, 2p+1, H, W] view
    # Advanced indices on dims 0, 2, 3 are split by a slice, so the batch dim leads: result [B, C, H, W].
    return windows[torch.arange(b, device=x.device), :, offsets[:, 0], offsets[:, 1]]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and take a random H x W window per image (independent offsets)."""
    if padding == 0:
        return x
    return crop_at(x, padding, crop_offsets(x.shape[0], padding, generator))


def flip_mask(n: int, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Bool [n]: which images to mirror, each with probability p."""
    return torch.rand(n, generator=generator, device=generator.device) < p


def hflip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images selected by `mask`, leave the others untouched."""
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image independently with probability p."""
    return hflip_where(x, flip_mask(x.shape[0], generator, p))


def _per_channel(values: Sequence[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=device).reshape(-1, 1, 1)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 (x / 255 - mean) / std, with per-channel mean/std on the 0..1 scale.

    Folded into one multiply-add: x * (1 / (255 std)) - mean / std.
    """
    mean_t = _per_channel(mean, x.device)
    std_t = _per_channel(std, x.device)
    scale = 1.0 / (255.0 * std_t)
    shift = mean_t / std_t
    return torch.addcmul(-shift, x.to(torch.float32), scale)
