"""Distributed DP over real mTLS (``--dp distributed``): sites clip, round and add their
shares of Skellam noise before masking; the server unmasks a sum that already carries
noise of the configured variance, divides by q·N, and accounts the Skellam bound.
No sample count leaves a site, and a bad configuration is refused at start."""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pytest
import torch
from federation_harness import make_identities, make_server, wait_until
from secure_sites import SecureFederation

from aggregator_service.config import SecureAggregation
from aggregator_service.privacy_config import PrivacyConfig
from client_agent.agent import AgentConfig, ClientAgent
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.partitions import client_split
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


def test_real_agents_train_under_distributed_dp_and_a_site_refuses_too_little_noise(
    tmp_path, caplog
):
    """Three real agents (training the tiny MAE, signing their keys) publish a
    distributed-DP round; then a fourth joins whose floor is above the announced σ: it
    sits round 2 out before training, and the round fails naming why (no site is
    talked into adding less noise than it requires)."""
    caplog.set_level(logging.INFO)
    names = ["s1", "s2", "s3", "s4"]
    certs, ids = make_identities(tmp_path, names)
    privacy = PrivacyConfig(noise_multiplier=0.5, sites=4, mode="distributed")
    server = make_server(tmp_path / "state", certs, 3, 0, round_timeout_s=60.0,
                         server={"privacy": privacy, "secure": SecureAggregation()})  # fmt: skip
    port = server.start()
    agents = [_agent(port, ids[n], i, floor=1.0 if n == "s4" else 0.0) for i, n in enumerate(names)]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    try:
        for thread in threads[:3]:
            thread.start()
        wait_until(lambda: server.rounds.round_log.read(), "round 1", timeout=120)
        threads[3].start()  # s4 joins a later round (runs go on until stopped)
        wait_until(
            lambda: any(r["status"] == "failed" for r in server.rounds.round_log.read()),
            "the round s4 refused", timeout=120,
        )  # fmt: skip
    finally:
        for a in agents:
            a.stop()
        server.stop(grace=0)
    records = server.rounds.round_log.read()
    first, failed = records[0], next(r for r in records if r["status"] == "failed")
    assert first["status"] == "published" and first["dp"]["mode"] == "distributed"
    assert first["num_samples"] == 3  # inputs, not samples: each site weighed 1
    assert "below this site's floor 1" in failed["reason"]
    assert "s4: round" in caplog.text and "is below this site's floor 1" in caplog.text
    assert agents[3].rounds_done == 0  # it never trained for a round it refused


def _agent(port: int, identity, index: int, floor: float) -> ClientAgent:
    data = client_split(load_fashion_mnist(), index, 4, seed=0, limit=100 * 4)
    cfg = AgentConfig(
        server=f"127.0.0.1:{port}", identity=identity, backoff_initial_s=0.2,
        backoff_max_s=1.0, give_up_after_s=60, overrides={"batch_size": 32},
        min_noise_multiplier=floor,
    )  # fmt: skip
    return ClientAgent(cfg, data)
