"""Batched image ops on uint8 [B, C, H, W] with one parameter per image, for AutoAugment / RandAugment.

Every op takes the images of the batch that use it plus a per-image parameter tensor [B] and returns uint8
[B, C, H, W]. Semantics follow torchvision's tensor kernels for uint8 (`torchvision.transforms.functional`),
including where they round or truncate, so the policies behave like the reference implementation (one
deliberate exception: `autocontrast` uses exact integer stretching). Nothing here imports torchvision.
All work is whole-batch tensor ops: no Python loop over images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_MAX = 255.0  # uint8 bound

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale (which PIL's "L" conversion also uses).
_LUMA = (0.2989, 0.587, 0.114)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    """[B] -> float32 [B, 1, 1, 1] so a per-image parameter broadcasts over C, H, W."""
    return values.to(torch.float32).reshape(-1, 1, 1, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 255] and truncate towards zero, as torchvision's `.to(uint8)` after a float blend."""
    return x.clamp(0.0, _MAX).to(torch.uint8)


def blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * img + (1 - factor) * other, per image (torchvision `_blend`); factor > 1 extrapolates."""
    ratio = _per_image(factor)
    return _to_uint8(ratio * img + (1.0 - ratio) * other)


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 1, H, W] luma, truncated to integers like torchvision; a 1-channel image is its own gray."""
    if img.shape[1] == 1:
        return img
    r, g, b = img.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).to(torch.uint8).unsqueeze(1)


# ---------------------------------------------------------------------------------------------- colour ops


def brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: factor 0 -> black, 1 -> unchanged."""
    return blend(img, torch.zeros((), device=img.device), factor)


def color(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the grayscale image (identity for 1-channel images, as torchvision)."""
    if img.shape[1] == 1:
        return img
    return blend(img, grayscale(img), factor)


def contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the (unrounded) mean of the grayscale image, one mean per image."""
    mean = grayscale(img).to(torch.float32).mean(dim=(1, 2, 3), keepdim=True)
    return blend(img, mean, factor)


def sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a smoothed image (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded); border pixels are
    kept as they are in the smoothed image, so they never change (torchvision / PIL behaviour)."""
    h, w = img.shape[2:]
    if h <= 2 or w <= 2:
        return img
    smooth = _smooth_interior(img.to(torch.float32)).round_()  # [B, C, H-2, W-2]
    degenerate = img.clone()
    degenerate[..., 1:-1, 1:-1] = smooth.to(torch.uint8)
    return blend(img, degenerate, factor)


def _smooth_interior(x: torch.Tensor) -> torch.Tensor:
    """(3x3 neighbourhood sum + 4 * centre) / 13 at interior pixels: the box sum done separably (rows,
    then columns) on shifted views, ~4x faster on CPU than a depthwise conv2d.

    Sums of integers are exact in float32, and the quotient by 13 is never within 1/26 of a rounding tie,
    so rounding it gives the same integers as the reference convolution.
    """
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]  # [B, C, H, W-2]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]  # [B, C, H-2, W-2]
    return (box + 4.0 * x[..., 1:-1, 1:-1]) / 13.0


