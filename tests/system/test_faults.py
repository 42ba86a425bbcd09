"""Fault and hostile-input tests against a real aggregator *process* over gRPC/mTLS.

Each case checks the exact status code, that the server still answers health checks,
and the global model's checksum (unchanged unless a valid round closed). Crash cases
kill -9 the aggregator (or a client) and restart it on the same state directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    drive_rounds,
    make_identities,
    random_delta,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_agent.transfer import fetch_model, submit_update, update_messages
from fedmae.ml.model_state import trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import encode
from fedmae.payload.layout import ModelLayout
from fedmae.pki.files import ClientIdentity
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.credentials import channel_credentials
from fedmae.transport.messages import iter_chunks

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
LAYOUT = ModelLayout.from_state(trainable_state(build_model("tiny", seed=0)))


BAD_DIGEST = "xxh3-128:" + "0" * 32


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Aggregator:
    """`fedmae serve` as a separate process; kill -9 and restart on the same state."""

    def __init__(self, tmp: Path, certs: Path, *args: str):
        self.tmp, self.certs, self.args = tmp, certs, args
        self.port = _port()
        self.state = tmp / "state"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, env: dict | None = None) -> Aggregator:
        self.starts += 1
        log = open(self.tmp / f"serve-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedmae", "serve", "--state-dir", str(self.state),
             "--certs", str(self.certs), "--listen", f"127.0.0.1:{self.port}",
             "--enroll-listen", "off", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env={**ENV, **(env or {})},
        )  # fmt: skip
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if self.proc.poll() is not None:
                return  # it may have exited on purpose (a crash point); callers check
            time.sleep(0.2)
        raise AssertionError("aggregator did not become healthy")

    def healthy(self) -> bool:
        creds = channel_credentials(ClientIdentity(self.certs / "admin"))
        with grpc.secure_channel(f"127.0.0.1:{self.port}", creds) as ch:
            try:
                status = (
                    health_pb2_grpc.HealthStub(ch)
                    .Check(health_pb2.HealthCheckRequest(service="fedmae.v1.Federation"), timeout=2)
                    .status
                )
            except grpc.RpcError:
                return False
        return status == health_pb2.HealthCheckResponse.SERVING

    def status(self) -> apb.StatusResponse:
        creds = channel_credentials(ClientIdentity(self.certs / "admin"))
        with grpc.secure_channel(f"127.0.0.1:{self.port}", creds) as ch:
            return apb_grpc.AdminStub(ch).Status(apb.StatusRequest(), timeout=TIMEOUT)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def records(self) -> list[dict]:
        path = self.state / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def published(self) -> list[int]:
        return [r["round"] for r in self.records() if r["status"] == "published"]


def _model_sha(client: ScriptedClient) -> str:
    header, _ = fetch_model(client.stub, LAYOUT, None, timeout=TIMEOUT)  # the latest
    return header.manifest.digest


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ hostile input


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One aggregator process, one round open (client a selected, b is not)."""
    tmp = tmp_path_factory.mktemp("hostile")
    certs, ids = make_identities(tmp, ["a", "b"])
    limits = ["--max-update-norm", "1000", "--max-requests-per-s", "0"]
    # Two rounds: the server keeps serving after the last test closes round 1.
    agg = Aggregator(tmp, certs, "--min-clients", "1", "--rounds", "2", "--round-timeout",
                     "600", *limits).start()  # fmt: skip
    a = ScriptedClient(agg.port, ids["a"])
    a.wait_for("task", round=1)
    b = ScriptedClient(agg.port, ids["b"])  # subscribes after the round started
    sha = _model_sha(a)
    yield agg, a, b, sha
    a.close()
    b.close()
    agg.stop()


def _good_messages(round_=1, base=0, seed=1, scale=0.01):
    return list(update_messages(
        LAYOUT, random_delta(LAYOUT, seed, scale), round_=round_, base_version=base,
        num_samples=5, encoding=pb.ENCODING_FP32, metrics={}, chunk_size=1 << 20,
    ))  # fmt: skip


def _with_payload(values, header=None):
    payload = encode(values)
    good = _good_messages()
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
    good = _good_messages()
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
        "replay of another round": (_good_messages(round_=0), "FAILED_PRECONDITION"),
        "stale base version": (_good_messages(base=7), "FAILED_PRECONDITION"),
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
    assert _model_sha(a) == sha


