"""Secure aggregation on the wire: fedmae.transport.secagg, the RoundTask's phase data,
the ring encodings, and FederationClient's answers and masked input over real gRPC."""

from __future__ import annotations

import hashlib
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from fedmae.config import TrainingConfig
from fedmae.errors import InvalidRequest, InvalidUpdate
from fedmae.payload.decoder import PayloadDecoder
from fedmae.payload.digest import check_digest
from fedmae.payload.encodings import RING_ENCODINGS, Encoding, decode, encode, encoding_from_name
from fedmae.payload.layout import (
    MASKED_INPUT_TENSOR,
    ModelLayout,
    check_ring_manifest,
    ring_manifest,
)
from fedmae.rounds import Phase, RoundEvent, RoundTask
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
from fedmae.transport._proto import federation_pb2_grpc as pb_grpc
from fedmae.transport.events import event_from_proto, event_to_proto, update_header_from_proto
from fedmae.transport.federation_client import FederationClient
from fedmae.transport.messages import (
    encoding_from_proto,
    encoding_to_proto,
    manifest_from_proto,
    manifest_to_proto,
)
from fedmae.transport.secagg import answer_message, from_proto, secagg_answer, to_proto

PARAMS = SecAggParams(ring_bits=32, frac_bits=16, clip=0.5, weight_cap=1000, threshold=3)
KEYS = AdvertiseKeys(
    round=7, attempt=2, mask_public=bytes(range(32)), share_public=bytes(range(32, 64)),
    certificate_chain=b"-----BEGIN CERTIFICATE-----\nMII...\n-----END CERTIFICATE-----\n",
    signature=b"\x30\x45" + b"\x01" * 69,
)  # fmt: skip
PEER = PeerKeys(index=2, client_id="site-b", keys=KEYS)
ROSTER = Roster(index=1, threshold=2, peers=(PEER, PeerKeys(3, "site-c", KEYS)))
SEALED = (SealedShare(1, 2, b"\xaa" * 164), SealedShare(1, 3, b"\xbb" * 164))
INBOUND = InboundShares(shares=(SealedShare(2, 1, b"\x01" * 164),))
UNMASK = UnmaskRequest(survivors=(1, 2), dropped=(3,))
ANSWERS = [
    KEYS,
    ShareKeys(round=7, attempt=2, shares=SEALED, seed_commitment=hashlib.sha256(b"b").digest()),
    UnmaskShares(
        round=7, attempt=2,
        seed_shares=(RevealedShare(1, b"\x00\x01" + b"\x07" * 66),
                     RevealedShare(2, b"\x00\x01" + b"\x08" * 66)),
        key_shares=(RevealedShare(3, b"\x00\x01" + b"\x09" * 66),),
    ),
    SecAggAbort(round=7, attempt=2, reason="the keys of site site-c do not verify"),
]  # fmt: skip
MESSAGES = [PARAMS, PEER, ROSTER, SEALED[0], INBOUND, UNMASK, *ANSWERS]
MESSAGES += [RevealedShare(5, b"\x00\x05" + b"\x01" * 66), InboundShares(shares=())]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_secagg_message_survives_the_wire(message):
    msg = to_proto(message)
    assert type(msg).__name__ == type(message).__name__  # the same name on both sides
    back = from_proto(type(msg).FromString(msg.SerializeToString()))
    assert back == message and type(back) is type(message)


def test_every_secagg_dataclass_has_its_message_with_the_same_fields():
    import dataclasses

    seen = {type(m) for m in MESSAGES}
    assert len(seen) == 11
    for kind in seen:
        wire_fields = set(getattr(pb, kind.__name__).DESCRIPTOR.fields_by_name)
        assert wire_fields == {f.name for f in dataclasses.fields(kind)}


