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

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from fedmae.config import TrainingConfig
from fedmae.errors import ConfigError
from fedmae.payload.layout import ModelLayout

if TYPE_CHECKING:
    from aggregator_service.update_store import UpdateStore

# A check of each published model, e.g. ``global_eval.GlobalEvaluator``: its loss.
Evaluator = Callable[[ModelLayout, torch.Tensor], float]


@dataclass(frozen=True)
class StrategyOptions:
    """The rules' knobs (``fedmae serve --server-lr ...``). Every rule accepts them all
    and reads those it needs (listed beside each), so a flag never fails a rule that
    ignores it; the help of each flag says who reads it."""

    server_lr: float | None = None  # η; None = the rule's default (server_opt.py)
    server_momentum: float = 0.9  # β of fedavgm
    beta1: float = 0.9  # fedadam, fedyogi (Reddi et al. 2021)
    beta2: float = 0.99  # fedadam, fedyogi
    tau: float = 1e-3  # fedadam, fedyogi, fedadagrad: adaptivity; v starts at τ²
    mu: float = 0.01  # fedprox: the proximal term's weight, sent to clients
    trim_beta: float = 0.1  # trimmed-mean: share trimmed at each end (robust.py)
    krum_f: int = 1  # multi-krum: Byzantine sites assumed (krum.py)
    krum_m: int = 0  # multi-krum: updates averaged; 0 = n − f
    clip_norm: float = 10.0  # norm-bounded: L2 bound M per delta (norm_bounded.py)

    def __post_init__(self) -> None:
        checks = (
            ("--server-lr", self.server_lr is None or self.server_lr > 0, "> 0"),
            ("--server-momentum", 0.0 <= self.server_momentum < 1.0, "in [0, 1)"),
            ("--beta1", 0.0 <= self.beta1 < 1.0, "in [0, 1)"),
            ("--beta2", 0.0 <= self.beta2 < 1.0, "in [0, 1)"),
            ("--tau", self.tau > 0, "> 0"),
            ("--mu", self.mu >= 0, ">= 0"),
            ("--trim-beta", 0.0 <= self.trim_beta < 0.5, "in [0, 0.5)"),
            ("--krum-f", self.krum_f >= 0, ">= 0"),
            ("--krum-m", self.krum_m >= 0, ">= 0 (0 = n - f)"),
            ("--clip-norm", self.clip_norm > 0, "> 0"),
        )
        for flag, ok, want in checks:
            value = getattr(self, flag[2:].replace("-", "_"))
            if not ok or (value is not None and not math.isfinite(value)):
                raise ConfigError(f"{flag} {value}: it must be a finite number {want}")


@dataclass
class StrategyState:
    """What a rule carries from round to round (a server optimizer's moments and its
    step count), saved beside each published version so a restart resumes it."""

    strategy: str  # the rule's name: another rule never resumes it
    step: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # flat float32


class Strategy(ABC):
    """Hooks for each moment of a round, called by the round engine in this order:
    ``configure_round``, ``begin_round``, ``accumulate`` per accepted update (folding
    rules only), ``updates_to_close`` while the round waits, ``updates_to_publish`` at
    the close, ``aggregate``, then ``evaluate`` on the published model."""

    name: ClassVar[str] = "strategy"
    # False: ``accumulate`` folds each update in as it arrives. True: the engine keeps
    # every accepted update in an ``UpdateStore`` and hands it to ``aggregate``.
    needs_all_updates: ClassVar[bool] = False
    # True: the rule carries state from round to round (``state``/``load_state``),
    # saved with each published version.
    keeps_state: ClassVar[bool] = False
    # True: the rule must see each site's update on its own (a robust rule, or the
    # server's clipping of norm-bounded), which secure aggregation never shows it.
    needs_clear_updates: ClassVar[bool] = False

    def __init__(
        self, evaluator: Evaluator | None = None, options: StrategyOptions | None = None
    ) -> None:
        self.evaluator = evaluator
        self.options = options or StrategyOptions()

    @classmethod
    def fewest_updates(cls, options: StrategyOptions) -> tuple[int, str]:
        """The fewest updates a round of this rule may aggregate, and why (checked
        against the round policy at start: ``ServerConfig``)."""
        return 1, "a round aggregates at least one update"

    def training_config(self, training: TrainingConfig) -> TrainingConfig:
        """The training config sent with each task (FedProx adds its μ)."""
        return training

    def state(self) -> StrategyState | None:
        """State to save with the version just aggregated; ``None``: the rule keeps none."""
        return None

    def load_state(self, state: StrategyState | None) -> None:  # noqa: B027 (stateless rules)
        """Resume the state saved with the version the server starts from (``None``:
        start fresh)."""

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
        return max(1, required, self.fewest_updates(self.options)[0])

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
