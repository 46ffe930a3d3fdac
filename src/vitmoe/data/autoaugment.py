"""Batched on-device AutoAugment (CIFAR-10 policy) and RandAugment for uint8 batches [B, C, H, W].

Both policies are split in two steps so that a distributed loader can draw for the global batch and keep
its rows (like `augment.crop_offsets` / `crop_at`):

* `autoaugment_plan` / `randaugment_plan` draw, from a torch.Generator on the data's device, an `OpPlan`:
  per image a short sequence of (op id, signed magnitude); an op that was not drawn is "Identity".
* `apply_plan` runs the plan. For each position in the sequence it groups the images by op (one argsort),
  then loops over the op TYPES present (at most 15): gather that op's images, run the op on them in one
  batched call, scatter them back. All geometric ops of a step share a single `grid_sample`. Never a loop
  over images; one host sync per step (the per-op counts).

Magnitude bins and op semantics follow torchvision (`transforms.AutoAugment`, `transforms.RandAugment`),
re-implemented with torch tensor ops in `image_ops` (torchvision is not a dependency).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import image_ops as ops

POLICIES = ("none", "autoaugment", "randaugment")

# Op ids index this tuple. The first 14 are RandAugment's op list (torchvision order); Invert is only used by
# AutoAugment policies. Id 0 (Identity) also marks "op not applied".
OP_NAMES = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize",
    "AutoContrast", "Equalize", "Invert",
)  # fmt: skip
OP_ID = {name: i for i, name in enumerate(OP_NAMES)}
RANDAUGMENT_OPS = OP_NAMES[:14]
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")  # consecutive ids 1..5

# Upper end of the Solarize threshold bins. torchvision uses linspace(255, 0) (the paper's PIL code used 256,
# where the lowest bin is a no-op); we follow torchvision, so the lowest bin inverts pixels equal to 255.
SOLARIZE_MAX = 255.0

SubPolicy = tuple[tuple[str, float, int | None], tuple[str, float, int | None]]

# AutoAugment CIFAR-10 policy (Cubuk et al. 2019, "AutoAugment: Learning Augmentation Strategies from Data"),
# as in torchvision's AutoAugmentPolicy.CIFAR10: 25 sub-policies of two
# (op, probability, magnitude bin of 10) each; bin None for ops without a magnitude.
CIFAR10_POLICY: tuple[SubPolicy, ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def magnitude_bins(num_bins: int, image_size: tuple[int, int]) -> dict[str, tuple[torch.Tensor, bool]]:
    """Per op: (magnitude of each bin [num_bins], signed?) — torchvision's `_augmentation_space`.

    Signed ops get a random sign per application. Colour factors are 1 + magnitude. Ops without a
    magnitude get zeros. Computed with torch.linspace in float32 so values match torchvision bit for bit.
    """
    h, w = image_size
    zeros = torch.zeros(num_bins)
    factor = torch.linspace(0.0, 0.9, num_bins)
    return {
        "Identity": (zeros, False),
        "ShearX": (torch.linspace(0.0, 0.3, num_bins), True),
        "ShearY": (torch.linspace(0.0, 0.3, num_bins), True),
        "TranslateX": (torch.linspace(0.0, 150.0 / 331.0 * w, num_bins), True),
        "TranslateY": (torch.linspace(0.0, 150.0 / 331.0 * h, num_bins), True),
        "Rotate": (torch.linspace(0.0, 30.0, num_bins), True),  # degrees
        "Brightness": (factor, True),
        "Color": (factor, True),
        "Contrast": (factor, True),
        "Sharpness": (factor, True),
        # bits kept: 8 down to 4 (torch.round rounds half to even, as in torchvision)
        "Posterize": ((8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round()).float(), False),
        "Solarize": (torch.linspace(SOLARIZE_MAX, 0.0, num_bins), False),
        "AutoContrast": (zeros, False),
        "Equalize": (zeros, False),
        "Invert": (zeros, False),
    }


@dataclass(frozen=True)
class OpPlan:
    """Per image a sequence of ops: `op_ids` int64 [n, K] into OP_NAMES (0 = nothing) and the signed
    magnitude of each, float32 [n, K]. Step k is applied to every image before step k + 1."""

    op_ids: torch.Tensor
    magnitudes: torch.Tensor

    def __len__(self) -> int:
        return int(self.op_ids.shape[0])

    def rows(self, index: torch.Tensor | slice) -> OpPlan:
        """The plan of a subset of images (e.g. this rank's share of a global batch)."""
        return OpPlan(self.op_ids[index], self.magnitudes[index])

    def split(self, sections: int) -> tuple[OpPlan, ...]:
        """Contiguous chunks like torch.tensor_split(t, sections) (the loader's rank sharding)."""
        ids = torch.tensor_split(self.op_ids, sections)
        mags = torch.tensor_split(self.magnitudes, sections)
        return tuple(OpPlan(i, m) for i, m in zip(ids, mags))


def _random_signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """+1 / -1 with equal probability (float32)."""
    bits = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return 1.0 - 2.0 * bits.to(torch.float32)


def autoaugment_plan(
    n: int,
    image_size: tuple[int, int],
    generator: torch.Generator,
    policy: Sequence[SubPolicy] = CIFAR10_POLICY,
    num_bins: int = 10,
) -> OpPlan:
    """Per image: a sub-policy chosen uniformly; each of its two ops applied with its own probability and,
    if signed, a random sign (AutoAugment, Cubuk et al. 2019; torchvision's magnitude bins)."""
    device = generator.device
    bins = magnitude_bins(num_bins, image_size)
    table_ids, table_probs, table_mags, table_signed = [], [], [], []
    for sub in policy:
        for name, prob, bin_index in sub:
            values, signed = bins[name]
            table_ids.append(OP_ID[name])
            table_probs.append(float(prob))
            table_mags.append(float(values[bin_index]) if bin_index is not None else 0.0)
            table_signed.append(signed)
    steps = len(policy[0])

    def as_table(values: list, dtype: torch.dtype) -> torch.Tensor:  # [num sub-policies, steps]
        return torch.tensor(values, dtype=dtype, device=device).reshape(len(policy), steps)

    ids, probs = as_table(table_ids, torch.int64), as_table(table_probs, torch.float32)
    mags, signed = as_table(table_mags, torch.float32), as_table(table_signed, torch.bool)

    choice = torch.randint(0, len(policy), (n,), generator=generator, device=device)
    # rand is in [0, 1): probability 0 never fires, probability 1 always does.
    fire = torch.rand((n, steps), generator=generator, device=device) < probs[choice]
    sign = torch.where(signed[choice], _random_signs((n, steps), generator), 1.0)
    return OpPlan(torch.where(fire, ids[choice], 0), mags[choice] * sign)


def randaugment_plan(
    n: int,
    image_size: tuple[int, int],
    generator: torch.Generator,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = 31,
) -> OpPlan:
    """Per image: `num_ops` ops drawn uniformly (with replacement, Identity included) from the 14
    RandAugment ops, all at bin `magnitude` of `num_magnitude_bins`, signed ops with a random sign
    (RandAugment, Cubuk et al. 2020; torchvision's defaults num_ops=2, magnitude=9, 31 bins)."""
    if not 0 <= magnitude < num_magnitude_bins:
        raise ValueError(f"magnitude {magnitude} must be in [0, {num_magnitude_bins})")
    device = generator.device
    bins = magnitude_bins(num_magnitude_bins, image_size)
    mags = torch.tensor([float(bins[name][0][magnitude]) for name in RANDAUGMENT_OPS], device=device)
    signed = torch.tensor([bins[name][1] for name in RANDAUGMENT_OPS], device=device)
    ids = torch.randint(0, len(RANDAUGMENT_OPS), (n, num_ops), generator=generator, device=device)
    sign = torch.where(signed[ids], _random_signs((n, num_ops), generator), 1.0)
    return OpPlan(ids, mags[ids] * sign)  # RANDAUGMENT_OPS[i] has op id i


def policy_plan(name: str, n: int, image_size: tuple[int, int], generator: torch.Generator) -> OpPlan | None:
    """The plan of a named policy with its default settings ("none" -> None)."""
    if name == "none":
        return None
    if name == "autoaugment":
        return autoaugment_plan(n, image_size, generator)
    if name == "randaugment":
        return randaugment_plan(n, image_size, generator)
    raise ValueError(f"unknown augment policy {name!r}; expected one of {POLICIES}")


# Colour / histogram ops by name: f(images [m, C, H, W] uint8, torchvision magnitude [m]) -> uint8.
_COLOUR_OPS = {
    "Brightness": lambda x, m: ops.brightness(x, 1.0 + m),
    "Color": lambda x, m: ops.color(x, 1.0 + m),
    "Contrast": lambda x, m: ops.contrast(x, 1.0 + m),
    "Sharpness": lambda x, m: ops.sharpness(x, 1.0 + m),
    "Posterize": ops.posterize,
    "Solarize": ops.solarize,
    "AutoContrast": ops.autocontrast,
    "Equalize": ops.equalize,
    "Invert": ops.invert,
}

_GEOMETRIC_MATRICES = {
    "ShearX": ops.shear_x_matrices,
    "ShearY": ops.shear_y_matrices,
    "TranslateX": ops.translate_x_matrices,
    "TranslateY": ops.translate_y_matrices,
    "Rotate": ops.rotate_matrices,
}


def apply_op(x: torch.Tensor, name: str, magnitudes: torch.Tensor) -> torch.Tensor:
    """Apply one named op to every image of `x` with per-image torchvision magnitudes [B]."""
    if name == "Identity":
        return x
    if name in _GEOMETRIC_MATRICES:
        return ops.warp(x, _GEOMETRIC_MATRICES[name](magnitudes, x.shape[2], x.shape[3]))
    return _COLOUR_OPS[name](x, magnitudes)


def _apply_step(x: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor) -> None:
    """One step of a plan, in place on x.

    Sorting the images by op id groups each op's images into one contiguous run of `order`, so each op
    type present runs once on its images (index_select -> op -> index_copy_), and the per-op counts are
    the only host sync. Geometric ops have consecutive ids, so they form one run and share one warp.
    """
    order = torch.argsort(op_ids, stable=True)
    counts = torch.bincount(op_ids, minlength=len(OP_NAMES)).tolist()
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)

    def run(first: str, last: str) -> torch.Tensor:
        """Indices of the images whose op id is in OP_ID[first] .. OP_ID[last]."""
        return order[starts[OP_ID[first]] : starts[OP_ID[last] + 1]]

    geometric = run(GEOMETRIC_OPS[0], GEOMETRIC_OPS[-1])
    if geometric.numel() > 0:
        h, w = x.shape[2], x.shape[3]
        matrices = torch.cat([
            _GEOMETRIC_MATRICES[name](magnitudes[run(name, name)], h, w) for name in GEOMETRIC_OPS
        ])  # rows in the order of `geometric`
        x.index_copy_(0, geometric, ops.warp(x.index_select(0, geometric), matrices))

    for name, op in _COLOUR_OPS.items():
        if counts[OP_ID[name]] > 0:
            idx = run(name, name)
            x.index_copy_(0, idx, op(x.index_select(0, idx), magnitudes[idx]))


