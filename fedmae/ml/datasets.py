"""The dataset type: in-memory images with optional labels and their normalisation.

Everything is in memory: the supported datasets (Fashion-MNIST, small image folders,
``.npy``/``.npz`` arrays) fit comfortably in RAM, so a plain tensor plus a tiny batch
iterator is simpler and faster than a ``DataLoader`` with worker processes. Loading
lives in ``fedmae.ml.loaders`` (and ``fedmae.ml.fashion_mnist``), client shards in
``fedmae.ml.partitions``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class ImageDataset:
    """In-memory images (uint8, channels-last) with optional integer labels.

    ``mean``/``std`` are the normalisation constants on the [0, 1] scale; when not given they
    are computed from the images. Subsets inherit them so that every client of a federation
    normalises identically.
    """

    images: np.ndarray  # uint8 [N, H, W] or [N, H, W, C]
    labels: np.ndarray | None  # int64 [N]
    name: str
    mean: float | None = None  # always a float after __post_init__
    std: float | None = None  # always a float after __post_init__
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"{self.name}: images must be a uint8 numpy array, got {got}")
        if images.ndim not in (3, 4):
            raise ValueError(
                f"{self.name}: images must have shape [N, H, W] or [N, H, W, C], got {images.shape}"
            )
        if images.ndim == 4 and not 1 <= images.shape[3] <= 4:
            raise ValueError(
                f"{self.name}: images have {images.shape[3]} channels in the last axis "
                f"(shape {images.shape}); expected channels-last [N, H, W, C] with C in 1..4 "
                "(transpose channels-first arrays first)"
            )
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(
                    f"{self.name}: labels must have shape [{images.shape[0]}], got {labels.shape}"
                )
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"{self.name}: labels must be integers, got {labels.dtype}")
            self.labels = labels.astype(np.int64, copy=False)
        if self.mean is None or self.std is None:
            mean, std = _pixel_stats(images, self.name)
            self.mean = mean if self.mean is None else self.mean
            self.std = std if self.std is None else self.std
        self.mean = float(self.mean)
        self.std = float(self.std)
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"{self.name}: std must be a positive number, got {self.std}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    @property
    def image_size(self) -> int:
        """Image height; the model additionally needs square images (checked in to_tensor)."""
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int | None:
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is None or self.labels.size == 0:
            return None
        return int(self.labels.max()) + 1

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> ImageDataset:
        """A copy restricted to ``indices``, keeping this dataset's normalisation constants."""
        idx = _as_index_array(indices, len(self), self.name)
        return ImageDataset(
            images=self.images[idx],
            labels=None if self.labels is None else self.labels[idx],
            name=self.name if name is None else name,
            mean=self.mean,
            std=self.std,
            class_names=self.class_names,
        )

    def to_tensor(self, indices: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Float32 ``[N, C, H, W]``: scaled to [0, 1], then ``(x - mean) / std``."""
        height, width = self.images.shape[1], self.images.shape[2]
        if height != width:
            raise ValueError(
                f"{self.name}: the model needs square images but these are {height}x{width} "
                "(H x W); resize them, e.g. load_image_folder(path, size=N)"
            )
        images = self.images
        if indices is not None:
            images = images[_as_index_array(indices, len(self), self.name)]
        if not images.flags.writeable:
            # torch.from_numpy warns on read-only buffers; one copy of uint8 data is cheap.
            images = images.copy()
        x = torch.from_numpy(images)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = x.to(torch.float32).contiguous()
        assert self.mean is not None and self.std is not None  # set in __post_init__
        # Fused form of ((x / 255) - mean) / std, done in place to avoid float temporaries.
        return x.mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)


def _pixel_stats(images: np.ndarray, name: str) -> tuple[float, float]:
    """Mean/std of all pixels on the [0, 1] scale, exact and O(256) memory via a histogram."""
    if images.size == 0:
        raise ValueError(f"{name}: cannot compute normalisation statistics of an empty dataset")
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    var = float((counts * (values - mean) ** 2).sum() / total)
    std = math.sqrt(var)
    if std == 0.0:
        # A constant dataset: any positive std keeps normalisation finite.
        log.warning("%s: all pixels are identical; using std=1.0 for normalisation", name)
        std = 1.0
    return mean, std


def _as_index_array(indices: Sequence[int] | np.ndarray, length: int, name: str) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(
            f"{name}: indices must be a 1-D integer array, got {idx.dtype} {idx.shape}"
        )
    if idx.min() < -length or idx.max() >= length:
        raise IndexError(f"{name}: index out of range for a dataset of {length} items")
    return idx.astype(np.int64, copy=False)
