"""Distributed DP over real mTLS (``--dp distributed``): sites clip, round and add their
shares of Skellam noise before masking; the server unmasks a sum that already carries
noise of the configured variance, divides by q·N, and accounts the Skellam bound.
No sample count leaves a site, and a bad configuration is refused at start."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from secure_sites import SecureFederation

from aggregator_service.private_rounds import PrivacyConfig
from fedmae.privacy.skellam import DistributedSkellam

NAMES = ["a", "b", "c", "d"]


def _clipped(delta: torch.Tensor, clip: float) -> np.ndarray:
    values = delta.numpy().astype(np.float64)
    norm = float(np.linalg.norm(values))
    return values * min(1.0, clip / norm)


def test_the_sites_noise_is_in_the_published_mean_and_the_server_accounts_it(tmp_path):
    clip, sigma = 5.0, 0.5
    privacy = PrivacyConfig(clip=clip, noise_multiplier=sigma, sites=len(NAMES),
                            mode="distributed")  # fmt: skip
    fed = SecureFederation(tmp_path, NAMES, privacy=privacy, fraction=1.0)
    try:
        rng = np.random.default_rng(3)
        d = fed.layout.numel
        # Honest deltas of norm ~3.6 (< C, whole); "d" sends 100x one (> C: its agent
        # code clips it to C) and claims 2^40 samples (it weighs 1 like every site).
        deltas = {n: torch.from_numpy((rng.standard_normal(d) * 0.003).astype(np.float32))
                  for n in NAMES}  # fmt: skip
        deltas["d"] = deltas["a"] * 100
        samples = {n: 600 for n in NAMES} | {"d": 2**40}
        [record] = fed.run(deltas, samples)
        assert record["status"] == "published", record.get("reason")
        published = fed.published()
    finally:
        fed.close()

    # What the round log says: inputs counted (not samples), the mode, the Skellam noise.
    assert record["num_samples"] == len(NAMES) and record["clients"] == []
    dp = record["dp"]
    assert dp["mode"] == "distributed" and dp["noise"] == "skellam"
    assert dp["amplification"] is False
    assert dp["min_sites"] == 4  # this round needs every one of the 4 sites to publish
    # 2^12 units per 1.0 round a clip of 5 in 1.3 M values to within 0.1 %, and the
    # sums of 100 sites with this noise fit the 32-bit ring: half the bytes of 64.
    assert dp["frac_bits"] == 12
    assert record["secagg"]["distributed_dp"] is True and record["secagg"]["ring_bits"] == 32
    noise = DistributedSkellam(clip, sigma, dp["frac_bits"], d, dp["min_sites"])
    assert dp["epsilon"] == pytest.approx(noise.epsilon(1, dp["delta"]), rel=1e-9)

    # The published model is θ0 + (Σ clip(Δᵢ) + noise) / (q·N): 4 shares of variance
    # V/4 each, so the noise on the mean has std σΔ₂/s / 4 per coordinate.
    clipped = sum(_clipped(deltas[n], clip) for n in NAMES)
    residual = published - fed.theta0 - clipped / len(NAMES)
    expected = noise.noise_std / len(NAMES)
    # Over 1.3 M coordinates the sample std's standard error is ~0.06 %; float32 of
    # the model and the rounding (1/s) are far below it.
    assert float(residual.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(residual.mean())) < 5 * expected / math.sqrt(d)  # unbiased
    # Without the noise the attacker's part would be clipped to C: it cannot be more
    # than C/(qN) plus the noise's norm (a 100x delta unclipped would be 25x that).
    attacker = residual + _clipped(deltas["d"], clip) / len(NAMES)
    assert np.linalg.norm(attacker) <= clip / len(NAMES) + 1.01 * expected * math.sqrt(d)
