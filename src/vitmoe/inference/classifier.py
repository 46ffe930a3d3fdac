"""A trained model as an image classifier: the model, how its inputs are made and what its
outputs are called, and its top-k predictions for image files.

    clf = vitmoe.load_classifier("runs/mine")          # any model source (inference.sources)
    for p in clf.predict(["new_images/"], top_k=3):    # files, folders, glob patterns
        print(p.image, p.label, p.prob)

Prediction runs in float32 in eval mode, in batches: each file is decoded and resized on the
CPU, the batch goes to the model's device, is normalised there (the steps of
vitmoe.data.preprocess) and classified; probabilities are the softmax of the logits.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..data.preprocess import Preprocessing
from ..models import VisionTransformer
from .images import ImageInputError, find_images
from .sources import ModelSource, class_names, load_source_model, preprocessing_of_source, resolve_source


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    image: str
    classes: tuple[str, ...]
    indices: tuple[int, ...]
    probs: tuple[float, ...]

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.classes[0]

    @property
    def prob(self) -> float:
        return self.probs[0]

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "top": [{"class": c, "index": i, "probability": p}
                                             for c, i, p in zip(self.classes, self.indices, self.probs)]}


def has_random_routes(model: VisionTransformer) -> bool:
    """Whether some MoE layer of the model routes at random (an eval mode applies to it)."""
    return any(getattr(getattr(m, "router", None), "random_routes", False) for _, m in model.moe_modules())


class ImageClassifier:
    """A model with what prediction needs.

    Args:
        model: the VisionTransformer (put in eval mode here).
        preprocessing: how an image file becomes its input (vitmoe.data.Preprocessing).
        classes: the name of each output; None: "0", "1", ...
        source: where it was loaded from (a resolved ModelSource), for messages.
    """

    def __init__(self, model: VisionTransformer, preprocessing: Preprocessing, classes: Sequence[str] | None = None,
                 source: ModelSource | None = None):
        cfg = model.config
        if (preprocessing.channels, preprocessing.input_size) != (cfg.in_chans, cfg.img_size):
            raise ValueError(f"preprocessing makes {preprocessing.channels}-channel {preprocessing.input_size}-pixel "
                             f"inputs; the model takes {cfg.in_chans}-channel {cfg.img_size}-pixel ones")
        names = [str(i) for i in range(cfg.num_classes)] if classes is None else [str(c) for c in classes]
        if len(names) != cfg.num_classes:
            raise ValueError(f"{len(names)} class names for a model of {cfg.num_classes} classes")
        self.model = model.eval()
        self.preprocessing = preprocessing
        self.classes = names
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def mode(self) -> str | None:
        """The eval mode of its randomly routed layers (None when it has none)."""
        return self.model.config.moe.eval_mode if has_random_routes(self.model) else None

    @torch.no_grad()
    def logits(self, images: torch.Tensor | Sequence[str | os.PathLike]) -> torch.Tensor:
        """float32 logits [B, classes] of image files, or of a uint8 batch [B, C, size, size]
        already decoded (Preprocessing.read)."""
        x = images if isinstance(images, torch.Tensor) else torch.stack([self.preprocessing.read(p) for p in images])
        return self.model(self.preprocessing(x.to(self.device))).float()

    def predict(self, images: str | os.PathLike | Iterable[str | os.PathLike], top_k: int = 5, batch_size: int = 64,
                progress: bool | None = False, skip_bad_images: bool = False,
                on_skip: Callable[[Path, str], None] | None = None) -> list[Prediction]:
        """The top-k classes of every image the arguments name (files, folders, glob patterns;
        see find_images), in that order.

        Args:
            top_k: classes per image (at most the class count).
            batch_size: images per forward.
            progress: a progress bar on stderr (None: only on a terminal).
            skip_bad_images: leave out files Pillow cannot read (each goes to `on_skip`) instead
                of raising ImageInputError naming the first.
        """
        if isinstance(images, (str, os.PathLike)):
            images = [images]
        if not (isinstance(top_k, int) and top_k >= 1) or not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"top_k {top_k!r} and batch_size {batch_size!r} must be positive integers")
        from tqdm import tqdm

        paths = find_images(images)
        k = min(top_k, len(self.classes))
        out: list[Prediction] = []
        bar = tqdm(total=len(paths), unit="img", desc="predicting", file=sys.stderr, leave=False,
                   disable=None if progress is None else not progress)
        with bar:
            for start in range(0, len(paths), batch_size):
                chunk, decoded = [], []
                for p in paths[start:start + batch_size]:
                    try:
                        decoded.append(self.preprocessing.read(p))
                        chunk.append(p)
                    except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken file
                        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
                        if not skip_bad_images:
                            raise ImageInputError(f"cannot read image {p}: {why} (fix or remove it, or pass "
                                                  "--skip-bad-images)") from None
                        if on_skip is not None:
                            on_skip(p, why)
                if chunk:
                    probs = torch.softmax(self.logits(torch.stack(decoded)), dim=-1).cpu()
                    top = probs.topk(k, dim=-1)
                    for p, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
                        out.append(Prediction(str(p), tuple(self.classes[i] for i in indices), tuple(indices),
                                              tuple(values)))
                bar.update(len(paths[start:start + batch_size]))
        return out


def load_classifier(source: str | os.PathLike, checkpoint: str = "latest", ema: bool = False, mode: str | None = None,
                    device: str | torch.device = "cpu", seed: int = 0, preprocessing: Preprocessing | None = None,
                    log: Callable[[str], None] | None = None) -> ImageClassifier:
    """The classifier of any model source (a run directory, checkpoint, pointer, model file or
    transformers directory; see vitmoe.inference.sources).

    Args:
        checkpoint: a run directory's "latest" or "best" checkpoint.
        ema: its EMA weights (runs trained with --ema-decay).
        mode: eval mode of randomly routed MoE layers ("merged", "random", "ensemble"; default
            the model's). "random" draws routes from a generator seeded with `seed`.
        device: "cpu", "cuda", "auto" (CUDA when available) or a torch.device.
        preprocessing: overrides what the source records (needed only for a model file that
            records neither its preprocessing nor its dataset).
        log: receives notes (a skipped checkpoint that does not verify, an older file's fallback).
    """
    from ..moe import EVAL_MODES, seed_random_routers
    from ..training import resolve_device

    src = resolve_source(source, checkpoint, ema, log)
    dev = resolve_device(device) if isinstance(device, str) else device
    model = load_source_model(src, dev)
    if mode is not None:
        if mode not in EVAL_MODES:
            raise ValueError(f"mode {mode!r} must be one of {', '.join(EVAL_MODES)}")
        if not has_random_routes(model):
            raise ValueError(f"mode {mode!r}: {src.path} has no randomly routed MoE layers (eval modes apply to "
                             f"router random only)")
        model.set_eval_mode(mode)
    seed_random_routers(model, seed, dev)
    pre = preprocessing if preprocessing is not None else preprocessing_of_source(src, model, log)
    return ImageClassifier(model, pre, class_names(src, model.config.num_classes), src)


def predict(source: str | os.PathLike, images: str | os.PathLike | Iterable[str | os.PathLike], top_k: int = 5,
            **options: Any) -> list[Prediction]:
    """`load_classifier(source, **options).predict(images, top_k)` in one call (options of either:
    checkpoint, ema, mode, device, seed; batch_size, progress, skip_bad_images)."""
    predict_keys = {"batch_size", "progress", "skip_bad_images", "on_skip"}
    clf = load_classifier(source, **{k: v for k, v in options.items() if k not in predict_keys})
    return clf.predict(images, top_k=top_k, **{k: v for k, v in options.items() if k in predict_keys})
