"""Crashes and limits against a real aggregator *process* over gRPC/mTLS.

Crash cases kill -9 the aggregator (or a client) and restart it on the same state
directory; the run must neither lose nor repeat a round. Hostile updates are in
test_hostile_updates.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from aggregator_process import ENV, LAYOUT, Aggregator, good_update_messages, model_digest
from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    drive_rounds,
    make_identities,
    random_delta,
    wait_until,
)

from fedmae.transport.transfer import fetch_model, submit_update

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
    agg = Aggregator(tmp_path, certs, "--min-clients", "2", "--min-participants", "1",
                     "--rounds", "4", "--round-timeout", "120").start()  # fmt: skip
    clients = [_client(tmp_path, agg.port, ids[n], n, i, 2) for i, n in enumerate(ids)]
    try:
        wait_until(lambda: len(agg.published()) >= 2, "two rounds", 120, every=0.2)
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
    agg = Aggregator(tmp_path, certs, "--min-clients", "1", "--min-participants", "1",
                     "--rounds", "2", "--round-timeout", "120")  # fmt: skip
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
    agg = Aggregator(tmp_path, certs, "--min-clients", "2", "--min-participants", "1",
                     "--min-updates", "1", "--rounds", "3", "--round-timeout", "120",
                     "--dropout-grace", "1").start()  # fmt: skip
    a = _client(tmp_path, agg.port, ids["a"], "a", 0, 2)
    b = ScriptedClient(agg.port, ids["b"])  # b takes the task and then vanishes
    try:
        b.wait_for("task", round=1)
        b.close()
        wait_until(lambda: len(agg.published()) >= 1, "round 1 without b", 60, every=0.2)
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
    agg = Aggregator(tmp_path, certs, "--min-clients", "1", "--min-participants", "1",
                     "--rounds", "1", "--max-requests-per-s", "2").start()  # fmt: skip
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
    agg = Aggregator(
        tmp_path, certs, "--min-clients", "2", "--min-participants", "1", "--rounds", "2"
    ).start()
    a, b = ScriptedClient(agg.port, ids["a"]), ScriptedClient(agg.port, ids["b"])
    try:
        a.wait_for("task", round=1)
        sha = model_digest(a)
        good = good_update_messages()
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
        assert task.model_version == 0 and model_digest(a2) == sha
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
    agg = Aggregator(tmp_path, certs, "--min-clients", "2", "--min-participants", "1",
                     "--rounds", "1", "--final-grace", "600").start()  # fmt: skip
    log = tmp_path / "serve-1.log"
    a, b = ScriptedClient(agg.port, ids["a"]), ScriptedClient(agg.port, ids["b"])
    try:
        drive_rounds({"a": a, "b": b}, LAYOUT, [1])
        for c in (a, b):
            c.wait_for("run_finished", final_version=1)
        wait_until(
            lambda: "serving the final version 1" in log.read_text() or agg.proc.poll() is not None,
            "the run to end", TIMEOUT, every=0.2,
        )  # fmt: skip
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
