"""The server's own check of each published model on a held-out set (optional)."""

from __future__ import annotations

import logging

import torch

from fedmae.ml.loaders import load_dataset
from fedmae.ml.model_state import load_trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.ml.training import evaluate
from fedmae.payload.layout import ModelLayout

log = logging.getLogger(__name__)


class GlobalEvaluator:
    """Masked-patch MSE of the global model on ``images`` test images, fixed masks."""

    def __init__(self, model: str, data: str, images: int, mask_ratio: float):
        dataset = load_dataset(data, split="test")
        n = min(images, len(dataset))
        self.images = dataset.to_tensor(list(range(n)))
        self.model = build_model(model, seed=0)
        self.mask_ratio = mask_ratio
        log.info("global evaluation on %d held-out images of %s", n, dataset.name)

    def __call__(self, layout: ModelLayout, flat: torch.Tensor) -> float:
        load_trainable_state(self.model, layout.unflatten(flat))
        return self.loss_of(self.model)

    def loss_of(self, model: torch.nn.Module) -> float:
        """The same measure for a model already built (e.g. a loaded checkpoint)."""
        return evaluate(model, self.images, self.mask_ratio)
