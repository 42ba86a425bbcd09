"""Central DP in a running aggregator over mTLS (``--dp central``): the published model
is the noiseless fixed-denominator mean plus Gaussian noise of the configured standard
deviation, an oversized delta is clipped to C by the server, ε per round in the round
log is the ledger's, the run stops when its budget is spent, and the ledger survives a
restart. The noise seed is the test hook (``PrivacyConfig.noise_seed``)."""

from __future__ import annotations

import json
import logging
import math
import threading

import pytest
import torch
from federation_harness import (
    TIMEOUT,
    Federations,
    drive_rounds,
    fetch_flat,
    make_identities,
    make_server,
    random_delta,
)

from aggregator_service.privacy_config import PrivacyConfig
from aggregator_service.private_rounds import BUDGET_SPENT
from client_agent.agent import AgentConfig, ClientAgent
from fedmae.admin_view import dp_line
from fedmae.cli.main import main
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.partitions import client_split
from fedmae.privacy.accountant import PoissonSampling, PrivacyLedger
from fedmae.privacy.mechanisms import add_gaussian_noise_, noise_generator
from fedmae.transport.transfer import submit_update

NAMES = ["a", "b", "c", "d", "evil"]


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


def test_published_model_is_the_clipped_mean_plus_noise_of_the_configured_std(tmp_path):
    clip, sigma, seed = 20.0, 0.25, 1234
    n = len(NAMES)  # q = 1 of N = 5 sites: q·N = 5
    privacy = PrivacyConfig(clip=clip, noise_multiplier=sigma, sites=n, noise_seed=seed)
    with Federations(tmp_path, max_requests_per_s=0) as federations:
        server, clients = federations.start(NAMES, privacy=privacy, max_update_norm=0.0)
        layout = server.layout
        for c in clients.values():
            c.wait_for("task", round=1)
        theta0 = fetch_flat(clients["a"], layout, 0)
        # Honest deltas of norm ~11 (< C, left whole); the attacker's is 100x one (> C).
        deltas = {name: random_delta(layout, seed=i) for i, name in enumerate(NAMES[:-1])}
        deltas["evil"] = 100 * deltas["a"]
        for name in NAMES:  # it claims 2^40 samples: under DP every site weighs 1
            submit_update(clients[name].stub, layout, deltas[name], round_=1, base_version=0,
                          num_samples=2**40 if name == "evil" else 600,
                          timeout=TIMEOUT)  # fmt: skip
        closed = clients["a"].wait_for("round_closed", round=1).round_closed
        assert closed.success and closed.version == 1
        assert (closed.train_loss, closed.val_loss) == (0.0, 0.0)  # no un-noised mean to sites
        published = fetch_flat(clients["a"], layout, 1)
        record = server.rounds.round_log.read()[0]

    honest = torch.stack([deltas[name] for name in NAMES[:-1]]).sum(dim=0)
    evil = deltas["evil"] * (clip / _norm(deltas["evil"]))
    noiseless = theta0 + (honest + evil) / n
    std = float((published - noiseless).double().std())
    # σC/(qN) = 1.0; over 1.3 M coordinates the sample std's standard error is 0.06 %.
    assert std == pytest.approx(sigma * clip / n, rel=0.005), std

    # The noise is the seeded generator's: take it away and the attacker's part is left,
    # which the server clipped to C, so it moved the model by C/(qN) = 4 at most.
    noise = torch.zeros(layout.numel)
    add_gaussian_noise_(noise, sigma * clip, noise_generator(seed))
    attacker = published - theta0 - noise / n - honest / n
    assert _norm(attacker) == pytest.approx(clip / n, rel=1e-3)
    assert _norm(attacker) <= clip / n * (1 + 1e-3)

    assert record["participants"] == sorted(NAMES) and record["num_samples"] == n
    assert {c["id"]: c["clipped"] for c in record["clients"]}["evil"] is True
    ledger = PrivacyLedger(sigma, PoissonSampling(1.0), 1e-5, rounds=1)
    assert record["dp"] == {
        "mode": "central", "clip": clip, "noise_multiplier": sigma, "q": 1.0,
        "population": n, "delta": 1e-5, "epsilon": ledger.epsilon(), "rounds": 1,
        "target_epsilon": None, "accountant": "rdp", "sampling": "poisson",
    }  # fmt: skip


