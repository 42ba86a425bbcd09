"""Tests for client shards: IID and Dirichlet partitions, client splits, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmae.ml.datasets import ImageDataset
from fedmae.ml.partitions import (
    ClientData,
    client_split,
    dirichlet_partition,
    iid_partition,
    parse_partition,
)
from fedmae.ml.training import batches

# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


def _assert_disjoint_cover(shards: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(shards)
    assert joined.size == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def test_iid_partition() -> None:
    shards = iid_partition(103, 5, seed=0)
    assert len(shards) == 5
    _assert_disjoint_cover(shards, 103)
    sizes = [s.size for s in shards]
    assert max(sizes) - min(sizes) <= 1
    again = iid_partition(103, 5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = iid_partition(103, 5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))
    with pytest.raises(ValueError):
        iid_partition(3, 5, seed=0)


def _mean_max_class_share(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[s], minlength=10).max() / s.size for s in shards]))


def test_dirichlet_partition_skew_and_determinism() -> None:
    labels = np.repeat(np.arange(10), 300)
    skewed = dirichlet_partition(labels, 10, alpha=0.1, seed=0)
    _assert_disjoint_cover(skewed, labels.size)
    again = dirichlet_partition(labels, 10, alpha=0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again, strict=True))
    other = dirichlet_partition(labels, 10, alpha=0.1, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(skewed, other, strict=True))
    balanced = dirichlet_partition(labels, 10, alpha=100.0, seed=0)
    _assert_disjoint_cover(balanced, labels.size)
    skew_share = _mean_max_class_share(labels, skewed)
    flat_share = _mean_max_class_share(labels, balanced)
    assert flat_share < 0.2  # near the uniform 0.1
    assert skew_share > 0.5
    assert skew_share > 2.5 * flat_share
    assert min(s.size for s in skewed) >= 1


def test_dirichlet_partition_impossible() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match="at least 5"):
        dirichlet_partition(labels, 10, alpha=1.0, seed=0, min_size=5)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(np.repeat(np.arange(2), 30), 30, alpha=0.001, seed=0, min_size=2)
    with pytest.raises(ValueError, match="positive"):
        dirichlet_partition(labels, 2, alpha=0.0, seed=0)


def test_parse_partition() -> None:
    assert parse_partition("0/3") == (0, 3)
    assert parse_partition(" 2/3 ") == (2, 3)
    for bad in ("3/3", "-1/3", "1/0", "a/3", "1", "1/2/3", ""):
        with pytest.raises(ValueError, match="partition"):
            parse_partition(bad)


# --------------------------------------------------------------------------------------------
# Client splits
# --------------------------------------------------------------------------------------------


def _global_indices(ds: ImageDataset, part: ImageDataset) -> set[int]:
    # Synthetic images are random and 8x8, so each image's bytes identify its index.
    lookup = {img.tobytes(): i for i, img in enumerate(ds.images)}
    return {lookup[img.tobytes()] for img in part.images}


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_client_split_disjoint(alpha: float | None, synthetic) -> None:
    ds = synthetic(n=300)
    seen: set[int] = set()
    for k in range(3):
        data = client_split(ds, k, 3, dirichlet_alpha=alpha, seed=7, val_fraction=0.2)
        assert isinstance(data, ClientData)
        train, val = _global_indices(ds, data.train), _global_indices(ds, data.val)
        assert len(train) == len(data.train) and len(val) == len(data.val)
        assert not train & val
        total = len(train) + len(val)
        assert len(val) == max(1, round(0.2 * total))
        assert not (train | val) & seen
        seen |= train | val
        assert data.train.mean == ds.mean and data.val.std == ds.std
    assert len(seen) == len(ds)
    again = client_split(ds, 1, 3, dirichlet_alpha=alpha, seed=7, val_fraction=0.2)
    first = client_split(ds, 1, 3, dirichlet_alpha=alpha, seed=7, val_fraction=0.2)
    np.testing.assert_array_equal(again.val.images, first.val.images)


def test_client_split_limit_and_errors(synthetic) -> None:
    ds = synthetic(n=300)
    parts = [client_split(ds, k, 2, seed=3, limit=40) for k in range(2)]
    assert sum(len(p.train) + len(p.val) for p in parts) == 40
    assert all(len(p.val) >= 1 for p in parts)
    unlabelled = ImageDataset(ds.images, None, "u")
    with pytest.raises(ValueError, match="no labels"):
        client_split(unlabelled, 0, 2, dirichlet_alpha=0.5)
    with pytest.raises(ValueError, match="client_index"):
        client_split(ds, 2, 2)


def test_client_split_real(fmnist_train: ImageDataset) -> None:
    data = client_split(fmnist_train, 0, 4, dirichlet_alpha=0.3, seed=0, limit=2000)
    assert 0 < len(data.val) < len(data.train)
    assert data.train.image_size == 28


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def test_batches_cover_once_per_epoch() -> None:
    x = torch.arange(23).float().unsqueeze(1)
    gen = torch.Generator().manual_seed(0)
    epoch1 = list(batches(x, 5, shuffle=True, generator=gen))
    assert [b.shape[0] for b in epoch1] == [5, 5, 5, 5, 3]
    values = torch.cat(epoch1).squeeze(1)
    assert sorted(values.tolist()) == list(range(23))
    assert values.tolist() != list(range(23))  # actually shuffled
    epoch2 = torch.cat(list(batches(x, 5, shuffle=True, generator=gen))).squeeze(1)
    assert sorted(epoch2.tolist()) == list(range(23)) and not torch.equal(values, epoch2)
    ordered = torch.cat(list(batches(x, 4, shuffle=False))).squeeze(1)
    assert ordered.tolist() == list(range(23))
    dropped = list(batches(x, 5, shuffle=False, drop_last=True))
    assert [b.shape[0] for b in dropped] == [5, 5, 5, 5]
    with pytest.raises(ValueError):
        batches(x, 0, shuffle=False)
