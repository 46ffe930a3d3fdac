"""Batched on-device augmentation of uint8 image batches [B, C, H, W]: random crop, random-resized crop,
centre crop, horizontal flip, normalise.

Each op is a few whole-batch tensor kernels (no per-image Python loop, no PIL/torchvision). Randomness comes
from a torch.Generator that must live on the same device as the batch. The `*_at` / `*_where` variants take
the random draws explicitly so that a distributed loader can draw for the global batch and slice its share.
"""

from __future__ import annotations

import math
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


# Inception's random-resized crop (Szegedy et al. 2015, "Going deeper with convolutions", s.6), as
# torchvision's RandomResizedCrop draws it: the crop's area is a uniform fraction of the image's in
# `scale` and its aspect ratio log-uniform in `ratio`; 10 tries, then the whole image (centre crop
# clamped to `ratio`). The ImageNet recipes of ViT/DeiT train with it.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_RRC_TRIES = 10


def resized_crop_boxes(n: int, height: int, width: int, generator: torch.Generator,
                       scale: tuple[float, float] = RRC_SCALE, ratio: tuple[float, float] = RRC_RATIO) -> torch.Tensor:
    """Per-image crop boxes, int64 [n, 4] = (top, left, h, w), drawn as torchvision's
    RandomResizedCrop.get_params does for each image, all images at once (the first of 10 candidate
    (area, ratio) draws that fits, else the fallback), on the generator's device."""
    device = generator.device
    area = float(height * width)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, _RRC_TRIES, generator=generator, device=device,
                                                                     dtype=torch.float64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, _RRC_TRIES, generator=generator, device=device,
                                                     dtype=torch.float64))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # the first candidate that fits (0 when none does)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # Fallback: the largest centred crop whose aspect ratio lies in `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).long(), (height - fh) // 2)
    left = torch.where(found, (u[:, 1] * (width - w + 1)).long(), (width - fw) // 2)
    return torch.stack([top, left, h, w], 1)


def resized_crop_at(x: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 [B, C, H, W] -> uint8 [B, C, side, side]: each image's box (`resized_crop_boxes`) resized
    to side x side, bilinear (half-pixel centres, as F.interpolate with align_corners=False on the
    cropped image; not antialiased: the crop is at most H/side times larger than the output), in one
    grid_sample for the whole batch. Rounded to the nearest integer, as torchvision rounds uint8."""
    b, _, height, width = x.shape
    top, left, h, w = (boxes[:, i:i + 1].to(torch.float32) for i in range(4))
    pos = (torch.arange(side, device=x.device, dtype=torch.float32) + 0.5) / side  # output pixel centres, 0..1
    # Source points in pixels from the image's top-left corner, clamped to the box's first and last
    # pixel centres as F.interpolate clamps to the cropped image's edge, then in grid_sample's [-1, 1]
    # (align_corners=False: -1 and 1 are the image's outer edges).
    px = torch.minimum(torch.maximum(left + pos * w, left + 0.5), left + w - 0.5) * (2.0 / width) - 1.0  # [B, side]
    py = torch.minimum(torch.maximum(top + pos * h, top + 0.5), top + h - 0.5) * (2.0 / height) - 1.0
    grid = torch.stack([px[:, None, :].expand(b, side, side), py[:, :, None].expand(b, side, side)], dim=-1)
    out = F.grid_sample(x.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def center_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    """The centred side x side window of every image (top = (H - side) // 2, as torchvision and
    transformers' image processors take it)."""
    h, w = x.shape[-2:]
    top, left = (h - side) // 2, (w - side) // 2
    return x[..., top:top + side, left:left + side]


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
