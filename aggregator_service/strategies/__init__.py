"""Aggregation strategies, chosen by name (``fedmae serve --strategy NAME``).

One file per rule; a new rule is registered here by its ``name``. The interface and
the two kinds of rule (folding, needs-all) are described in ``base.py``.
"""

from __future__ import annotations

from aggregator_service.strategies.base import Evaluator, Strategy
from aggregator_service.strategies.fedavg import FedAvg
from fedmae.errors import ConfigError

DEFAULT_STRATEGY = "fedavg"
STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg,)}

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "Evaluator",
    "FedAvg",
    "Strategy",
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


def make_strategy(name: str, evaluator: Evaluator | None = None) -> Strategy:
    """A new strategy by name; ``evaluator`` (optional) checks each published model."""
    return strategy_class(name)(evaluator=evaluator)
