"""What both roles say about rounds: the round events a server sends and a client
hears, and the headers and receipt of the model and update transfers.

Plain dataclasses, no gRPC: ``fedmae.transport.events`` converts them to and from
the wire's ``fedmae.v1`` messages, for the servicers and for ``FederationClient``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Protocol

from fedmae.config import TrainingConfig
from fedmae.payload.layout import Manifest
from fedmae.secagg.messages import InboundShares, Roster, SecAggParams, UnmaskRequest


class Phase(IntEnum):
    """A phase of a round; the values are the wire's ``fedmae.v1.Phase`` numbers."""

    TRAIN = 1  # fetch the model, train, SubmitUpdate
    # A secure round (``fedmae.secagg.messages`` has what each phase says):
    ADVERTISE_KEYS = 2  # train, keep the delta, send AdvertiseKeys
    SHARE_KEYS = 3  # the task's Roster -> ShareKeys
    MASKED_INPUT = 4  # the task's InboundShares -> the masked input (a ring upload)
    UNMASK = 5  # the task's UnmaskRequest -> UnmaskShares


# What a secure round's phase gives a site with its task (SHARE_KEYS, MASKED_INPUT, UNMASK).
PhaseData = Roster | InboundShares | UnmaskRequest


class _RunningPhase(Protocol):
    phase: Phase


class _OpenRound(Protocol):
    """What ``RoundTask.of`` reads of a round (the engine's ``RoundState``)."""

    round: int
    attempt: int
    base_version: int
    selected: list[str]
    phase: _RunningPhase | None


class _ClosedRound(Protocol):
    """What ``RoundClosed.of`` reads of a record (the engine's ``RoundRecord``)."""

    round: int
    attempt: int
    version: int
    train_loss: float | None
    val_loss: float | None
    reason: str

    @property
    def published(self) -> bool: ...


@dataclass(frozen=True)
class RoundTask:
    """Sent to each client a phase of a round waits for."""

    kind: ClassVar[str] = "task"
    round: int
    attempt: int
    model_version: int  # the base version an update must be relative to
    phase: Phase
    training: TrainingConfig
    deadline: float  # wall-clock (Unix) seconds
    selected_clients: int
    secagg: SecAggParams | None = None  # set in every phase of a secure round
    phase_data: PhaseData | None = None  # what this phase gives this site, if anything

    @classmethod
    def of(
        cls,
        state: _OpenRound,
        training: TrainingConfig,
        deadline: float,
        *,
        secagg: SecAggParams | None = None,
        phase_data: PhaseData | None = None,
    ) -> RoundTask:
        """The task of the phase ``state`` is in (for one site when ``phase_data``)."""
        assert state.phase is not None
        return cls(
            round=state.round, attempt=state.attempt, model_version=state.base_version,
            phase=state.phase.phase, training=training, deadline=deadline,
            selected_clients=len(state.selected), secagg=secagg, phase_data=phase_data,
        )  # fmt: skip


@dataclass(frozen=True)
class ModelPublished:
    """A round's aggregate became a new version: clients fetch it from here on."""

    kind: ClassVar[str] = "model_published"
    version: int
    round: int
    manifest: Manifest  # the fp32 manifest of the checkpoint (``ModelLayout.manifest``)


@dataclass(frozen=True)
class RoundClosed:
    """A round ended: published (``success``) or failed, with the aggregate metrics.

    Not who took part nor the round's sample total: a client that knows its own delta
    and count would recover a co-participant's delta from them and the published model
    (issue 13). The operator's views (Admin.Status, WatchRounds, the round log) keep
    them."""

    kind: ClassVar[str] = "round_closed"
    round: int
    attempt: int
    success: bool
    version: int  # published (success) or unchanged
    train_loss: float
    val_loss: float
    reason: str

    @classmethod
    def of(cls, record: _ClosedRound) -> RoundClosed:
        """The event of a closed round's record (no loss reported: 0.0)."""
        return cls(
            round=record.round, attempt=record.attempt, success=record.published,
            version=record.version, train_loss=record.train_loss or 0.0,
            val_loss=record.val_loss or 0.0, reason=record.reason,
        )  # fmt: skip


@dataclass(frozen=True)
class RunFinished:
    """The run is over: no more rounds; the final version is served a while longer."""

    kind: ClassVar[str] = "run_finished"
    final_version: int
    rounds: int
    reason: str
    model: str  # registry name of the final version's model


@dataclass(frozen=True)
class Heartbeat:
    """Nothing happened for a while: both ends notice a dead stream."""

    kind: ClassVar[str] = "heartbeat"
    time: float  # wall-clock (Unix) seconds


EventBody = RoundTask | ModelPublished | RoundClosed | RunFinished | Heartbeat


@dataclass(frozen=True)
class RoundEvent:
    seq: int  # increasing per server; 0 for heartbeats
    body: EventBody


@dataclass(frozen=True)
class ModelHeader:
    """What precedes a model's chunks."""

    version: int
    round: int
    model: str  # model registry name
    manifest: Manifest  # ``ModelLayout.manifest``, with the payload's digest


@dataclass(frozen=True)
class UpdateHeader:
    """What an update says about itself before its payload."""

    round: int
    base_version: int
    num_samples: int
    manifest: Manifest  # of the delta payload, checked by ``PayloadDecoder``
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingProgress:
    """How far a site's local training got in a training phase (TRAIN, ADVERTISE_KEYS).

    Sent every few seconds while the site trains, so the server can tell a slow site
    from a gone one: it extends the round's deadline while every site it waits for is
    connected and its ``step`` keeps advancing (``aggregator_service.deadlines``)."""

    round: int
    attempt: int
    step: int  # optimizer steps done so far
    total: int  # optimizer steps the local training takes


@dataclass(frozen=True)
class UpdateReceipt:
    round: int
    bytes_received: int
    digest: str  # of the payload as received
    updates_received: int  # accepted updates in this round so far
