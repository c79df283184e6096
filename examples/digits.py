"""The shipped UCI handwritten digits (``examples/data/digits.npz``) with a fixed train/test split.

The split is a permutation drawn from a fixed seed; its last 20% is the held-out test set. It
does not depend on the training seed, so every run (and every rank) tests on the same samples.
"""

from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data" / "digits.npz"
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load(path=DATA):
    """Return ``(x_train, y_train, x_test, y_test)``: float32 features (N, 64) scaled to [0, 1]
    and int64 labels."""
    with np.load(path) as data:
        images, labels = data["images"], data["labels"]
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 16.0)
    y = torch.from_numpy(labels.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(y)))
    n_test = int(round(len(y) * TEST_FRACTION))
    train, test = order[:-n_test], order[-n_test:]
    return x[train], y[train], x[test], y[test]


def shard(x, y, rank, size):
    """Rank-strided shard: samples ``rank, rank + size, rank + 2*size, ...``."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a job of {size}")
    return x[rank::size], y[rank::size]