def test_run_stops_when_its_budget_is_spent_and_the_ledger_survives_a_restart(
    tmp_path, caplog, capsys
):
    caplog.set_level(logging.INFO)
    names, sigma = ["a", "b", "c"], 2.0
    sampling = PoissonSampling(1.0)
    eps = [PrivacyLedger(sigma, sampling, 1e-5, rounds=r).epsilon() for r in range(4)]
    target = (eps[2] + eps[3]) / 2  # two rounds fit, a third would not
    privacy = PrivacyConfig(clip=20.0, noise_multiplier=sigma, target_epsilon=target,
                            sites=3, noise_seed=1)  # fmt: skip
    with Federations(tmp_path, max_requests_per_s=0) as federations:
        fed = federations.launch(names, privacy=privacy, rounds=5, max_update_norm=0.0)
        server, clients = fed.server, fed.clients
        drive_rounds(clients, server.layout, [1, 2])
        done = clients["a"].wait_for("run_finished").run_finished
        assert (done.reason, done.rounds, done.final_version) == (BUDGET_SPENT, 2, 2)
        wait_until_finished = server.rounds.finished.wait(TIMEOUT)
        assert wait_until_finished
        records = server.rounds.round_log.read()
        status = server.rounds.status()
        gauge = server.metrics.registry.get_sample_value("fedmae_dp_epsilon")
        admin = str(server.config.certs_dir / "admin")  # the operator asks why it ended
        assert main(["status", "--server", f"127.0.0.1:{fed.port}", "--identity", admin]) == 0
    assert f"run finished ({BUDGET_SPENT})" in caplog.text
    assert f"state:     finished ({BUDGET_SPENT})" in capsys.readouterr().out
    assert status["finish_reason"] == BUDGET_SPENT

    published = [r for r in records if r["status"] == "published"]
    assert [r["round"] for r in published] == [1, 2]  # of the 5 planned
    spent = [r["dp"]["epsilon"] for r in published]
    assert spent == [eps[1], eps[2]] and spent[0] < spent[1] <= target
    assert [r["dp"]["rounds"] for r in published] == [1, 2]
    assert status["last_record"]["dp"]["epsilon"] == eps[2] and gauge == pytest.approx(eps[2])

    from fedmae.cli.report import write_report  # matplotlib: only this test needs it

    summary = write_report(tmp_path / "state", tmp_path / "report").summary.read_text()
    assert f"- differential privacy: ε = {eps[2]:.3g} of {target:g} at δ = 1e-05 after 2" in summary
    assert summary.count(f" {eps[1]:.4f} |") == 1 and summary.count(f" {eps[2]:.4f} |") == 1

    # A restart on the same state directory takes up the ledger saved with version 2.
    again = make_server(tmp_path / "state", tmp_path / "certs", 3, 5,
                        server={"privacy": privacy, "max_update_norm": 0.0})  # fmt: skip
    try:
        private = again.rounds.private
        assert private.ledger.rounds == 2 and private.ledger.epsilon() == eps[2]
        assert private.budget_spent()
    finally:
        again.stop(grace=0)


def test_real_agents_clip_their_deltas_to_the_c_the_task_sends(tmp_path, caplog):
    """Three real agents train the tiny MAE (honest round-1 deltas have norms 4-9); with
    C = 0.5 each clips its own delta before sending: every norm the server measures is C.
    The budget fits one of the two planned rounds: the agents log why the run ended."""
    caplog.set_level(logging.INFO)
    certs, ids = make_identities(tmp_path, ["s1", "s2", "s3"])
    one, two = (PrivacyLedger(1.0, PoissonSampling(1.0), 1e-5, rounds=r).epsilon() for r in (1, 2))
    privacy = PrivacyConfig(clip=0.5, noise_multiplier=1.0, target_epsilon=(one + two) / 2,
                            sites=3)  # fmt: skip
    server = make_server(tmp_path / "state", certs, 3, 2, server={"privacy": privacy})
    port = server.start()
    agents = [_agent(port, ids[f"s{i + 1}"], i, 3) for i in range(3)]
    try:
        threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
        for thread in threads:
            thread.start()
        assert server.wait(timeout=120), "run did not finish"
        for thread in threads:  # each fetches the final model, then its run returns
            thread.join(timeout=30)
            assert not thread.is_alive()
    finally:
        for a in agents:
            a.stop()
        server.stop(grace=0)
    (record,) = server.rounds.round_log.read()
    assert record["status"] == "published" and record["participants"] == ["s1", "s2", "s3"]
    assert all(c["update_norm"] == pytest.approx(0.5, rel=1e-5) for c in record["clients"])
    assert record["dp"]["rounds"] == 1
    for site in ("s1", "s2", "s3"):
        assert f"{site}: run finished ({BUDGET_SPENT}) at version 1 after 1 rounds" in caplog.text


