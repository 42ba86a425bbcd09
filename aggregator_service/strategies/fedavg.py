"""FedAvg: the default rule, folded in place as updates arrive."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from aggregator_service.strategies.base import Evaluator, Strategy, StrategyOptions

if TYPE_CHECKING:
    from aggregator_service.update_store import UpdateStore


class FedAvg(Strategy):
    """θ ← θ + Σ wᵢsᵢΔᵢ / Σ wᵢ (McMahan et al. 2017), accumulated in place; with the
    round engine's capped weights wᵢ and clipping factors sᵢ this is norm-bounded
    FedAvg (Sun et al. 2019)."""

    name = "fedavg"
    needs_all_updates = False

    def __init__(
        self, evaluator: Evaluator | None = None, options: StrategyOptions | None = None
    ) -> None:
        super().__init__(evaluator, options)
        self._acc: torch.Tensor | None = None
        self._total = 0
        # Central DP (aggregator_service/private_rounds.py) replaces Σ/Σwᵢ with its noised
        # fixed-denominator estimate; the server optimizers step on it unchanged.
        self.noised_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

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

    def aggregate(
        self, global_flat: torch.Tensor, updates: UpdateStore | None = None
    ) -> torch.Tensor:
        # Into the accumulator (θ read once from the page cache, nothing allocated);
        # begin_round zeroes it for the next round once the new model is on disk.
        return self.mean_delta().add_(global_flat)

    def mean_delta(self) -> torch.Tensor:
        """Δ = Σ wᵢsᵢΔᵢ / Σ wᵢ (under central DP: the noised Σ / q·N), computed in the
        accumulator (which it returns)."""
        assert self._acc is not None and self._total > 0, "no updates to aggregate"
        if self.noised_mean is not None:
            return self.noised_mean(self._acc)
        return self._acc.mul_(1.0 / self._total)