def test_a_peer_without_its_keys_is_a_malformed_roster():
    msg = pb.Roster(index=1, threshold=2, peers=[pb.PeerKeys(index=2, client_id="site-b")])
    with pytest.raises(InvalidRequest, match="PeerKeys without its keys"):
        from_proto(msg)


def _task(**secure) -> RoundTask:
    return RoundTask(
        round=7, attempt=2, model_version=6, phase=Phase.SHARE_KEYS,
        training=TrainingConfig(model="small"), deadline=1_700_000_000.5, selected_clients=3,
        **secure,
    )  # fmt: skip


@pytest.mark.parametrize(
    "task",
    [
        _task(),
        _task(secagg=PARAMS),
        _task(secagg=PARAMS, phase_data=ROSTER),
        _task(secagg=PARAMS, phase_data=INBOUND),
        _task(secagg=PARAMS, phase_data=UNMASK),
        _task(secagg=PARAMS, phase_data=InboundShares(shares=())),  # set, though empty
    ],
    ids=["plain", "params", "roster", "inbound", "unmask", "no-inbound"],
)
def test_a_round_task_carries_its_secagg_params_and_phase_data(task):
    msg = pb.RoundEvent.FromString(event_to_proto(RoundEvent(4, task)).SerializeToString())
    assert msg.task.HasField("secagg") == (task.secagg is not None)
    assert event_from_proto(msg) == RoundEvent(4, task)


def test_every_secure_phase_has_its_wire_number():
    for phase in Phase:
        assert pb.Phase.Name(int(phase)) == f"PHASE_{phase.name}"


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda m: type(m).__name__)
def test_an_answer_is_one_update_message_the_server_reads_back(answer):
    received = wire.deserializer(pb.UpdateMessage)(answer_message(answer).SerializeToString())
    assert secagg_answer(received) == answer


def test_an_update_header_or_chunk_is_no_secagg_answer():
    header = pb.UpdateMessage(header=pb.UpdateHeader(round=1))
    assert secagg_answer(header) is None
    assert secagg_answer(wire.deserializer(pb.UpdateMessage)(wire.frame(0, b"abc"))) is None
    assert secagg_answer(pb.UpdateMessage()) is None


@pytest.mark.parametrize("encoding", sorted(RING_ENCODINGS))
def test_a_ring_manifest_survives_the_wire(encoding):
    manifest = ring_manifest(11, encoding, digest="xxh3-128:" + "0" * 32)
    spec = manifest.tensors[0]
    size = 4 if encoding == Encoding.RING32 else 8
    assert (spec.name, spec.shape, spec.dtype) == (MASKED_INPUT_TENSOR, (11,), f"uint{8 * size}")
    assert manifest.total_bytes == spec.nbytes == 11 * size
    assert encoding_from_proto(encoding_to_proto(encoding)) is encoding
    msg = pb.Manifest.FromString(manifest_to_proto(manifest).SerializeToString())
    assert pb.Encoding.Name(msg.encoding) == f"ENCODING_{encoding.name}"
    assert manifest_from_proto(msg) == manifest
    check_ring_manifest(manifest_from_proto(msg), 11, encoding)


def test_a_ring_manifest_of_another_length_or_ring_is_refused():
    with pytest.raises(InvalidUpdate, match=r"expected one tensor 'secagg.masked_input' \[12\]"):
        check_ring_manifest(ring_manifest(11, Encoding.RING32), 12, Encoding.RING32)
    with pytest.raises(InvalidUpdate, match="this round's ring is ring64"):
        check_ring_manifest(ring_manifest(11, Encoding.RING32), 11, Encoding.RING64)
    with pytest.raises(InvalidUpdate, match="no secure-aggregation ring"):
        ring_manifest(11, Encoding.FP32)


