"""The published model: the version clients download, its checkpoint, its flat vector.

The round engine holds one ``PublishedModel``. Between rounds the flat vector is
released (``release``) and read back from the checkpoint on demand, so a round needs no
copy of the model in memory until it aggregates. Closing a round that publishes is two
steps: ``prepare`` (aggregate, save, evaluate: full-model passes and an fsync, run
outside the engine's lock) and ``publish`` (under the engine's lock, with the round log
line, so ``current`` never pairs a version with another's checkpoint).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aggregator_service.checkpoint_store import Checkpoint, CheckpointStore
from aggregator_service.clock import Clock
from aggregator_service.strategies.base import Strategy, StrategyState
from fedmae.payload.layout import Manifest, ModelLayout

log = logging.getLogger(__name__)


def resume_state(store: CheckpointStore, strategy: Strategy, version: int) -> None:
    """Give ``strategy`` the state saved with ``version``, the one the server resumes
    from, so a restart continues the same optimizer trajectory. Without one (a version
    written by a stateless rule, by another rule, or before states were saved) the rule
    starts fresh, and the log says so."""
    if not strategy.keeps_state:
        return
    saved = store.load_state(version)
    if saved is not None and saved.strategy != strategy.name:
        log.warning("version %d's saved state is %s's, not %s's: %s starts with fresh state",
                    version, saved.strategy, strategy.name, strategy.name)  # fmt: skip
        saved = None
    elif saved is None and version > 0:
        log.warning("version %d has no saved %s state: it starts with fresh state",
                    version, strategy.name)  # fmt: skip
    elif saved is not None:
        log.info("resuming %s state of version %d (step %d)", strategy.name, version, saved.step)
    strategy.load_state(saved)


@dataclass(frozen=True)
class NextVersion:
    """A saved, not yet published model: the aggregate, its checkpoint, its eval loss."""

    flat: torch.Tensor
    checkpoint: Checkpoint
    eval_loss: float | None


class PublishedModel:
    """The latest published version of the global model."""

    def __init__(
        self,
        store: CheckpointStore,
        layout: ModelLayout,
        checkpoint: Checkpoint,
        flat: torch.Tensor | None,
        model_name: str,
        clock: Clock,
        lock: threading.Condition,
    ):
        self.store = store
        self.layout = layout
        self.checkpoint = checkpoint
        self.version = checkpoint.version
        self.model_name = model_name
        self.clock = clock
        self._lock = lock  # the engine's: the version moves on under it
        self._flat = flat

    @property
    def flat(self) -> torch.Tensor:
        """The model as one flat vector, mapped from its checkpoint after a ``release``."""
        if self._flat is None:
            _, self._flat = self.store.map(self.version, self.layout)
        return self._flat

    def current(self) -> tuple[int, Checkpoint]:
        """The version and its checkpoint, read together (for downloads)."""
        with self._lock:
            return self.version, self.checkpoint

    def release(self) -> None:
        """Drop the in-memory vector (it may be the strategy's accumulator, which the
        next round resets); ``flat`` reads it back from the checkpoint."""
        self._flat = None

    def manifest(self) -> Manifest:
        """What a client checks a download of this version against."""
        return self.layout.manifest(digest=self.checkpoint.payload_digest)

    def prepare(
        self,
        round_: int,
        aggregate: Callable[[torch.Tensor], torch.Tensor],
        evaluate: Callable[[ModelLayout, torch.Tensor], float | None],
        timings: dict[str, float],
        rule_state: Callable[[], StrategyState | None] = lambda: None,
        ledger: str | None = None,
    ) -> NextVersion:
        """Aggregate onto this version, save the result as the next one with the rule's
        state after that aggregation (``rule_state``) and the privacy ledger with this
        round recorded (``ledger``, under DP), evaluate it; each step's seconds go into
        ``timings``."""
        t0 = self.clock.monotonic()
        model = aggregate(self.flat)
        timings["aggregation_s"] = self._since(t0)
        t0 = self.clock.monotonic()
        checkpoint = self.store.save(
            self.version + 1, round_, self.model_name, self.layout, model, rule_state(), ledger
        )
        timings["checkpoint_s"] = self._since(t0)
        t0 = self.clock.monotonic()
        eval_loss = evaluate(self.layout, model)
        if eval_loss is not None:
            timings["evaluation_s"] = self._since(t0)
        return NextVersion(model, checkpoint, eval_loss)

    def publish(self, next_version: NextVersion) -> None:
        """Make a prepared version the published one."""
        self._flat, self.checkpoint = next_version.flat, next_version.checkpoint
        self.version += 1

    def _since(self, t0: float) -> float:
        return round(self.clock.monotonic() - t0, 3)
