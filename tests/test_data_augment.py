"""On-device batched augmentation: crop windows, exact mirrors, normalisation values, seeded reproducibility."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitmoe.data import normalize, random_crop, random_hflip
from vitmoe.data.augment import crop_at, flip_mask, hflip_where
from vitmoe.data.seeding import derive_seed, device_generator


def coord_images(b: int = 200, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    """uint8 images whose pixel value encodes (c, y, x) as 1 + 64c + 8y + x (never 0, so padding is visible)."""
    cc = torch.arange(c)[:, None, None]
    yy = torch.arange(h)[None, :, None]
    xx = torch.arange(w)[None, None, :]
    one = (1 + 64 * cc + 8 * yy + xx).to(torch.uint8)
    return one.expand(b, c, h, w).clone()


def gen(seed: int = 0, epoch: int = 0) -> torch.Generator:
    return device_generator("cpu", derive_seed(seed, epoch))


def window_offset(out: torch.Tensor, padded: torch.Tensor, padding: int) -> tuple[int, int] | None:
    h, w = out.shape[-2:]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            if torch.equal(padded[:, dy : dy + h, dx : dx + w], out):
                return dy, dx
    return None


def test_random_crop_is_window_of_zero_padded_input():
    x, p = coord_images(), 2
    out = random_crop(x, p, gen())
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (p, p, p, p))
    offsets = [window_offset(out[i], padded[i], p) for i in range(len(x))]
    assert all(o is not None for o in offsets)
    # Independent per-image offsets covering the whole range [0, 2p] x [0, 2p], extremes included.
    assert len(set(offsets)) == (2 * p + 1) ** 2


def test_crop_at_exact_shift():
    x = coord_images(b=2, c=1, h=4, w=5)
    out = crop_at(x, 1, torch.tensor([[0, 2], [1, 1]]))
    assert torch.equal(out[1], x[1])  # centre offset = identity
    expected = torch.zeros(1, 4, 5, dtype=torch.uint8)  # dy=0 shifts down by 1, dx=2 shifts left by 1
    expected[:, 1:, :4] = x[0, :, :3, 1:]
    assert torch.equal(out[0], expected)


def test_crop_padding_zero_is_identity():
    x = coord_images(b=4)
    assert torch.equal(random_crop(x, 0, gen()), x)


def test_hflip_exact_mirror_and_probability():
    x = coord_images()
    out = random_hflip(x, gen(), p=0.5)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped ^ kept).all())  # each image is either untouched or exactly mirrored
    assert 0.3 < flipped.float().mean().item() < 0.7
    assert torch.equal(random_hflip(x, gen(), p=0.0), x)
    assert torch.equal(random_hflip(x, gen(), p=1.0), x.flip(-1))


def test_hflip_where_follows_mask():
    x = coord_images(b=3)
    out = hflip_where(x, torch.tensor([True, False, True]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1]) and torch.equal(out[2], x[2].flip(-1))


def test_labels_follow_images_through_augmentation():
    labels = torch.arange(1, 101)  # non-zero so zero padding cannot be mistaken for content
    x = labels.to(torch.uint8)[:, None, None, None].expand(100, 1, 6, 6).clone()  # constant value = label
    out = random_hflip(random_crop(x, 2, gen()), gen(1))
    assert torch.equal(out.flatten(1).max(1).values.long(), labels)
    assert bool(((out == 0) | (out == labels.to(torch.uint8)[:, None, None, None])).all())


def test_normalize_values():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == x.shape
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]) / torch.tensor(
        std, dtype=torch.float64)[:, None, None]
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)
    # Known point: 255 in channel 0 -> (1 - 0.4914) / 0.2470.
    x1 = torch.full((1, 1, 1, 1), 255, dtype=torch.uint8)
    assert abs(normalize(x1, (0.4914,), (0.2470,)).item() - (1 - 0.4914) / 0.2470) < 1e-5


def test_same_seed_same_output_other_epoch_differs():
    x = coord_images()
    a = random_hflip(random_crop(x, 2, gen(7, 3)), gen(7, 3))
    b = random_hflip(random_crop(x, 2, gen(7, 3)), gen(7, 3))
    c = random_hflip(random_crop(x, 2, gen(7, 4)), gen(7, 4))
    d = random_hflip(random_crop(x, 2, gen(8, 3)), gen(8, 3))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_draw_helpers_on_generator_device():
    g = gen()
    assert flip_mask(10, g).device == g.device
    assert derive_seed(1, 2) != derive_seed(2, 1) and 0 <= derive_seed(2**70, -1) < 2**63