def apply_plan(x: torch.Tensor, plan: OpPlan) -> torch.Tensor:
    """Run `plan` on uint8 [B, C, H, W] (B = len(plan)); returns a new uint8 tensor of the same shape."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 [B, C, H, W], got {x.dtype} {list(x.shape)}")
    if len(plan) != x.shape[0]:
        raise ValueError(f"plan has {len(plan)} rows for a batch of {x.shape[0]}")
    out = x.clone()
    for k in range(plan.op_ids.shape[1]):
        _apply_step(out, plan.op_ids[:, k].to(x.device), plan.magnitudes[:, k].to(x.device))
    return out


def autoaugment(
    x: torch.Tensor, generator: torch.Generator, policy: Sequence[SubPolicy] = CIFAR10_POLICY
) -> torch.Tensor:
    """AutoAugment a uint8 batch [B, C, H, W] (default: the CIFAR-10 policy)."""
    return apply_plan(x, autoaugment_plan(x.shape[0], (x.shape[2], x.shape[3]), generator, policy))


def randaugment(
    x: torch.Tensor,
    generator: torch.Generator,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = 31,
) -> torch.Tensor:
    """RandAugment a uint8 batch [B, C, H, W] (torchvision defaults: 2 ops at magnitude 9 of 31 bins)."""
    plan = randaugment_plan(x.shape[0], (x.shape[2], x.shape[3]), generator, num_ops, magnitude, num_magnitude_bins)
    return apply_plan(x, plan)
