"""The edge-client story as a user types it: serve, token, enroll, client, revoke.

Every step is a separate `fedmae` process, as on two machines (docs/edge-clients.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FEDMAE = [sys.executable, "-m", "fedmae"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([*FEDMAE, *args], capture_output=True, text=True, timeout=timeout,
                            env=ENV)  # fmt: skip
    assert result.returncode == 0, f"fedmae {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def _published(state: Path) -> int:
    path = state / "rounds.jsonl"
    if not path.exists():
        return 0
    return sum(json.loads(x)["status"] == "published" for x in path.read_text().splitlines())


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_enroll_train_revoke_from_the_command_line(tmp_path):
    certs, state, edge = tmp_path / "certs", tmp_path / "state", tmp_path / "edge"
    fed, enr = f"127.0.0.1:{_port()}", f"127.0.0.1:{_port()}"
    admin = ["--server", fed, "--identity", str(certs / "admin")]
    _run("certs", "init", "--out", str(certs))
    server_log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [*FEDMAE, "serve", "--state-dir", str(state), "--certs", str(certs), "--listen", fed,
         "--enroll-listen", enr, "--min-clients", "1", "--min-participants", "1", "--rounds", "0",
         "--round-timeout", "60"],
        stdout=server_log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    client = None
    try:
        _wait(
            lambda: (
                subprocess.run([*FEDMAE, "health", *admin], capture_output=True).returncode == 0
            ),
            60,
            "the aggregator",
        )
        token = _run("token", "create", "--name", "edge-1", "--ttl", "10m", *admin).stdout.strip()
        assert token.startswith("fmt_") and "\n" not in token
        ca = str(certs / "ca.pem")
        out = _run("enroll", "--server", enr, "--ca", ca, "--token", token, "--name", "edge-1",
                   "--label", "site=lab", "--out", str(edge)).stdout  # fmt: skip
        assert "enrolled as client 'edge-1'" in out
        names = sorted(p.name for p in edge.iterdir())
        assert names == ["ca.pem", "client.key", "client.pem", "enrollment.json"]
        client_log = open(tmp_path / "client.log", "w")
        client = subprocess.Popen(
            [*FEDMAE, "client", "--server", fed, "--identity", str(edge), "--limit", "200",
             "--threads", "1"],
            stdout=client_log, stderr=subprocess.STDOUT, env=ENV,
        )  # fmt: skip
        _wait(lambda: _published(state) >= 2, 180, "two published rounds")
        listed = _run("clients", "list", *admin).stdout
        assert "edge-1" in listed and "active" in listed and "site=lab" in listed
        _run("clients", "revoke", "edge-1", "--reason", "decommissioned", *admin)
        rc = client.wait(timeout=60)
        log = (tmp_path / "client.log").read_text()
        assert rc == 2, log
        assert "PERMISSION_DENIED" in log and "revoked" in log and "decommissioned" in log
        assert "Traceback" not in log
        assert "revoked" in _run("clients", "show", "edge-1", *admin).stdout
        audit = _run("audit", "--json", *admin).stdout.splitlines()
        actions = [json.loads(line)["action"] for line in audit]
        assert {"token.create", "client.enroll", "client.revoke"} <= set(actions)
        # A second enrollment with the spent token is refused with a clear message.
        again = subprocess.run(
            [*FEDMAE, "enroll", "--server", enr, "--ca", str(certs / "ca.pem"), "--token", token,
             "--out", str(tmp_path / "again")],
            capture_output=True, text=True, timeout=60, env=ENV,
        )  # fmt: skip
        assert again.returncode == 2 and "used up" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        server_log.close()
