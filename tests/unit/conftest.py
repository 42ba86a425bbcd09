"""Datasets and models shared by the unit tests of fedmae.ml."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedmae.ml.datasets import ImageDataset
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.mae import MaskedAutoencoderViT
from fedmae.ml.model_zoo import build_model


@pytest.fixture(scope="session")
def fmnist_train() -> ImageDataset:
    return load_fashion_mnist(split="train")


@pytest.fixture(scope="module")
def tiny() -> MaskedAutoencoderViT:
    return build_model("tiny", seed=0)


@pytest.fixture
def synthetic() -> Callable[..., ImageDataset]:
    """A maker of small labelled random datasets: ``synthetic(n, num_classes, size, seed)``."""
    return _synthetic


def _synthetic(n: int = 200, num_classes: int = 10, size: int = 8, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    return ImageDataset(images=images, labels=labels, name="synthetic")
