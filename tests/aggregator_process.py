"""``fedmae serve`` as a separate process, for the system tests: start, health, status,
kill -9 and restart on the same state directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from federation_harness import TIMEOUT, ScriptedClient, open_admin, random_delta
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedmae.ml.model_state import trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.payload.layout import ModelLayout
from fedmae.pki.files import ClientIdentity
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.channels import open_channel
from fedmae.transport.transfer import fetch_model, update_messages

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


LAYOUT = ModelLayout.from_state(trainable_state(build_model("tiny", seed=0)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Aggregator:
    """`fedmae serve` as a separate process; kill -9 and restart on the same state."""

    def __init__(self, tmp: Path, certs: Path, *args: str):
        self.tmp, self.certs, self.args = tmp, certs, args
        self.port = free_port()
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
        with open_channel(f"127.0.0.1:{self.port}", ClientIdentity(self.certs / "admin")) as ch:
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
        channel, admin = open_admin(self.port, self.certs)
        with channel:
            return admin.Status(apb.StatusRequest(), timeout=TIMEOUT)

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


def model_digest(client: ScriptedClient) -> str:
    """The digest of the latest published model, as the server reports it."""
    header, _ = fetch_model(client.stub, LAYOUT, None, timeout=TIMEOUT)  # the latest
    return header.manifest.digest


def good_update_messages(round_=1, base=0, seed=1, scale=0.01):
    """A valid fp32 update of the tiny model, as the messages of one SubmitUpdate."""
    return list(update_messages(
        LAYOUT, random_delta(LAYOUT, seed, scale), round_=round_, base_version=base,
        num_samples=5, encoding=pb.ENCODING_FP32, metrics={}, chunk_size=1 << 20,
    ))  # fmt: skip
