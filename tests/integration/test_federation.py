"""Integration tests over real gRPC with mutual TLS on 127.0.0.1."""

from __future__ import annotations

import json
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
    fetch_flat,
    held_upload,
    make_identities,
    make_server,
    random_delta,
    wait_until,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.numpy import load_file

from client_agent.transfer import fetch_model, submit_update, update_messages
from fedmae.pki import certs as tls
from fedmae.tensor_codec import encode, iter_chunks, payload_digest
from fedmae.transport import frames as wire
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport._proto import federation_pb2_grpc as pb_grpc


@pytest.fixture
def cluster(tmp_path):
    """Factory: a started aggregator plus subscribed scripted clients; all torn down."""
    made: list = []

    def start(names: list[str], rounds: int = 1, min_clients: int | None = None, **policy):
        certs_dir, ids = make_identities(tmp_path, names)
        server = make_server(
            tmp_path / "state", certs_dir, min_clients or len(names), rounds, **policy
        )
        port = server.start()
        clients = {n: ScriptedClient(port, ids[n]) for n in names}
        made.append((server, clients))
        return server, port, clients, ids

    yield start
    for server, clients in made:
        for c in clients.values():
            c.close()
        server.stop(grace=0)


BAD_DIGEST = "xxh3-128:" + "0" * 32


def _expected(theta: torch.Tensor, deltas: dict[str, torch.Tensor], n: dict[str, int]):
    """θ + Σ nᵢΔᵢ / Σ nᵢ, computed independently in float64 numpy."""
    total = sum(n.values())
    acc = np.zeros(theta.numel(), dtype=np.float64)
    for cid, d in deltas.items():
        acc += n[cid] * d.numpy().astype(np.float64)
    return theta.numpy().astype(np.float64) + acc / total


def test_fedavg_is_exact_over_mtls(cluster, tmp_path):
    names = ["alpha", "bravo", "charlie"]
    server, _port, clients, _ = cluster(names, rounds=1)
    layout = server.layout
    tasks = {n: c.wait_for("task").task for n, c in clients.items()}
    assert {t.round for t in tasks.values()} == {1}
    assert {t.model_version for t in tasks.values()} == {0}
    theta0 = fetch_flat(clients["alpha"], layout, 0)

    samples = {"alpha": 10, "bravo": 50, "charlie": 200}
    # Norm ~34, below round 1's default bound (0.5 x the model's norm of ~85): not clipped.
    deltas = {n: random_delta(layout, seed=i + 1, scale=0.03) for i, n in enumerate(names)}
    encodings = {"alpha": pb.ENCODING_FP32, "bravo": pb.ENCODING_FP32, "charlie": pb.ENCODING_FP32}
    for n in names:
        receipt = submit_update(
            clients[n].stub,
            layout,
            deltas[n],
            round_=1,
            base_version=0,
            num_samples=samples[n],
            encoding=encodings[n],
            metrics={"train_loss": 1.0 + names.index(n), "val_loss": 2.0},
            chunk_size=256 * 1024,  # several chunks per update
            timeout=TIMEOUT,
        )
        assert receipt.round == 1
        assert receipt.bytes_received == layout.numel * 4
        assert receipt.digest == payload_digest(encode(deltas[n]))

    published = clients["alpha"].wait_for("model_published", version=1).model_published
    assert published.round == 1
    theta1 = fetch_flat(clients["bravo"], layout, 1)
    expected = _expected(theta0, deltas, samples)
    np.testing.assert_allclose(theta1.numpy(), expected, rtol=0, atol=1e-6)
    # The update really moved the model (the test would pass trivially otherwise).
    assert np.abs(expected - theta0.numpy()).max() > 1e-2

    # The checkpoint on disk is a plain safetensors file with the same values.
    ckpt = load_file(str(tmp_path / "state" / "checkpoints" / "v000001.safetensors"))
    for e in layout.entries:
        np.testing.assert_array_equal(
            ckpt[e.name].reshape(-1), theta1.numpy()[e.offset : e.offset + e.numel]
        )
    record = json.loads((tmp_path / "state" / "rounds.jsonl").read_text().splitlines()[-1])
    assert record["round"] == 1 and record["version"] == 1 and record["status"] == "published"
    assert record["participants"] == names
    assert record["num_samples"] == 260
    assert record["train_loss"] == pytest.approx((10 * 1 + 50 * 2 + 200 * 3) / 260)
    assert record["val_loss"] == pytest.approx(2.0)
    assert record["bytes_in"] == 3 * layout.numel * 4
    assert record["bytes_out"] >= layout.numel * 4  # the fetch above
    closed = clients["charlie"].wait_for("round_closed", round=1).round_closed
    assert closed.success and list(closed.participants) == names


