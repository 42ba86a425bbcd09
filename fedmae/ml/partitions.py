"""Federated partitioning: each client's shard of a dataset (IID or Dirichlet) and its
train/validation split.

Partitioning is a pure function of ``(seed, num_clients, ...)`` so that every client
process, started independently, derives the same disjoint shards without talking to
the others.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from fedmae.ml.datasets import ImageDataset

log = logging.getLogger(__name__)

_DIRICHLET_MAX_ATTEMPTS = 200


def iid_partition(num_items: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(num_items)`` and cut it into ``num_clients`` near-equal sorted shards."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_items < num_clients:
        raise ValueError(
            f"cannot give each of {num_clients} clients at least one of {num_items} items"
        )
    perm = np.random.default_rng(seed).permutation(num_items)
    return [np.sort(shard).astype(np.int64) for shard in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed non-IID shards (Hsu et al. 2019): per class, proportions ~ Dir(alpha).

    Smaller ``alpha`` means more skew. Draws are repeated with the same generator until every
    client holds at least ``min_size`` items, so the result depends only on the arguments.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"dirichlet alpha must be a positive number, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_clients * min_size > labels.size:
        raise ValueError(
            f"{labels.size} items cannot give {num_clients} clients at least {min_size} each"
        )
    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_clients, float(alpha))
    smallest = 0
    for _ in range(_DIRICHLET_MAX_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in class_indices:
            idx = rng.permutation(idx)
            proportions = rng.dirichlet(concentration)
            cuts = (np.cumsum(proportions)[:-1] * idx.size).astype(np.int64)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
        shards = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        smallest = min(s.size for s in shards)
        if smallest >= min_size:
            return shards
    raise ValueError(
        f"dirichlet alpha={alpha} is too small for {num_clients} clients over {labels.size} items: "
        f"after {_DIRICHLET_MAX_ATTEMPTS} draws some client still had fewer than {min_size} "
        f"items (last draw: {smallest}); use a larger alpha, fewer clients or more data"
    )


def parse_partition(text: str) -> tuple[int, int]:
    """Parse ``"K/N"`` (client K of N, 0-based) into ``(K, N)``."""
    parts = str(text).strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(
            f"invalid partition {text!r}: expected 'K/N' (client K of N, 0-based), e.g. '0/3'"
        ) from None
    if count < 1:
        raise ValueError(f"invalid partition {text!r}: N must be >= 1")
    if not 0 <= index < count:
        raise ValueError(f"invalid partition {text!r}: K must satisfy 0 <= K < N (K is 0-based)")
    return index, count


@dataclass
class ClientData:
    """One client's local data: its training shard and a held-out validation split."""

    train: ImageDataset
    val: ImageDataset


def client_split(
    dataset: ImageDataset,
    client_index: int,
    num_clients: int,
    *,
    dirichlet_alpha: float | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    limit: int | None = None,
) -> ClientData:
    """This client's shard of ``dataset`` (IID or Dirichlet), split into train and validation.

    ``limit`` first restricts the pool to a seeded random subset, e.g. for quick demos. All
    randomness derives from ``seed`` so independent client processes agree on the shards.
    """
    if not 0 <= client_index < num_clients:
        raise ValueError(
            f"client_index must satisfy 0 <= index < num_clients, got {client_index}/{num_clients}"
        )
    shards = shard_indices(
        dataset, num_clients, dirichlet_alpha=dirichlet_alpha, seed=seed, limit=limit
    )
    train_idx, val_idx = train_val_indices(
        dataset, shards[client_index], client_index, num_clients, seed=seed,
        val_fraction=val_fraction,
    )  # fmt: skip
    base = f"{dataset.name}/client{client_index}of{num_clients}"
    scheme = "iid" if dirichlet_alpha is None else f"dirichlet(alpha={dirichlet_alpha})"
    shard = shards[client_index]
    if dataset.labels is not None:
        hist = np.bincount(dataset.labels[shard], minlength=dataset.num_classes or 0)
        histogram = " ".join(f"{c}:{n}" for c, n in enumerate(hist.tolist()))
    else:
        histogram = "unlabelled"
    log.info(
        "%s: %s shard of %d items (train %d, val %d); classes %s",
        base, scheme, shard.size, train_idx.size, val_idx.size, histogram,
    )  # fmt: skip
    return ClientData(
        train=dataset.subset(train_idx, name=f"{base}/train"),
        val=dataset.subset(val_idx, name=f"{base}/val"),
    )


def shard_indices(
    dataset: ImageDataset,
    num_clients: int,
    *,
    dirichlet_alpha: float | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> list[np.ndarray]:
    """Every client's shard as indices into ``dataset`` (what ``client_split`` cuts one
    client's from): a simulation computes them once for all its sites."""
    pool = np.arange(len(dataset), dtype=np.int64)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if limit < len(dataset):
            # Separate streams (seed, purpose) so the subset draw doesn't mirror the partition's.
            rng = np.random.default_rng((seed, 1))
            pool = np.sort(rng.choice(len(dataset), size=limit, replace=False)).astype(np.int64)
    if dirichlet_alpha is None:
        return [pool[s] for s in iid_partition(pool.size, num_clients, seed)]
    if dataset.labels is None:
        raise ValueError(
            f"{dataset.name} has no labels, so a Dirichlet (label-skewed) partition is "
            "impossible; use the IID partition (no alpha) or a labelled dataset"
        )
    # Two items per client so each can hold out one for validation.
    shards = dirichlet_partition(
        dataset.labels[pool], num_clients, dirichlet_alpha, seed, min_size=2
    )
    return [pool[s] for s in shards]


def train_val_indices(
    dataset: ImageDataset,
    shard: np.ndarray,
    client_index: int,
    num_clients: int,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """One client's shard split into (train, validation) indices, seeded per client."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard.size < 2:
        raise ValueError(
            f"client {client_index}/{num_clients} got {shard.size} item(s); need at least 2 "
            "for a train/validation split (use fewer clients or more data)"
        )
    rng = np.random.default_rng((seed, 2, client_index))
    order = rng.permutation(shard)
    num_val = min(shard.size - 1, max(1, round(val_fraction * shard.size)))
    val_idx, train_idx = np.sort(order[:num_val]), np.sort(order[num_val:])
    return train_idx, val_idx
