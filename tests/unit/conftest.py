"""Datasets and models shared by the unit tests of fedmae.ml."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest

# fedmae.ml loads torch (2-4 s of CPU): imported where used, so that the pytest-xdist
# controller, which loads this file but runs no test, does not pay for it.
if TYPE_CHECKING:
    from fedmae.ml.datasets import ImageDataset
    from fedmae.ml.mae import MaskedAutoencoderViT


@pytest.fixture(scope="session")
def fmnist_train() -> ImageDataset:
    from fedmae.ml.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(split="train")


@pytest.fixture(scope="module")
def tiny() -> MaskedAutoencoderViT:
    from fedmae.ml.model_zoo import build_model

    return build_model("tiny", seed=0)


@pytest.fixture
def synthetic() -> Callable[..., ImageDataset]:
    """A maker of small labelled random datasets: ``synthetic(n, num_classes, size, seed)``."""
    return _synthetic


def _synthetic(n: int = 200, num_classes: int = 10, size: int = 8, seed: int = 0) -> ImageDataset:
    from fedmae.ml.datasets import ImageDataset

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    return ImageDataset(images=images, labels=labels, name="synthetic")
