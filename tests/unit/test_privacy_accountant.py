"""The privacy ledger (fedmae.privacy.accountant): ε from dp-accounting, cross-checked
against opacus' independent RDP implementation, calibration, checkpointing, refusals."""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier

from fedmae.errors import ConfigError
from fedmae.privacy.accountant import (
    FixedSizeSampling,
    PoissonSampling,
    PrivacyLedger,
    calibrate_noise,
    epsilon_for,
)
from fedmae.privacy.skellam import DistributedSkellam

DELTA = 1e-5

# (q, σ, rounds): federated regimes (10 % of sites for 100 rounds, full participation,
# 1 % for 1000, a low-noise short run) at δ = 1e-5.
CROSS_CHECK = [
    (0.1, 1.0, 100),
    (1.0, 1.0, 50),
    (1.0, 5.0, 50),
    (0.01, 0.8, 1000),
    (0.05, 2.0, 500),
    (0.1, 0.5, 10),
]


def _opacus_rdp_epsilon(q: float, sigma: float, rounds: int) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" notes
        return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("q, sigma, rounds", CROSS_CHECK)
def test_epsilon_matches_opacus_rdp_within_one_percent(q, sigma, rounds):
    ours = PrivacyLedger(sigma, PoissonSampling(q), DELTA, rounds=rounds).epsilon()
    theirs = _opacus_rdp_epsilon(q, sigma, rounds)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert ours == pytest.approx(epsilon_for(sigma, PoissonSampling(q), DELTA, rounds), rel=1e-9)


def test_where_dp_accounting_drops_orders_its_epsilon_is_the_larger():
    """At q = 0.3, σ = 1.1, 200 rounds the best orders are in (1, 2), where dp-accounting's
    series for fractional orders does not converge and it drops them: its ε is 1.2 %
    above opacus' — larger, so still a valid bound (docs/privacy.md)."""
    ours = PrivacyLedger(1.1, PoissonSampling(0.3), DELTA, rounds=200).epsilon()
    theirs = _opacus_rdp_epsilon(0.3, 1.1, 200)
    assert theirs <= ours <= theirs * 1.02


def test_pld_matches_opacus_prv():
    """The optional PLD accountant against opacus' PRV accountant (numerical, both tight)."""
    ours = epsilon_for(1.0, PoissonSampling(0.1), DELTA, 100, accountant="pld")
    prv = PRVAccountant()
    prv.history = [(1.0, 0.1, 100)]
    theirs = prv.get_epsilon(DELTA)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert ours < PrivacyLedger(1.0, PoissonSampling(0.1), DELTA, rounds=100).epsilon()


def test_full_fixed_size_sampling_is_the_gaussian_under_replace_one():
    """m = N: no amplification; replace-one moves the sum by 2C, so RDP(α) = 2α/σ² per
    round; the conversion to ε is opacus' (an independent implementation of the same
    bound, Balle et al. 2020)."""
    sigma, rounds = 3.0, 20
    ours = PrivacyLedger(sigma, FixedSizeSampling(10, 10), DELTA, rounds=rounds).epsilon()
    orders = np.array([1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256])
    theirs, _ = opacus_rdp.get_privacy_spent(
        orders=orders, rdp=rounds * 2 * orders / sigma**2, delta=DELTA
    )
    assert ours == pytest.approx(theirs, rel=0.01)


def test_fixed_size_sampling_is_accounted_under_replace_one():
    """Sampling without replacement amplifies less than Poisson at the same rate once its
    replace-one sensitivity (2C) is counted, and the ledger says which relation it uses."""
    fixed = PrivacyLedger(1.0, FixedSizeSampling(10, 100), DELTA, rounds=50)
    poisson = PrivacyLedger(1.0, PoissonSampling(0.1), DELTA, rounds=50)
    assert fixed.epsilon() > poisson.epsilon()
    assert fixed.sampling.neighbouring == "replace one site"
    assert poisson.sampling.neighbouring == "add or remove one site"


@pytest.mark.parametrize("sampling", [PoissonSampling(0.1), FixedSizeSampling(10, 100)])
def test_epsilon_grows_with_rounds_and_what_if_does_not_record(sampling):
    ledger = PrivacyLedger(1.2, sampling, DELTA)
    assert ledger.epsilon() == 0.0
    spent = [ledger.epsilon_after(r) for r in (1, 2, 5, 10, 50, 200)]
    assert all(a < b for a, b in zip(spent, spent[1:], strict=False))
    assert ledger.rounds == 0
    for _ in range(5):
        ledger.record_round()
    assert ledger.rounds == 5
    assert ledger.epsilon() == spent[2]


def test_no_noise_means_no_guarantee():
    ledger = PrivacyLedger(0.0, PoissonSampling(0.1), DELTA, rounds=1)
    assert ledger.epsilon() == math.inf
    assert epsilon_for(0.0, PoissonSampling(1.0), DELTA, 3) == math.inf
    assert not ledger.budget_allows_next_round(1e9)


def test_the_budget_stops_before_the_round_that_would_exceed_it():
    ledger = PrivacyLedger(1.0, PoissonSampling(0.1), DELTA)
    target = ledger.epsilon_after(10)
    while ledger.budget_allows_next_round(target):
        ledger.record_round()
    assert ledger.rounds == 10
    assert ledger.epsilon() <= target < ledger.epsilon_after(11)