def test_an_update_from_a_client_not_selected_is_refused(hostile):
    agg, _a, b, sha = hostile
    with pytest.raises(grpc.RpcError) as err:
        b.stub.SubmitUpdate(iter(_good_messages()), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not selected" in err.value.details()
    assert agg.healthy() and _model_sha(b) == sha


def test_a_cut_connection_frees_the_slot(hostile):
    agg, a, _b, sha = hostile
    good = _good_messages()
    started = threading.Event()

    def stalled():
        yield good[0]
        yield good[1]
        started.set()
        time.sleep(60)

    future = a.stub.SubmitUpdate.future(stalled(), timeout=TIMEOUT)
    assert started.wait(TIMEOUT)
    _wait(lambda: "a" in agg.status().uploading, TIMEOUT, "the server to hold a's upload")
    future.cancel()  # the connection is cut mid-stream
    assert agg.healthy() and _model_sha(a) == sha
    # The round still takes a complete update from the same client afterwards, once the
    # server has noticed the cut. (Last test of the module: this closes round 1.)
    for _ in range(50):
        try:
            receipt = a.stub.SubmitUpdate(iter(_good_messages(seed=9)), timeout=TIMEOUT)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            time.sleep(0.1)
    assert receipt.updates_received == 1
    a.wait_for("model_published", version=1)
    assert _model_sha(a) != sha  # a valid round closed: now the model changed


# ------------------------------------------------------------------ crashes


def _client(tmp: Path, port: int, ident: Path, name: str, index: int, count: int):
    log = open(tmp / f"{name}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "fedmae", "client", "--server", f"127.0.0.1:{port}",
         "--identity", str(ident), "--partition", f"{index}/{count}", "--limit",
         str(150 * count), "--threads", "1", "--give-up-after", "120"],
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip


def _finish(agg: Aggregator, clients: list[subprocess.Popen], timeout: float = 180) -> None:
    agg.proc.wait(timeout=timeout)  # the aggregator exits when the run is complete
    assert agg.proc.returncode == 0
    for c in clients:
        c.wait(timeout=60)


def _check_run(agg: Aggregator, rounds: int) -> None:
    assert agg.published() == list(range(1, rounds + 1))  # each exactly once, none lost
    versions = sorted(p.name for p in (agg.state / "checkpoints").iterdir())
    assert versions == [f"v{v:06d}.safetensors" for v in range(rounds + 1)]  # no .tmp left


def test_kill9_mid_round_resumes_without_losing_or_repeating_a_round(tmp_path):
    certs, ids = make_identities(tmp_path, ["a", "b"])
    agg = Aggregator(tmp_path, certs, "--min-clients", "2", "--rounds", "4",
                     "--round-timeout", "120").start()  # fmt: skip
    clients = [_client(tmp_path, agg.port, ids[n], n, i, 2) for i, n in enumerate(ids)]
    try:
        _wait(lambda: len(agg.published()) >= 2, 120, "two rounds")
        agg.kill9()  # round 3 is open (or about to be)
        assert agg.published() == [1, 2] or agg.published() == [1, 2, 3]
        agg.start()
        _finish(agg, clients)
        _check_run(agg, 4)
        assert all(c.returncode == 0 for c in clients)  # they reconnected by themselves
    finally:
        agg.stop()
        for c in clients:
            c.kill()


@pytest.mark.parametrize("point", ["checkpoint", "published"])
def test_kill9_mid_checkpoint_is_crash_consistent(tmp_path, point):
    certs, ids = make_identities(tmp_path, ["a"])
    agg = Aggregator(tmp_path, certs, "--min-clients", "1", "--rounds", "2",
                     "--round-timeout", "120")  # fmt: skip
    agg.start(env={"FEDMAE_CRASH_AT": point})  # dies by SIGKILL inside round 1's checkpoint
    client = _client(tmp_path, agg.port, ids["a"], "a", 0, 1)
    try:
        agg.proc.wait(timeout=120)
        assert agg.proc.returncode == -signal.SIGKILL
        if point == "checkpoint":  # written to a temp file, never renamed: not published
            tmp_files = [p.name for p in (agg.state / "checkpoints").glob("*.tmp")]
            assert tmp_files == ["v000001.safetensors.tmp"]
            assert not (agg.state / "checkpoints" / "v000001.safetensors").exists()
        else:  # renamed into place, but the round was never logged
            assert (agg.state / "checkpoints" / "v000001.safetensors").exists()
            assert agg.published() == []
        agg.start()
        _finish(agg, [client])
        _check_run(agg, 2)
        if point == "published":
            assert agg.records()[0].get("recovered") is True
    finally:
        agg.stop()
        client.kill()


def test_a_client_killed_mid_round_is_dropped_and_the_round_closes(tmp_path):
    certs, ids = make_identities(tmp_path, ["a", "b"])
    agg = Aggregator(tmp_path, certs, "--min-clients", "2", "--min-updates", "1", "--rounds",
                     "3", "--round-timeout", "120", "--dropout-grace", "1").start()  # fmt: skip
    a = _client(tmp_path, agg.port, ids["a"], "a", 0, 2)
    b = ScriptedClient(agg.port, ids["b"])  # b takes the task and then vanishes
    try:
        b.wait_for("task", round=1)
        b.close()
        _wait(lambda: len(agg.published()) >= 1, 60, "round 1 without b")
        first = agg.records()[0]
        assert first["participants"] == ["a"]
        assert first["dropped"] == ["b"] and first["dropped_reasons"]["b"] == "disconnected"
        assert first["duration_s"] < 60  # closed early, not at the 120 s deadline
        assert agg.healthy()
    finally:
        agg.stop()
        a.kill()


def test_server_limits_answer_resource_exhausted(tmp_path):
    certs, ids = make_identities(tmp_path, ["a"])
    agg = Aggregator(tmp_path, certs, "--min-clients", "1", "--rounds", "1",
                     "--max-requests-per-s", "2").start()  # fmt: skip
    a = ScriptedClient(agg.port, ids["a"], subscribe=False)
    try:
        codes = []
        for _ in range(12):  # burst of 4 allowed at 2/s, then refused
            try:
                fetch_model(a.stub, LAYOUT, 0, timeout=TIMEOUT, resume_attempts=0)
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
                assert "requests per second" in err.details()
        assert "RESOURCE_EXHAUSTED" in codes and codes[0] == "OK"
        assert agg.healthy()
    finally:
        a.close()
        agg.stop()


def test_update_submission_after_restart_is_refused_cleanly(tmp_path):
    """An update in flight during a crash is refused after the restart, never half-applied."""
    certs, ids = make_identities(tmp_path, ["a", "b"])
    agg = Aggregator(tmp_path, certs, "--min-clients", "2", "--rounds", "2").start()
    a, b = ScriptedClient(agg.port, ids["a"]), ScriptedClient(agg.port, ids["b"])
    try:
        a.wait_for("task", round=1)
        sha = _model_sha(a)
        good = _good_messages()
        started = threading.Event()

        def stalled():
            yield from good[:3]
            started.set()
            time.sleep(3)
            yield from good[3:]

        future = a.stub.SubmitUpdate.future(stalled(), timeout=TIMEOUT)
        assert started.wait(TIMEOUT)
        agg.kill9()
        with pytest.raises(grpc.RpcError) as err:
            future.result()
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        agg.start()
        a2 = ScriptedClient(agg.port, ids["a"])
        b2 = ScriptedClient(agg.port, ids["b"])
        task = a2.wait_for("task", round=1).task  # round 1 again, from version 0
        assert task.model_version == 0 and _model_sha(a2) == sha
        for c, seed in ((a2, 1), (b2, 2)):
            submit_update(c.stub, LAYOUT, random_delta(LAYOUT, seed), round_=1, base_version=0,
                          num_samples=3, timeout=TIMEOUT)  # fmt: skip
        a2.wait_for("model_published", version=1)
        assert agg.published() == [1]
        a2.close()
        b2.close()
    finally:
        a.close()
        b.close()
        agg.stop()


def test_f12_the_final_model_is_served_after_the_run_until_every_client_has_it(tmp_path):
    """`fedmae serve` keeps serving the final version after RunFinished, so a slow client
    still gets it, and exits once every client subscribed at the end has fetched it."""
    certs, ids = make_identities(tmp_path, ["a", "b"])
    agg = Aggregator(tmp_path, certs, "--min-clients", "2", "--rounds", "1",
                     "--final-grace", "600").start()  # fmt: skip
    log = tmp_path / "serve-1.log"
    a, b = ScriptedClient(agg.port, ids["a"]), ScriptedClient(agg.port, ids["b"])
    try:
        drive_rounds({"a": a, "b": b}, LAYOUT, [1])
        for c in (a, b):
            c.wait_for("run_finished", final_version=1)
        _wait(lambda: "serving the final version 1" in log.read_text()
              or agg.proc.poll() is not None, TIMEOUT, "the run to end")  # fmt: skip
        header, _ = fetch_model(a.stub, LAYOUT, None, timeout=TIMEOUT, resume_attempts=0)
        assert header.version == 1  # the latest is the final version
        header, _ = fetch_model(b.stub, LAYOUT, 0, timeout=TIMEOUT, resume_attempts=0)
        assert header.version == 0  # any kept version can be asked for; not the final one
        assert agg.proc.poll() is None  # b has not fetched the final version yet
        fetch_model(b.stub, LAYOUT, 1, timeout=TIMEOUT, resume_attempts=0)
        assert agg.proc.wait(timeout=TIMEOUT) == 0  # every client has it: the server exits
        text = log.read_text()
        assert "until a, b have fetched it" in text
        assert "every client fetched the final version 1" in text
    finally:
        a.close()
        b.close()
        agg.stop()
