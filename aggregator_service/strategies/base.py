"""The ``Strategy`` interface: whom a round asks, when it may close, how the accepted
updates become the next global model, and how that model is evaluated.

The transport never knows which strategy runs. A new aggregation rule is a new file in
this package and one line in its registry (``__init__.py``); nothing in the gRPC layer
changes. Two kinds of rule:

- folding rules (``needs_all_updates = False``, e.g. FedAvg) take each update as it
  arrives (``accumulate``), so memory holds the global model, one accumulator and the
  uploads in flight, never one copy per client;
- needs-all rules (``needs_all_updates = True``, e.g. a coordinate-wise median) see
  every update at once: the round engine spills each accepted update to an
  ``UpdateStore`` (a memory-mapped file in the state directory) and ``aggregate`` reads
  it back in coordinate blocks, so peak memory is one block times the sites.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch

from fedmae.payload.layout import ModelLayout

if TYPE_CHECKING:
    from aggregator_service.update_store import UpdateStore

# A check of each published model, e.g. ``global_eval.GlobalEvaluator``: its loss.
Evaluator = Callable[[ModelLayout, torch.Tensor], float]


class Strategy(ABC):
    """Hooks for each moment of a round, called by the round engine in this order:
    ``configure_round``, ``begin_round``, ``accumulate`` per accepted update (folding
    rules only), ``updates_to_close`` while the round waits, ``updates_to_publish`` at
    the close, ``aggregate``, then ``evaluate`` on the published model."""

    name: ClassVar[str] = "strategy"
    # False: ``accumulate`` folds each update in as it arrives. True: the engine keeps
    # every accepted update in an ``UpdateStore`` and hands it to ``aggregate``.
    needs_all_updates: ClassVar[bool] = False

    def __init__(self, evaluator: Evaluator | None = None) -> None:
        self.evaluator = evaluator

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

    def updates_to_close(self, available: int, target: int) -> int:
        """Accepted updates at which the round closes before its deadline.

        ``available``: selected clients that may still count (not revoked); ``target``:
        the policy's over-selection target (0 = wait for every one of them)."""
        return min(target, available) if target else available

    def updates_to_publish(self, required: int) -> int:
        """Accepted updates a closed round needs to publish a new model; ``required`` is
        the policy's minimum (``min_updates``, else ``min_clients``). Never below one.
        The engine adds its own floor, ``min_participants`` (``RoundState.to_publish``)."""
        return max(1, required)

    def begin_round(self, numel: int) -> None:  # noqa: B027 (a hook; most rules keep no state)
        """Reset per-round state before the first update arrives (``numel`` parameters)."""

    def accumulate(self, delta: torch.Tensor, weight: int, scale: float = 1.0) -> None:
        """Fold one validated update (flat float32 delta) in. Called under a lock, for
        folding rules only (``needs_all_updates`` False).

        ``weight`` is the update's capped sample count and ``scale`` its clipping factor
        min(1, B/||delta||) (``update_bounds``): the update to fold in is
        ``scale * delta`` with weight ``weight``. ``delta`` is valid only during the
        call: its memory is a receive buffer that the next upload reuses. Copy whatever
        must outlive the call."""
        raise TypeError(
            f"strategy {self.name!r} needs all updates: the engine keeps them in an "
            "UpdateStore and passes it to aggregate()"
        )

    @abstractmethod
    def aggregate(
        self, global_flat: torch.Tensor, updates: UpdateStore | None = None
    ) -> torch.Tensor:
        """Return the next global model from this round's accepted updates.

        ``updates`` is the round's ``UpdateStore`` for a needs-all rule (each row one
        clipped update, with its weight), ``None`` for a folding rule. ``global_flat``
        is mapped from the published checkpoint (copy-on-write). The result may be
        memory the strategy owns, such as its accumulator: the engine drops it before
        the next ``begin_round``."""

    def evaluate(self, layout: ModelLayout, flat: torch.Tensor) -> float | None:
        """The published model's loss on the server's held-out set, or ``None`` when no
        evaluation is configured."""
        if self.evaluator is None:
            return None
        return self.evaluator(layout, flat)
