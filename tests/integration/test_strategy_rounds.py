"""Strategies in a running aggregator: a needs-all rule over mTLS, and ``fedmae serve
--strategy`` from the command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import torch
from federation_harness import (
    ScriptedClient,
    drive_rounds,
    fetch_flat,
    make_identities,
    make_server,
    random_delta,
    wait_until,
)
from strategy_rules import CoordinateMedian

from aggregator_service.strategies import STRATEGIES, StrategyOptions
from aggregator_service.update_store import SPILL_FILE
from fedmae.cli.main import main
from fedmae.ml.model_zoo import initial_state
from fedmae.payload.layout import ModelLayout
from fedmae.transport.transfer import submit_update

TIMEOUT = 60.0


def test_a_needs_all_rule_aggregates_the_spilled_updates(tmp_path):
    names = ["a", "b", "c"]
    certs, ids = make_identities(tmp_path, names)
    state_dir = tmp_path / "state"
    rule = CoordinateMedian(block_size=250_000)
    server = make_server(state_dir, certs, min_clients=3, rounds=1, strategy=rule)
    port = server.start()
    clients = {n: ScriptedClient(port, ids[n]) for n in names}
    try:
        layout = server.layout
        for c in clients.values():
            c.wait_for("task", round=1)
        theta0 = fetch_flat(clients["a"], layout, 0)
        # Norm ~34, below round 1's default bound (~42): not clipped.
        deltas = {n: random_delta(layout, seed=i + 1, scale=0.03) for i, n in enumerate(names)}
        samples = {"a": 10, "b": 50, "c": 200}
        spill = state_dir / SPILL_FILE
        for n in names:
            if n == "c":  # two updates in: they wait on disk, not in the aggregator's RAM
                assert spill.exists()
            submit_update(clients[n].stub, layout, deltas[n], round_=1, base_version=0,
                          num_samples=samples[n], timeout=TIMEOUT)  # fmt: skip
        closed = clients["a"].wait_for("round_closed", round=1).round_closed
        assert closed.success and closed.version == 1
        published = fetch_flat(clients["a"], layout, 1)
        stacked = torch.stack([deltas[n] for n in names])  # [sites, numel]
        assert torch.equal(published, theta0 + stacked.median(dim=0).values)
        mean = theta0 + sum(samples[n] * deltas[n] for n in names) / sum(samples.values())
        assert not torch.allclose(published, mean)  # the median ran, not FedAvg
        assert rule.blocks_read == -(-layout.numel // 250_000)
        record = server.rounds.round_log.read()[0]
        assert record["strategy"] == "median" and record["status"] == "published"
        assert not spill.exists()  # the round's spill file is gone once it closed
    finally:
        for c in clients.values():
            c.close()
        server.stop(grace=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_a_named_strategy_runs_a_round(tmp_path):
    names = ["a", "b", "c"]
    certs, ids = make_identities(tmp_path, names)
    state_dir = tmp_path / "state"
    port = _free_port()
    layout = ModelLayout.from_state(initial_state("tiny", seed=0))
    failure: list[BaseException] = []

    def sites() -> None:
        clients: dict[str, ScriptedClient] = {}
        try:
            wait_until(lambda: _accepts(port), "the aggregator to listen", timeout=TIMEOUT)
            clients = {n: ScriptedClient(port, ids[n]) for n in names}
            drive_rounds(clients, layout, [1])
        except BaseException as err:  # noqa: BLE001 (reported by the test thread)
            failure.append(err)
            os.kill(os.getpid(), signal.SIGINT)  # serve's handler ends the run
        finally:
            for c in clients.values():
                c.close()

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=sites, daemon=True)
    thread.start()
    try:
        code = main([
            "serve", "--state-dir", str(state_dir), "--certs", str(certs),
            "--listen", f"127.0.0.1:{port}", "--enroll-listen", "off", "--min-clients", "3",
            "--rounds", "1", "--final-grace", "0", "--strategy", "fedavg",
        ])  # fmt: skip
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    thread.join(TIMEOUT)
    assert not failure, failure
    assert code == 0
    records = [json.loads(x) for x in (state_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["status"], r["strategy"]) for r in records] == [
        (1, "published", "fedavg")
    ]


def test_fedprox_sends_its_mu_with_each_task(tmp_path):
    certs, ids = make_identities(tmp_path, ["a"])
    server = make_server(
        tmp_path / "state", certs, min_clients=1, rounds=1, min_participants=1,
        server={"strategy": "fedprox", "strategy_options": StrategyOptions(mu=0.05)},
    )  # fmt: skip
    port = server.start()
    client = ScriptedClient(port, ids["a"])
    try:
        task = client.wait_for("task", round=1).task
        assert task.config.proximal_mu == 0.05  # over the wire, in the TrainingConfig
        assert server.config.training.proximal_mu == 0.0  # the server's own stays plain
    finally:
        client.close()
        server.stop(grace=0)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_serve_refuses_an_unknown_strategy_listing_the_choices(tmp_path, caplog):
    state_dir = tmp_path / "state"
    code = main(["serve", "--state-dir", str(state_dir), "--strategy", "nope"])
    assert code == 2
    assert f"unknown strategy 'nope': choose one of {', '.join(sorted(STRATEGIES))}" in caplog.text
    assert not state_dir.exists()  # refused before anything was made


def test_a_spill_file_a_crash_left_behind_is_removed_at_start(tmp_path):
    certs, _ = make_identities(tmp_path, [])
    state_dir = tmp_path / "state"
    leftover = state_dir / SPILL_FILE
    leftover.write_bytes(b"\0" * 4096)  # a needs-all round cut short by kill -9
    server = make_server(state_dir, certs, min_clients=1, rounds=1, min_participants=1)
    try:
        assert not leftover.exists()
    finally:
        server.registry.close()
