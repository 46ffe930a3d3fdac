"""`DeviceLoader`: a whole split resident on the training device, batched, sharded across ranks, augmented.
`StreamingLoader`: the same batches from a split kept in host memory (e.g. a memory-mapped folder cache),
each batch gathered into pinned memory and copied to the device. `make_loader` picks one by size."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from . import augment as aug
from .autoaugment import POLICIES, apply_plan, policy_plan
from .info import ImageData
from .seeding import derive_seed, device_generator

# Distinct streams so the permutation and the augmentation never share random numbers.
_PERM_STREAM = 0
_AUG_STREAM = 1


class DeviceLoader:
    """Iterate over a split held on `device` as uint8, yielding normalised float32 batches and int64 labels.

    * `batch_size` is the GLOBAL batch size. Each global batch is split across ranks with
      `torch.tensor_split` (contiguous chunks whose sizes differ by at most 1); this rank yields its chunk.
    * Train: a fresh permutation per epoch, drawn from a CPU generator seeded by (seed, epoch), hence
      identical on every rank and on a resumed run. Call `set_epoch(epoch)` before iterating, as with
      DistributedSampler. The final partial global batch is KEPT: over all ranks an epoch visits every
      sample exactly once (nothing dropped, nothing repeated). Consequently the last batch is smaller;
      a tail smaller than `world_size` joins the batch before it, so no rank ever gets an empty batch.
      Ranks may hold unequal shares, so average the loss over the global batch (`global_batch_size(i)`).
    * Augmentation (train with `augment=True`, per `data.info`): random crop with zero padding and
      optional horizontal flip, drawn on the data device for the whole global batch from a generator
      seeded by (seed, epoch, batch index), and sliced per rank. So every batch is a pure function of
      (seed, epoch, batch index): independent of world size, and `iter_epoch(epoch, start_batch)` resumes
      mid-epoch exactly. The loader keeps no other state.
    * Images stored larger than the dataset's side (`DatasetInfo.stored_size`: a folder cached with
      `folder_resize: crop`) give img_size crops: random-resized in training with augmentation
      (`augment.resized_crop_boxes`, in place of the padded crop), centred otherwise.
    * `augment_policy` ("none" | "autoaugment" | "randaugment", see `data.autoaugment`) adds AutoAugment
      (CIFAR-10 policy) or RandAugment (2 ops, magnitude 9/31) between the crop and the flip, drawn the same
      way. Its draws come after the crop and flip draws, so crops and flips do not depend on the policy.
    * Eval (`train=False`): identity order, no augmentation; over all ranks each sample appears exactly once.
    * `mean` / `std` (per channel, 0..1 scale) normalise the batches; None: the dataset's (`data.info`).
    * `resize_to` (an int side): each batch is resized on the device to resize_to x resize_to
      (`F.interpolate`, bilinear, antialias=True) after augmentation and before normalisation, e.g.
      CIFAR's 32x32 for a model of 224x224 images. None (or the data's own size): no resize.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        device: torch.device | str,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = True,
        augment_policy: str = "none",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize_to: int | None = None,
    ) -> None:
        if augment_policy not in POLICIES:
            raise ValueError(f"unknown augment_policy {augment_policy!r}; expected one of {POLICIES}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < world_size:
            raise ValueError(f"global batch_size {batch_size} must be >= world_size {world_size}")
        if len(data) == 0:
            raise ValueError(f"{data.info.name}: cannot build a loader over an empty split")
        self.info = data.info
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.augment = bool(augment) and self.train
        self.augment_policy = augment_policy
        self.epoch = 0
        side = (self.info.img_size,) * 2  # after the crop of images stored larger (stored_size)
        self.resize_to = None if resize_to is None or (int(resize_to),) * 2 == side else int(resize_to)
        if self.resize_to is not None and self.resize_to < 1:
            raise ValueError(f"resize_to must be a positive image side, got {resize_to}")
        self._place(data, device)
        # Normalisation: the dataset's statistics unless the run overrides them (TrainConfig.norm_mean/std).
        self.mean = tuple(float(m) for m in (self.info.mean if mean is None else mean))
        self.std = tuple(float(s) for s in (self.info.std if std is None else std))
        if len(self.mean) != self.info.in_chans or len(self.std) != self.info.in_chans:
            raise ValueError(f"{self.info.name}: mean/std need one value per channel ({self.info.in_chans}), "
                             f"got {self.mean} / {self.std}")
        self._mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.std, dtype=torch.float32, device=self.device)

    def _place(self, data: ImageData, device: torch.device | str) -> None:
        # One host->device copy for the whole run; uint8 keeps it 4x smaller than float.
        self.images = data.images.to(device, non_blocking=False).contiguous()
        self.labels = data.labels.to(self.images.device)
        self.device = self.images.device  # normalised (e.g. "cuda" -> cuda:0) for generator placement
        self._index_device = self.device

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows `idx` (on `_index_device`) as (uint8 images, labels) on the device."""
        return self.images[idx], self.labels[idx]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.info.img_size:  # stored larger and not random-cropped: the centre
            x = aug.center_crop(x, self.info.img_size)
        if self.resize_to is not None:
            x = F.interpolate(x.float(), size=(self.resize_to, self.resize_to), mode="bilinear",
                              align_corners=False, antialias=True)
        return aug.normalize(x, self._mean, self._std)

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    @property
    def images_per_epoch(self) -> int:
        """Images processed per epoch over all ranks (= split size: the partial last batch is kept)."""
        return self.num_samples

    def __len__(self) -> int:
        """Number of global batches per epoch (the same on every rank)."""
        n = math.ceil(self.num_samples / self.batch_size)
        tail = self.num_samples - (n - 1) * self.batch_size
        return n - 1 if n > 1 and tail < self.world_size else n

    def batch_bounds(self, i: int) -> tuple[int, int]:
        """[start, end) of global batch i in the epoch's order (the last one absorbs a tiny tail)."""
        start = i * self.batch_size
        end = self.num_samples if i == len(self) - 1 else start + self.batch_size
        return start, end

    def global_batch_size(self, i: int) -> int:
        start, end = self.batch_bounds(i)
        return end - start

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int | None = None) -> torch.Tensor:
        """Global sample order (CPU int64) for `epoch`: a seeded permutation when training, else the identity."""
        epoch = self.epoch if epoch is None else int(epoch)
        if not self.train:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _PERM_STREAM))
        return torch.randperm(self.num_samples, generator=gen)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's (x float32 [b, C, H, W], y int64 [b]) for global batches start_batch.. of `epoch`."""
        order = self.epoch_order(epoch).to(self._index_device)
        for i in range(start_batch, len(self)):
            start, end = self.batch_bounds(i)
            global_idx = order[start:end]
            x, y = self._fetch(self._shard(global_idx))
            if self.augment:
                x = self._augment(x, global_idx.numel(), epoch, i)
            yield self._finish(x), y

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global-batch tensor (sizes differ by at most 1 across ranks)."""
        return torch.tensor_split(t, self.world_size)[self.rank]

    def _augment(self, x: torch.Tensor, global_n: int, epoch: int, batch: int) -> torch.Tensor:
        # Draw for the whole global batch and keep this rank's rows, so ranks get independent draws and
        # the augmented epoch does not depend on world_size.
        gen = device_generator(self.device, derive_seed(self.seed, epoch, _AUG_STREAM, batch))
        side, stored = self.info.img_size, self.info.stored_side
        boxes = aug.resized_crop_boxes(global_n, stored, stored, gen) if stored != side else None
        offsets = (aug.crop_offsets(global_n, self.info.crop_padding, gen)
                   if self.info.crop_padding > 0 and boxes is None else None)
        flips = aug.flip_mask(global_n, gen) if self.info.hflip else None
        # Drawn last so that adding a policy leaves the crop and flip draws unchanged.
        plan = policy_plan(self.augment_policy, global_n, (side, side), gen)
        if boxes is not None:
            x = aug.resized_crop_at(x, self._shard(boxes), side)
        if offsets is not None:
            x = aug.crop_at(x, self.info.crop_padding, self._shard(offsets))
        if plan is not None:
            x = apply_plan(x, plan.split(self.world_size)[self.rank])
        if flips is not None:
            x = aug.hflip_where(x, self._shard(flips))
        return x


class StreamingLoader(DeviceLoader):
    """A `DeviceLoader` whose split stays in host memory (a memory-mapped cache is read on demand).
    Rows are fetched in chunks of consecutive batches (about `chunk_bytes` of uint8 pixels): this
    rank's rows of the whole chunk are gathered on the host in sorted order (sequential reads), into
    pinned memory when the device is CUDA, copied asynchronously in one transfer, and the batches are
    sliced from it on the device. Order, augmentation and resizing are the DeviceLoader's, so both
    yield the same batches."""

    chunk_bytes = 64 * 2**20

    def _place(self, data: ImageData, device: torch.device | str) -> None:
        self.images = data.images  # host (CPU) tensor, possibly memory-mapped
        self.labels = data.labels.cpu()
        self.device = torch.empty(0, device=device).device
        self._index_device = torch.device("cpu")
        self._pin = self.device.type == "cuda"

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sorted_idx, perm = torch.sort(idx)
        rows = self.images[sorted_idx]
        x = torch.empty_like(rows)
        x[perm] = rows
        y = self.labels[idx]
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order(epoch)
        row_bytes = max(1, self.images[:1].numel() * self.images.element_size())
        per_chunk = max(1, int(self.chunk_bytes // (row_bytes * self.batch_size)))
        for first in range(start_batch, len(self), per_chunk):
            ids = range(first, min(first + per_chunk, len(self)))
            shards = [self._shard(order[slice(*self.batch_bounds(i))]) for i in ids]
            xs, ys = self._fetch(torch.cat(shards))
            offset = 0
            for i, shard in zip(ids, shards):
                x, y = xs[offset:offset + shard.numel()], ys[offset:offset + shard.numel()]
                offset += shard.numel()
                if self.augment:
                    x = self._augment(x, self.global_batch_size(i), epoch, i)
                yield self._finish(x), y


def make_loader(data: ImageData, batch_size: int, device: torch.device | str, train: bool,
                stream_above_bytes: float | None = None, **kwargs) -> DeviceLoader:
    """A `DeviceLoader` when the split's uint8 images fit under `stream_above_bytes` (None: always),
    else a `StreamingLoader` over host memory."""
    size = data.images.numel() * data.images.element_size()
    cls = StreamingLoader if stream_above_bytes is not None and size > stream_above_bytes else DeviceLoader
    return cls(data, batch_size, device, train, **kwargs)
