"""How an image file becomes a model input: `Preprocessing`, recorded in every model file a run
writes (metadata entry `preprocessing`), so that `vitmoe predict`, the exports and your own code
feed a model exactly what its training and test batches were.

The steps, in order (the test split's, i.e. no augmentation):

1. **decode** with Pillow: 16-bit and float images scaled to 8 bits, then `convert("L")` for
   1-channel models or `convert("RGB")` for 3-channel ones (alpha dropped);
2. **resize**, Pillow bilinear (antialiased when shrinking), as a folder dataset's cache is built
   (`vitmoe.data.folder.decode_image`): `resize="stretch"`, the whole image to `size` x `size`, the
   aspect ratio not kept (folders by default; it also brings a file to a built-in dataset's own side:
   CIFAR 32, Fashion-MNIST 28, digits 8); `resize="crop"`, the shorter side to `size` and the
   centred `size` x `size` square (folders with `folder_resize: crop`);
   then, when `crop` is set, the centred `crop` x `crop` window (the ImageNet evaluation transform,
   e.g. shorter side 256, centre 224);
3. **resize to the model's side** when `input_size` differs from that side (a built-in dataset
   trained with `img_size`): `F.interpolate`, bilinear, antialiased, on the uint8 batch as float,
   as the loaders do;
4. **normalise**: `(x / 255 - mean) / std` per channel (`vitmoe.data.augment.normalize`).

`mean` / `std` are the run's: a folder dataset's training-split statistics, a built-in dataset's
constants, or the `norm_mean` / `norm_std` overrides.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from .augment import center_crop, normalize
from .folder import RESIZE_POLICIES  # stretch | crop: vitmoe.data.folder's resize policies


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of an image file; see the module docstring for the steps.

    Args:
        size: side the file is decoded and resized to (step 2).
        channels: 1 (Pillow "L") or 3 ("RGB").
        mean, std: per-channel normalisation on the 0..1 scale (step 4).
        input_size: the model's image side; another value than `size` adds step 3.
        resize: the resize policy of step 2 (RESIZE_POLICIES).
        crop: side of the centred window taken after the resize (step 2), or None.
    """

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    resize: str = "stretch"
    crop: int | None = None

    @property
    def side(self) -> int:
        """The image side after step 2."""
        return self.crop or self.size

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.size, int) and self.size >= 1 and isinstance(self.input_size, int) and self.input_size >= 1):
            problems.append(f"size {self.size!r} and input_size {self.input_size!r} must be positive integers")
        if self.channels not in (1, 3):
            problems.append(f"channels {self.channels!r} must be 1 or 3")
        if len(self.mean) != self.channels or len(self.std) != self.channels or not all(s > 0 for s in self.std):
            problems.append(f"mean {list(self.mean)} and std {list(self.std)} need one value per channel "
                            f"({self.channels}), std positive")
        if self.crop is not None and not (isinstance(self.crop, int) and 1 <= self.crop <= self.size):
            problems.append(f"crop {self.crop!r} must be an integer from 1 to size ({self.size})")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize {self.resize!r} must be one of {', '.join(RESIZE_POLICIES)}")
        if problems:
            raise ValueError("preprocessing: " + "; ".join(problems))

    # -- the record in a model file --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if d["crop"] is None:
            del d["crop"]  # model files written before crop existed read back the same
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        """The inverse of `to_dict`; ValueError naming what is wrong for anything else."""
        if not isinstance(d, Mapping):
            raise ValueError(f"preprocessing must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("size", "channels", "mean", "std", "input_size") if k not in d]
        if missing:
            raise ValueError(f"preprocessing lacks {', '.join(missing)}")
        try:
            return cls(size=d["size"], channels=d["channels"], mean=tuple(float(v) for v in d["mean"]),
                       std=tuple(float(v) for v in d["std"]), input_size=d["input_size"],
                       resize=d.get("resize", "stretch"), crop=d.get("crop"))
        except TypeError as e:
            raise ValueError(f"preprocessing: {e}") from None

    # -- the steps ----------------------------------------------------------------------------------------
    def read(self, path: str | os.PathLike) -> torch.Tensor:
        """Step 1 and step 2's resize: one file as uint8 [channels, size, size]."""
        from .folder import decode_image

        # a copy: Pillow's array is read-only, and torch warns about (and must not write to) such memory
        return torch.from_numpy(decode_image(path, self.size, gray=self.channels == 1, resize=self.resize,
                                             window=self.crop).copy())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Step 2's crop, steps 3-4: uint8 [B, channels, size, size] (on any device) -> the model's
        float32 input."""
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(f"expected uint8 [B, {self.channels}, {self.size}, {self.size}] images, "
                             f"got {images.dtype} {list(images.shape)}")
        x = center_crop(images, self.crop) if self.crop else images  # DeviceLoader._finish's crop
        if self.input_size != self.side:  # the same call as DeviceLoader._finish
            x = F.interpolate(x.float(), size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return normalize(x, self.mean, self.std)

    def load(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Steps 1-4 for a batch of files: the model's float32 input [B, channels, input_size, input_size]."""
        return self(torch.stack([self.read(p) for p in paths]))


def preprocessing_of(info, mean: Sequence[float], std: Sequence[float], input_size: int) -> Preprocessing:
    """The preprocessing of a run on dataset `info` (a DatasetInfo: its side, stored side and
    channels), normalised with `mean` / `std`, for a model of side `input_size`."""
    cropped = info.stored_size is not None
    return Preprocessing(size=int(info.stored_side), channels=int(info.in_chans), mean=tuple(float(m) for m in mean),
                         std=tuple(float(s) for s in std), input_size=int(input_size),
                         resize="crop" if cropped else "stretch", crop=int(info.img_size) if cropped else None)
