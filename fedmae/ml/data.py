"""Datasets, federated partitioning and batching for fedmae.

Everything here is in memory: the supported datasets (Fashion-MNIST, small image folders,
``.npy``/``.npz`` arrays) fit comfortably in RAM, so a plain tensor plus a tiny batch iterator
is simpler and faster than a ``DataLoader`` with worker processes.

Partitioning is a pure function of ``(seed, num_clients, ...)`` so that every client process,
started independently, derives the same disjoint shards without talking to the others.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Published Fashion-MNIST training-set statistics on the [0, 1] scale. Used for both splits so
# that train and test images go through the identical transform.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})
_FASHION_MNIST_ALIASES = frozenset({"fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"})
_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_DIRICHLET_MAX_ATTEMPTS = 200


# --------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# --------------------------------------------------------------------------------------------


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


def _has_idx_files(folder: Path) -> bool:
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


# --------------------------------------------------------------------------------------------
# Image folders and array files
# --------------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def load_image_folder(
    path: Path | str, *, mode: str = "L", size: int | None = None
) -> ImageDataset:
    """Load a folder of PNG/JPEG images, or a ``.npy``/``.npz`` array file.

    Images sit either directly in ``path`` (no labels) or in class sub-folders whose sorted
    names define the labels. With ``size`` every image is resized to ``size x size``;
    otherwise they must all share one size already. ``mode``/``size`` do not apply to arrays.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() in ARRAY_SUFFIXES:
        return _load_array_file(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is neither a folder of PNG/JPEG images nor a .npy/.npz file"
        )
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' (grayscale) or 'RGB', got {mode!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")

    top_level = sorted(p for p in path.iterdir() if _is_image(p))
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_files = {d.name: sorted(p for p in d.rglob("*") if _is_image(p)) for d in class_dirs}
    class_files = {name: files for name, files in class_files.items() if files}
    if top_level and class_files:
        raise ValueError(
            f"{path} mixes images at the top level with class sub-folders "
            f"({', '.join(class_files)}); put every image in a class folder, or none of them"
        )
    if not top_level and not class_files:
        raise ValueError(
            f"no PNG/JPEG images found in {path}; expected image files directly in it "
            "(unlabelled) or in class sub-folders such as {path}/cat/*.png (labelled)"
        )

    files: list[Path]
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None
    if class_files:
        class_names = tuple(class_files)
        files = [f for name in class_names for f in class_files[name]]
        labels = np.repeat(
            np.arange(len(class_names), dtype=np.int64),
            [len(class_files[name]) for name in class_names],
        )
    else:
        class_names, files, labels = None, top_level, None

    images = _stack_same([_read_image(f, mode, size) for f in files], files)
    log.info(
        "loaded %d images of shape %s from %s (%s)",
        len(files),
        images.shape[1:],
        path,
        f"{len(class_names)} classes" if class_names else "unlabelled",
    )
    return ImageDataset(images=images, labels=labels, name=path.name, class_names=class_names)


def _read_image(path: Path, mode: str, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def _stack_same(arrays: list[np.ndarray], files: list[Path]) -> np.ndarray:
    expected = arrays[0].shape
    for arr, file in zip(arrays, files, strict=True):
        if arr.shape != expected:
            raise ValueError(
                f"images differ in size: {files[0]} is {expected[1]}x{expected[0]} (WxH) but "
                f"{file} is {arr.shape[1]}x{arr.shape[0]}; pass size=N to resize all to NxN"
            )
    return np.stack(arrays)


def _to_uint8_images(array: np.ndarray, source: Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
            raise ValueError(
                f"{source}: float images must lie in [0, 1] (got range "
                f"[{np.nanmin(array):.4g}, {np.nanmax(array):.4g}]); store uint8 0..255 instead"
            )
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"{source}: integer images must lie in 0..255")
        return array.astype(np.uint8)
    raise ValueError(f"{source}: images must be uint8 or float in [0, 1], got {array.dtype}")


def _to_labels(array: np.ndarray, source: Path) -> tuple[np.ndarray, tuple[str, ...] | None]:
    if array.dtype.kind in "US":
        # String class names: map to indices in sorted order, like class sub-folders.
        names, inverse = np.unique(array, return_inverse=True)
        return inverse.astype(np.int64), tuple(str(n) for n in names)
    if np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)):
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers or strings, got {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{source}: labels must be non-negative")
    return array.astype(np.int64), None


def _load_array_file(path: Path) -> ImageDataset:
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None
    try:
        if path.suffix.lower() == ".npy":
            images = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                keys = set(archive.files)
                if "images" in keys:
                    images_key, labels_key = "images", "labels"
                elif "x" in keys:
                    images_key, labels_key = "x", "y"
                else:
                    raise ValueError(
                        f"{path}: expected arrays named 'images' (and optional 'labels') or "
                        f"'x' (and optional 'y'); found {sorted(keys)}"
                    )
                images = archive[images_key]
                if labels_key in keys:
                    labels, class_names = _to_labels(archive[labels_key], path)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ValueError(
                f"{path}: contains Python objects; only plain numeric arrays are accepted"
            ) from exc
        raise
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{path}: expected images of shape [N, H, W] or [N, H, W, C], got {images.shape}"
        )
    images = _to_uint8_images(images, path)
    log.info("loaded %s: images %s%s", path, images.shape, "" if labels is None else " + labels")
    return ImageDataset(images=images, labels=labels, name=path.stem, class_names=class_names)


