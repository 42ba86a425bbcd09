"""Issue 11, finding 1: a flood of streams and held calls on the enrollment port (TLS,
no client certificate), from a process of its own, does not stall the federation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    make_identities,
    make_server,
    open_admin,
    random_delta,
    wait_until,
)

from aggregator_service.rpc.server import ENROLL_WORKERS
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport.transfer import submit_update

FLOOD = Path(__file__).parent.parent / "enrollment_flood.py"


def _timed_status(admin: apb_grpc.AdminStub) -> tuple[apb.StatusResponse, float]:
    t0 = time.monotonic()
    status = admin.Status(apb.StatusRequest(), timeout=2.0)  # DEADLINE_EXCEEDED fails the test
    return status, time.monotonic() - t0


class FloodProcess:
    """``tests/enrollment_flood.py`` in a process of its own; JSON lines both ways."""

    def __init__(self, address: str, ca: Path, watches: int, held: int):
        self.proc = subprocess.Popen(
            [sys.executable, str(FLOOD), "--address", address, "--ca", str(ca),
             "--watches", str(watches), "--held", str(held), "--max-seconds", "120"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        # Once every watch is answered or refused (or --settle passed: 20 s).
        self.started = json.loads(self.proc.stdout.readline())
        assert self.started["started"] == watches + held

    def report(self) -> dict:
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def test_f1_enrollment_flood_does_not_stall_the_federation(tmp_path):
    """3,000 Health.Watch streams and 24 Enroll calls that never send their request hit
    the enrollment port (TLS, no client certificate); meanwhile an enrolled client
    completes a round and admin Status answers within 2 s. On one shared 2048-thread
    server the streams took every handler thread and Status hit DEADLINE_EXCEEDED."""
    watches, held = 3000, 24
    certs, ids = make_identities(tmp_path, ["a"])
    server = make_server(tmp_path / "state", certs, min_clients=1, rounds=1, min_participants=1)
    port = server.start()
    admin_channel, admin = open_admin(port, certs)
    client = ScriptedClient(port, ids["a"])
    flood = None
    try:
        task = client.wait_for("task").task
        flood = FloodProcess(f"127.0.0.1:{server.enroll_port}", certs / "ca.pem", watches, held)
        status, seconds = _timed_status(admin)
        assert status.round == 1 and seconds < 2.0
        submit_update(
            client.stub, server.layout, random_delta(server.layout, 1), round_=1,
            base_version=task.model_version, num_samples=5, timeout=TIMEOUT,
        )  # fmt: skip
        client.wait_for("model_published", version=1)
        report = wait_until(
            lambda: (
                (r := flood.report())["open"]["watch"] == 0
                and sum(r["codes"]["held"].values()) == held - ENROLL_WORKERS
                and r
            ),
            "the flood to be answered",
        )
        # The flood is still there: every handler thread of the enrollment port is held.
        assert report["open"]["held"] == ENROLL_WORKERS
        status, seconds = _timed_status(admin)
        assert status.version == 1 and seconds < 2.0
        # No watch was served (Health is not on that port), streams over the per-
        # connection cap were refused, and calls over ENROLL_WORKERS got RESOURCE_EXHAUSTED.
        assert flood.started["in_place"] == watches and report["answered"] == 0
        watch_codes = report["codes"]["watch"]
        assert set(watch_codes) <= {"UNIMPLEMENTED", "UNAVAILABLE"}  # refused streams
        assert sum(watch_codes.values()) == watches and watch_codes["UNIMPLEMENTED"] > 0
        assert report["codes"]["held"] == {"RESOURCE_EXHAUSTED": held - ENROLL_WORKERS}
    finally:
        if flood is not None:
            flood.stop()
        client.close()
        admin_channel.close()
        server.stop(grace=0)
