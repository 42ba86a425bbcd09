"""The round engine's domain objects to and from ``fedmae.v1`` protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from aggregator_service.downloads import ModelHeader
from aggregator_service.subscriptions import (
    Heartbeat,
    ModelPublished,
    RoundClosed,
    RoundEvent,
    RoundTask,
    RunFinished,
)
from aggregator_service.uploads import UpdateHeader, UpdateReceipt
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.messages import (
    manifest_from_proto,
    manifest_to_proto,
    training_config_to_proto,
)


def _timestamp(unix_s: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix_s * 1e9))
    return ts


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


def model_header_to_proto(header: ModelHeader) -> pb.ModelHeader:
    return pb.ModelHeader(
        version=header.version,
        round=header.round,
        model=header.model,
        manifest=manifest_to_proto(header.manifest),
    )