def test_fp16_and_bf16_updates_are_aggregated(cluster):
    names = ["a", "b"]
    server, _port, clients, _ = cluster(names, rounds=1)
    layout = server.layout
    for c in clients.values():
        c.wait_for("task")
    theta0 = fetch_flat(clients["a"], layout, 0)
    deltas = {"a": random_delta(layout, 7), "b": random_delta(layout, 8)}
    for n, enc in (("a", pb.ENCODING_FP16), ("b", pb.ENCODING_BF16)):
        submit_update(
            clients[n].stub, layout, deltas[n], round_=1, base_version=0, num_samples=3,
            encoding=enc, timeout=TIMEOUT,
        )  # fmt: skip
    clients["a"].wait_for("model_published", version=1)
    theta1 = fetch_flat(clients["a"], layout, 1)
    # Same computation with the deltas as the wire carried them.
    sent = {
        "a": deltas["a"].half().float(),
        "b": deltas["b"].bfloat16().float(),
    }
    np.testing.assert_allclose(
        theta1.numpy(), _expected(theta0, sent, {"a": 3, "b": 3}), rtol=0, atol=1e-6
    )


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_stale_and_duplicate_updates_are_refused(cluster):
    names = ["a", "b"]
    server, _port, clients, _ = cluster(names, rounds=2)
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
    theta1 = _expected(theta0, {"a": d["a1"], "b": d["b1"]}, {"a": 5, "b": 5})
    theta2 = _expected(
        torch.from_numpy(theta1.astype(np.float32)), {"a": d["a2"], "b": d["b2"]}, {"a": 4, "b": 12}
    )
    np.testing.assert_allclose(fetch_flat(clients["a"], layout, 2).numpy(), theta2, atol=1e-6)
    clients["a"].wait_for("run_finished")


def _send_raw(client: ScriptedClient, messages) -> pb.UpdateReceipt:
    return client.stub.SubmitUpdate(iter(messages), timeout=TIMEOUT)


def test_malformed_updates_get_invalid_argument_and_change_nothing(cluster):
    server, _port, clients, _ = cluster(["a", "b"], rounds=1)
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
    server, port, clients, ids = cluster(["a"], rounds=1, min_clients=2)
    # A certificate from another CA, and no certificate at all.
    other = tls.init_certs(tmp_path / "other-ca")
    foreign = tls.issue_client(other.dir, "a", tmp_path / "foreign")
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


def test_restart_resumes_from_the_last_published_version(tmp_path):
    certs_dir, ids = make_identities(tmp_path, ["a"])
    server = make_server(tmp_path / "state", certs_dir, min_clients=1, rounds=1)
    port = server.start()
    client = ScriptedClient(port, ids["a"])
    try:
        client.wait_for("task", round=1)
        submit_update(
            client.stub, server.layout, random_delta(server.layout, 3), round_=1,
            base_version=0, num_samples=1, timeout=TIMEOUT,
        )  # fmt: skip
        client.wait_for("run_finished")
        v1 = fetch_flat(client, server.layout, 1)
    finally:
        client.close()
        server.stop(grace=0)

    again = make_server(tmp_path / "state", certs_dir, min_clients=1, rounds=2)
    assert again.rounds.version == 1 and again.rounds.next_round == 2
    assert torch.equal(again.rounds.global_flat, v1)
    port = again.start()
    client = ScriptedClient(port, ids["a"])
    try:
        task = client.wait_for("task").task
        assert (task.round, task.model_version) == (2, 1)
    finally:
        client.close()
        again.stop(grace=0)