def posterize(img: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of every value (bits in 1..8)."""
    shift = (8 - bits.to(torch.int32)).reshape(-1, 1, 1, 1)
    mask = (0xFF << shift) & 0xFF  # e.g. 4 bits -> 0b11110000
    return img & mask.to(torch.uint8)


def solarize(img: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert every value >= threshold (float thresholds compare exactly, as torchvision)."""
    return torch.where(img >= _per_image(threshold), 255 - img, img)


def invert(img: torch.Tensor, _unused: torch.Tensor | None = None) -> torch.Tensor:
    return 255 - img


def autocontrast(img: torch.Tensor, _unused: torch.Tensor | None = None) -> torch.Tensor:
    """Stretch each channel of each image so that its min maps to 0 and its max to 255 (flat channels kept).

    Computed as floor((v - lo) * 255 / (hi - lo)): numerator and denominator are exact integers in float32
    and the division is correctly rounded, so this is the exact integer result. (torchvision multiplies by
    255 / (hi - lo), which can land a hair below an integer and map the maximum to 254.)
    """
    lo = img.amin(dim=(2, 3), keepdim=True).to(torch.float32)
    hi = img.amax(dim=(2, 3), keepdim=True).to(torch.float32)
    flat = hi == lo
    stretched = (img - lo) * _MAX / (hi - lo).clamp(min=1.0)
    return torch.where(flat, img, _to_uint8(stretched))


def equalize(img: torch.Tensor, _unused: torch.Tensor | None = None) -> torch.Tensor:
    """Histogram equalisation per image and channel, torchvision's `_scale_channel` batched.

    One bincount over values offset by 256 * (image-channel index) gives all histograms at once. Per
    channel: step = (pixels - count of the highest value present) // 255, i.e. the sum of the histogram
    without its last non-empty bin; lut[v] = (cumsum[v - 1] + step // 2) // step; step 0 leaves the channel.
    """
    b, c, h, w = img.shape
    flat = img.reshape(b * c, h * w).to(torch.int64)
    offsets = torch.arange(b * c, device=img.device).unsqueeze(1) * 256
    hist = torch.bincount((flat + offsets).reshape(-1), minlength=b * c * 256).reshape(b * c, 256)
    top_count = hist.gather(1, flat.amax(dim=1, keepdim=True))  # count in the last non-empty bin
    step = (h * w - top_count) // 255  # [BC, 1]
    lut = (hist.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)  # shift: a value maps by the count strictly below it
    out = torch.where(step == 0, flat, lut.gather(1, flat))
    return out.to(torch.uint8).reshape(b, c, h, w)


# ------------------------------------------------------------------------------------------- geometric ops
#
# Each geometric op is an inverse affine map A (output pixel -> input pixel) in torchvision's pixel frame:
# origin at the image centre, x right, y down, pixel centres at half-integers from the edges. Keeping the
# matrices per image lets one `grid_sample` warp every image of a batch, whatever its op and magnitude.
# (Inverse maps because grid_sample pulls: each output pixel reads the input at A @ (x, y, 1).)


def identity_matrices(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(2, 3, device=device).repeat(n, 1, 1)


def shear_x_matrices(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """x_in = x + m * (y + h/2): shear about the top edge (torchvision's ShearX uses center=[0, 0])."""
    a = identity_matrices(m.numel(), m.device)
    a[:, 0, 1] = m
    a[:, 0, 2] = m * (h / 2)
    return a


def shear_y_matrices(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """y_in = y + m * (x + w/2): shear about the left edge."""
    a = identity_matrices(m.numel(), m.device)
    a[:, 1, 0] = m
    a[:, 1, 2] = m * (w / 2)
    return a


def translate_x_matrices(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Shift right by trunc(t) whole pixels (torchvision passes int(magnitude))."""
    a = identity_matrices(t.numel(), t.device)
    a[:, 0, 2] = -torch.trunc(t)
    return a


def translate_y_matrices(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Shift down by trunc(t) whole pixels."""
    a = identity_matrices(t.numel(), t.device)
    a[:, 1, 2] = -torch.trunc(t)
    return a


def rotate_matrices(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Rotate counter-clockwise (as seen on screen) about the image centre."""
    theta = degrees.to(torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    a = identity_matrices(degrees.numel(), degrees.device)
    a[:, 0, 0], a[:, 0, 1] = cos, -sin
    a[:, 1, 0], a[:, 1, 1] = sin, cos
    return a


def warp(img: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Apply per-image inverse affine maps [B, 2, 3] (pixel frame above), nearest neighbour, zero fill."""
    b, c, h, w = img.shape
    grid = _sampling_grid(matrices.to(torch.float32), h, w)
    out = F.grid_sample(img.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.to(torch.uint8)  # nearest sampling copies input values, so this is exact


def _sampling_grid(matrices: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """grid_sample's [B, H, W, 2] source coordinates, normalised to [-1, 1] with align_corners=False.

    Same result as affine_grid(theta, align_corners=False) with theta = the matrices rescaled to normalised
    coordinates, but built by broadcasting: ~5x faster than affine_grid's batched matmul on CPU.
    """
    device = matrices.device
    xs = torch.arange(w, device=device, dtype=torch.float32) + (0.5 - w / 2)  # pixel centres, origin in the middle
    ys = torch.arange(h, device=device, dtype=torch.float32) + (0.5 - h / 2)
    a = matrices[:, :, :, None, None]  # [B, 2, 3, 1, 1]
    src_x = a[:, 0, 0] * xs + a[:, 0, 1] * ys[:, None] + a[:, 0, 2]  # [B, H, W], pixels
    src_y = a[:, 1, 0] * xs + a[:, 1, 1] * ys[:, None] + a[:, 1, 2]
    return torch.stack([src_x * (2.0 / w), src_y * (2.0 / h)], dim=-1)
