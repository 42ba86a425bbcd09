"""Central DP's wiring without a network (aggregator_service/private_rounds.py): the
configurations ``fedmae serve`` refuses, Poisson sampling that is never topped up, the
server's re-clip, and the ledger's way through a checkpoint and back."""

from __future__ import annotations

import math
import random

import pytest
import torch
from round_engine_harness import Client, EngineThread, FakeClock, make_engine

from aggregator_service.checkpoint_store import CheckpointStore
from aggregator_service.privacy_config import PrivacyConfig, default_delta
from aggregator_service.private_rounds import PrivateRounds
from aggregator_service.update_bounds import Weighing
from fedmae.cli.main import main
from fedmae.errors import ConfigError
from fedmae.payload.layout import ModelLayout
from fedmae.privacy.accountant import PoissonSampling, epsilon_for

DP = ["--dp", "central", "--dp-sites", "10", "--fraction", "0.5", "--rounds", "3"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dp", "distributed", *DP[2:], "--dp-noise-multiplier", "1"],
         "add --secure-aggregation"),
        (["--dp", "distributed", *DP[2:], "--dp-noise-multiplier", "100", "--dp-clip", "1e6",
          "--secure-aggregation", "--secagg-ring-bits", "32"], "a 32-bit ring cannot hold"),
        (["--dp", "distributed", *DP[2:], "--secure-aggregation", "--dp-target-epsilon",
          "0.0001"], "distributed Skellam noise needs σ above 100"),
        (["--dp", "distributed", "--secure-aggregation", "--dp-noise-multiplier", "1"],
         "--dp distributed needs --dp-sites N"),
        (["--dp", "distributed", *DP[2:], "--secure-aggregation", "--dp-noise-multiplier", "1",
          "--dp-clip-quantile", "0.5"], "it works with --dp central only"),
        ([*DP, "--dp-noise-multiplier", "1", "--dp-clip-quantile", "0.5"],
         "σ_b = 0.25 is too small for σ = 1"),  # q·N/20 = 0.25: 2σ_b < σ
        ([*DP, "--dp-noise-multiplier", "1", "--dp-clip-quantile", "1.5"],
         "--dp-clip-quantile γ is in (0, 1)"),
        ([*DP, "--dp-noise-multiplier", "1", "--secure-aggregation"],
         "--secure-aggregation never shows the server"),
        ([*DP, "--dp-noise-multiplier", "1", "--strategy", "median"],
         "--strategy median aggregates no sum"),
        ([*DP, "--dp-noise-multiplier", "1", "--strategy", "trimmed-mean"],
         "--strategy trimmed-mean aggregates no sum"),
        (["--dp", "central", "--dp-sites", "2", "--dp-noise-multiplier", "1",
          "--min-clients", "2", "--min-participants", "2"], "expects 2 sites per round"),
        (["--dp", "central", "--dp-sites", "20", "--fraction", "0.1",
          "--dp-noise-multiplier", "1"], "expects 2 sites per round"),
        (["--dp", "central", "--dp-noise-multiplier", "1"], "needs --dp-sites N"),
        (["--dp", "central", "--dp-sites", "10"], "needs --dp-noise-multiplier"),
        ([*DP, "--dp-noise-multiplier", "0"], "σ = 0 is no privacy"),
        ([*DP, "--dp-noise-multiplier", "1", "--dp-clip", "0"], "--dp-clip is a positive"),
        (["--dp", "central", "--dp-sites", "10", "--rounds", "1",
          "--dp-target-epsilon", "0.0001"], "ε = 0.0001 at δ = 1e-05 cannot be met in 1 round"),
        ([*DP, "--dp-noise-multiplier", "0.5", "--dp-target-epsilon", "0.01"],
         "cannot be met even for one round"),
        ([*DP, "--dp-target-epsilon", "1", "--rounds", "0"], "give --rounds (not 0)"),
    ],
)  # fmt: skip
def test_serve_refuses_with_the_reason_and_exit_2(tmp_path, caplog, flags, message):
    state_dir = tmp_path / "state"
    assert main(["serve", "--state-dir", str(state_dir), *flags]) == 2
    assert message in caplog.text
    assert not state_dir.exists()  # refused before anything was made


def test_default_delta_is_1e5_until_it_nears_one_over_n():
    assert default_delta(100) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e6**-1.1)
    assert default_delta(1_000_000) < 1e-6


def _private(fraction=0.1, sites=1000, **given) -> PrivateRounds:
    config = PrivacyConfig(sites=sites, **{"noise_multiplier": 1.0, **given})
    return PrivateRounds.plan(config, fraction, rounds=10)