def load_dataset(spec: str | Path, split: str = "train") -> ImageDataset:
    """Resolve a dataset spec: ``"fashion-mnist"``, a folder (IDX files or images) or an array file.

    Folders that hold ``train``/``test`` sub-folders of images are resolved to ``split``;
    image folders and array files without splits hold one split only.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if isinstance(spec, str) and spec.strip().lower() in _FASHION_MNIST_ALIASES:
        return load_fashion_mnist(FASHION_MNIST_DIR, split)
    path = Path(spec).expanduser()
    expected = (
        "expected 'fashion-mnist', a folder with Fashion-MNIST-style IDX files, "
        "a folder of PNG/JPEG images (optionally in class sub-folders), or a .npy/.npz file"
    )
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}; {expected}")
    if path.is_dir():
        if _has_idx_files(path):
            return load_fashion_mnist(path, split)
        if (path / "train").is_dir() and (path / split).is_dir():
            return load_image_folder(path / split)
        _warn_single_split(path, split)
        return load_image_folder(path)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        _warn_single_split(path, split)
        return load_image_folder(path)
    raise ValueError(f"unsupported dataset {path}; {expected}")


def _warn_single_split(path: Path, split: str) -> None:
    if split != "train":
        log.warning("%s holds a single split; using all of it for split %r", path, split)


# --------------------------------------------------------------------------------------------
# Federated partitioning
# --------------------------------------------------------------------------------------------


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
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    pool = np.arange(len(dataset), dtype=np.int64)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if limit < len(dataset):
            # Separate streams (seed, purpose) so the subset draw doesn't mirror the partition's.
            rng = np.random.default_rng((seed, 1))
            pool = np.sort(rng.choice(len(dataset), size=limit, replace=False)).astype(np.int64)
    if dirichlet_alpha is None:
        shards = iid_partition(pool.size, num_clients, seed)
        scheme = "iid"
    else:
        if dataset.labels is None:
            raise ValueError(
                f"{dataset.name} has no labels, so a Dirichlet (label-skewed) partition is "
                "impossible; use the IID partition (no alpha) or a labelled dataset"
            )
        # Two items per client so each can hold out one for validation.
        shards = dirichlet_partition(
            dataset.labels[pool], num_clients, dirichlet_alpha, seed, min_size=2
        )
        scheme = f"dirichlet(alpha={dirichlet_alpha})"
    shard = pool[shards[client_index]]
    if shard.size < 2:
        raise ValueError(
            f"client {client_index}/{num_clients} got {shard.size} item(s); need at least 2 "
            "for a train/validation split (use fewer clients or more data)"
        )

    rng = np.random.default_rng((seed, 2, client_index))
    order = rng.permutation(shard)
    num_val = min(shard.size - 1, max(1, round(val_fraction * shard.size)))
    val_idx, train_idx = np.sort(order[:num_val]), np.sort(order[num_val:])

    base = f"{dataset.name}/client{client_index}of{num_clients}"
    if dataset.labels is not None:
        hist = np.bincount(dataset.labels[shard], minlength=dataset.num_classes or 0)
        histogram = " ".join(f"{c}:{n}" for c, n in enumerate(hist.tolist()))
    else:
        histogram = "unlabelled"
    log.info(
        "%s: %s shard of %d items (train %d, val %d); classes %s",
        base,
        scheme,
        shard.size,
        train_idx.size,
        val_idx.size,
        histogram,
    )
    return ClientData(
        train=dataset.subset(train_idx, name=f"{base}/train"),
        val=dataset.subset(val_idx, name=f"{base}/val"),
    )


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def batches(
    images: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield mini-batches along dim 0 of an in-memory tensor (one pass = one epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Validate eagerly; the generator below only starts running on the first next().
    return _iter_batches(images, batch_size, shuffle, generator, drop_last)


def _iter_batches(
    images: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> Iterator[torch.Tensor]:
    n = images.shape[0]
    stop = n - n % batch_size if drop_last else n
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        yield images[start:end] if order is None else images[order[start:end]]