def test_round_without_enough_updates_fails_and_is_retried(cluster):
    names = ["a", "b"]
    server, _port, clients, _ = cluster(names, rounds=1, round_timeout_s=1.5, retry_delay_s=0.1)
    layout = server.layout
    for c in clients.values():
        c.wait_for("task", round=1, attempt=1)
    theta0 = fetch_flat(clients["a"], layout, 0)
    submit_update(
        clients["a"].stub, layout, random_delta(layout, 1), round_=1, base_version=0,
        num_samples=5, timeout=TIMEOUT,
    )  # fmt: skip
    closed = clients["a"].wait_for("round_closed", round=1).round_closed
    assert not closed.success and closed.version == 0
    assert "only 1 of 2 required updates" in closed.reason
    # The round is retried from the same version; the lone update was not applied.
    retry = clients["b"].wait_for("task", round=1, attempt=2).task
    assert retry.model_version == 0
    assert torch.equal(fetch_flat(clients["a"], layout, None), theta0)  # nothing published
    assert server.rounds.version == 0
    records = server.rounds.round_log.read()
    assert records[0]["status"] == "failed" and records[0]["dropped"] == ["b"]
    assert records[0]["participants"] == ["a"]


def test_selection_is_seeded_and_respects_fraction():
    from aggregator_service.strategy import FedAvg

    pool = [f"c{i}" for i in range(10)]
    s = FedAvg()
    picked = s.configure_round(3, 1, pool, fraction=0.3, minimum=2, seed=7)
    assert len(picked) == 3 and set(picked) <= set(pool)
    assert picked == s.configure_round(3, 1, list(reversed(pool)), 0.3, 2, 7)  # order-free
    others = {tuple(s.configure_round(r, 1, pool, 0.3, 2, 7)) for r in range(1, 10)}
    assert len(others) > 1  # different rounds pick different clients
    assert len(s.configure_round(1, 1, pool, fraction=0.05, minimum=2, seed=0)) == 2


def test_over_selection_closes_at_the_target_and_refuses_the_straggler(cluster):
    names = ["a", "b", "c"]
    server, _port, clients, _ = cluster(names, rounds=2, target_updates=2, min_updates=2)
    layout = server.layout
    for c in clients.values():
        c.wait_for("task", round=1)
    for n in ("a", "b"):
        submit_update(clients[n].stub, layout, random_delta(layout, ord(n)), round_=1,
                      base_version=0, num_samples=4, timeout=TIMEOUT)  # fmt: skip
    closed = clients["c"].wait_for("round_closed", round=1).round_closed
    assert closed.success and list(closed.participants) == ["a", "b"]
    with pytest.raises(grpc.RpcError) as late:
        submit_update(clients["c"].stub, layout, random_delta(layout, 3), round_=1,
                      base_version=0, num_samples=4, timeout=TIMEOUT)  # fmt: skip
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    record = server.rounds.round_log.read()[0]
    assert record["dropped"] == ["c"]
    assert record["dropped_reasons"]["c"] == "no update before the round closed"


