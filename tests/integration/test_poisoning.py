"""Finding 2 of issue 11: no single site steers the global model.

Over real gRPC with mutual TLS: scripted sites send deltas and sample counts the test
chooses (a false 2^40 claim, a 100x scaled delta), and the published model is checked
against the bound documented in docs/round-log.md: with weights capped at W and deltas
clipped to B, k dishonest sites move the model at most

    kW / (N_H + kW) * (B + ||mean honest delta||)

away from the FedAvg of the N_H honest samples.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_harness import (
    TIMEOUT,
    Federations,
    ScriptedClient,
    fetch_flat,
    make_server,
    random_delta,
)

from aggregator_service.config import ServerConfig
from aggregator_service.rpc.server import AggregatorServer
from aggregator_service.update_bounds import UpdateBounds, parse_norm_bound
from fedmae.cli.main import build_parser
from fedmae.config import TrainingConfig
from fedmae.transport.transfer import submit_update

DEFAULTS = ServerConfig(state_dir=Path("."))


@pytest.fixture
def federation(tmp_path):
    """Factory: a started aggregator and subscribed scripted sites; all torn down."""
    with Federations(tmp_path, max_requests_per_s=0) as federations:
        yield federations.start


def _send(client: ScriptedClient, layout, delta, n: int, round_: int = 1, base: int = 0):
    return submit_update(
        client.stub, layout, delta, round_=round_, base_version=base, num_samples=n,
        metrics={"train_loss": 0.5, "val_loss": 0.6}, timeout=TIMEOUT,
    )  # fmt: skip


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64)


def _fedavg(theta, deltas: list[np.ndarray], weights: list[float], scales=None) -> np.ndarray:
    """θ + Σ wᵢsᵢΔᵢ / Σ wᵢ in float64, computed independently of the server."""
    scales = scales or [1.0] * len(deltas)
    acc = sum(w * s * d for d, w, s in zip(deltas, weights, scales, strict=True))
    return theta + acc / sum(weights)


def _logged(server: AggregatorServer, round_: int) -> dict:
    """Round ``round_``'s record, read once its events were seen: the line is fsynced
    before the round is announced, so it must be there already (no polling)."""
    records = [r for r in server.rounds.round_log.read() if r["round"] == round_]
    assert records, f"round {round_} was announced before it was logged"
    return records[-1]


def _clients(record: dict) -> dict[str, dict]:
    return {c["id"]: c for c in record["clients"]}


def test_f2_poisoned_round_stays_within_the_documented_bound(federation):
    """One site claims n = 2^40 with a large delta, one sends a 100x scaled delta, one
    is honest. Defaults only: the weight cap and the auto norm bound are on."""
    server, clients = federation(["honest", "liar", "scaler"])
    layout = server.layout
    for c in clients.values():
        c.wait_for("task", round=1)
    theta0 = fetch_flat(clients["honest"], layout, 0)
    n_honest = 1800  # a demo site's training images
    honest = random_delta(layout, 1)  # norm ~11: a real round-1 update of the tiny MAE is ~7
    big = random_delta(layout, 2, scale=1.0)  # norm ~1140, 13x the model's own norm
    scaled = 100 * random_delta(layout, 3)
    _send(clients["honest"], layout, honest, n_honest)
    _send(clients["liar"], layout, big, 2**40)
    _send(clients["scaler"], layout, scaled, n_honest)
    closed = clients["honest"].wait_for("round_closed", round=1).round_closed
    assert closed.success
    published = _f64(fetch_flat(clients["honest"], layout, 1))

    record = _logged(server, 1)
    W, B = record["weight_cap"], record["norm_bound"]
    assert W == DEFAULTS.max_client_samples
    # Round 1 has no history: B = ratio x ||θ0||.
    assert B == pytest.approx(DEFAULTS.norm_bound_ratio * float(theta0.double().norm()), rel=1e-9)
    per = _clients(record)
    assert (per["liar"]["samples_claimed"], per["liar"]["samples"]) == (2**40, W)
    assert per["liar"]["capped"] and not per["honest"]["capped"] and not per["scaler"]["capped"]
    assert per["liar"]["clipped"] and per["scaler"]["clipped"] and not per["honest"]["clipped"]
    assert per["honest"]["update_norm"] == pytest.approx(float(honest.double().norm()), rel=1e-5)
    # The log counts the weights used, not the claims (clients are told no total).
    assert record["num_samples"] == W + 2 * n_honest

    # The published model is exactly norm-bounded FedAvg of what was sent ...
    deltas = [_f64(honest), _f64(big), _f64(scaled)]
    norms = [per[c]["update_norm"] for c in ("honest", "liar", "scaler")]
    expected = _fedavg(
        _f64(theta0), deltas, [n_honest, W, n_honest], [min(1.0, B / x) for x in norms]
    )
    np.testing.assert_allclose(published, expected, rtol=0, atol=1e-5)

    # ... and within the documented bound of the honest sites' FedAvg.
    honest_fedavg = _fedavg(_f64(theta0), [_f64(honest)], [n_honest])
    k, n_h = 2, n_honest
    bound = k * W / (n_h + k * W) * (B + float(np.linalg.norm(_f64(honest))))
    distance = float(np.linalg.norm(published - honest_fedavg))
    assert distance <= bound * (1 + 1e-6), (distance, bound)
    # Without the defences the liar alone replaced the model (the old behaviour):
    undefended = _fedavg(_f64(theta0), deltas, [n_honest, 2**40, n_honest])
    assert float(np.linalg.norm(undefended - honest_fedavg)) > 10 * bound


def test_f2_auto_bound_follows_the_last_round_and_leaves_honest_updates_untouched(
    federation, tmp_path
):
    names = ["a", "b", "c"]
    server, clients = federation(names, rounds=3)
    layout = server.layout
    theta = {0: fetch_flat(clients["a"], layout, 0)}
    n = {"a": 40, "b": 300, "c": 1000}
    ratio, factor = DEFAULTS.norm_bound_ratio, DEFAULTS.norm_bound_factor

    # Round 1: honest updates of different sizes, all below ratio x ||θ0||: untouched,
    # so the model is exactly FedAvg.
    r1 = {x: random_delta(layout, 10 + i, scale=s) for i, (x, s) in
          enumerate(zip(names, (0.004, 0.01, 0.02), strict=True))}  # fmt: skip
    for x in names:
        clients[x].wait_for("task", round=1)
        _send(clients[x], layout, r1[x], n[x])
    clients["a"].wait_for("model_published", version=1)
    theta[1] = fetch_flat(clients["a"], layout, 1)
    np.testing.assert_allclose(
        _f64(theta[1]),
        _fedavg(_f64(theta[0]), [_f64(r1[x]) for x in names], [n[x] for x in names]),
        rtol=0, atol=1e-6,
    )  # fmt: skip
    rec1 = _logged(server, 1)
    assert rec1["norm_bound"] == pytest.approx(ratio * float(theta[0].double().norm()))
    assert not any(c["clipped"] or c["capped"] for c in rec1["clients"])

    # Round 2: B = factor x the median norm of round 1. Two honest updates pass as sent;
    # c sends 100x its honest delta and is cut back to B.
    b2 = factor * float(np.median([c["update_norm"] for c in rec1["clients"]]))
    r2 = {"a": random_delta(layout, 20, 0.004), "b": random_delta(layout, 21, 0.01),
          "c": 100 * random_delta(layout, 22, 0.01)}  # fmt: skip
    for x in names:
        clients[x].wait_for("task", round=2)
        _send(clients[x], layout, r2[x], n[x], round_=2, base=1)
    clients["a"].wait_for("model_published", version=2)
    theta[2] = fetch_flat(clients["a"], layout, 2)
    rec2 = _logged(server, 2)
    assert rec2["norm_bound"] == pytest.approx(b2, rel=1e-9)
    per = _clients(rec2)
    assert not per["a"]["clipped"] and not per["b"]["clipped"] and per["c"]["clipped"]
    scale_c = rec2["norm_bound"] / per["c"]["update_norm"]
    np.testing.assert_allclose(
        _f64(theta[2]),
        _fedavg(_f64(theta[1]), [_f64(r2[x]) for x in names], [n[x] for x in names],
                [1.0, 1.0, scale_c]),
        rtol=0, atol=1e-6,
    )  # fmt: skip

    # A restarted aggregator takes round 3's bound from the log: factor x the median of
    # round 2's norms as folded in (c's counts as B, not as its raw 100x norm).
    for c in clients.values():
        c.close()
    server.stop(grace=0)
    again = make_server(
        tmp_path / "state", tmp_path / "certs", 3, 3, server={"max_requests_per_s": 0}
    )
    try:
        folded = sorted(min(c["update_norm"], rec2["norm_bound"]) for c in rec2["clients"])
        assert again.rounds.bounds.round_bound(3, lambda: theta[2]) == pytest.approx(
            factor * folded[1], rel=1e-9
        )
    finally:
        again.registry.close()


@pytest.mark.parametrize("setting", ["5", "off", "0"])
def test_f2_fixed_bound_clips_and_off_disables(federation, setting):
    server, clients = federation(
        ["a"], max_update_norm=parse_norm_bound(setting), policy={"min_participants": 1}
    )
    layout = server.layout
    clients["a"].wait_for("task")
    theta0 = fetch_flat(clients["a"], layout, 0)
    delta = 100 * random_delta(layout, 4)  # norm ~1140
    norm = float(delta.double().norm())
    _send(clients["a"], layout, delta, 7)
    clients["a"].wait_for("model_published", version=1)
    record = _logged(server, 1)
    scale = 5.0 / norm if setting == "5" else 1.0
    assert record["norm_bound"] == (5.0 if setting == "5" else None)
    assert record["clients"][0]["clipped"] is (setting == "5")
    np.testing.assert_allclose(
        _f64(fetch_flat(clients["a"], layout, 1)),
        _f64(theta0) + scale * _f64(delta),
        rtol=0, atol=1e-5,
    )  # fmt: skip


def test_f2_weight_cap_is_max_samples_when_set(federation):
    """With ``--max-samples`` a site trains on at most that many: a larger claim is
    false and weighs max_samples (capped, not refused); smaller claims are kept."""
    training = TrainingConfig(model="tiny", max_samples=500)
    server, clients = federation(
        ["a", "b"], training=training, max_client_samples=10**9,
        policy={"min_participants": 2},
    )  # fmt: skip
    layout = server.layout
    for c in clients.values():
        c.wait_for("task")
    theta0 = fetch_flat(clients["a"], layout, 0)
    da, db = random_delta(layout, 5), random_delta(layout, 6)
    _send(clients["a"], layout, da, 2**40)
    _send(clients["b"], layout, db, 300)
    closed = clients["a"].wait_for("round_closed", round=1).round_closed
    assert closed.success
    record = _logged(server, 1)
    per = _clients(record)
    assert record["weight_cap"] == 500 and record["num_samples"] == 800
    assert (per["a"]["samples_claimed"], per["a"]["samples"], per["a"]["capped"]) == (
        2**40, 500, True,
    )  # fmt: skip
    assert (per["b"]["samples_claimed"], per["b"]["samples"], per["b"]["capped"]) == (
        300, 300, False,
    )  # fmt: skip
    np.testing.assert_allclose(
        _f64(fetch_flat(clients["a"], layout, 1)),
        _fedavg(_f64(theta0), [_f64(da), _f64(db)], [500, 300]),
        rtol=0, atol=1e-6,
    )  # fmt: skip
    # The round log is strict JSON (no NaN/Infinity tokens).
    for line in (server.config.state_dir / "rounds.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in the log"))


def test_f2_auto_bound_grows_at_most_factor_fold_per_round():
    """Even sites that are the majority of a round and send huge deltas raise the next
    round's auto bound at most ``factor``-fold: history counts norms as folded in."""
    bounds = UpdateBounds(DEFAULTS)
    theta = torch.ones(100)
    b1 = bounds.round_bound(1, lambda: theta)
    assert b1 == pytest.approx(DEFAULTS.norm_bound_ratio * 10.0)
    norms = [1.0, 1e30, 1e30]  # one honest update, two huge ones
    record = {"status": "published", "norm_bound": b1,
              "clients": [{"update_norm": x} for x in norms]}  # fmt: skip
    bounds.published(record)
    assert bounds.round_bound(2, lambda: theta) == pytest.approx(DEFAULTS.norm_bound_factor * b1)
    w = bounds.weigh(claimed=2**40, norm=1e30, bound=b1)
    assert (w.weight, w.capped, w.clipped) == (DEFAULTS.max_client_samples, True, True)
    assert w.scale == pytest.approx(b1 / 1e30)
    honest = bounds.weigh(claimed=10, norm=b1, bound=b1)  # at the bound: untouched
    assert (honest.weight, honest.scale) == (10, 1.0)
    # A model of norm 0 gives auto no scale: no bound that round (not "clip to 0").
    assert UpdateBounds(DEFAULTS).round_bound(1, lambda: torch.zeros(10)) is None


def test_f2_norm_bound_flag_parses():
    parser = build_parser()

    def parse(*flags: str) -> argparse.Namespace:
        return parser.parse_args(["serve", "--state-dir", "x", *flags])

    assert parse().max_update_norm == "auto"
    assert parse().max_client_samples == DEFAULTS.max_client_samples
    assert parse("--max-update-norm", "off").max_update_norm == 0.0
    assert parse("--max-update-norm", "0").max_update_norm == 0.0
    assert parse("--max-update-norm", "2.5").max_update_norm == 2.5
    assert parse("--max-update-norm", "AUTO").max_update_norm == "auto"
    for bad in ("-1", "nan", "inf", "big"):
        with pytest.raises(SystemExit):
            parse("--max-update-norm", bad)
    assert math.isclose(parse("--norm-bound-factor", "4").norm_bound_factor, 4.0)
