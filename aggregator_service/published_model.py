"""The published model: the version clients download, its checkpoint, its flat vector.

The round engine holds one ``PublishedModel``. Between rounds the flat vector is
released (``release``) and read back from the checkpoint on demand, so a round needs no
copy of the model in memory until it aggregates. Closing a round that publishes is two
steps: ``prepare`` (aggregate, save, evaluate: full-model passes and an fsync, run
outside the engine's lock) and ``publish`` (under the engine's lock, with the round log
line, so ``current`` never pairs a version with another's checkpoint).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aggregator_service.checkpoint_store import Checkpoint, CheckpointStore
from aggregator_service.clock import Clock
from fedmae.payload.layout import Manifest, ModelLayout


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
    ) -> NextVersion:
        """Aggregate onto this version, save the result as the next one, evaluate it;
        each step's seconds go into ``timings``."""
        t0 = self.clock.monotonic()
        model = aggregate(self.flat)
        timings["aggregation_s"] = self._since(t0)
        t0 = self.clock.monotonic()
        checkpoint = self.store.save(self.version + 1, round_, self.model_name, self.layout, model)
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
