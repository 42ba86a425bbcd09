"""FedProx (Li et al. 2020): FedAvg's aggregation, with a proximal term that keeps each
site's local training near the round's global model."""

from __future__ import annotations

from dataclasses import replace

from aggregator_service.strategies.fedavg import FedAvg
from fedmae.config import TrainingConfig


class FedProx(FedAvg):
    """θ ← θ + the weighted mean delta, as FedAvg; each task's training config carries
    μ (``--mu``, ``TrainingConfig.proximal_mu``), and the agent adds (μ/2)·‖w − w_global‖²
    to its local loss (``fedmae.ml.training.train_local``)."""

    name = "fedprox"

    def training_config(self, training: TrainingConfig) -> TrainingConfig:
        return replace(training, proximal_mu=self.options.mu)
