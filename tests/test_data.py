"""The shipped digits data set and its fixed train/test split (examples/digits.py)."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import digits  # noqa: E402

# Recorded in examples/data/README.md.
SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"


def test_file_is_the_documented_data():
    assert digits.DATA.stat().st_size < 100_000
    with np.load(digits.DATA) as data:
        assert sorted(data.files) == ["images", "labels"]
        images, labels = data["images"], data["labels"]
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    assert labels.dtype == np.uint8 and labels.shape == (1797,)
    assert images.max() == 16 and labels.max() == 9
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    h = hashlib.sha256(images.tobytes())
    h.update(labels.tobytes())
    assert h.hexdigest() == SHA256
    readme = (EXAMPLES / "data" / "README.md").read_text()
    assert SHA256 in readme and "CC BY 4.0" in readme and "archive.ics.uci.edu/dataset/80" in readme


def test_split_is_fixed_and_disjoint():
    x_train, y_train, x_test, y_test = digits.load()
    assert x_train.shape == (1438, 64) and x_test.shape == (359, 64)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    again = digits.load()
    assert all(torch.equal(a, b) for a, b in zip((x_train, y_train, x_test, y_test), again))
    # Train and test are disjoint: no test sample (image and label) also appears in training.
    train_rows = {tuple(r) for r in torch.cat([x_train, y_train[:, None].float()], 1).tolist()}
    test_rows = [tuple(r) for r in torch.cat([x_test, y_test[:, None].float()], 1).tolist()]
    assert len(train_rows) == 1438 and not any(r in train_rows for r in test_rows)
    # Every class is in the test set.
    assert torch.bincount(y_test, minlength=10).min() > 20


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_shards_partition_the_training_set(size):
    index = torch.arange(1438)
    shards = [digits.shard(index, -index, r, size) for r in range(size)]
    assert all(torch.equal(xs, -ys) for xs, ys in shards)  # samples keep their labels
    assert torch.equal(torch.cat([xs for xs, _ in shards]).sort().values, index)
    assert max(len(xs) for xs, _ in shards) - min(len(xs) for xs, _ in shards) <= 1


def test_shard_rejects_bad_rank():
    x, y, _, _ = digits.load()
    with pytest.raises(ValueError, match="rank 4"):
        digits.shard(x, y, 4, 4)
