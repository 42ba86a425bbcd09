"""Findings 11 and 12 of issue 11: one event stream per identity, and the end of a run
(the final model stays available; any version, 0 included, can be asked for).

The aggregator process itself (`fedmae serve` lingering for the final model, then
exiting) is tested in test_faults.py; the agent that stops when replaced, in
test_client_agent.py.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    drive_rounds,
    fetch_flat,
    make_identities,
    make_server,
    wait_until,
)

from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.transfer import fetch_model


@pytest.fixture
def started(tmp_path):
    """Factory: a started server with enrolled identities; torn down at the end."""
    made: list = []

    def start(names: list[str], min_clients: int, rounds: int, min_participants: int,
              **server_cfg):  # fmt: skip
        certs, ids = make_identities(tmp_path, names)
        server = make_server(tmp_path / "state", certs, min_clients, rounds, server=server_cfg,
                             min_participants=min_participants)  # fmt: skip
        port = server.start()
        made.append(server)
        return server, port, ids

    yield start
    for server in made:
        server.stop(grace=0)


def test_f11_a_newer_subscribe_ends_the_older_with_aborted(started):
    # No round starts: one client of two.
    server, port, ids = started(["a"], min_clients=2, rounds=1, min_participants=1)
    first, second = (ScriptedClient(port, ids["a"], subscribe=False) for _ in range(2))
    try:
        old = first.stub.Subscribe(pb.SubscribeRequest(agent_version="test"), timeout=TIMEOUT)
        wait_until(lambda: server.rounds.connected() == ["a"], "the first stream to register")
        new = second.stub.Subscribe(pb.SubscribeRequest(agent_version="test"), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in old:
                pass
        assert ended.value.code() == grpc.StatusCode.ABORTED
        assert "replaced by a newer connection from ipv4:127.0.0.1:" in ended.value.details()
        assert "two agents must not share one identity" in ended.value.details()
        # The newer stream is the one that stays, and it still gets events.
        assert next(new).WhichOneof("event") == "heartbeat"
        assert server.rounds.connected() == ["a"]
        new.cancel()
    finally:
        first.close()
        second.close()


def test_f12_version_0_can_be_fetched_after_version_1_exists(started):
    # Two rounds: it keeps running after v1.
    server, port, ids = started(["a"], min_clients=1, rounds=2, min_participants=1)
    client = ScriptedClient(port, ids["a"])
    try:
        theta0 = fetch_flat(client, server.layout, 0)
        drive_rounds({"a": client}, server.layout, [1])
        header, flat = fetch_model(client.stub, server.layout, 0, timeout=TIMEOUT)
        assert header.version == 0 and torch.equal(flat, theta0)
        header, latest = fetch_model(client.stub, server.layout, None, timeout=TIMEOUT)
        assert header.version == 1 and not torch.equal(latest, theta0)
        # A request that names no version is refused instead of guessed.
        with pytest.raises(grpc.RpcError) as refused:
            list(client.stub.FetchModel(pb.FetchModelRequest(), timeout=TIMEOUT))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "set 'version'" in refused.value.details()
    finally:
        client.close()


def test_f12_the_final_model_is_served_until_the_grace_ends(started):
    """After the run, the server waits for the clients subscribed at the end (and those
    subscribing since) to fetch the final version, at most ``final_grace_s``."""
    server, port, ids = started(
        ["a", "b", "c"], min_clients=1, rounds=1, min_participants=1, final_grace_s=1.0
    )
    a = ScriptedClient(port, ids["a"])
    try:
        drive_rounds({"a": a}, server.layout, [1])
        a.wait_for("run_finished", final_version=1, model="tiny")
        assert server.wait(TIMEOUT) and server.rounds.completed
        b = ScriptedClient(port, ids["b"])  # subscribes after the run: told it ended
        b.wait_for("run_finished", final_version=1)
        assert server.rounds.wait_final_fetches(0) == ["a", "b"]
        c = ScriptedClient(port, ids["c"], subscribe=False)
        fetch_flat(c, server.layout, 1)  # not subscribed: not waited for
        fetch_flat(a, server.layout, 0)  # not the final version: a still owes it
        assert server.rounds.wait_final_fetches(0) == ["a", "b"]
        header, _ = fetch_model(a.stub, server.layout, None, timeout=TIMEOUT)
        assert header.version == 1
        # (Counted once the server's last send completed, a moment after the client read.)
        wait_until(lambda: server.rounds.wait_final_fetches(0) == ["b"], "a's fetch to count")
        t0 = time.monotonic()
        assert server.serve_final_model() == ["b"]  # b never fetches: the grace ends
        assert 0.5 < time.monotonic() - t0 < 10
        b.close()
        c.close()
    finally:
        a.close()
