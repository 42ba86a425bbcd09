"""Tests for the datasets: IDX parsing, Fashion-MNIST, image folders and arrays, ImageDataset."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmae.ml.datasets import ImageDataset
from fedmae.ml.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist, read_idx
from fedmae.ml.loaders import load_dataset, load_image_folder

# The real data is required: `make test` installs Debian's dataset-fashion-mnist.
# Fixtures ``fmnist_train`` and ``synthetic`` are in conftest.py (shared with test_partitions).


def _write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


# --------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST
# --------------------------------------------------------------------------------------------


def test_read_idx_real_fashion_mnist_train() -> None:
    images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (60000,)
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels, minlength=10).tolist() == [6000] * 10


def test_load_fashion_mnist_splits(fmnist_train: ImageDataset) -> None:
    assert len(fmnist_train) == 60000
    assert fmnist_train.labels is not None and fmnist_train.labels.dtype == np.int64
    assert fmnist_train.num_channels == 1 and fmnist_train.image_size == 28
    assert fmnist_train.mean == pytest.approx(0.2860)
    assert fmnist_train.std == pytest.approx(0.3530)
    test = load_fashion_mnist(split="test")
    assert test.images.shape == (10000, 28, 28)
    assert test.labels is not None
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    # The published constants really are this data's statistics.
    pixels = fmnist_train.images[:10000].astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(0.2860, abs=0.005)
    assert pixels.std() == pytest.approx(0.3530, abs=0.005)


def test_load_dataset_spec_fashion_mnist() -> None:
    assert len(load_dataset("fashion-mnist", split="test")) == 10000
    assert len(load_dataset(str(FASHION_MNIST_DIR), split="test")) == 10000


def test_read_idx_roundtrip_plain_and_gz(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (False, True):
        path = tmp_path / f"a-idx3-ubyte{'.gz' if compress else ''}"
        _write_idx(path, array, compress=compress)
        out = read_idx(path)
        np.testing.assert_array_equal(out, array)
        assert out.dtype == np.uint8


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-magic"
    # 0x0D = float32 data type: not supported, must be rejected.
    path.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0D, 1, 3) + b"\x00" * 12)
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"ab")
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t-idx3-ubyte"
    _write_idx(path, np.zeros((4, 5, 5), np.uint8), compress=False)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    path.write_bytes(data[:10])  # cut inside the dimension sizes
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    path.write_bytes(data + b"extra")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(path)
    gz = tmp_path / "t-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(data)[:-20])  # truncated gzip stream
    with pytest.raises(ValueError):
        read_idx(gz)


def test_load_fashion_mnist_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)  # exists, but empty


def test_load_fashion_mnist_uncompressed_names(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress=False)
    ds = load_dataset(str(tmp_path), split="test")
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels is not None and ds.labels.tolist() == list(range(6))


def test_load_dataset_unknown(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="expected 'fashion-mnist'"):
        load_dataset(str(tmp_path / "missing"))
    other = tmp_path / "data.csv"
    other.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_dataset(str(other))


# --------------------------------------------------------------------------------------------
# Image folders and arrays
# --------------------------------------------------------------------------------------------


def test_load_image_folder_with_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for cls, count in (("boot", 3), ("shirt", 2)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(tmp_path / cls / f"{i}.png")
    ds = load_image_folder(tmp_path)
    assert ds.images.shape == (5, 16, 16) and ds.images.dtype == np.uint8
    assert ds.labels is not None and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.class_names == ("boot", "shirt")
    rgb = load_image_folder(tmp_path, mode="RGB", size=8)
    assert rgb.images.shape == (5, 8, 8, 3) and rgb.num_channels == 3
    assert load_dataset(str(tmp_path)).labels is not None


def test_load_image_folder_flat_and_size_mismatch(tmp_path: Path) -> None:
    for i, shape in enumerate([(10, 10), (10, 10), (12, 10)]):
        Image.fromarray(np.full(shape, i * 40, np.uint8), "L").save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="size=N"):
        load_image_folder(tmp_path)
    ds = load_image_folder(tmp_path, size=10)
    assert ds.images.shape == (3, 10, 10) and ds.labels is None
    pixels = np.arange(100, dtype=np.uint8).reshape(10, 10)
    Image.fromarray(pixels, "L").save(tmp_path / "exact.png")
    reloaded = load_image_folder(tmp_path, size=10)
    np.testing.assert_array_equal(reloaded.images[-1], pixels)  # PNG is lossless


def test_load_image_folder_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no PNG/JPEG images"):
        load_image_folder(tmp_path)


def test_load_npy_uint8_and_float(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, (7, 12, 12), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", images)
    ds = load_dataset(str(tmp_path / "u8.npy"))
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels is None
    np.save(tmp_path / "f.npy", images.astype(np.float32) / 255)
    np.testing.assert_array_equal(load_image_folder(tmp_path / "f.npy").images, images)
    np.save(tmp_path / "bad.npy", images.astype(np.float32))  # 0..255 floats: out of range
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image_folder(tmp_path / "bad.npy")


def test_load_npz_keys(tmp_path: Path) -> None:
    images = np.random.default_rng(3).integers(0, 256, (6, 9, 9, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2, 0, 1])
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    ds = load_image_folder(tmp_path / "a.npz")
    np.testing.assert_array_equal(ds.images, images)
    assert ds.labels is not None and ds.labels.tolist() == labels.tolist()
    assert ds.num_channels == 3
    np.savez(tmp_path / "b.npz", x=images, y=labels)
    assert load_dataset(str(tmp_path / "b.npz")).labels is not None
    np.savez(tmp_path / "c.npz", x=images)
    assert load_dataset(str(tmp_path / "c.npz")).labels is None
    np.savez(tmp_path / "d.npz", pixels=images)
    with pytest.raises(ValueError, match="'images'"):
        load_image_folder(tmp_path / "d.npz")


# --------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------


def test_to_tensor_shape_dtype_normalisation(synthetic) -> None:
    ds = synthetic(n=50, size=8)
    x = ds.to_tensor()
    assert x.shape == (50, 1, 8, 8) and x.dtype == torch.float32
    # Statistics computed from the images themselves: normalised data is ~N(0, 1).
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    expected = (ds.images[3].astype(np.float32) / 255 - ds.mean) / ds.std
    np.testing.assert_allclose(ds.to_tensor([3])[0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)

    rgb = ImageDataset(np.zeros((2, 4, 4, 3), np.uint8), None, "rgb", mean=0.5, std=0.25)
    assert rgb.to_tensor().shape == (2, 3, 4, 4)
    assert torch.allclose(rgb.to_tensor(), torch.full((2, 3, 4, 4), -2.0))

    rect = ImageDataset(np.zeros((2, 4, 6), np.uint8), None, "rect", mean=0.0, std=1.0)
    assert rect.image_size == 4
    with pytest.raises(ValueError, match="square"):
        rect.to_tensor()


def test_to_tensor_fashion_mnist_constants(fmnist_train: ImageDataset) -> None:
    x = fmnist_train.to_tensor(np.arange(2000))
    assert x.shape == (2000, 1, 28, 28)
    assert x[0, 0, 0, 0].item() == pytest.approx((0.0 - 0.2860) / 0.3530, abs=1e-5)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1.0) < 0.05


def test_subset_keeps_normalisation(synthetic) -> None:
    ds = synthetic()
    sub = ds.subset([0, 5, 7])
    assert len(sub) == 3 and (sub.mean, sub.std) == (ds.mean, ds.std)
    assert sub.labels is not None and sub.labels.tolist() == [0, 5, 7]


def test_image_dataset_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(np.zeros((2, 4, 4), np.float32), None, "f")
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(np.zeros((2, 4, 4), np.uint8), np.array([1, 2, 3]), "l")
