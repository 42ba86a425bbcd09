"""Settings shared by the aggregator and the client agent."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from fedmae.errors import InvalidUpdate
from fedmae.payload.encodings import Encoding, encoding_from_name

# What a client may report with an update (``UpdateHeader.metrics``): the keys the
# client agent sends, each with the range a real value falls in. The aggregator refuses
# any other key, a non-finite value or one out of range (INVALID_ARGUMENT), so the round
# log, ``fedmae watch`` and Prometheus only ever see finite, plausible numbers.
UPDATE_METRICS: dict[str, tuple[float, float]] = {
    "train_loss": (0.0, 1e6),  # masked-patch MSE of the last local epoch
    "val_loss": (0.0, 1e6),  # masked-patch MSE on the client's held-out images
    "train_seconds": (0.0, 1e7),  # wall time of local training (~4 months)
    "images_per_s": (0.0, 1e12),  # training throughput
}


def check_update_metrics(metrics: Mapping[str, float]) -> None:
    """``InvalidUpdate`` naming the first metric that is unknown, not finite or out of
    range (see ``UPDATE_METRICS``)."""
    if len(metrics) > len(UPDATE_METRICS):
        raise InvalidUpdate(
            f"{len(metrics)} metrics reported; at most {len(UPDATE_METRICS)} are known: "
            f"{', '.join(UPDATE_METRICS)}"
        )
    for key, value in metrics.items():
        if key not in UPDATE_METRICS:
            raise InvalidUpdate(
                f"unknown metric {key[:40]!r}; the known ones are {', '.join(UPDATE_METRICS)}"
            )
        low, high = UPDATE_METRICS[key]
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidUpdate(
                f"metric {key!r} is {value!r}; it must be a finite number in [{low:g}, {high:g}]"
            )


@dataclass(frozen=True)
class TrainingConfig:
    """Local training knobs; the server sends them with each task (converted to the wire's
    ``TrainingConfig`` by ``fedmae.transport.messages``)."""

    model: str = "tiny"
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    update_encoding: str = "fp32"
    max_samples: int = 0  # 0 = every local sample
    # FedProx (Li et al. 2020): add (μ/2)·‖w − w_global‖² to the local loss; 0 = off.
    proximal_mu: float = 0.0
    # Central DP (--dp central): the site clips its delta to this L2 norm C; 0 = off.
    dp_clip: float = 0.0

    def __post_init__(self) -> None:
        encoding_from_name(self.update_encoding)  # fail early on a typo
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("local_epochs and batch_size must be at least 1")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError("mask_ratio must be in (0, 1)")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError("proximal_mu must be a finite number >= 0")
        if not (math.isfinite(self.dp_clip) and self.dp_clip >= 0):
            raise ValueError("dp_clip must be a finite number >= 0 (0 = off)")

    @property
    def encoding(self) -> Encoding:
        """``update_encoding`` as an ``Encoding``."""
        return encoding_from_name(self.update_encoding)

    def with_overrides(self, **overrides: object) -> TrainingConfig:
        """A copy with the non-None overrides applied (a client's local settings)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