def _agent(port: int, identity, index: int, count: int) -> ClientAgent:
    data = client_split(load_fashion_mnist(), index, count, seed=0, limit=100 * count)
    cfg = AgentConfig(
        server=f"127.0.0.1:{port}", identity=identity, backoff_initial_s=0.2,
        backoff_max_s=1.0, give_up_after_s=60, overrides={"batch_size": 32},
    )  # fmt: skip
    return ClientAgent(cfg, data)


def test_status_line_says_epsilon_of_the_budget_and_the_mechanism():
    dp = {"mode": "central", "clip": 5.0, "noise_multiplier": 1.02, "q": 0.1,
          "population": 100, "delta": 1e-5, "epsilon": 3.91, "rounds": 40,
          "target_epsilon": 8.0, "accountant": "rdp", "sampling": "poisson"}  # fmt: skip
    assert dp_line(dp) == (
        "ε = 3.91 of 8 at δ = 1e-05 after 40 round(s) (central DP, σ = 1.02, C = 5, q = 0.1, "
        "N = 100, rdp)"
    )


def test_adaptive_clipping_moves_c_pays_for_its_bits_and_sends_the_new_c(tmp_path):
    """--dp-clip-quantile: every honest delta (norm ~11) is under C = 20, so the noised
    unclipped share is near 1 and C shrinks; the update's noise is z_Δ·C, z_Δ raised
    so update and bits cost σ; round 2's task carries the new C and the server clips
    to it; the ledger beside version 1 holds it."""
    clip, sigma, bit_noise, seed = 20.0, 1.0, 1.0, 99
    names = ["a", "b", "c"]
    privacy = PrivacyConfig(clip=clip, noise_multiplier=sigma, sites=3, noise_seed=seed,
                            clip_quantile=0.5, clip_bit_noise=bit_noise)  # fmt: skip
    z_update = (sigma**-2 - (2 * bit_noise) ** -2) ** -0.5
    with Federations(tmp_path, max_requests_per_s=0) as federations:
        fed = federations.launch(names, privacy=privacy, rounds=2, max_update_norm=0.0)
        server, clients = fed.server, fed.clients
        layout = server.layout
        theta0 = fetch_flat(clients["a"], layout, 0)
        drive_rounds(clients, layout, [1])
        one = fetch_flat(clients["a"], layout, 1)
        tasks = {}
        for i, name in enumerate(names):  # round 2 by hand, to read the task it sends
            tasks[name] = clients[name].wait_for("task", round=2).task
            submit_update(clients[name].stub, layout, random_delta(layout, seed=200 + i),
                          round_=2, base_version=1, num_samples=10, timeout=TIMEOUT)  # fmt: skip
        assert server.wait(TIMEOUT)
        task = tasks["a"]
        first, second = server.rounds.round_log.read()
        saved = json.loads(server.store.load_ledger(1))

    adaptive = first["dp"]["adaptive_clip"]
    assert first["dp"]["clip"] == clip
    assert adaptive["update_noise_multiplier"] == pytest.approx(z_update)
    moved = clip * math.exp(-0.2 * (adaptive["unclipped_share"] - 0.5))
    assert adaptive["next_clip"] == pytest.approx(moved) and moved < clip
    assert task.config.dp_clip == pytest.approx(moved)  # the sites clip to the new C
    assert second["dp"]["clip"] == pytest.approx(moved)
    assert saved["adaptive_clip"]["clip"] == pytest.approx(moved)  # resumable
    # Round 1's noise: z_Δ·C/(qN) per coordinate (drivers' deltas: random_delta seeds).
    deltas = sum(random_delta(layout, seed=100 + i) for i in range(3))
    std = float((one - theta0 - deltas / 3).double().std())
    assert std == pytest.approx(z_update * clip / 3, rel=0.01)
