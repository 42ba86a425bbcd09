"""The client edge of the wire: round events and transfer headers both ways through
``fedmae.transport.events``, and failed calls as domain errors
(``fedmae.transport.status.domain_error``) that the retry policy still decides on."""

from __future__ import annotations

import grpc
import pytest
import torch
from failed_call import Failed

from fedmae import errors, rounds
from fedmae.config import TrainingConfig
from fedmae.payload.encodings import Encoding
from fedmae.payload.layout import ModelLayout
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.events import (
    event_from_proto,
    event_to_proto,
    model_header_from_proto,
    model_header_to_proto,
    receipt_from_proto,
    receipt_to_proto,
    update_header_from_proto,
    update_header_to_proto,
)
from fedmae.transport.retry import RetryPolicy, ServerFault, Verdict, connection_failed
from fedmae.transport.status import DOMAIN_ERRORS, domain_error, status_code, status_name

S = grpc.StatusCode
LAYOUT = ModelLayout.from_state({"b": torch.zeros(3, 2), "a": torch.zeros(5)})
MANIFEST = LAYOUT.manifest(Encoding.FP32, digest="xxh3-128:" + "0" * 32)


EVENTS = [
    rounds.RoundTask(round=3, attempt=2, model_version=2, phase=rounds.Phase.TRAIN,
              training=TrainingConfig(model="small", local_epochs=2, update_encoding="int8"),
              deadline=1_700_000_000.5, selected_clients=4),
    rounds.ModelPublished(version=3, round=3, manifest=MANIFEST),
    rounds.RoundClosed(round=3, attempt=2, success=True, version=3, train_loss=0.25,
                val_loss=0.5, reason=""),
    rounds.RoundClosed(round=4, attempt=1, success=False, version=3, train_loss=0.0,
                val_loss=0.0, reason="too few updates"),
    rounds.RunFinished(final_version=3, rounds=4, reason="completed", model="small"),
    rounds.Heartbeat(time=1_700_000_001.25),
]  # fmt: skip


@pytest.mark.parametrize("body", EVENTS, ids=lambda body: body.kind)
def test_every_event_kind_survives_the_wire(body):
    event = rounds.RoundEvent(seq=0 if isinstance(body, rounds.Heartbeat) else 7, body=body)
    msg = pb.RoundEvent.FromString(event_to_proto(event).SerializeToString())
    assert msg.WhichOneof("event") == body.kind
    assert event_from_proto(msg) == event


def test_an_event_of_an_unknown_kind_is_skipped_and_an_unknown_phase_kept():
    assert event_from_proto(pb.RoundEvent(seq=5)) is None
    task = event_from_proto(pb.RoundEvent(task=pb.RoundTask(round=1, phase=99))).body
    assert task.phase == 99 and not isinstance(task.phase, rounds.Phase)


def test_transfer_headers_and_the_receipt_survive_the_wire():
    update = rounds.UpdateHeader(1, 0, 30, LAYOUT.manifest(Encoding.INT8), {"train_loss": 0.5})
    assert update_header_from_proto(update_header_to_proto(update)) == update
    model = rounds.ModelHeader(version=2, round=2, model="tiny", manifest=MANIFEST)
    assert model_header_from_proto(model_header_to_proto(model)) == model
    receipt = rounds.UpdateReceipt(round=1, bytes_received=4096, digest="d", updates_received=2)
    assert receipt_from_proto(receipt_to_proto(receipt)) == receipt


@pytest.mark.parametrize("code", list(DOMAIN_ERRORS), ids=lambda code: code.name)
def test_a_failed_call_is_raised_as_the_domain_error_of_its_code(code):
    error = domain_error(Failed(code, "why"))
    assert isinstance(error, DOMAIN_ERRORS[code])
    assert str(error) == "why" and status_name(error) == code.name
    # Still the call's RpcError for gRPC-level callers, and back to the same code.
    assert isinstance(error, grpc.RpcError) and error.code() == code and error.details() == "why"
    if code not in (S.CANCELLED, S.UNKNOWN):  # codes only gRPC answers with
        assert status_code(error) == code


def test_a_code_outside_the_table_is_a_plain_fedmae_error():
    error = domain_error(Failed(S.UNIMPLEMENTED))
    assert isinstance(error, errors.FedmaeError)
    assert not isinstance(error, tuple(DOMAIN_ERRORS.values()))
    assert status_name(error) == "UNIMPLEMENTED"
    assert domain_error(error) is error


def test_the_retry_policy_decides_on_domain_errors_as_on_their_codes():
    policy = RetryPolicy(retry_on=frozenset({S.UNAVAILABLE}), jitter=0.0, max_fault_retries=1)
    retries = policy.start(wait=lambda s: False)
    # Raised on this side (a stream that ended): the code the table gives it.
    assert retries.decide(errors.Unavailable("event stream ended")).retry
    assert retries.decide(domain_error(Failed(S.PERMISSION_DENIED))).verdict is Verdict.REFUSED
    fault = domain_error(Failed(S.INTERNAL, "a bug"))
    assert retries.decide(fault).retry
    decision = retries.decide(fault)
    assert decision.verdict is Verdict.SERVER_FAULT
    final = retries.give_up(fault, decision)
    assert isinstance(final, ServerFault) and isinstance(final, errors.ServerFault)
    assert status_name(final) == "INTERNAL" and str(final).startswith("INTERNAL 2 times in a row")


def test_only_a_failed_connection_ends_the_session():
    assert connection_failed(domain_error(Failed(S.UNAVAILABLE)))
    assert connection_failed(domain_error(Failed(S.CANCELLED)))
    assert connection_failed(domain_error(Failed(S.UNKNOWN)))
    assert connection_failed(errors.Unavailable("event stream ended"))
    for code in (S.INTERNAL, S.FAILED_PRECONDITION, S.DEADLINE_EXCEEDED, S.RESOURCE_EXHAUSTED):
        assert not connection_failed(domain_error(Failed(code)))
