"""Round events and transfer headers (``fedmae.rounds``) to and from ``fedmae.v1``
messages: ``*_to_proto`` for the side that sends one, ``*_from_proto`` for the side
that receives it. The servicers and ``FederationClient`` both convert here."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

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
    TrainingProgress,
    UpdateHeader,
    UpdateReceipt,
)
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.frames import part
from fedmae.transport.messages import (
    manifest_from_proto,
    manifest_to_proto,
    training_config_from_proto,
    training_config_to_proto,
)
from fedmae.transport.secagg import task_fields_from_proto, task_fields_to_proto

M = TypeVar("M")  # a message type
D = TypeVar("D")  # a dataclass of fedmae.rounds


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


def _to_proto(obj: Any, message_type: Callable[..., M], **wire_form: Any) -> M:
    """A ``message_type`` with each field of the dataclass ``obj`` under the same name,
    but for those given in their wire form (one the message lacks is a ValueError)."""
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return message_type(**(fields | wire_form))


def _from_proto(msg: Any, domain_type: type[D], **domain_form: Any) -> D:
    """A ``domain_type`` (a dataclass) with each field read from ``msg`` under the same
    name, but for those given (nested messages, and repeated and map fields, which are
    copied into plain lists and dicts)."""
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(domain_type)}
    return domain_type(**(fields | domain_form))


def event_to_proto(event: RoundEvent) -> pb.RoundEvent:
    """A ``RoundEvent`` message with the event's ``seq`` and its oneof set."""
    body = event.body
    if isinstance(body, RoundTask):
        # Not one-to-one (config is named training here, phase, deadline, the oneof
        # phase_data): spelt out.
        msg = pb.RoundEvent(
            task=pb.RoundTask(
                round=body.round,
                attempt=body.attempt,
                model_version=body.model_version,
                phase=int(body.phase),
                config=training_config_to_proto(body.training),
                deadline=_timestamp(body.deadline),
                selected_clients=body.selected_clients,
                **task_fields_to_proto(body.secagg, body.phase_data),
            )
        )
    elif isinstance(body, ModelPublished):
        manifest = manifest_to_proto(body.manifest)
        msg = pb.RoundEvent(model_published=_to_proto(body, pb.ModelPublished, manifest=manifest))
    elif isinstance(body, RoundClosed):
        msg = pb.RoundEvent(round_closed=_to_proto(body, pb.RoundClosed))
    elif isinstance(body, RunFinished):
        msg = pb.RoundEvent(run_finished=_to_proto(body, pb.RunFinished))
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
            **task_fields_from_proto(task),
        )
    elif kind == "model_published":
        published = msg.model_published
        manifest = manifest_from_proto(published.manifest)
        body = _from_proto(published, ModelPublished, manifest=manifest)
    elif kind == "round_closed":
        body = _from_proto(msg.round_closed, RoundClosed)
    elif kind == "run_finished":
        body = _from_proto(msg.run_finished, RunFinished)
    elif kind == "heartbeat":
        body = Heartbeat(_unix_s(msg.heartbeat.time))
    else:
        return None
    return RoundEvent(msg.seq, body)


def update_header_to_proto(header: UpdateHeader) -> pb.UpdateHeader:
    return _to_proto(header, pb.UpdateHeader, manifest=manifest_to_proto(header.manifest))


def update_header_from_proto(msg: pb.UpdateHeader) -> UpdateHeader:
    manifest = manifest_from_proto(msg.manifest)
    return _from_proto(msg, UpdateHeader, manifest=manifest, metrics=dict(msg.metrics))


def progress_message(progress: TrainingProgress) -> pb.UpdateMessage:
    """The SubmitUpdate message (the stream's only one) that carries a progress report."""
    return pb.UpdateMessage(progress=_to_proto(progress, pb.TrainingProgress))


def progress_from_proto(request: Any) -> TrainingProgress | None:
    """The progress report a SubmitUpdate stream's first message holds, or ``None``
    when it holds anything else."""
    if part(request) != "progress":
        return None
    return _from_proto(request.progress, TrainingProgress)


def receipt_to_proto(receipt: UpdateReceipt) -> pb.UpdateReceipt:
    return _to_proto(receipt, pb.UpdateReceipt)


def receipt_from_proto(msg: pb.UpdateReceipt) -> UpdateReceipt:
    return _from_proto(msg, UpdateReceipt)


def model_header_to_proto(header: ModelHeader) -> pb.ModelHeader:
    return _to_proto(header, pb.ModelHeader, manifest=manifest_to_proto(header.manifest))


def model_header_from_proto(msg: pb.ModelHeader) -> ModelHeader:
    return _from_proto(msg, ModelHeader, manifest=manifest_from_proto(msg.manifest))
