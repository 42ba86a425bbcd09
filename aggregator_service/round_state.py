"""A round while it runs: its phases, the clients' results, who was refused.

A round is an ordered list of phases (``ROUND_PHASES``). The engine sends each phase's
task to the clients that owe it something, waits until the phase is done (or the
deadline, or every client it waits for is gone), then moves to the next phase. A plain
round has one phase, TRAIN; a secure one (``secure_rounds.SECURE_PHASES``, Bonawitz et
al. 2017) runs ADVERTISE_KEYS (train, then advertise keys), SHARE_KEYS, MASKED_INPUT
and UNMASK, with their own rules, through the same loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aggregator_service.deadlines import TrainingDeadline
from fedmae.errors import InvalidRequest, PermissionDenied, StaleUpdate
from fedmae.payload.encodings import encoding_from_name
from fedmae.rounds import Phase, TrainingProgress

if TYPE_CHECKING:
    from aggregator_service.config import ServerConfig
    from aggregator_service.strategies import Strategy

log = logging.getLogger(__name__)


@dataclass
class ClientResult:
    """One accepted update, as it was folded in."""

    client_id: str
    num_samples: int  # the aggregation weight used: the claim, capped (update_bounds)
    metrics: dict[str, float]
    bytes: int
    upload_s: float
    update_norm: float = 0.0  # of the delta as received, before clipping
    claimed_samples: int = 0  # num_samples as the client reported it
    clip_scale: float = 1.0  # the delta was folded in times this


@dataclass
class RoundState:
    """The open (or last) round. Guarded by the engine's condition variable."""

    round: int
    attempt: int
    base_version: int
    selected: list[str]
    deadline: float  # on the engine's monotonic clock
    started: float
    encoding: int
    target_updates: int = 0  # close early after this many updates (0 = every selected)
    # The strategy's close policy: (available, target) -> updates that close the round.
    close_rule: Callable[[int, int], int] = lambda available, target: (
        min(target, available) if target else available
    )
    required: int = 1  # accepted updates to publish (``Strategy.updates_to_publish``)
    # The floor under ``required`` whatever the strategy says (``RoundPolicy``): fewer
    # participants could infer each other's updates from the published model.
    min_participants: int = 1
    accepted: dict[str, ClientResult] = field(default_factory=dict)
    uploading: set[str] = field(default_factory=set)  # admitted, not yet accepted or refused
    folding: set[str] = field(default_factory=set)  # being added into the aggregate now
    rejected: dict[str, str] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    invalidated: str | None = None  # set when an aggregated update must not be published
    norm_bound: float | None = None  # L2 bound updates are clipped to; None = off
    phase: RoundPhase | None = None  # the phase running now
    # A secure round's protocol state (``aggregator_service.secure_rounds.SecureRound``).
    secure: Any = None
    # Progress reports and the training deadline's extension (``deadlines``); None: a
    # fixed deadline.
    training: TrainingDeadline | None = None
    closed: bool = False
    bytes_in: int = 0
    bytes_out: int = 0

    @classmethod
    def opened(
        cls, round_: int, attempt: int, base_version: int, selected: list[str],
        config: ServerConfig, strategy: Strategy, norm_bound: float | None, now: float,
    ) -> RoundState:  # fmt: skip
        """A round opened now (``now``: the engine's monotonic clock) with its policy's
        deadline, close and publish rules, and the strategy's."""
        policy = config.policy
        return cls(
            round=round_,
            attempt=attempt,
            base_version=base_version,
            selected=selected,
            deadline=now + policy.round_timeout_s,
            started=now,
            encoding=encoding_from_name(config.training.update_encoding),
            target_updates=policy.target_updates,
            close_rule=strategy.updates_to_close,
            required=strategy.updates_to_publish(policy.required_updates),
            min_participants=policy.min_participants,
            norm_bound=norm_bound,
            training=TrainingDeadline.opened(
                now + policy.round_timeout_s, now, policy.hard_timeout_s,
                policy.progress_timeout_s,
            ),
        )  # fmt: skip

    def to_publish(self) -> int:
        """Accepted updates the round needs to publish a new version."""
        return max(1, self.required, self.min_participants)

    def needed(self) -> int:
        """Updates that close the round early: every selected client, or the target,
        but not fewer than it takes to publish while enough clients may still send."""
        available = len(set(self.selected) - self.revoked)
        return max(
            self.close_rule(available, self.target_updates), min(self.to_publish(), available)
        )

    def awaits(self, client_id: str) -> bool:
        """Whether the running phase still waits for this client to start its part (a
        client that reconnects mid-round is sent its task again)."""
        return (
            not self.closed
            and self.phase is not None
            and client_id in self.phase.owing(self)
            and client_id not in self.uploading
        )

    def revoke(self, client_id: str, why: str) -> None:
        """A selected client was revoked while the round is open. An update already
        folded into the aggregate (or being folded) cannot be taken out of the running
        sum, so the round fails and is retried without that client."""
        if self.closed or client_id not in self.selected:
            return
        self.revoked.add(client_id)
        if client_id in self.accepted or client_id in self.folding:
            # Unnamed: every client hears this reason (RoundClosed), and who took part is
            # the operator's to know (the engine's log and the audit name the client).
            self.invalidated = (
                "a selected client was revoked after its update was aggregated; "
                "the round is retried without it"
            )
        else:
            self.rejected[client_id] = f"revoked{why}"

    def report_progress(self, client_id: str, progress: TrainingProgress, now: float) -> None:
        """Record a site's training progress (kept only while a training phase runs)."""
        if self.closed or (progress.round, progress.attempt) != (self.round, self.attempt):
            raise StaleUpdate(
                f"progress for round {progress.round} attempt {progress.attempt}, but round "
                f"{self.round} attempt {self.attempt} is {'closed' if self.closed else 'open'}"
            )
        if client_id not in self.selected:
            raise PermissionDenied(f"{client_id} is not selected for round {self.round}")
        if progress.step > progress.total:
            raise InvalidRequest(f"progress step {progress.step} above total {progress.total}")
        if self.training is not None and self.phase is not None and self.phase.trains:
            self.training.report(client_id, progress, now)

    def extend_deadline(self, connected: set[str], now: float) -> bool:
        """At a training phase's deadline: move it on while every site it still waits for
        is connected and progressing (``TrainingDeadline.extension``)."""
        if self.training is None or self.phase is None or not self.phase.trains:
            return False
        owing = self.phase.owing(self) - self.rejected.keys()  # refused: not waited for
        later = self.training.extension(owing, connected, self.uploading, now)
        if later is None:
            return False
        self.deadline = later
        log.info("round %d: every site still training is progressing: deadline extended to "
                 "%.0f s after the start", self.round, later - self.started)  # fmt: skip
        return True

    def close_training(self, connected: set[str], now: float) -> None:
        """A training phase ended: fix why each site it still waited for is missing."""
        if self.training is not None and self.phase is not None and self.phase.trains:
            owing = self.phase.owing(self) - self.rejected.keys()
            self.training.close(owing, connected, self.deadline, now)

    def outcome(self, stopping: bool) -> tuple[str, str]:
        """(status, reason) of the closed round: published, failed or aborted."""
        reported = len(self.accepted)
        if self.invalidated:
            return "failed", self.invalidated
        if reported >= self.to_publish():
            return "published", ""
        if stopping:
            return "aborted", "aggregator stopped during the round"
        if reported < self.min_participants:
            who = "participant" if reported == 1 else "participants"
            return "failed", (
                f"only {reported} {who}: a round needs at least {self.min_participants} "
                "to publish (--min-participants)"
            )
        return "failed", f"only {reported} of {self.to_publish()} required updates"

    def progress(self, now: float) -> dict[str, Any]:
        """The open round's part of the engine's status snapshot (``now``: monotonic)."""
        reported = self.accepted.keys()
        if self.secure is not None and self.phase is not None:  # who answered this phase
            reported = self.secure.answered[self.phase.phase]
        return {
            "round": self.round,
            "attempt": self.attempt,
            "selected": list(self.selected),
            "reported": sorted(reported),
            "uploading": sorted(self.uploading),
            "round_elapsed_s": now - self.started,
            "deadline_in_s": max(0.0, self.deadline - now),
            "progress": self.training.snapshot(now) if self.training else {},
        }

    def weighted(self, key: str) -> float | None:
        """Sample-weighted mean of a client metric over the accepted updates."""
        pairs = [
            (r.num_samples, r.metrics[key]) for r in self.accepted.values() if key in r.metrics
        ]
        n = sum(w for w, _ in pairs)
        return sum(w * v for w, v in pairs) / n if n else None

    def dropped(self, connected: set[str]) -> dict[str, str]:
        """Selected clients that sent nothing accepted or refused, and why (as known:
        slow or gone when training closed, from their progress reports)."""
        owing = set(self.selected) - set(self.accepted) - set(self.rejected)
        known = self.training.reasons if self.training is not None else {}
        return {
            c: known.get(c)
            or ("disconnected" if c not in connected else "no update before the round closed")
            for c in sorted(owing)
        }


