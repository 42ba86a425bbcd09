"""Adaptive clipping (Andrew et al. 2021): the update's noise multiplier is raised so
that the update and the noised bit count together cost the ledger's σ, C moves
geometrically toward the γ-quantile of the norms, and the bit noise is what it says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmae.errors import ConfigError
from fedmae.privacy.adaptive_clip import AdaptiveClip
from fedmae.privacy.mechanisms import noise_generator


def test_update_and_bits_together_cost_the_ledgers_sigma():
    clip = AdaptiveClip.with_defaults(5.0, expected_sites=100)  # σ_b = 100/20 = 5
    assert clip.bit_noise == 5.0
    for z in (0.5, 1.0, 3.0, 9.9):
        z_update = clip.update_noise_multiplier(z)
        # Theorem 1: z⁻² = z_Δ⁻² + z_b⁻², z_b = σ_b / (1/2) (centred bits, sensitivity ½)
        assert z_update**-2 + (2 * clip.bit_noise) ** -2 == pytest.approx(z**-2, rel=1e-12)
        assert z_update > z  # the update pays for the bits with more noise
    with pytest.raises(ConfigError, match="needs 2σ_b > σ"):
        clip.update_noise_multiplier(10.0)  # 2σ_b = 10: no z_Δ
    with pytest.raises(ConfigError, match="--dp-clip-quantile γ is in"):
        AdaptiveClip.with_defaults(5.0, 100, quantile=1.0)


def test_clip_moves_geometrically_toward_the_quantile():
    gen = noise_generator(0)
    quiet = AdaptiveClip(10.0, 0.5, 0.2, bit_noise=1e-9, expected_sites=10)
    share = quiet.adapt(10, 10, gen)  # every site under C: C shrinks by exp(-η(1 - γ))
    assert share == pytest.approx(1.0) and quiet.clip == pytest.approx(10 * math.exp(-0.1))
    quiet.adapt(0, 10, gen)  # every site over C: C grows by exp(ηγ) back to where it was
    assert quiet.clip == pytest.approx(10.0)
    # Against a fixed population of norms, C settles near its median (γ = 0.5), from far
    # below and far above, with the recommended noise (σ_b = q·N / 20).
    norms = np.random.default_rng(1).lognormal(mean=math.log(6.0), sigma=0.5, size=10_000)
    rng = np.random.default_rng(2)
    for start in (0.1, 500.0):
        adaptive = AdaptiveClip.with_defaults(start, expected_sites=50)
        settled = []
        for step in range(400):
            sample = rng.choice(norms, size=50)
            adaptive.adapt(int((sample <= adaptive.clip).sum()), 50, gen)
            if step >= 300:
                settled.append(adaptive.clip)
        assert float(np.median(settled)) == pytest.approx(float(np.median(norms)), rel=0.1)


def test_the_bit_noise_has_the_configured_spread():
    gen = noise_generator(3)
    shares = []
    for _ in range(4000):
        clip = AdaptiveClip(5.0, 0.5, 0.2, bit_noise=2.0, expected_sites=40)
        shares.append(clip.adapt(20, 40, gen))  # noiseless share: exactly 0.5
    # (20 − 40/2 + N(0, 2²)) / 40 + ½: mean ½, std 2/40 = 0.05 (standard error ~1.1 %)
    assert float(np.mean(shares)) == pytest.approx(0.5, abs=0.004)
    assert float(np.std(shares)) == pytest.approx(0.05, rel=0.05)


def test_state_round_trips_and_garbage_is_refused():
    clip = AdaptiveClip.with_defaults(5.0, expected_sites=30, quantile=0.7)
    assert AdaptiveClip.from_dict(clip.to_dict()) == clip
    with pytest.raises(ConfigError, match="lacks or garbles"):
        AdaptiveClip.from_dict({"clip": 5.0})