def test_multi_tensor_model_in_many_small_chunks(tmp_path):
    """The big-model path (many tensors, payload far larger than a chunk) in miniature."""
    from aggregator_service.config import RoundPolicy, ServerConfig
    from aggregator_service.rpc.server import AggregatorServer
    from fedmae.config import TrainingConfig
    from fedmae.ml import model_zoo

    certs_dir, ids = make_identities(tmp_path, ["a"])
    old = model_zoo.BLOB_TENSOR
    model_zoo.BLOB_TENSOR = 50_000  # 7 tensors, the last one partial
    try:
        server = AggregatorServer(ServerConfig(
            state_dir=tmp_path / "state", listen="127.0.0.1:0", certs_dir=certs_dir,
            policy=RoundPolicy(min_clients=1, rounds=1), chunk_size=4096,
            training=TrainingConfig(model="blob:312345"), max_requests_per_s=0,
        ))  # fmt: skip
    finally:
        model_zoo.BLOB_TENSOR = old
    port = server.start()
    client = ScriptedClient(port, ids["a"])
    try:
        layout = server.layout
        assert len(layout.entries) == 7 and layout.numel == 312345
        client.wait_for("task")
        theta0 = fetch_flat(client, layout, 0)
        delta = random_delta(layout, 11)
        receipt = submit_update(client.stub, layout, delta, round_=1, base_version=0,
                                num_samples=2, chunk_size=4096, timeout=TIMEOUT)  # fmt: skip
        assert receipt.bytes_received == 312345 * 4  # in 306 chunks of 4 KiB
        client.wait_for("model_published", version=1)
        header, theta1 = fetch_model(client.stub, layout, 1, timeout=TIMEOUT)
        np.testing.assert_allclose(theta1.numpy(), (theta0 + delta).numpy(), atol=1e-6)
    finally:
        client.close()
        server.stop(grace=0)


def test_other_encodings_are_encoded_once_for_all_downloads(cluster):
    server, _port, clients, _ = cluster(["a", "b"], rounds=1)
    layout = server.layout
    fp32 = fetch_flat(clients["a"], layout, 0)
    ha, fa = fetch_model(clients["a"].stub, layout, 0, encoding=pb.ENCODING_FP16, timeout=TIMEOUT)
    hb, fb = fetch_model(clients["b"].stub, layout, 0, encoding=pb.ENCODING_FP16, timeout=TIMEOUT)
    assert ha.manifest.digest == hb.manifest.digest and torch.equal(fa, fb)
    assert torch.equal(fa, fp32.half().float())
    assert server.rounds.downloads._encoded_cache[0] == (0, pb.ENCODING_FP16)


def test_plain_generated_stubs_interoperate(cluster):
    """The fast framing is only an implementation: a peer with plain generated stubs
    (protobuf parsing and serializing every chunk) downloads and uploads the same."""
    server, port, clients, ids = cluster(["a"], rounds=1)
    layout = server.layout
    clients["a"].wait_for("task")
    fast = fetch_flat(clients["a"], layout, 0)
    plain = pb_grpc.FederationStub(clients["a"].channel)
    stream = plain.FetchModel(pb.FetchModelRequest(version=0, chunk_size=65536), timeout=TIMEOUT)
    header, *chunks = list(stream)
    assert header.WhichOneof("part") == "header" and len(chunks) > 1
    assert all(isinstance(c, pb.ModelChunk) and c.WhichOneof("part") == "chunk" for c in chunks)
    payload = b"".join(c.chunk.data for c in chunks)
    assert payload_digest(payload) == header.header.manifest.digest
    assert torch.equal(torch.frombuffer(bytearray(payload), dtype=torch.float32), fast)
    delta = random_delta(layout, 5)
    msgs = update_messages(layout, delta, round_=1, base_version=0, num_samples=3,
                           encoding=pb.ENCODING_FP32, metrics={}, chunk_size=65536)  # fmt: skip
    receipt = plain.SubmitUpdate(msgs, timeout=TIMEOUT)
    assert receipt.bytes_received == layout.numel * 4
    assert receipt.digest == payload_digest(encode(delta))
    clients["a"].wait_for("model_published", version=1)
    np.testing.assert_allclose(fetch_flat(clients["a"], layout, 1).numpy(),
                               (fast + delta).numpy(), atol=1e-6)  # fmt: skip


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
    server = make_server(tmp_path / "state", certs, 1, 1,
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
