"""Rounds over real gRPC with mutual TLS on 127.0.0.1: exact FedAvg, encodings, restart,
failed and retried rounds, selection and over-selection, the generated stubs."""

from __future__ import annotations

import dataclasses
import json

import grpc
import numpy as np
import pytest
import torch
from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    fedavg_expected,
    fetch_flat,
    make_identities,
    make_server,
    random_delta,
)
from google.protobuf.unknown_fields import UnknownFieldSet
from safetensors.numpy import load_file

from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import encode
from fedmae.rounds import RoundClosed
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport._proto import federation_pb2_grpc as pb_grpc
from fedmae.transport.events import event_from_proto
from fedmae.transport.transfer import fetch_model, submit_update, update_messages


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
    expected = fedavg_expected(theta0, deltas, samples)
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
    assert closed.success and closed.version == 1  # who took part: the log above only


def test_clients_hear_the_version_and_aggregate_metrics_only(cluster):
    """Issue 13: a client that knows its own delta and count, and the round's participant
    list and sample total, would recover a co-participant's delta from the published
    model. RoundClosed carries neither, and a round of fewer than 3 (the default
    min_participants) does not publish."""
    names = ["a", "b", "c"]
    server, _port, clients, _ = cluster(names, rounds=2, round_timeout_s=4.0)
    assert {"participants", "num_samples"}.isdisjoint(pb.RoundClosed.DESCRIPTOR.fields_by_name)
    layout = server.layout

    def send(n: str, round_: int) -> None:
        task = clients[n].wait_for("task", round=round_).task
        submit_update(clients[n].stub, layout, random_delta(layout, ord(n)), round_=round_,
                      base_version=task.model_version, num_samples=4, timeout=TIMEOUT,
                      metrics={"train_loss": 1.0, "val_loss": 2.0})  # fmt: skip

    for n in names:
        send(n, 1)
    for c in clients.values():
        msg = c.wait_for("round_closed", round=1)
        sent = {f.name for f, _ in msg.round_closed.ListFields()}
        assert sent == {"round", "attempt", "success", "version", "train_loss", "val_loss"}
        assert len(UnknownFieldSet(msg.round_closed)) == 0  # nothing under numbers 5, 6
        body = event_from_proto(msg).body
        assert isinstance(body, RoundClosed) and body.success and body.version == 1
        assert not {"participants", "num_samples"} & {f.name for f in dataclasses.fields(body)}
    assert server.rounds.round_log.read()[0]["participants"] == names  # the operator's
    for n in ("a", "b"):  # c sends nothing in round 2: 2 participants, below the 3
        send(n, 2)
    failed = clients["a"].wait_for("round_closed", round=2).round_closed
    assert not failed.success and failed.version == 1
    assert failed.reason == (
        "only 2 participants: a round needs at least 3 to publish (--min-participants)"
    )


def test_fp16_and_bf16_updates_are_aggregated(cluster):
    names = ["a", "b"]
    server, _port, clients, _ = cluster(names, rounds=1, min_participants=2)
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
        theta1.numpy(), fedavg_expected(theta0, sent, {"a": 3, "b": 3}), rtol=0, atol=1e-6
    )


def test_restart_resumes_from_the_last_published_version(tmp_path):
    certs_dir, ids = make_identities(tmp_path, ["a"])
    server = make_server(tmp_path / "state", certs_dir, min_clients=1, rounds=1, min_participants=1)
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

    again = make_server(tmp_path / "state", certs_dir, min_clients=1, rounds=2, min_participants=1)
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
    server, _port, clients, _ = cluster(
        names, rounds=1, round_timeout_s=1.5, retry_delay_s=0.1, min_participants=1
    )  # the min_clients rule, not the participant floor (tests/unit/test_min_participants.py)
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
    from aggregator_service.strategies import FedAvg

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
    server, _port, clients, _ = cluster(
        names, rounds=2, target_updates=2, min_updates=2, min_participants=2
    )
    layout = server.layout
    for c in clients.values():
        c.wait_for("task", round=1)
    for n in ("a", "b"):
        submit_update(clients[n].stub, layout, random_delta(layout, ord(n)), round_=1,
                      base_version=0, num_samples=4, timeout=TIMEOUT)  # fmt: skip
    closed = clients["c"].wait_for("round_closed", round=1).round_closed
    assert closed.success
    assert server.rounds.round_log.read()[0]["participants"] == ["a", "b"]
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
            policy=RoundPolicy(min_clients=1, rounds=1, min_participants=1), chunk_size=4096,
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
    server, _port, clients, _ = cluster(["a", "b"], rounds=1, min_participants=2)
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
    server, port, clients, ids = cluster(["a"], rounds=1, min_participants=1)
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
