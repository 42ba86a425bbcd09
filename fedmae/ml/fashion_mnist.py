"""Fashion-MNIST from its IDX files (gzip-compressed or not)."""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedmae.ml.datasets import ImageDataset

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Published Fashion-MNIST training-set statistics on the [0, 1] scale. Used for both splits so
# that train and test images go through the identical transform.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_NAMES = frozenset({"fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"})
_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path | str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzip-compressed or not) into a uint8 array.

    The payload is read straight into one buffer that numpy wraps without copying.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with path.open("rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC  # sniff rather than trust the suffix
    stream: BinaryIO
    stream = gzip.open(path, "rb") if compressed else path.open("rb")  # type: ignore[assignment]
    try:
        with stream:
            header = _read_exact(stream, 4)
            if len(header) < 4:
                raise ValueError(f"{path}: not an IDX file (only {len(header)} bytes long)")
            magic = int.from_bytes(header, "big")
            dtype_code, ndim = header[2], header[3]
            if header[:2] != b"\x00\x00" or dtype_code != _IDX_UBYTE or ndim == 0:
                raise ValueError(
                    f"{path}: bad IDX magic number 0x{magic:08X}; expected 0x000008NN "
                    "(two zero bytes, 0x08 = unsigned byte data, NN = number of dimensions >= 1)"
                )
            dims_raw = _read_exact(stream, 4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise ValueError(f"{path}: truncated IDX header (expected {ndim} dimension sizes)")
            shape = struct.unpack(f">{ndim}I", dims_raw)
            size = math.prod(shape)
            buffer = bytearray(size)
            got = _readinto_exact(stream, buffer)
            if got < size:
                raise ValueError(
                    f"{path}: truncated IDX file: header declares shape {shape} "
                    f"({size} bytes of data) but only {got} bytes follow"
                )
            if stream.read(1):
                raise ValueError(
                    f"{path}: IDX file has trailing data after the {size} bytes "
                    f"declared by its header (shape {shape})"
                )
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc
    return np.frombuffer(buffer, dtype=np.uint8).reshape(shape)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Read up to n bytes, looping over short reads; fewer only at end of file."""
    chunks = []
    remaining = n
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _readinto_exact(stream: BinaryIO, buffer: bytearray) -> int:
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        got = stream.readinto(view[filled:])
        if not got:
            break
        filled += got
    return filled


def _find_idx_file(root: Path, prefix: str, kind: str) -> Path | None:
    # Debian ships "train-images-idx3-ubyte.gz"; other mirrors use the uncompressed name or a
    # dot before "idx" (e.g. Kaggle's "train-images.idx3-ubyte").
    ndim = 3 if kind == "images" else 1
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for name in (stem + ".gz", stem):
            candidate = root / name
            if candidate.is_file():
                return candidate
    return None


def has_idx_files(folder: Path) -> bool:
    return any(folder.glob("*idx[13]-ubyte*"))


def load_fashion_mnist(root: Path | str = FASHION_MNIST_DIR, split: str = "train") -> ImageDataset:
    """Load a Fashion-MNIST split (``"train"`` or ``"test"``) from a folder of IDX files."""
    root = Path(root).expanduser()
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    prefix = _SPLIT_PREFIX[split]
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder not found: {root}. Install Debian's copy with "
            f"'sudo apt-get install dataset-fashion-mnist' (it goes to {FASHION_MNIST_DIR}) "
            "or pass a folder holding the IDX files "
            f"({prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz])."
        )
    images_path = _find_idx_file(root, prefix, "images")
    labels_path = _find_idx_file(root, prefix, "labels")
    if images_path is None or labels_path is None:
        missing = [
            f"{prefix}-{kind}-idx{nd}-ubyte[.gz]"
            for kind, nd, found in (("images", 3, images_path), ("labels", 1, labels_path))
            if found is None
        ]
        raise FileNotFoundError(
            f"{root} exists but lacks the Fashion-MNIST {split} split: missing "
            f"{', '.join(missing)}. Expected the four IDX files "
            "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
            "(e.g. 'sudo apt-get install dataset-fashion-mnist')."
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected a 3-D image array, got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected a 1-D label array, got shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{root}: {images.shape[0]} images but {labels.shape[0]} labels for split {split!r}"
        )
    log.debug("loaded %s: %d images of %dx%d", images_path, *images.shape)
    return ImageDataset(
        images=images,
        labels=labels.astype(np.int64),
        name=f"fashion-mnist-{'test' if prefix == 't10k' else 'train'}",
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )
