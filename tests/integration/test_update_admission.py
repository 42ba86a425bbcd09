"""What the aggregator refuses or makes wait, over real gRPC with mutual TLS: stale,
duplicate and malformed updates, callers without the CA, uploads and downloads past
their slots."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from federation_harness import (
    TIMEOUT,
    UNREAD_DOWNLOADS,
    ScriptedClient,
    fedavg_expected,
    fetch_flat,
    held_upload,
    make_identities,
    make_server,
    random_delta,
    wait_until,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import encode
from fedmae.pki.issue import init_certs, issue_client
from fedmae.transport import frames as wire
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.messages import iter_chunks
from fedmae.transport.transfer import fetch_model, submit_update, update_messages

BAD_DIGEST = "xxh3-128:" + "0" * 32


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_stale_and_duplicate_updates_are_refused(cluster):
    names = ["a", "b"]
    server, _port, clients, _ = cluster(names, rounds=2, min_participants=2)
    layout = server.layout
    for c in clients.values():
        c.wait_for("task", round=1)
    d = {n: random_delta(layout, i) for i, n in enumerate(["a1", "b1", "a2", "b2", "x"])}

    def send(client, delta, round_, base, n=5):
        return submit_update(
            clients[client].stub, layout, delta, round_=round_, base_version=base,
            num_samples=n, timeout=TIMEOUT,
        )  # fmt: skip

    theta0 = fetch_flat(clients["a"], layout, 0)
    send("a", d["a1"], 1, 0)
    with pytest.raises(grpc.RpcError) as dup:
        send("a", d["x"], 1, 0)  # second update from a in round 1
    assert _code(dup) == grpc.StatusCode.FAILED_PRECONDITION
    assert "already sent" in dup.value.details()
    send("b", d["b1"], 1, 0)
    clients["a"].wait_for("task", round=2)

    with pytest.raises(grpc.RpcError) as stale_round:
        send("a", d["x"], 1, 0)  # round 1 is over
    assert _code(stale_round) == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 2 is open" in stale_round.value.details()
    with pytest.raises(grpc.RpcError) as stale_version:
        send("a", d["x"], 2, 0)  # right round, old base version
    assert _code(stale_version) == grpc.StatusCode.FAILED_PRECONDITION
    assert "version" in stale_version.value.details()

    send("a", d["a2"], 2, 1, n=4)
    with pytest.raises(grpc.RpcError) as dup2:
        send("a", d["x"], 2, 1)
    assert _code(dup2) == grpc.StatusCode.FAILED_PRECONDITION
    send("b", d["b2"], 2, 1, n=12)
    clients["b"].wait_for("model_published", version=2)

    # Only the accepted updates moved the model: refused ones left no trace.
    theta1 = fedavg_expected(theta0, {"a": d["a1"], "b": d["b1"]}, {"a": 5, "b": 5})
    theta2 = fedavg_expected(
        torch.from_numpy(theta1.astype(np.float32)), {"a": d["a2"], "b": d["b2"]}, {"a": 4, "b": 12}
    )
    np.testing.assert_allclose(fetch_flat(clients["a"], layout, 2).numpy(), theta2, atol=1e-6)
    clients["a"].wait_for("run_finished")


def _send_raw(client: ScriptedClient, messages) -> pb.UpdateReceipt:
    return client.stub.SubmitUpdate(iter(messages), timeout=TIMEOUT)


def test_malformed_updates_get_invalid_argument_and_change_nothing(cluster):
    server, _port, clients, _ = cluster(["a", "b"], rounds=1, min_participants=2)
    layout = server.layout
    clients["a"].wait_for("task")
    a = clients["a"]
    before = fetch_flat(a, layout, 0)
    good = list(update_messages(
        layout, random_delta(layout, 1), round_=1, base_version=0, num_samples=5,
        encoding=pb.ENCODING_FP32, metrics={}, chunk_size=1 << 20,
    ))  # fmt: skip
    header, chunks, trailer = good[0], good[1:-1], good[-1]
    assert len(chunks) >= 2

    wrong_shape = pb.UpdateMessage()
    wrong_shape.CopyFrom(header)
    wrong_shape.header.manifest.tensors[0].shape[0] += 1
    nan = random_delta(layout, 2)
    nan[123] = float("nan")
    payload = encode(nan)
    nan_trailer = pb.UpdateMessage(trailer=pb.UpdateTrailer(digest=payload_digest(payload)))
    nan_msgs = [header, *[pb.UpdateMessage(chunk=c) for c in iter_chunks(payload)], nan_trailer]
    cases = {
        "no header": ([chunks[0], trailer], "must start with an UpdateHeader"),
        "wrong shape": ([wrong_shape, *chunks, trailer], "shape"),
        "out of order": ([header, chunks[1], chunks[0], *chunks[2:], trailer], "in order"),
        "duplicated chunk": ([header, chunks[0], chunks[0], *chunks[1:], trailer], "in order"),
        "truncated": ([header, *chunks], "truncated"),
        "missing bytes": ([header, chunks[0], trailer], "incomplete"),
        "bad checksum": (
            [header, *chunks, pb.UpdateMessage(trailer=pb.UpdateTrailer(digest=BAD_DIGEST))],
            "digest mismatch",
        ),
        "nan": (nan_msgs, "NaN"),
    }
    for name, (msgs, words) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            _send_raw(a, msgs)
        assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT, name
        assert words in err.value.details(), (name, err.value.details())
        # A refused upload frees the slot: the same client may send a good one later.
    assert torch.equal(fetch_flat(a, layout, None), before)  # the latest is still version 0
    receipt = _send_raw(a, good)
    assert receipt.updates_received == 1


def test_clients_without_a_ca_certificate_are_refused(cluster, tmp_path):
    server, port, clients, ids = cluster(["a"], rounds=1, min_clients=2, min_participants=2)
    # a's Subscribe is in flight when cluster() returns: wait until it is registered.
    wait_until(lambda: server.rounds.connected() == ["a"], "a's subscription")
    # A certificate from another CA, and no certificate at all.
    other = init_certs(tmp_path / "other-ca")
    foreign = issue_client(other.dir, "a", tmp_path / "foreign")
    (foreign.dir / "ca.pem").write_bytes((ids["a"] / "ca.pem").read_bytes())  # trusts our server
    anonymous = tmp_path / "anon"
    anonymous.mkdir()
    (anonymous / "ca.pem").write_bytes((ids["a"] / "ca.pem").read_bytes())
    for ident in (foreign.dir, anonymous):
        intruder = ScriptedClient(port, ident, subscribe=False)
        with pytest.raises(grpc.RpcError) as err:
            list(intruder.stub.FetchModel(pb.FetchModelRequest(latest=True), timeout=10))
        assert _code(err) == grpc.StatusCode.UNAVAILABLE  # refused in the TLS handshake
        intruder.close()
    assert server.rounds.connected() == ["a"]
    # The server is still serving its legitimate client.
    health = health_pb2_grpc.HealthStub(clients["a"].channel)
    status = health.Check(
        health_pb2.HealthCheckRequest(service="fedmae.v1.Federation"), timeout=10
    ).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_uploads_beyond_the_limit_wait_for_a_slot_then_give_up(tmp_path):
    """Over ``max_uploads_in_flight`` an upload waits its turn instead of being refused
    (no client-side backoff sleeps); past ``transfer_wait_s`` it gets RESOURCE_EXHAUSTED."""
    names = ["a", "b", "c", "d"]
    certs, ids = make_identities(tmp_path, names)
    server = make_server(tmp_path / "state", certs, 4, 1,
                         server={"max_uploads_in_flight": 1, "transfer_wait_s": 2.0})  # fmt: skip
    port = server.start()
    clients = {n: ScriptedClient(port, ids[n]) for n in names}
    pool = ThreadPoolExecutor(2)
    try:
        for c in clients.values():
            c.wait_for("task")
        layout = server.layout

        def upload(name: str, seed: int):
            return submit_update(clients[name].stub, layout, random_delta(layout, seed),
                                 round_=1, base_version=0, num_samples=1, busy_retries=0,
                                 timeout=TIMEOUT)  # fmt: skip

        release, started = threading.Event(), threading.Event()
        held = held_upload(clients["a"], layout, random_delta(layout, 1), 1, release, started)
        assert started.wait(TIMEOUT)
        waiting = pool.submit(upload, "b", 2)
        wait_until(lambda: server.rounds.uploads.queue, "b's upload to reach the server")
        assert not waiting.done()  # b waits for a's slot (within its 2 s)
        release.set()
        assert held.result().updates_received == 1
        assert waiting.result(TIMEOUT).updates_received == 2  # then gets it

        release, started = threading.Event(), threading.Event()
        held = held_upload(clients["c"], layout, random_delta(layout, 3), 1, release, started)
        assert started.wait(TIMEOUT)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            upload("d", 4)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no slot freed within 2s" in refused.value.details()
        assert 1.5 < time.monotonic() - t0 < 10
        release.set()
        assert held.result().updates_received == 3
    finally:
        pool.shutdown(wait=False)
        for c in clients.values():
            c.close()
        server.stop(grace=0)


def test_downloads_beyond_the_budget_wait_for_a_slot(tmp_path):
    """Downloads at once are bounded by ``download_budget_mb`` / model size (at least 2);
    one more waits, and gets RESOURCE_EXHAUSTED after ``transfer_wait_s``."""
    certs, ids = make_identities(tmp_path, ["a", "b"])
    server = make_server(tmp_path / "state", certs, 1, 1, min_participants=1,
                         server={"download_budget_mb": 1, "transfer_wait_s": 1.0})  # fmt: skip
    port = server.start()
    a, b = (ScriptedClient(port, ids[n], False, UNREAD_DOWNLOADS) for n in ("a", "b"))
    try:
        assert server.rounds.downloads.max_downloads == 2
        request = pb.FetchModelRequest(version=0)
        held = [c.stub.FetchModel(request, timeout=TIMEOUT) for c in (a, b)]
        for stream in held:  # both started; unread, they stall on flow control
            assert wire.part(next(stream)) == "header"
        with pytest.raises(grpc.RpcError) as refused:
            fetch_model(a.stub, server.layout, 0, timeout=TIMEOUT, resume_attempts=0)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 downloads are in flight" in refused.value.details()
        held[0].cancel()  # frees a slot
        _, flat = fetch_model(a.stub, server.layout, 0, timeout=TIMEOUT)
        assert flat.numel() == server.layout.numel
        held[1].cancel()
    finally:
        a.close()
        b.close()
        server.stop(grace=0)