def test_json_round_trip_keeps_rounds_and_parameters():
    ledger = PrivacyLedger(0.9, FixedSizeSampling(7, 50), 1e-6)
    for _ in range(7):
        ledger.record_round()
    text = ledger.to_json()
    assert json.loads(text)["epsilon"] == pytest.approx(ledger.epsilon())
    back = PrivacyLedger.from_json(text)
    assert (back.noise_multiplier, back.sampling, back.delta, back.rounds, back.accountant) == (
        0.9,
        FixedSizeSampling(7, 50),
        1e-6,
        7,
        "rdp",
    )
    assert back.epsilon() == ledger.epsilon()
    poisson = PrivacyLedger(1.0, PoissonSampling(0.25), DELTA, rounds=3, accountant="pld")
    assert PrivacyLedger.from_json(poisson.to_json()).sampling == PoissonSampling(0.25)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        json.dumps({"format": "pickle"}),
        json.dumps({"format": "fedmae-privacy-ledger/1", "noise_multiplier": 1.0}),
        json.dumps(
            {
                "format": "fedmae-privacy-ledger/1",
                "noise_multiplier": 1.0,
                "sampling": {"kind": "shuffled"},
                "delta": DELTA,
                "rounds": 1,
                "accountant": "rdp",
            }
        ),
    ],
)
def test_a_garbled_ledger_is_a_config_error(text):
    with pytest.raises(ConfigError):
        PrivacyLedger.from_json(text)


def test_calibration_round_trips_to_the_target():
    """The calibrated σ meets the target and is within 0.1 % of the smallest σ that does."""
    for sampling, target, rounds in [
        (PoissonSampling(0.1), 4.0, 50),
        (PoissonSampling(1.0), 8.0, 20),
    ]:
        sigma = calibrate_noise(target, DELTA, sampling, rounds)
        spent = epsilon_for(sigma, sampling, DELTA, rounds)
        assert spent <= target
        assert spent == pytest.approx(target, rel=0.01)
        assert epsilon_for(sigma * 0.999, sampling, DELTA, rounds) > target


def test_calibration_matches_opacus():
    """σ for ε = 8 at q = 0.1 over 100 rounds against opacus' get_noise_multiplier (RDP;
    it stops within 0.01 of ε, so it may sit a little above our σ)."""
    ours = calibrate_noise(8.0, DELTA, PoissonSampling(0.1), 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_noise_multiplier(
            target_epsilon=8.0, target_delta=DELTA, sample_rate=0.1, steps=100, accountant="rdp"
        )
    assert ours == pytest.approx(theirs, rel=0.01)
    assert ours == pytest.approx(0.994, abs=0.002)


def test_calibration_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="cannot be met in 1 round"):
        calibrate_noise(1e-4, DELTA, PoissonSampling(1.0), 1)
    with pytest.raises(ConfigError, match="planned rounds"):
        calibrate_noise(8.0, DELTA, PoissonSampling(0.1), 0)
    for bad_target in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="target ε"):
            calibrate_noise(bad_target, DELTA, PoissonSampling(0.1), 10)
    with pytest.raises(ConfigError, match="δ"):
        calibrate_noise(8.0, 0.0, PoissonSampling(0.1), 10)


@pytest.mark.parametrize(
    "build",
    [
        lambda: PoissonSampling(0.0),
        lambda: PoissonSampling(1.5),
        lambda: FixedSizeSampling(0, 10),
        lambda: FixedSizeSampling(11, 10),
        lambda: PrivacyLedger(-1.0, PoissonSampling(0.1), DELTA),
        lambda: PrivacyLedger(math.nan, PoissonSampling(0.1), DELTA),
        lambda: PrivacyLedger(1.0, PoissonSampling(0.1), 0.0),
        lambda: PrivacyLedger(1.0, PoissonSampling(0.1), 1.0),
        lambda: PrivacyLedger(1.0, PoissonSampling(0.1), DELTA, rounds=-1),
        lambda: PrivacyLedger(1.0, PoissonSampling(0.1), DELTA, accountant="moments"),
        lambda: PrivacyLedger(1.0, FixedSizeSampling(5, 10), DELTA, accountant="pld"),
        lambda: PrivacyLedger(1.0, PoissonSampling(0.1), DELTA).epsilon_after(-1),
    ],
)
def test_bad_parameters_are_config_errors(build):
    with pytest.raises(ConfigError):
        build()


def test_a_ledger_of_distributed_skellam_noise():
    skellam = DistributedSkellam(
        clip=1.0, noise_multiplier=2.0, frac_bits=12, dim=5000, min_sites=5
    )
    ledger = PrivacyLedger(2.0, PoissonSampling(0.1), DELTA, distributed=skellam)
    for _ in range(4):
        ledger.record_round()
    assert ledger.epsilon() == skellam.epsilon(4, DELTA)  # no amplification by q claimed
    assert ledger.epsilon() > PrivacyLedger(2.0, PoissonSampling(0.1), DELTA, rounds=4).epsilon()
    back = PrivacyLedger.from_json(ledger.to_json())
    assert back.distributed == skellam and back.epsilon() == ledger.epsilon()
    with pytest.raises(ConfigError, match="σ"):
        PrivacyLedger(1.0, PoissonSampling(0.1), DELTA, distributed=skellam)
    with pytest.raises(ConfigError, match="RDP"):
        PrivacyLedger(2.0, PoissonSampling(0.1), DELTA, accountant="pld", distributed=skellam)


def test_dropped_orders_do_not_flood_the_log(caplog):
    # At small σ dp-accounting cannot evaluate the lowest orders and warns for each, on
    # every step of a calibration: those warnings are hidden, other absl ones are not.
    caplog.set_level(logging.WARNING)
    calibrate_noise(8.0, 1e-5, PoissonSampling(rate=0.1), rounds=20)
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    logging.getLogger("absl").warning("something else")
    assert "something else" in caplog.text
