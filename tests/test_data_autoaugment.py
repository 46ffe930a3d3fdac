"""Batched AutoAugment / RandAugment: per-op semantics against naive per-image references, policy tables,
reproducibility, per-image independence and the DeviceLoader integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitmoe.data import DatasetInfo, DeviceLoader, ImageData
from vitmoe.data import augment as aug
from vitmoe.data import autoaugment as aa
from vitmoe.data import image_ops as ops
from vitmoe.data.seeding import derive_seed


def rand_images(n: int, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def full(n: int, value: float) -> torch.Tensor:
    return torch.full((n,), float(value))


def per_image(x: torch.Tensor, ref) -> torch.Tensor:
    """Apply a numpy reference image by image (the naive loop the batched code avoids)."""
    return torch.from_numpy(np.stack([ref(img) for img in x.numpy()]))


# --------------------------------------------------------------------------------------- naive references


def ref_gray(img: np.ndarray) -> np.ndarray:
    if img.shape[0] == 1:
        return img[0].astype(np.float64)
    r, g, b = img.astype(np.float64)
    return np.floor(0.2989 * r + 0.587 * g + 0.114 * b)  # torchvision truncates luma to uint8


def ref_blend(img: np.ndarray, other, factor: float) -> np.ndarray:
    return np.floor(np.clip(factor * img.astype(np.float64) + (1 - factor) * other, 0, 255)).astype(np.uint8)


def ref_sharpen_degenerate(img: np.ndarray) -> np.ndarray:
    out = img.astype(np.float64).copy()
    c, h, w = img.shape
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            window = img[:, y - 1 : y + 2, x - 1 : x + 2].astype(np.float64)
            out[:, y, x] = np.round((window.sum(axis=(1, 2)) + 4.0 * img[:, y, x]) / 13)  # [[1,1,1],[1,5,1],[1,1,1]]
    return out


def ref_equalize_channel(ch: np.ndarray) -> np.ndarray:
    """torchvision `_scale_channel`, literally."""
    hist = np.bincount(ch.reshape(-1), minlength=256)
    nonzero = hist[hist != 0]
    step = int(nonzero[:-1].sum()) // 255
    if step == 0:
        return ch
    lut = (np.cumsum(hist) + step // 2) // step
    lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
    return lut[ch].astype(np.uint8)


def ref_autocontrast(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    for c, ch in enumerate(img.astype(np.int64)):
        lo, hi = ch.min(), ch.max()
        if hi > lo:  # exact integer stretch; a flat channel stays as it is
            out[c] = (ch - lo) * 255 // (hi - lo)
    return out


# ----------------------------------------------------------------------------------------- colour ops


def test_invert_posterize_solarize_match_integer_reference():
    x = rand_images(6)
    assert torch.equal(ops.invert(x), 255 - x)
    bits = torch.tensor([8, 7, 6, 5, 4, 1])
    expect = torch.stack([x[i] & ((0xFF << (8 - int(b))) & 0xFF) for i, b in enumerate(bits)])
    assert torch.equal(ops.posterize(x, bits), expect)
    assert torch.equal(ops.posterize(x, full(6, 4))[0], x[0] // 16 * 16)
    thresholds = torch.tensor([255.0, 178.5, 128.0, 0.0, 256.0, 1.0])
    expect = torch.stack([torch.where(x[i].double() >= t, 255 - x[i], x[i]) for i, t in enumerate(thresholds)])
    assert torch.equal(ops.solarize(x, thresholds), expect)
    assert torch.equal(ops.solarize(x, full(6, 256)), x)  # nothing reaches 256
    assert torch.equal(ops.solarize(x, full(6, 0)), 255 - x)  # everything inverted


@pytest.mark.parametrize("factor", [0.0, 0.25, 0.5, 1.0, 1.5, 1.75])  # exact in binary: float32 == float64
def test_brightness_color_contrast_match_float64_reference(factor):
    x = rand_images(5)
    f = full(5, factor)
    assert torch.equal(ops.brightness(x, f), per_image(x, lambda im: ref_blend(im, 0.0, factor)))
    assert torch.equal(ops.color(x, f), per_image(x, lambda im: ref_blend(im, ref_gray(im)[None], factor)))
    assert torch.equal(ops.contrast(x, f), per_image(x, lambda im: ref_blend(im, ref_gray(im).mean(), factor)))
    gray = rand_images(5, c=1)  # 1 channel: grayscale is the image itself; saturation is a no-op
    assert torch.equal(ops.color(gray, f), gray)
    assert torch.equal(ops.contrast(gray, f), per_image(gray, lambda im: ref_blend(im, im.mean(), factor)))


def test_colour_factor_one_is_identity_and_factors_are_per_image():
    x = rand_images(4)
    for op in (ops.brightness, ops.color, ops.contrast, ops.sharpness):
        assert torch.equal(op(x, full(4, 1.0)), x)
    factors = torch.tensor([0.1, 1.0, 1.7, 0.5])
    out = ops.brightness(x, factors)
    for i, f in enumerate(factors.tolist()):
        assert torch.equal(out[i], ops.brightness(x[i : i + 1], full(1, f))[0])


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.5])
def test_sharpness_matches_reference_and_keeps_borders(factor):
    x = rand_images(3, h=7, w=9)
    out = ops.sharpness(x, full(3, factor))
    assert torch.equal(out, per_image(x, lambda im: ref_blend(im, ref_sharpen_degenerate(im), factor)))
    assert torch.equal(out[..., 0, :], x[..., 0, :]) and torch.equal(out[..., :, -1], x[..., :, -1])


def test_autocontrast_matches_reference():
    x = rand_images(4, h=6, w=6) // 3 + 40  # values in [40, 125]: stretching changes them
    x[1, 2] = 77  # a flat channel is left as it is
    out = ops.autocontrast(x)
    assert torch.equal(out, per_image(x, ref_autocontrast))
    assert torch.equal(out[0].amin(dim=(1, 2)), torch.zeros(3, dtype=torch.uint8))
    assert torch.equal(out[0].amax(dim=(1, 2)), torch.full((3,), 255, dtype=torch.uint8))
    assert torch.equal(out[1, 2], x[1, 2])


def test_equalize_matches_torchvision_algorithm():
    x = rand_images(5, h=16, w=16)
    x[1] = x[1] // 64 * 64 + 10  # few distinct values
    x[2, 0] = 9  # constant channel -> step 0 -> unchanged
    x[3, 1, :8] = 200  # one dominant value
    x[4] = (x[4].to(torch.int32) * 60 // 255).to(torch.uint8)  # narrow range
    out = ops.equalize(x)
    expect = per_image(x, lambda im: np.stack([ref_equalize_channel(ch) for ch in im]))
    assert torch.equal(out, expect)
    assert torch.equal(out[2, 0], x[2, 0])
    assert not torch.equal(out[4], x[4])


# ------------------------------------------------------------------------------------------ geometric ops


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move content down by dy and right by dx, filling with zeros."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        ..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_translate_whole_pixels_is_a_zero_filled_roll():
    x = rand_images(4, h=10, w=12)
    t = torch.tensor([3.0, -2.0, 0.0, 5.9])  # torchvision truncates: 5.9 -> 5 pixels
    out_x = aa.apply_op(x, "TranslateX", t)
    out_y = aa.apply_op(x, "TranslateY", t)
    for i, d in enumerate([3, -2, 0, 5]):
        assert torch.equal(out_x[i], shift(x[i], 0, d))
        assert torch.equal(out_y[i], shift(x[i], d, 0))


def test_zero_rotation_and_shear_are_identities_and_rot90_is_counter_clockwise():
    x = rand_images(3, h=10, w=14)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        assert torch.equal(aa.apply_op(x, name, full(3, 0.0)), x)
    sq = rand_images(2, h=8, w=8)
    assert torch.equal(aa.apply_op(sq, "Rotate", full(2, 90.0)), torch.rot90(sq, 1, dims=(2, 3)))
    assert torch.equal(aa.apply_op(sq, "Rotate", full(2, -90.0)), torch.rot90(sq, -1, dims=(2, 3)))


@pytest.mark.parametrize("m", [0.25, -0.25])
def test_shear_matches_nearest_neighbour_reference(m):
    """torchvision shears about the top-left corner: x_in = x + m * y measured from the top edge."""
    x = rand_images(2, h=6, w=9)
    h, w = 6, 9
    ref_x, ref_y = torch.zeros_like(x), torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            src_j = math.floor(j + m * (i + 0.5) + 0.5)  # nearest (m = +-1/4 never hits a tie)
            if 0 <= src_j < w:
                ref_x[..., i, j] = x[..., i, src_j]
            src_i = math.floor(i + m * (j + 0.5) + 0.5)
            if 0 <= src_i < h:
                ref_y[..., i, j] = x[..., src_i, j]
    assert torch.equal(aa.apply_op(x, "ShearX", full(2, m)), ref_x)
    assert torch.equal(aa.apply_op(x, "ShearY", full(2, m)), ref_y)


# ---------------------------------------------------------------------------------------------- policies


def test_cifar10_policy_table():
    assert len(aa.CIFAR10_POLICY) == 25
    no_magnitude = {"AutoContrast", "Equalize", "Invert"}
    for sub in aa.CIFAR10_POLICY:
        assert len(sub) == 2
        for name, prob, bin_index in sub:
            assert name in aa.OP_ID and 0.0 <= prob <= 1.0
            assert (bin_index is None) == (name in no_magnitude)
            assert bin_index is None or 0 <= bin_index < 10
    assert aa.CIFAR10_POLICY[0] == (("Invert", 0.1, None), ("Contrast", 0.2, 6))
    assert aa.CIFAR10_POLICY[-1] == (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None))


def test_geometric_ops_have_consecutive_ids():
    # apply_plan relies on it: after sorting by op id, all geometric images form one run for one warp.
    assert [aa.OP_ID[name] for name in aa.GEOMETRIC_OPS] == list(range(1, 6))
    x = rand_images(5, h=10, w=10)
    plan = aa.OpPlan(torch.tensor([[5], [1], [3], [0], [4]]), torch.tensor([[90.0], [0.25], [2.0], [7.0], [-3.0]]))
    out = aa.apply_plan(x, plan)
    for i in range(5):
        name = aa.OP_NAMES[int(plan.op_ids[i, 0])]
        assert torch.equal(out[i], aa.apply_op(x[i : i + 1], name, plan.magnitudes[i])[0])


def test_magnitude_bins_follow_torchvision():
    bins = aa.magnitude_bins(10, (32, 32))
    assert bins["Posterize"][0].tolist() == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert bins["TranslateX"][0][-1].item() == pytest.approx(150 / 331 * 32)
    assert bins["ShearX"][0][-1].item() == pytest.approx(0.3) and bins["Rotate"][0][-1].item() == 30.0
    assert bins["Brightness"][0][-1].item() == pytest.approx(0.9) and bins["Brightness"][1]
    assert bins["Solarize"][0][0].item() == 255.0 and bins["Solarize"][0][-1].item() == 0.0
    rand = aa.magnitude_bins(31, (32, 32))  # RandAugment default magnitude 9 of 31 bins
    assert rand["Posterize"][0][9].item() == 7 and rand["Rotate"][0][9].item() == pytest.approx(9.0)
    assert rand["Solarize"][0][9].item() == pytest.approx(178.5)


def test_probability_zero_never_applies_and_one_always_does():
    x = rand_images(64, seed=1)
    always = [(("Invert", 1.0, None), ("Posterize", 0.0, 9))]
    never = [(("Invert", 0.0, None), ("Equalize", 0.0, None))]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(aa.autoaugment(x, g, always), 255 - x)
    assert torch.equal(aa.autoaugment(x, g, never), x)


def test_autoaugment_plan_draws_policy_and_signs():
    g = torch.Generator().manual_seed(0)
    n = 20000
    plan = aa.autoaugment_plan(n, (32, 32), g)
    assert plan.op_ids.shape == (n, 2) and plan.magnitudes.shape == (n, 2)
    first_probs = torch.tensor([sub[0][1] for sub in aa.CIFAR10_POLICY])
    assert (plan.op_ids[:, 0] != 0).float().mean().item() == pytest.approx(first_probs.mean().item(), abs=0.015)
    rot = plan.magnitudes[plan.op_ids[:, 0] == aa.OP_ID["Rotate"], 0]  # Rotate bin 2: +-6.667 degrees
    assert torch.allclose(rot.abs(), torch.tensor(20.0 / 3)) and 0.4 < (rot > 0).float().mean() < 0.6
    posterize = plan.magnitudes[plan.op_ids[:, 1] == aa.OP_ID["Posterize"], 1]  # bin 7 -> 5 bits, unsigned
    assert posterize.numel() > 0 and torch.all(posterize == 5)


def test_randaugment_plan_uses_all_ops_at_one_magnitude():
    g = torch.Generator().manual_seed(0)
    plan = aa.randaugment_plan(5000, (32, 32), g, num_ops=3)
    assert plan.op_ids.shape == (5000, 3)
    counts = torch.bincount(plan.op_ids.reshape(-1), minlength=len(aa.OP_NAMES))
    assert torch.all(counts[:14] > 0) and counts[aa.OP_ID["Invert"]] == 0  # 14 ops, Invert not among them
    shear = plan.magnitudes[plan.op_ids == aa.OP_ID["ShearX"]]
    assert torch.allclose(shear.abs(), torch.tensor(0.09))  # linspace(0, 0.3, 31)[9]
    with pytest.raises(ValueError):
        aa.randaugment_plan(4, (32, 32), g, magnitude=31)


@pytest.mark.parametrize("policy", [aa.autoaugment, aa.randaugment])
@pytest.mark.parametrize("shape", [(48, 3, 12, 12), (40, 1, 10, 14)])
def test_policy_output_range_shape_and_seeding(policy, shape):
    x = rand_images(*shape, seed=2)
    out = policy(x, torch.Generator().manual_seed(5))
    assert out.dtype == torch.uint8 and out.shape == x.shape  # uint8 keeps values in [0, 255]
    assert torch.equal(out, policy(x, torch.Generator().manual_seed(5)))  # same seed -> same output
    assert not torch.equal(out, policy(x, torch.Generator().manual_seed(6)))
    assert not torch.equal(out, x)
    assert torch.equal(x, rand_images(*shape, seed=2))  # input untouched


def test_each_output_image_depends_only_on_its_own_input_and_plan_row():
    """Label alignment: image i of the batched result equals the policy run on image i alone."""
    x = rand_images(64, h=8, w=8, seed=3)
    x[::4] = (torch.arange(16, dtype=torch.uint8) * 15 + 7)[:, None, None, None]  # some constant images
    for make_plan in (aa.autoaugment_plan, aa.randaugment_plan):
        plan = make_plan(64, (8, 8), torch.Generator().manual_seed(4))
        out = aa.apply_plan(x, plan)
        for i in range(64):
            assert torch.equal(out[i : i + 1], aa.apply_plan(x[i : i + 1], plan.rows(slice(i, i + 1))))
    # Colour-only ops map a constant image to a constant image.
    colour = aa.OpPlan(torch.full((16, 2), aa.OP_ID["Brightness"]), torch.full((16, 2), 0.5))
    const = aa.apply_plan(x[::4], colour)
    assert torch.all(const == const[:, :1, :1, :1])
    once = torch.clamp(torch.floor(x[::4, 0, 0, 0] * 1.5), max=255)  # each op truncates to uint8
    assert torch.equal(const[:, 0, 0, 0], torch.clamp(torch.floor(once * 1.5), max=255).to(torch.uint8))


def test_empty_batch():
    x = rand_images(0)
    plan = aa.autoaugment_plan(0, (8, 8), torch.Generator().manual_seed(0))
    assert aa.apply_plan(x, plan).shape == x.shape


# ----------------------------------------------------------------------------------------- DeviceLoader

N, BATCH = 37, 8
INFO = DatasetInfo(name="toy3", num_classes=N, in_chans=3, img_size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                   crop_padding=2, hflip=True, classes=[str(i) for i in range(N)])


def toy_data() -> ImageData:
    return ImageData(rand_images(N, seed=7), torch.arange(N), INFO)


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.round((x * 0.25 + 0.5) * 255).to(torch.uint8)


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment"])
def test_loader_applies_policy_between_crop_and_flip_with_aligned_labels(policy):
    data = toy_data()
    loader = DeviceLoader(data, BATCH, "cpu", train=True, seed=11, augment_policy=policy)
    loader.set_epoch(2)
    order = loader.epoch_order(2)
    for b, (x, y) in enumerate(loader):
        idx = order[b * BATCH : (b + 1) * BATCH]
        assert torch.equal(y, data.labels[idx])
        g = torch.Generator().manual_seed(derive_seed(11, 2, 1, b))  # the loader's augmentation stream
        offsets, flips = aug.crop_offsets(len(idx), 2, g), aug.flip_mask(len(idx), g)
        plan = aa.policy_plan(policy, len(idx), (8, 8), g)
        expect = aug.hflip_where(aa.apply_plan(aug.crop_at(data.images[idx], 2, offsets), plan), flips)
        assert torch.equal(to_pixels(x), expect)


def test_loader_policy_is_independent_of_world_size_and_none_is_unchanged():
    data = toy_data()
    whole = list(DeviceLoader(data, BATCH, "cpu", train=True, seed=1, augment_policy="randaugment"))
    ranks = [list(DeviceLoader(data, BATCH, "cpu", train=True, seed=1, rank=r, world_size=3,
                               augment_policy="randaugment")) for r in range(3)]
    for b, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[r][b][0] for r in range(3)]), x)
        assert torch.equal(torch.cat([ranks[r][b][1] for r in range(3)]), y)
    plain = list(DeviceLoader(data, BATCH, "cpu", train=True, seed=1))
    none = list(DeviceLoader(data, BATCH, "cpu", train=True, seed=1, augment_policy="none"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, none))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(plain, whole))
    evals = list(DeviceLoader(data, BATCH, "cpu", train=False, augment_policy="autoaugment"))
    assert torch.equal(to_pixels(torch.cat([x for x, _ in evals])), data.images)  # eval: no augmentation
    with pytest.raises(ValueError, match="augment_policy"):
        DeviceLoader(data, BATCH, "cpu", train=True, augment_policy="trivialaugment")
