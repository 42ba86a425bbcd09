"""How far one update can move the global model: a weight cap and a norm bound.

Plain FedAvg trusts each site's claimed sample count and folds in deltas of any size:
one site claiming n = 2^40, or sending a delta scaled 100x, replaces the next model.
Two limits make every site's influence bounded (norm-bounded FedAvg, Sun et al. 2019,
"Can You Really Backdoor Federated Learning?"):

- Weight cap: an update weighs min(claimed num_samples, W). W is the training
  config's ``max_samples`` when set (a client trains on at most that many, so a larger
  claim is false), else ``--max-client-samples``. Capped, not refused: an honest site
  with more data than W still contributes, with weight W.
- Norm bound: an update's delta is scaled by min(1, B / ||Δ||) before it is folded in
  (clipped, not refused). B is fixed (``--max-update-norm 5.0``), off (``0`` / ``off``)
  or ``auto``: ``factor`` x the median of the previous published round's update norms
  as folded in (each min(||Δ||, B) of that round), and ``ratio`` x ||θ_base|| for a
  round without such history (round 1, or a resumed run whose log has none).

With honest sites H (nᵢ <= W, ||Δᵢ|| <= B, weighted mean delta Δ̄_H over N_H samples) and
k other sites, the published model stays within  kW / (N_H + kW) · (B + ||Δ̄_H||)  of
the honest sites' FedAvg (derivation and the measurements behind the defaults:
docs/round-log.md, "How far one site can move the model").
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from aggregator_service.config import ServerConfig

log = logging.getLogger(__name__)

AUTO = "auto"


def parse_norm_bound(text: str | float) -> float | str:
    """``--max-update-norm``: "auto", "off" (= 0) or a non-negative number (0 = off)."""
    if isinstance(text, str):
        word = text.strip().lower()
        if word == AUTO:
            return AUTO
        if word == "off":
            return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"--max-update-norm takes 'auto', 'off' or a number >= 0, got {text!r}"
        ) from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"--max-update-norm must be a finite number >= 0, got {text!r}")
    return value


@dataclass(frozen=True)
class Weighing:
    """How much of one update goes into the aggregate."""

    claimed: int  # num_samples the client reported
    weight: int  # the aggregation weight used: min(claimed, cap)
    norm: float  # L2 norm of the delta as received (before clipping)
    scale: float  # the delta is folded in times this: min(1, B / norm)

    @property
    def capped(self) -> bool:
        return self.weight < self.claimed

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0


class UpdateBounds:
    """The weight cap and the per-round norm bound, with the history ``auto`` needs."""

    def __init__(
        self, config: ServerConfig, history: Callable[[], Iterable[dict[str, Any]]] = list
    ):
        self.cap = config.weight_cap
        if self.cap < 1:
            raise ValueError("--max-client-samples must be at least 1")
        self.setting = parse_norm_bound(config.max_update_norm)
        self.factor = config.norm_bound_factor
        self.ratio = config.norm_bound_ratio
        if self.setting == AUTO and not (self.factor > 0 and self.ratio > 0):
            raise ValueError("--norm-bound-factor and --norm-bound-ratio must be positive")
        self._median: float | None = None  # of the last published round's folded-in norms
        self._history: Callable[[], Iterable[dict[str, Any]]] | None = history

    def _load_history(self) -> None:
        """The last published round of a resumed run (read at the first round, once the
        server has repaired its log)."""
        history, self._history = self._history, None
        if history is not None:
            published = [r for r in history() if r.get("status") == "published"]
            if published:
                self._median = _folded_median(published[-1])

    def weigh(self, claimed: int, norm: float, bound: float | None) -> Weighing:
        scale = 1.0 if bound is None or norm <= bound else bound / norm
        return Weighing(claimed, min(claimed, self.cap), norm, scale)

    def round_bound(self, round_: int, base: Callable[[], torch.Tensor]) -> float | None:
        """B for a round (None = no bound); ``base`` gives θ_base, read only when needed."""
        if self.setting != AUTO:
            return float(self.setting) or None
        self._load_history()
        if self._median:
            return self.factor * self._median
        base_norm = float(torch.linalg.vector_norm(base(), dtype=torch.float64))
        if not (base_norm > 0 and math.isfinite(base_norm)):
            log.warning(
                "round %d: the model's norm is %g, so --max-update-norm auto has no scale: "
                "no norm bound this round (pass a fixed bound to have one)", round_, base_norm,
            )  # fmt: skip
            return None
        return self.ratio * base_norm

    def published(self, record: dict[str, Any]) -> None:
        """Remember a published round's norms: the next round's ``auto`` bound."""
        self._history = None  # this run's rounds are newer than the log's
        median = _folded_median(record)
        if median is not None:
            self._median = median


def _folded_median(record: dict[str, Any]) -> float | None:
    """Median of a round's update norms as they were folded in, min(||Δ||, B).

    Clipped norms, not raw ones: sites that sent huge deltas cannot raise the next
    bound more than ``factor``-fold per round even when they are the majority."""
    bound = record.get("norm_bound")
    norms = [
        min(c["update_norm"], bound) if bound else c["update_norm"]
        for c in record.get("clients") or []
        if c.get("update_norm") is not None
    ]
    return float(statistics.median(norms)) if norms else None
