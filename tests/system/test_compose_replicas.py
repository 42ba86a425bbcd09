"""docker/replica.py, the compose glue: one token per client replica, one name per replica.

Runs the script as compose does (a process per replica) against a real aggregator on
127.0.0.1 and its real registry; no Docker needed. `make compose-test` runs it in the
cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from federation_harness import TIMEOUT, make_server

from aggregator_service.registry import Registry
from fedmae.pki.files import ClientIdentity
from fedmae.pki.issue import init_certs

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docker" / "replica.py"
# Stands in for `fedmae client`: shows the arguments it was given, runs until stdin closes.
CLIENT = "import json, sys; print(json.dumps(sys.argv[1:]), flush=True); sys.stdin.read()"


def _replica(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=_env(), **kw)  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "FEDMAE_LOG_FORMAT": "text"}


def _issue(state: Path, tokens: Path, clients: int, *extra: str) -> subprocess.CompletedProcess:
    res = _replica("issue", f"--state-dir={state}", f"--tokens={tokens}",
                   f"--clients={clients}", *extra)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res


def _files(tokens: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(tokens.glob("client-*.json"))}


def _registry(state: Path) -> Registry:
    return Registry(state / "fedmae.db")


def test_f5_tokens_one_bound_single_use_short_lived_token_per_name(tmp_path):
    state, tokens = tmp_path / "state", tmp_path / "bootstrap" / "tokens"
    _issue(state, tokens, 3)
    files = _files(tokens)
    assert sorted(files) == ["client-1", "client-2", "client-3"]
    assert len({f["token"] for f in files.values()}) == 3, "replicas must not share a token"
    assert oct(tokens.stat().st_mode & 0o777) == "0o700"
    for name, entry in files.items():
        assert oct((tokens / f"{name}.json").stat().st_mode & 0o777) == "0o600"
        registry = _registry(state)
        try:
            record = registry.token(entry["token_id"])
        finally:
            registry.close()
        assert record.name == name == entry["name"]
        assert record.uses == 1 and record.used == 0
        assert 3500 < record.expires - record.created <= 3600  # default --ttl 1h
        assert record.created_by == "compose:tokens"


def test_f5_tokens_rerun_keeps_valid_skips_enrolled_and_revokes_the_rest(tmp_path):
    state, tokens = tmp_path / "state", tmp_path / "tokens"
    _issue(state, tokens, 3)
    first = _files(tokens)
    registry = _registry(state)
    try:
        registry.register("test", "client-2", "ab" * 32, "1", time.time() + 86400)
    finally:
        registry.close()
    _issue(state, tokens, 2)  # client-2 enrolled; FEDMAE_CLIENTS went from 3 to 2
    second = _files(tokens)
    assert sorted(second) == ["client-1"], "an enrolled name or one beyond N keeps a token"
    assert second["client-1"] == first["client-1"], "a still-valid token was replaced"
    registry = _registry(state)
    try:
        for name in ("client-2", "client-3"):
            assert registry.token(first[name]["token_id"]).revoked, f"{name}'s token lives on"
        registry.revoke_token("test", first["client-1"]["token_id"])  # e.g. by the operator
    finally:
        registry.close()
    _issue(state, tokens, 2)
    third = _files(tokens)
    assert sorted(third) == ["client-1"]
    assert third["client-1"]["token"] != first["client-1"]["token"], "a dead token was kept"
    _issue(state, tokens, 0)  # FEDMAE_CLIENTS=0: an aggregator for edge devices only
    assert _files(tokens) == {}


def test_f5_tokens_near_expiry_are_replaced(tmp_path):
    state, tokens = tmp_path / "state", tmp_path / "tokens"
    _issue(state, tokens, 1, "--ttl=2m")
    first = _files(tokens)["client-1"]
    _issue(state, tokens, 1, "--keep=5m")  # 2 minutes left < 5: replace, revoke the old
    second = _files(tokens)["client-1"]
    assert second["token_id"] != first["token_id"]
    registry = _registry(state)
    try:
        assert registry.token(first["token_id"]).revoked
    finally:
        registry.close()


def test_f5_replica_without_a_token_says_what_to_do(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("unused")
    res = _replica("start", f"--slots={tmp_path / 'ids'}", f"--tokens={tmp_path / 'none'}",
                   "--clients=1", "--enroll-server=127.0.0.1:9", f"--ca={ca}", "--",
                   sys.executable, "-c", CLIENT)  # fmt: skip
    assert res.returncode == 4, res.stderr
    assert "no usable enrollment token for client-1" in res.stderr
    assert "docker compose up -d" in res.stderr


def _start(slots: Path, tokens: Path, clients: int, enroll: str, ca: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "start", f"--slots={slots}", f"--tokens={tokens}",
         f"--clients={clients}", f"--enroll-server={enroll}", f"--ca={ca}", "--",
         sys.executable, "-c", CLIENT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(),
    )  # fmt: skip


def test_f5_replicas_take_distinct_names_each_with_its_own_token(tmp_path):
    certs = init_certs(tmp_path / "certs", signer=tmp_path / "signer")
    state, tokens, slots = tmp_path / "state", tmp_path / "tokens", tmp_path / "identities"
    server = make_server(state, certs.dir, min_clients=10, rounds=1)
    server.start()
    procs: list[subprocess.Popen] = []
    try:
        _issue(state, tokens, 3)  # as compose does: the tokens service next to the server
        issued = _files(tokens)
        enroll = f"127.0.0.1:{server.enroll_port}"
        # Four replicas start at once for three names: three run, one is told why not.
        procs = [_start(slots, tokens, 3, enroll, certs.ca_cert) for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            lines = list(pool.map(lambda p: p.stdout.readline(), procs))
        running = {i: json.loads(line) for i, line in enumerate(lines) if line}
        assert len(running) == 3, [p.stderr.read() for p in procs if p.poll() is not None]
        idle = next(p for i, p in enumerate(procs) if i not in running)
        assert idle.wait(TIMEOUT) == 3  # the locks outlived exec: the three still hold them
        assert "all 3 client slots" in idle.stderr.read()
        names = {}
        for i, argv in running.items():
            identity = next(a.split("=", 1)[1] for a in argv if a.startswith("--identity="))
            partition = next(a.split("=", 1)[1] for a in argv if a.startswith("--partition="))
            name = Path(identity).name
            assert partition == f"{int(name.split('-')[1]) - 1}/3", (name, partition)
            assert ClientIdentity(Path(identity)).client_id == name
            assert oct((Path(identity) / "client.key").stat().st_mode & 0o777) == "0o600"
            names[name] = i
        assert sorted(names) == ["client-1", "client-2", "client-3"]
        # Each name was enrolled once, with the token issued for that name.
        enrolled = {e.target: e.actor for e in server.registry.audit_log(limit=100)
                    if e.action == "client.enroll"}  # fmt: skip
        assert enrolled == {n: f"token:{issued[n]['token_id']}" for n in names}
        _issue(state, tokens, 3)
        assert _files(tokens) == {}, "enrolled names still have tokens"

        # client-2 stops; a new replica takes its free name and identity, no new enrollment.
        stopped = procs[names["client-2"]]
        stopped.stdin.close()
        assert stopped.wait(TIMEOUT) == 0
        procs.append(_start(slots, tokens, 3, enroll, certs.ca_cert))
        argv = json.loads(procs[-1].stdout.readline())
        assert f"--identity={slots / 'client-2'}" in argv and "--partition=1/3" in argv
        after = [e for e in server.registry.audit_log(limit=100) if e.action == "client.enroll"]
        assert len(after) == 3
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(TIMEOUT)
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream and not stream.closed:
                    stream.close()
        server.stop(grace=0)
