"""Aggregation strategies, chosen by name (``fedmae serve --strategy NAME``).

One file per rule (or per family: the server optimizers share ``server_opt.py``); a new
rule is registered here by its ``name``. The interface and the two kinds of rule
(folding, needs-all) are described in ``base.py``; the robust rules (``robust.py``,
``krum.py``, ``norm_bounded.py``) in docs/privacy.md, "Robust aggregation".
"""

from __future__ import annotations

from aggregator_service.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from aggregator_service.strategies.base import (
    Evaluator,
    Strategy,
    StrategyOptions,
    StrategyState,
)
from aggregator_service.strategies.fedavg import FedAvg
from aggregator_service.strategies.fedprox import FedProx
from aggregator_service.strategies.krum import MultiKrum
from aggregator_service.strategies.norm_bounded import NormBoundedFedAvg
from aggregator_service.strategies.robust import CoordinateMedian, TrimmedMean
from aggregator_service.strategies.server_opt import FedAvgM, ServerOptimizer
from fedmae.errors import ConfigError

DEFAULT_STRATEGY = "fedavg"
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi, FedProx,
        CoordinateMedian, TrimmedMean, MultiKrum, NormBoundedFedAvg,
    )
}  # fmt: skip

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "CoordinateMedian",
    "Evaluator",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "MultiKrum",
    "NormBoundedFedAvg",
    "ServerOptimizer",
    "Strategy",
    "StrategyOptions",
    "StrategyState",
    "TrimmedMean",
    "make_strategy",
    "strategy_class",
]


def strategy_class(name: str) -> type[Strategy]:
    """The strategy registered as ``name``; ``ConfigError`` naming the choices if none."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown strategy {name!r}: choose one of {', '.join(sorted(STRATEGIES))}"
        ) from None


def make_strategy(
    name: str, evaluator: Evaluator | None = None, options: StrategyOptions | None = None
) -> Strategy:
    """A new strategy by name; ``evaluator`` (optional) checks each published model,
    ``options`` holds the rules' knobs (each rule reads those it needs)."""
    return strategy_class(name)(evaluator=evaluator, options=options)
