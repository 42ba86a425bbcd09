"""Hostile updates against a real aggregator *process* over gRPC/mTLS.

Each case checks the exact status code, that the server still answers health checks,
and the global model's checksum (unchanged unless a valid round closed).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from aggregator_process import LAYOUT, Aggregator, good_update_messages, model_digest
from federation_harness import TIMEOUT, ScriptedClient, make_identities, random_delta, wait_until

from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import encode
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.messages import iter_chunks

BAD_DIGEST = "xxh3-128:" + "0" * 32


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One aggregator process, one round open (client a selected, b is not)."""
    tmp = tmp_path_factory.mktemp("hostile")
    certs, ids = make_identities(tmp, ["a", "b"])
    limits = ["--max-update-norm", "1000", "--max-requests-per-s", "0"]
    # Two rounds: the server keeps serving after the last test closes round 1.
    agg = Aggregator(tmp, certs, "--min-clients", "1", "--min-participants", "1", "--rounds", "2",
                     "--round-timeout", "600", *limits).start()  # fmt: skip
    a = ScriptedClient(agg.port, ids["a"])
    a.wait_for("task", round=1)
    b = ScriptedClient(agg.port, ids["b"])  # subscribes after the round started
    sha = model_digest(a)
    yield agg, a, b, sha
    a.close()
    b.close()
    agg.stop()


def _with_payload(values, header=None):
    payload = encode(values)
    good = good_update_messages()
    return [header or good[0], *[pb.UpdateMessage(chunk=c) for c in iter_chunks(payload)],
            pb.UpdateMessage(trailer=pb.UpdateTrailer(digest=payload_digest(payload)))]  # fmt: skip


def _raw(client, data: list[bytes]):
    call = client.channel.stream_unary(
        "/fedmae.v1.Federation/SubmitUpdate",
        request_serializer=lambda b: b,
        response_deserializer=pb.UpdateReceipt.FromString,
    )
    return call(iter(data), timeout=TIMEOUT)


def _cases():
    good = good_update_messages()
    header, chunks, trailer = good[0], good[1:-1], good[-1]
    big_header = pb.UpdateMessage()
    big_header.CopyFrom(header)
    big_header.header.manifest.total_bytes = 10**15
    wrong_dtype = pb.UpdateMessage()
    wrong_dtype.CopyFrom(header)
    wrong_dtype.header.manifest.tensors[2].dtype = "float64"
    nan = random_delta(LAYOUT, 3)
    nan[5] = float("nan")
    inf = random_delta(LAYOUT, 4)
    inf[-1] = float("inf")
    zero_samples = pb.UpdateMessage()
    zero_samples.CopyFrom(header)
    zero_samples.header.num_samples = 0
    bad_offset = pb.UpdateMessage(chunk=pb.Chunk(offset=7, data=chunks[0].chunk.data))
    nan_loss = pb.UpdateMessage()
    nan_loss.CopyFrom(header)
    nan_loss.header.metrics["train_loss"] = float("nan")
    contradicting = pb.UpdateMessage()  # the trailer is right, the header's digest is not
    contradicting.CopyFrom(header)
    contradicting.header.manifest.digest = BAD_DIGEST
    return {
        "malformed protobuf": (lambda c: _raw(c, [b"\xff\xfe garbage"]), "INVALID_ARGUMENT"),
        "malformed second message": (
            lambda c: _raw(c, [header.SerializeToString(), b"\x0a\xff"]),
            "INVALID_ARGUMENT",
        ),
        "truncated stream": ([header, *chunks[:2]], "INVALID_ARGUMENT"),
        "out of order": ([header, chunks[1], chunks[0], *chunks[2:], trailer], "INVALID_ARGUMENT"),
        "duplicated chunk": ([header, chunks[0], *chunks, trailer], "INVALID_ARGUMENT"),
        "gap in offsets": ([header, bad_offset, trailer], "INVALID_ARGUMENT"),
        "oversized declaration": ([big_header, *chunks, trailer], "INVALID_ARGUMENT"),
        "wrong dtype": ([wrong_dtype, *chunks, trailer], "INVALID_ARGUMENT"),
        "NaN": (_with_payload(nan), "INVALID_ARGUMENT"),
        "Inf": (_with_payload(inf), "INVALID_ARGUMENT"),
        "NaN loss reported": ([nan_loss, *chunks, trailer], "INVALID_ARGUMENT"),
        "header digest contradicts the payload": (
            [contradicting, *chunks, trailer],
            "INVALID_ARGUMENT",
        ),
        "no digest": (
            [header, *chunks, pb.UpdateMessage(trailer=pb.UpdateTrailer())],
            "INVALID_ARGUMENT",
        ),
        "zero samples": ([zero_samples, *chunks, trailer], "INVALID_ARGUMENT"),
        "bad checksum": (
            [header, *chunks, pb.UpdateMessage(trailer=pb.UpdateTrailer(digest=BAD_DIGEST))],
            "INVALID_ARGUMENT",
        ),  # fmt: skip
        "replay of another round": (good_update_messages(round_=0), "FAILED_PRECONDITION"),
        "stale base version": (good_update_messages(base=7), "FAILED_PRECONDITION"),
        "message over the size limit": (
            [header, pb.UpdateMessage(chunk=pb.Chunk(offset=0, data=bytes(6 << 20)))],
            "RESOURCE_EXHAUSTED",
        ),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_hostile_update_is_refused_and_changes_nothing(hostile, case):
    agg, a, _b, sha = hostile
    send, code = _cases()[case]
    with pytest.raises(grpc.RpcError) as err:
        if callable(send):
            send(a)
        else:
            a.stub.SubmitUpdate(iter(send), timeout=TIMEOUT)
    assert err.value.code().name == code, err.value.details()
    assert err.value.details()  # a message a person can read
    assert agg.proc.poll() is None and agg.healthy()
    assert model_digest(a) == sha


def test_an_update_from_a_client_not_selected_is_refused(hostile):
    agg, _a, b, sha = hostile
    with pytest.raises(grpc.RpcError) as err:
        b.stub.SubmitUpdate(iter(good_update_messages()), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not selected" in err.value.details()
    assert agg.healthy() and model_digest(b) == sha


def test_a_cut_connection_frees_the_slot(hostile):
    agg, a, _b, sha = hostile
    good = good_update_messages()
    started = threading.Event()

    def stalled():
        yield good[0]
        yield good[1]
        started.set()
        time.sleep(60)

    future = a.stub.SubmitUpdate.future(stalled(), timeout=TIMEOUT)
    assert started.wait(TIMEOUT)
    wait_until(
        lambda: "a" in agg.status().uploading, "the server to hold a's upload", TIMEOUT, every=0.2
    )
    future.cancel()  # the connection is cut mid-stream
    assert agg.healthy() and model_digest(a) == sha
    # The round still takes a complete update from the same client afterwards, once the
    # server has noticed the cut. (Last test of the module: this closes round 1.)
    for _ in range(50):
        try:
            receipt = a.stub.SubmitUpdate(iter(good_update_messages(seed=9)), timeout=TIMEOUT)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            time.sleep(0.1)
    assert receipt.updates_received == 1
    a.wait_for("model_published", version=1)
    assert model_digest(a) != sha  # a valid round closed: now the model changed
