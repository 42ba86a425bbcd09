"""Loading a dataset by name or path: Fashion-MNIST, image folders, array files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedmae.ml.datasets import ImageDataset
from fedmae.ml.fashion_mnist import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_NAMES,
    has_idx_files,
    load_fashion_mnist,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})


def load_dataset(spec: str | Path, split: str = "train") -> ImageDataset:
    """Resolve a dataset spec: ``"fashion-mnist"``, a folder (IDX files or images) or an array file.

    Folders that hold ``train``/``test`` sub-folders of images are resolved to ``split``;
    image folders and array files without splits hold one split only.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if isinstance(spec, str) and spec.strip().lower() in FASHION_MNIST_NAMES:
        return load_fashion_mnist(FASHION_MNIST_DIR, split)
    path = Path(spec).expanduser()
    expected = (
        "expected 'fashion-mnist', a folder with Fashion-MNIST-style IDX files, "
        "a folder of PNG/JPEG images (optionally in class sub-folders), or a .npy/.npz file"
    )
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}; {expected}")
    if path.is_dir():
        if has_idx_files(path):
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