def test_poisson_sample_is_never_topped_up():
    private = _private()
    connected = [f"s{i:04d}" for i in range(1000)]
    sizes = [len(private.sample(connected)) for _ in range(200)]
    # Binomial(1000, 0.1): mean 100, sd 9.5; 200 draws' mean within 4 standard errors.
    assert abs(sum(sizes) / len(sizes) - 100) < 4 * 9.5 / math.sqrt(200)
    assert min(sizes) < 100 < max(sizes)  # it varies: no fixed size, no minimum
    few = [len(private.sample(connected[:5])) for _ in range(200)]
    assert few.count(0) > 0  # from 5 connected at q = 0.1 a round is often empty


def test_the_server_reclips_every_delta_and_weighs_it_one():
    private = _private(clip=2.0)
    delta = torch.full((1000,), 1.0)  # norm 31.6
    weighing = private.clip_(delta, Weighing(claimed=2**40, weight=10_000, norm=31.62, scale=1))
    assert float(torch.linalg.vector_norm(delta, dtype=torch.float64)) <= 2.0
    assert weighing.weight == 1
    assert weighing.scale == pytest.approx(2.0 / 31.62)
    small = torch.full((4,), 0.5)  # norm 1: left alone
    private.clip_(small, Weighing(1, 1, 1.0, 1.0))
    assert torch.equal(small, torch.full((4,), 0.5))


def test_noised_mean_has_the_fixed_denominator_and_the_seeded_noise():
    private = _private(fraction=0.5, sites=10, clip=1.0, noise_seed=7)
    total = torch.zeros(1 << 18)
    mean = private.mean_(total.clone())
    assert float(mean.std()) == pytest.approx(1.0 * 1.0 / 5, rel=0.01)  # σC/(qN)
    again = _private(fraction=0.5, sites=10, clip=1.0, noise_seed=7).mean_(total.clone())
    assert torch.equal(mean, again)  # the test hook's noise is known (so: tests only)


def test_budget_stop_before_the_round_that_would_exceed_the_target():
    one, two = (epsilon_for(1.0, PoissonSampling(0.5), 1e-5, r) for r in (1, 2))
    private = _private(fraction=0.5, sites=10, target_epsilon=(one + two) / 2)
    assert not private.budget_spent()
    private.record()
    assert private.budget_spent()
    assert private.summary()["epsilon"] == pytest.approx(one)


def test_the_ledger_survives_a_restart_beside_its_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    layout = ModelLayout.from_state({"w": torch.zeros(4)})
    private = _private(fraction=0.5, sites=10)
    for version in (1, 2):
        store.save(version, version, "tiny", layout, torch.zeros(4), ledger=private.next_ledger())
        private.record()
    restarted = _private(fraction=0.5, sites=10)
    restarted.resume(store.load_ledger(2), 2)
    assert restarted.ledger.rounds == 2
    assert restarted.ledger.epsilon() == private.ledger.epsilon()

    with pytest.raises(ConfigError, match="resume with the same --dp flags"):
        _private(fraction=0.5, sites=10, noise_multiplier=2.0).resume(store.load_ledger(2), 2)
    with pytest.raises(ConfigError, match="version 3 has no privacy ledger"):
        _private(fraction=0.5, sites=10).resume(store.load_ledger(3), 3)
    _private(fraction=0.5, sites=10).resume(None, 0)  # a fresh run: nothing to resume


def test_no_dp_flags_send_no_clip_to_sites():
    from fedmae.cli.main import build_parser
    from fedmae.cli.serve import _from_flags
    from fedmae.config import TrainingConfig

    args = build_parser().parse_args(["serve", "--state-dir", "s"])
    assert _from_flags(TrainingConfig, args).dp_clip == 0.0


def test_an_empty_poisson_sample_fails_the_round_and_spends_nothing(tmp_path):
    """Three sites connected, q = 0.03: the draw is not topped up to --min-clients, so
    the round has no one, fails, publishes nothing and costs no ε."""
    privacy = PrivacyConfig(sites=100, noise_multiplier=1.0)
    private = PrivateRounds.plan(privacy, 0.03, rounds=1)
    private.rng = random.Random(0)  # its first three draws are all above 0.03
    assert all(random.Random(0).random() >= 0.03 for _ in range(3))
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, server={"privacy": privacy}, private=private,
                         min_clients=3, rounds=1, fraction=0.03, max_attempts=1)  # fmt: skip
    clients = [Client(engine, c) for c in "abc"]
    loop = EngineThread(engine)
    closed = clients[0].next_event("round_closed", round=1)
    assert closed.reason == "the round did not publish (see the round log)"  # no counts
    loop.join()  # one attempt allowed: the loop ends
    (record,) = engine.round_log.read()
    assert record["status"] == "failed" and record["selected"] == [] and record["reason"]
    assert record["dp"]["epsilon"] == 0.0 and record["dp"]["rounds"] == 0
    assert private.ledger.rounds == 0
    assert not list((tmp_path / "checkpoints").glob("*.privacy.json"))
