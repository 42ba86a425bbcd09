"""FedProx's local training: μ = 0 is FedAvg's training bit for bit, μ > 0 pulls the
trained weights towards the round's global model (Li et al. 2020)."""

from __future__ import annotations

import pytest
import torch

from fedmae.config import TrainingConfig
from fedmae.ml.model_state import trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.ml.training import make_optimizer, train_local


def _train(cfg: TrainingConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(global, trained) trainable tensors of a seeded tiny model after ``train_local``."""
    model = build_model("tiny", seed=0)
    start = {k: v.clone() for k, v in trainable_state(model).items()}
    images = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    torch.manual_seed(2)  # the model's masks come from the global generator
    train_local(model, optimizer, images, cfg, seed=3)
    return start, trainable_state(model)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


@pytest.fixture(scope="module")
def fedavg() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return _train(TrainingConfig(batch_size=16, local_epochs=2, learning_rate=3e-3))


def test_mu_zero_is_fedavg_local_training_exactly(fedavg):
    _, plain = fedavg
    cfg = TrainingConfig(batch_size=16, local_epochs=2, learning_rate=3e-3, proximal_mu=0.0)
    _, prox = _train(cfg)
    assert all(torch.equal(plain[k], prox[k]) for k in plain)


def test_mu_above_zero_ends_closer_to_the_global_model(fedavg):
    start, plain = fedavg
    cfg = TrainingConfig(batch_size=16, local_epochs=2, learning_rate=3e-3, proximal_mu=10.0)
    _, prox = _train(cfg)
    free, pulled = _distance(plain, start), _distance(prox, start)
    assert 0 < pulled < 0.9 * free, (pulled, free)


def test_mu_must_be_a_finite_non_negative_number():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="proximal_mu"):
            TrainingConfig(proximal_mu=bad)
