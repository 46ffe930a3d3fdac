"""mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of whole batches on the device, with soft targets.

Per batch one lambda ~ Beta(alpha, alpha), and the partner of image i is image b-1-i of the same batch
(the batch reversed, as timm's Mixup does: no second gather, every image is some image's partner once).
mixup blends whole images, x = lam * x + (1 - lam) * x_rev. CutMix pastes one box of the reversed
batch: side sqrt(1 - lam) times the image's, centred on a uniform pixel, clipped at the border; lam is
then set to the exact share of pixels kept, so the targets weigh each image by what is visible of it.
Targets are lam * smooth(y) + (1 - lam) * smooth(y_rev), smooth(y) = (1 - eps) onehot(y) + eps / C with
the run's label smoothing eps, so every row sums to 1.

The draws are made on the host, from a generator seeded by (seed, epoch, stream, batch index) like the
loader's augmentation (`data.seeding`): a batch's mixing is a pure function of those numbers, so a resumed
run mixes exactly as an uninterrupted one, and nothing waits for the device. Every rank draws the same
lambda and box; with several ranks each one mixes within its own share of the global batch (as timm
does per process), so unlike the plain loader a mixed run depends on the world size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from .seeding import derive_seed

# The loader's permutation and augmentation use streams 0 and 1 (data.loader); mixing gets its own.
MIX_STREAM = 2


@dataclass(frozen=True)
class MixDraw:
    """What one batch's mixing does (host numbers)."""

    lam: float
    """Weight of each image's own label (CutMix: the share of its pixels kept)."""
    box: tuple[int, int, int, int] | None
    """CutMix: the pasted region (y0, y1, x0, x1), end-exclusive; None for mixup."""


def cut_box(lam: float, height: int, width: int, cy: int, cx: int) -> tuple[int, int, int, int]:
    """The CutMix box of side sqrt(1 - lam) of the image's, centred at (cy, cx), clipped at the border."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(height * ratio), int(width * ratio)
    y0, x0 = cy - ch // 2, cx - cw // 2
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return clip(y0, height), clip(y0 + ch, height), clip(x0, width), clip(x0 + cw, width)


def soft_targets(y: Tensor, y_partner: Tensor, lam: float, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """lam * smooth(y) + (1 - lam) * smooth(y_partner), float32 [b, num_classes]."""
    def smooth(labels: Tensor) -> Tensor:
        return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes

    return smooth(y) * lam + smooth(y_partner) * (1.0 - lam)


def mix_batch(x: Tensor, y: Tensor, draw: MixDraw, num_classes: int, smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """(mixed images, soft targets) of a batch [b, C, H, W] and its labels [b], partner = the batch reversed."""
    x_rev = x.flip(0)
    if draw.box is None:
        mixed = x * draw.lam + x_rev * (1.0 - draw.lam)
    else:
        y0, y1, x0, x1 = draw.box
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x_rev[:, :, y0:y1, x0:x1]
    return mixed, soft_targets(y, y.flip(0), draw.lam, num_classes, smoothing)


class BatchMixer:
    """`mixer(x, y, epoch, batch)` -> (x, soft targets), or (x, None) for a batch left unmixed.

    `mixup_alpha` / `cutmix_alpha`: Beta parameters (0 turns each off); `mix_prob`: probability a batch
    is mixed; `switch_prob`: probability of CutMix when both are on."""

    def __init__(self, num_classes: int, seed: int = 0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.0):
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= mix_prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError(f"BatchMixer: alphas must be >= 0 and probabilities in [0, 1], got mixup_alpha="
                             f"{mixup_alpha}, cutmix_alpha={cutmix_alpha}, mix_prob={mix_prob}, "
                             f"switch_prob={switch_prob}")
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.mix_prob, self.switch_prob, self.smoothing = float(mix_prob), float(switch_prob), float(label_smoothing)

    @classmethod
    def from_config(cls, cfg, num_classes: int) -> "BatchMixer | None":
        """The mixer a TrainConfig asks for, or None when mixing is off."""
        if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
            return None
        return cls(num_classes, cfg.seed, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob,
                   cfg.label_smoothing)

    def describe(self) -> str:
        kinds = [f"{name} alpha {a:g}" for name, a in (("mixup", self.mixup_alpha), ("CutMix", self.cutmix_alpha))
                 if a > 0]
        switch = f", CutMix share {self.switch_prob:g}" if len(kinds) == 2 else ""
        return f"{' + '.join(kinds)} (batches mixed: {self.mix_prob:g}{switch}; train_acc against the primary label)"

    def draw(self, epoch: int, batch: int, height: int, width: int) -> MixDraw | None:
        """Batch `batch` of `epoch`: its mixing, or None when it is left unmixed."""
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, epoch, MIX_STREAM, batch)))
        u_mix, u_switch = rng.random(2)
        if u_mix >= self.mix_prob or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            return None
        cut = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or u_switch < self.switch_prob)
        alpha = self.cutmix_alpha if cut else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not cut:
            return MixDraw(lam, None)
        box = cut_box(lam, height, width, int(rng.integers(height)), int(rng.integers(width)))
        y0, y1, x0, x1 = box
        return MixDraw(1.0 - (y1 - y0) * (x1 - x0) / (height * width), box)

    def __call__(self, x: Tensor, y: Tensor, epoch: int, batch: int) -> tuple[Tensor, Tensor | None]:
        draw = self.draw(epoch, batch, x.shape[-2], x.shape[-1])
        if draw is None:
            return x, None
        return mix_batch(x, y, draw, self.num_classes, self.smoothing)
