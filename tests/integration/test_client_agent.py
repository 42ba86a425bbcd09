"""The real client agent: trains the MAE on Fashion-MNIST against a real aggregator,
and reconnects by itself when the aggregator restarts."""

from __future__ import annotations

import json
import threading

from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    held_out_losses,
    make_identities,
    make_server,
    wait_until,
)

from aggregator_service.round_log import RoundLog
from client_agent.agent import AgentConfig, ClientAgent
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.partitions import client_split


def _agent(port: int, identity, index: int, count: int) -> ClientAgent:
    data = client_split(load_fashion_mnist(), index, count, seed=0, limit=300 * count)
    cfg = AgentConfig(
        server=f"127.0.0.1:{port}",
        identity=identity,
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
        give_up_after_s=60,
        overrides={"batch_size": 32},
    )
    return ClientAgent(cfg, data)


def _run_in_thread(agent: ClientAgent) -> tuple[threading.Thread, list[int]]:
    rc: list[int] = []
    thread = threading.Thread(target=lambda: rc.append(agent.run()), daemon=True)
    thread.start()
    return thread, rc


def test_agents_train_and_the_run_ends(tmp_path):
    certs, ids = make_identities(tmp_path, ["s1", "s2"])
    server = make_server(tmp_path / "state", certs, min_clients=2, rounds=2, min_participants=1)
    port = server.start()
    agents = [_agent(port, ids["s1"], 0, 2), _agent(port, ids["s2"], 1, 2)]
    try:
        runs = [_run_in_thread(a) for a in agents]
        assert server.wait(timeout=120), "run did not finish"
        for thread, rc in runs:
            thread.join(timeout=30)
            assert rc == [0]
        # Each agent fetched the final model after RunFinished: the server need not wait.
        assert server.rounds.wait_final_fetches(TIMEOUT) == []
    finally:
        for a in agents:
            a.stop()
        server.stop(grace=0)
    assert [a.rounds_done for a in agents] == [2, 2]
    records = RoundLog(tmp_path / "state" / "rounds.jsonl").read()
    assert [r["status"] for r in records] == ["published", "published"]
    assert all(r["participants"] == ["s1", "s2"] for r in records)
    assert all(r["num_samples"] == 540 for r in records)  # 2 × (300 − 10 % held out)
    assert all(0 < r["val_loss"] < 5 for r in records)
    # It learns: the global model against the one it started from on held-out images
    # (the sites' val_loss of one round against the next may go up by noise).
    start, end = held_out_losses(tmp_path / "state", [0, 2])
    assert end < 0.8 * start


def test_agent_reconnects_after_the_aggregator_restarts(tmp_path):
    certs, ids = make_identities(tmp_path, ["s1"])
    server = make_server(tmp_path / "state", certs, min_clients=1, rounds=2, min_participants=1)
    port = server.start()
    agent = _agent(port, ids["s1"], 0, 1)
    thread, rc = _run_in_thread(agent)
    restarted = None
    try:
        # Stop the aggregator after round 1 closes, as a crash between rounds would.
        first = threading.Event()
        original = server.rounds.round_log.append

        def append_then_signal(record):
            original(record)
            first.set()

        server.rounds.round_log.append = append_then_signal
        assert first.wait(timeout=60)
        server.stop(grace=0)
        restarted = make_server(
            tmp_path / "state", certs, min_clients=1, rounds=2, port=port, min_participants=1
        )
        restarted.start()
        assert restarted.wait(timeout=120), "resumed run did not finish"
        thread.join(timeout=30)
        assert rc == [0]
        assert agent.rounds_done == 2
    finally:
        agent.stop()
        server.stop(grace=0)
        if restarted is not None:
            restarted.stop(grace=0)
    records = RoundLog(tmp_path / "state" / "rounds.jsonl").read()
    published = [(r["round"], r["version"]) for r in records if r["status"] == "published"]
    assert published == [(1, 1), (2, 2)]  # no round lost or published twice
    # Round 2 may have started before the stop: then it is logged once as aborted.
    assert {r["status"] for r in records if r["status"] != "published"} <= {"aborted"}


def test_f11_an_agent_replaced_by_another_connection_stops(tmp_path):
    """Two agents with one identity: the older one is told (ABORTED) and exits non-zero
    instead of reconnecting, which would evict the newer one, and so on forever."""
    certs, ids = make_identities(tmp_path, ["s1"])
    server = make_server(
        tmp_path / "state", certs, min_clients=2, rounds=1, min_participants=1
    )  # no round
    port = server.start()
    agent = _agent(port, ids["s1"], 0, 1)
    agent.config.status_file = tmp_path / "status.json"
    thread, rc = _run_in_thread(agent)
    other = None
    try:
        wait_until(lambda: server.rounds.connected() == ["s1"], "the agent to subscribe", 60)
        other = ScriptedClient(port, ids["s1"])  # a second agent with the same identity
        thread.join(timeout=30)
        assert rc == [2], "the replaced agent did not stop"
        status = json.loads(agent.config.status_file.read_text())
        assert status["state"] == "refused" and status["error"].startswith("ABORTED: replaced")
        assert server.rounds.connected() == ["s1"]  # the newer one stays connected
        assert other._call.is_active()
    finally:
        agent.stop()
        if other is not None:
            other.close()
        server.stop(grace=0)