@dataclass
class DropoutWatch:
    """Early close of a phase: every client it waits for has been gone (no event
    stream, no upload in flight) for ``grace`` seconds."""

    grace: float
    busy: float  # the last time a client the phase waits for was uploading (monotonic)

    def all_gone(
        self,
        owing: set[str],
        uploading: set[str],
        gone_since: Callable[[set[str], float], float | None],
        now: float,
    ) -> bool:
        """Whether the phase may close early (``gone_since``: ``Subscribers.gone_since``)."""
        if owing & uploading:  # a client still uploading is not gone
            self.busy = now
            return False
        gone = gone_since(owing, now)
        return gone is not None and now - max(gone, self.busy) >= self.grace


@dataclass(frozen=True)
class RoundPhase:
    """One step of a round: whom its task goes to and when it is complete.

    A plain phase ends the round unless it is ``done``; a phase with ``settle`` decides
    after its wait whether the round goes on (``settle`` sets ``state.invalidated`` to
    stop it). ``start`` runs when the phase begins (``now``: the monotonic clock), and
    ``task_data`` gives the part of a client's task that is its own (a secure round's
    roster, shares, unmask request).
    """

    phase: Phase
    label: str  # the status while it runs; its timing in the record is ``<label>_s``
    owing: Callable[[RoundState], set[str]]  # clients this phase still waits for
    done: Callable[[RoundState], bool]  # complete: the phase need not wait any longer
    start: Callable[[RoundState, float], None] | None = None
    settle: Callable[[RoundState], None] | None = None
    task_data: Callable[[RoundState, str], Any] | None = None
    # Sites train in it: its deadline may be extended while they progress (``deadlines``).
    trains: bool = False

    def goes_on(self, state: RoundState) -> bool:
        """After the wait: may the round run its next phase?"""
        if self.settle is None:
            return self.done(state)
        self.settle(state)
        return state.invalidated is None


def _train_owing(state: RoundState) -> set[str]:
    return set(state.selected) - set(state.accepted) - state.revoked


def _train_done(state: RoundState) -> bool:
    return len(state.accepted) >= state.needed()


TRAIN = RoundPhase(Phase.TRAIN, "training", owing=_train_owing, done=_train_done, trains=True)

# The phases of every round, in order.
ROUND_PHASES: tuple[RoundPhase, ...] = (TRAIN,)
