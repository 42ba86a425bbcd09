"""Round strategies: whom to ask, and how updates become the next global model.

The transport never knows which strategy runs. A new aggregation rule is a new
subclass; nothing in the gRPC layer changes. Updates are folded in as they arrive
(``accumulate``), so memory holds the global model, one accumulator and the uploads
in flight, never one copy per client.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod

import torch


class Strategy(ABC):
    """Hooks for each moment of a round, called by the ``RoundManager``."""

    name: str = "strategy"

    def configure_round(
        self,
        round_: int,
        attempt: int,
        available: list[str],
        fraction: float,
        minimum: int,
        seed: int,
    ) -> list[str]:
        """Pick the clients asked to train this round (deterministic for a seed)."""
        count = min(len(available), max(minimum, round(fraction * len(available))))
        rng = random.Random(f"{seed}/{round_}/{attempt}")
        return sorted(rng.sample(sorted(available), count))

    @abstractmethod
    def begin_round(self, numel: int) -> None:
        """Reset per-round state before the first update arrives (``numel`` parameters)."""

    @abstractmethod
    def accumulate(self, delta: torch.Tensor, weight: int, scale: float = 1.0) -> None:
        """Fold one validated update (flat float32 delta) in. Called under a lock.

        ``weight`` is the update's capped sample count and ``scale`` its clipping factor
        min(1, B/||delta||) (``update_bounds``): the update to fold in is
        ``scale * delta`` with weight ``weight``. ``delta`` is valid only during the
        call: its memory is a receive buffer that the next upload reuses. Copy whatever
        must outlive the call."""

    @abstractmethod
    def aggregate(self, global_flat: torch.Tensor) -> torch.Tensor:
        """Return the next global model from the updates folded in this round.

        ``global_flat`` is mapped from the published checkpoint (copy-on-write). The
        result may be memory the strategy owns, such as its accumulator: the round
        manager drops it before the next ``begin_round``."""


class FedAvg(Strategy):
    """θ ← θ + Σ wᵢsᵢΔᵢ / Σ wᵢ (McMahan et al. 2017), accumulated in place; with the
    round manager's capped weights wᵢ and clipping factors sᵢ this is norm-bounded
    FedAvg (Sun et al. 2019)."""

    name = "fedavg"

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None
        self._total = 0

    def begin_round(self, numel: int) -> None:
        if self._acc is None or self._acc.numel() != numel:
            self._acc = torch.zeros(numel, dtype=torch.float32)
        else:
            self._acc.zero_()  # reuse: no new allocation per round
        self._total = 0

    def accumulate(self, delta: torch.Tensor, weight: int, scale: float = 1.0) -> None:
        assert self._acc is not None, "begin_round was not called"
        self._acc.add_(delta, alpha=float(weight) * scale)  # one pass; clipping costs nothing
        self._total += weight

    def aggregate(self, global_flat: torch.Tensor) -> torch.Tensor:
        assert self._acc is not None and self._total > 0, "no updates to aggregate"
        # Into the accumulator (θ read once from the page cache, nothing allocated);
        # begin_round zeroes it for the next round once the new model is on disk.
        return self._acc.mul_(1.0 / self._total).add_(global_flat)


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
