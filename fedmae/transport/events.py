"""Round events and transfer headers (``fedmae.rounds``) to and from ``fedmae.v1``
messages: ``*_to_proto`` for the side that sends one, ``*_from_proto`` for the side
that receives it. The servicers and ``FederationClient`` both convert here."""

from __future__ import annotations

import math

from google.protobuf.timestamp_pb2 import Timestamp

from fedmae.rounds import (
    Heartbeat,
    ModelHeader,
    ModelPublished,
    Phase,
    RoundClosed,
    RoundEvent,
    RoundTask,
    RunFinished,
    UpdateHeader,
    UpdateReceipt,
)
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.messages import (
    manifest_from_proto,
    manifest_to_proto,
    training_config_from_proto,
    training_config_to_proto,
)


def _timestamp(unix_s: float) -> Timestamp:
    # Seconds and the fraction apart: unix_s * 1e9 would lose the last digits to
    # float rounding, and the receiver's float would differ from the sender's.
    seconds = math.floor(unix_s)
    nanos = round((unix_s - seconds) * 1e9)
    if nanos == 1_000_000_000:
        seconds, nanos = seconds + 1, 0
    return Timestamp(seconds=seconds, nanos=nanos)


def _unix_s(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def event_to_proto(event: RoundEvent) -> pb.RoundEvent:
    """A ``RoundEvent`` message with the event's ``seq`` and its oneof set."""
    body = event.body
    if isinstance(body, RoundTask):
        msg = pb.RoundEvent(
            task=pb.RoundTask(
                round=body.round,
                attempt=body.attempt,
                model_version=body.model_version,
                phase=int(body.phase),
                config=training_config_to_proto(body.training),
                deadline=_timestamp(body.deadline),
                selected_clients=body.selected_clients,
            )
        )
    elif isinstance(body, ModelPublished):
        msg = pb.RoundEvent(
            model_published=pb.ModelPublished(
                version=body.version, round=body.round, manifest=manifest_to_proto(body.manifest)
            )
        )
    elif isinstance(body, RoundClosed):
        msg = pb.RoundEvent(
            round_closed=pb.RoundClosed(
                round=body.round,
                attempt=body.attempt,
                success=body.success,
                version=body.version,
                participants=body.participants,
                num_samples=body.num_samples,
                train_loss=body.train_loss,
                val_loss=body.val_loss,
                reason=body.reason,
            )
        )
    elif isinstance(body, RunFinished):
        msg = pb.RoundEvent(
            run_finished=pb.RunFinished(
                final_version=body.final_version,
                rounds=body.rounds,
                reason=body.reason,
                model=body.model,
            )
        )
    elif isinstance(body, Heartbeat):
        msg = pb.RoundEvent(heartbeat=pb.Heartbeat(time=_timestamp(body.time)))
    else:
        raise TypeError(f"no wire form for {type(body).__name__}")
    if event.seq:
        msg.seq = event.seq
    return msg


def event_from_proto(msg: pb.RoundEvent) -> RoundEvent | None:
    """The event a message carries; ``None`` for a kind this side does not know (a
    newer server's), which a client skips."""
    kind = msg.WhichOneof("event")
    if kind == "task":
        task = msg.task
        body = RoundTask(
            round=task.round,
            attempt=task.attempt,
            model_version=task.model_version,
            # A phase this side does not know stays its number (a newer server's).
            phase=Phase(task.phase) if task.phase in Phase._value2member_map_ else task.phase,
            training=training_config_from_proto(task.config),
            deadline=_unix_s(task.deadline),
            selected_clients=task.selected_clients,
        )
    elif kind == "model_published":
        published = msg.model_published
        body = ModelPublished(
            version=published.version,
            round=published.round,
            manifest=manifest_from_proto(published.manifest),
        )
    elif kind == "round_closed":
        rc = msg.round_closed
        body = RoundClosed(
            round=rc.round,
            attempt=rc.attempt,
            success=rc.success,
            version=rc.version,
            participants=list(rc.participants),
            num_samples=rc.num_samples,
            train_loss=rc.train_loss,
            val_loss=rc.val_loss,
            reason=rc.reason,
        )
    elif kind == "run_finished":
        done = msg.run_finished
        body = RunFinished(
            final_version=done.final_version, rounds=done.rounds, reason=done.reason,
            model=done.model,
        )  # fmt: skip
    elif kind == "heartbeat":
        body = Heartbeat(_unix_s(msg.heartbeat.time))
    else:
        return None
    return RoundEvent(msg.seq, body)


def update_header_to_proto(header: UpdateHeader) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        round=header.round,
        base_version=header.base_version,
        num_samples=header.num_samples,
        manifest=manifest_to_proto(header.manifest),
        metrics=dict(header.metrics),
    )


def update_header_from_proto(msg: pb.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        round=msg.round,
        base_version=msg.base_version,
        num_samples=msg.num_samples,
        manifest=manifest_from_proto(msg.manifest),
        metrics=dict(msg.metrics),
    )


def receipt_to_proto(receipt: UpdateReceipt) -> pb.UpdateReceipt:
    return pb.UpdateReceipt(
        round=receipt.round,
        bytes_received=receipt.bytes_received,
        digest=receipt.digest,
        updates_received=receipt.updates_received,
    )


def receipt_from_proto(msg: pb.UpdateReceipt) -> UpdateReceipt:
    return UpdateReceipt(
        round=msg.round,
        bytes_received=msg.bytes_received,
        digest=msg.digest,
        updates_received=msg.updates_received,
    )


def model_header_to_proto(header: ModelHeader) -> pb.ModelHeader:
    return pb.ModelHeader(
        version=header.version,
        round=header.round,
        model=header.model,
        manifest=manifest_to_proto(header.manifest),
    )


def model_header_from_proto(msg: pb.ModelHeader) -> ModelHeader:
    return ModelHeader(
        version=msg.version,
        round=msg.round,
        model=msg.model,
        manifest=manifest_from_proto(msg.manifest),
    )