@pytest.mark.parametrize("encoding", sorted(RING_ENCODINGS))
def test_a_ring_payload_is_never_a_model_or_delta(encoding):
    layout = ModelLayout.from_state({"a": torch.zeros(5)})
    with pytest.raises(InvalidUpdate, match="masked input, not a model or delta"):
        decode(np.zeros(40, dtype=np.uint8), encoding, 5)
    with pytest.raises(InvalidUpdate, match="masked input"):
        encode(torch.zeros(5), encoding)
    with pytest.raises(InvalidUpdate, match="masked input"):
        layout.manifest(encoding)
    ring = ring_manifest(5, encoding)
    with pytest.raises(InvalidUpdate, match="masked input"):
        PayloadDecoder(layout, ring)  # an update upload of a ring payload is refused
    with pytest.raises(ValueError, match="unknown update encoding"):
        encoding_from_name(encoding.name.lower())
    with pytest.raises(ValueError, match="unknown update encoding"):
        TrainingConfig(update_encoding=encoding.name.lower())


class _Recorder(pb_grpc.FederationServicer):
    """A Federation server that keeps every SubmitUpdate stream and admits at once."""

    def __init__(self) -> None:
        self.streams: list[list] = []

    def SubmitUpdate(self, request_iterator, context):
        context.send_initial_metadata((("fedmae-upload-admitted", "1"),))
        messages = list(request_iterator)
        self.streams.append(messages)
        size = sum(len(wire.chunk_of(m).data) for m in messages if wire.part(m) == "chunk")
        return pb.UpdateReceipt(round=7, bytes_received=size, updates_received=len(self.streams))


@pytest.fixture
def federation():
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.stream_unary_rpc_method_handler(
        recorder.SubmitUpdate,
        request_deserializer=wire.deserializer(pb.UpdateMessage),
        response_serializer=pb.UpdateReceipt.SerializeToString,
    )
    service = pb.DESCRIPTOR.services_by_name["Federation"].full_name
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {"SubmitUpdate": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = FederationClient(grpc.insecure_channel(f"127.0.0.1:{port}"), client_id="site-a")
    yield client, recorder
    client.close()
    server.stop(None)


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda m: type(m).__name__)
def test_send_secagg_is_a_stream_of_that_one_message(federation, answer):
    client, recorder = federation
    receipt = client.send_secagg(answer, timeout=10)
    assert receipt.round == 7 and receipt.updates_received == 1
    [stream] = recorder.streams
    assert len(stream) == 1 and secagg_answer(stream[0]) == answer


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_a_masked_input_is_an_upload_in_its_ring(federation, dtype):
    client, recorder = federation
    ring = np.random.default_rng(3).integers(0, np.iinfo(dtype).max, 1001, dtype=dtype)
    receipt = client.submit_masked_input(
        ring, round_=7, base_version=6, chunk_size=1000, stop=threading.Event(), timeout=10
    )
    assert receipt.bytes_received == ring.nbytes
    [stream] = recorder.streams
    header = update_header_from_proto(stream[0].header)
    encoding = Encoding.RING32 if dtype == np.uint32 else Encoding.RING64
    check_ring_manifest(header.manifest, len(ring), encoding)
    assert (header.round, header.base_version, header.num_samples) == (7, 6, 0)
    chunks = [wire.chunk_of(m) for m in stream[1:-1]]
    assert [c.offset for c in chunks] == list(range(0, ring.nbytes, 1000))
    payload = b"".join(bytes(c.data) for c in chunks)
    assert np.array_equal(np.frombuffer(payload, dtype=dtype), ring)
    check_digest(payload, header.manifest.digest)
    assert stream[-1].trailer.digest == header.manifest.digest


def test_a_masked_input_must_be_one_ring_vector(federation):
    client, _ = federation
    with pytest.raises(ValueError, match="uint32 or uint64 vector, not float32"):
        client.submit_masked_input(np.zeros(4, np.float32), round_=7, base_version=6)
    with pytest.raises(ValueError, match=r"shape \[2, 2\]"):
        client.submit_masked_input(np.zeros((2, 2), np.uint32), round_=7, base_version=6)
