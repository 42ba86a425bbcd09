"""Secure aggregation's messages (``fedmae.secagg.messages``) to and from ``fedmae.v1``:
the only place the two meet.

The dataclasses and the messages have the same fields under the same names (bytes,
integers, one float, nested messages and repeated ones as tuples), so one table of
pairs converts all eleven both ways. Only structure is checked here: a submessage
that must be there and is not raises ``InvalidRequest``; key, share and ciphertext
sizes, indices and signatures are the protocol's checks (``fedmae.secagg``).

A site answers a phase with a SubmitUpdate stream of one ``UpdateMessage`` holding
its answer (``answer_message``); the server reads it back with ``secagg_answer``.
A RoundTask carries the round's ``SecAggParams`` and the phase's data
(``task_fields_to_proto`` / ``task_fields_from_proto``, for ``fedmae.transport.events``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedmae.errors import InvalidRequest
from fedmae.rounds import PhaseData
from fedmae.secagg.messages import (
    AdvertiseKeys,
    InboundShares,
    PeerKeys,
    RevealedShare,
    Roster,
    SealedShare,
    SecAggAbort,
    SecAggParams,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from fedmae.transport import frames as wire
from fedmae.transport._proto import federation_pb2 as pb

SecAggMessage = (
    SecAggParams
    | AdvertiseKeys
    | PeerKeys
    | Roster
    | SealedShare
    | ShareKeys
    | InboundShares
    | UnmaskRequest
    | RevealedShare
    | UnmaskShares
    | SecAggAbort
)
SecAggAnswer = AdvertiseKeys | ShareKeys | UnmaskShares | SecAggAbort

_TO_PROTO: dict[type, Any] = {
    SecAggParams: pb.SecAggParams,
    AdvertiseKeys: pb.AdvertiseKeys,
    PeerKeys: pb.PeerKeys,
    Roster: pb.Roster,
    SealedShare: pb.SealedShare,
    ShareKeys: pb.ShareKeys,
    InboundShares: pb.InboundShares,
    UnmaskRequest: pb.UnmaskRequest,
    RevealedShare: pb.RevealedShare,
    UnmaskShares: pb.UnmaskShares,
    SecAggAbort: pb.SecAggAbort,
}
_FROM_PROTO: dict[Any, type] = {v: k for k, v in _TO_PROTO.items()}

# The oneof fields that carry them: UpdateMessage.part and RoundTask.phase_data.
_ANSWER_FIELDS: dict[type, str] = {
    AdvertiseKeys: "advertise_keys",
    ShareKeys: "share_keys",
    UnmaskShares: "unmask_shares",
    SecAggAbort: "secagg_abort",
}
_PHASE_DATA_FIELDS: dict[type, str] = {
    Roster: "roster",
    InboundShares: "inbound_shares",
    UnmaskRequest: "unmask",
}


def to_proto(obj: SecAggMessage) -> Any:
    """The ``fedmae.v1`` message of a secure-aggregation dataclass (nested ones too)."""
    fields = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = [to_proto(v) if dataclasses.is_dataclass(v) else v for v in value]
        elif dataclasses.is_dataclass(value):
            value = to_proto(value)
        fields[f.name] = value
    return _TO_PROTO[type(obj)](**fields)


def from_proto(msg: Any) -> SecAggMessage:
    """The dataclass of a received secure-aggregation message; ``InvalidRequest`` if a
    submessage it needs is missing."""
    domain_type = _FROM_PROTO[type(msg)]
    fields = {}
    for f in dataclasses.fields(domain_type):
        field = msg.DESCRIPTOR.fields_by_name[f.name]
        value = getattr(msg, f.name)
        if field.is_repeated:
            nested = field.message_type is not None
            value = tuple(from_proto(v) if nested else v for v in value)
        elif field.message_type is not None:
            if not msg.HasField(f.name):
                raise InvalidRequest(
                    f"{msg.DESCRIPTOR.name} without its {f.name}: a malformed message"
                )
            value = from_proto(value)
        fields[f.name] = value
    return domain_type(**fields)


def answer_message(answer: SecAggAnswer) -> pb.UpdateMessage:
    """The SubmitUpdate message (the stream's only one) that carries a site's answer."""
    return pb.UpdateMessage(**{_ANSWER_FIELDS[type(answer)]: to_proto(answer)})


def secagg_answer(request: Any) -> SecAggAnswer | None:
    """The secure-aggregation answer a SubmitUpdate stream's first message holds, or
    ``None`` when it holds anything else (an update's header: the upload path)."""
    part = wire.part(request)
    if part not in _ANSWER_FIELDS.values():
        return None
    return from_proto(getattr(request, part))  # type: ignore[return-value]


def task_fields_to_proto(secagg: SecAggParams | None, phase_data: PhaseData | None) -> dict:
    """The ``RoundTask`` fields of a secure round's task, as ``pb.RoundTask`` keywords
    (none for a plain round)."""
    fields: dict[str, Any] = {}
    if secagg is not None:
        fields["secagg"] = to_proto(secagg)
    if phase_data is not None:
        fields[_PHASE_DATA_FIELDS[type(phase_data)]] = to_proto(phase_data)
    return fields


def task_fields_from_proto(task: pb.RoundTask) -> dict:
    """``secagg`` and ``phase_data`` of a received ``RoundTask`` (``None`` if unset), as
    ``fedmae.rounds.RoundTask`` keywords."""
    kind = task.WhichOneof("phase_data")
    return {
        "secagg": from_proto(task.secagg) if task.HasField("secagg") else None,
        "phase_data": from_proto(getattr(task, kind)) if kind else None,
    }
