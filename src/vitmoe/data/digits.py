"""scikit-learn's 8x8 handwritten digits: always available offline, with a fixed stratified train/test split."""

from __future__ import annotations

import numpy as np
import torch

from .info import DATASETS, ImageData

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Deterministic stratified split: within each class a seeded shuffle puts round(fraction * n_c) in test.

    Uses a CPU torch.Generator rather than sklearn.model_selection so the split does not depend on the
    scikit-learn version. Returned indices are sorted (original order preserved inside each split).
    """
    gen = torch.Generator().manual_seed(seed)
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        perm = torch.randperm(len(members), generator=gen).numpy()
        test.append(members[perm[: int(round(test_fraction * len(members)))]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return {"train": train_idx, "test": test_idx}


def load_digits(split: str) -> ImageData:
    """The digits split as uint8 [N, 1, 8, 8] (0..16 rescaled to 0..255) with int64 labels."""
    from sklearn.datasets import load_digits as sk_load_digits  # lazy: sklearn import is slow-ish

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    idx = split_indices(labels)[split]
    return ImageData(
        torch.from_numpy(np.ascontiguousarray(images[idx])).unsqueeze(1),
        torch.from_numpy(labels[idx]),
        DATASETS["digits"],
    )
