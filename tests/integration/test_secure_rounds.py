"""Secure rounds over real mTLS: the published model is the weighted mean of the sites'
deltas within the documented bound, the server's view of each site is noise, and a
site that misbehaves is excluded while the honest ones still publish."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_harness import make_identities, make_server, wait_until
from secure_sites import SecureSite, weighted_mean

from aggregator_service.config import SecureAggregation
from fedmae.config import TrainingConfig
from fedmae.ml.model_zoo import initial_state
from fedmae.payload.layout import ModelLayout

TIMEOUT = 120.0


class SecureFederation:
    """An aggregator with --secure-aggregation and one ``SecureSite`` per name."""

    def __init__(self, tmp_path: Path, names: list[str], model: str = "tiny",
                 secure: SecureAggregation | None = None, **policy: object):  # fmt: skip
        self.tmp_path = tmp_path
        self.names = names
        self.certs, self.ids = make_identities(tmp_path, names)
        policy = {"min_participants": 3, "dropout_grace_s": 1.0, **policy}
        self.server = make_server(
            tmp_path / "state", self.certs, min_clients=len(names), rounds=1,
            server={"secure": secure or SecureAggregation()},
            training=TrainingConfig(model=model), **policy,
        )  # fmt: skip
        self.port = self.server.start()
        self.layout = self.server.layout
        self.theta0 = self.layout.flatten(initial_state(model, seed=0)).numpy().astype(np.float64)
        self.sites: dict[str, SecureSite] = {}

    def run(self, deltas, samples, **site_options) -> list[dict]:
        """Start a site per name with its delta; wait for the round's record."""
        for n in self.names:
            self.sites[n] = SecureSite(self.port, self.ids[n], {1: deltas[n]}, {1: samples[n]},
                                       **site_options.get(n, {}))  # fmt: skip
            self.sites[n].start()
        return wait_until(self.records, "the round's record", timeout=TIMEOUT)

    def records(self) -> list[dict]:
        path = self.tmp_path / "state" / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def published(self) -> np.ndarray:
        return self.server.rounds.global_flat.numpy().astype(np.float64)

    def bound(self, survivors: int, weight: int) -> np.ndarray:
        """The documented quantization bound plus float32 rounding of the new model."""
        frac = self.server.rounds.secagg.frac_bits
        return survivors * 2.0**-frac / weight + 2.0**-22 * (np.abs(self.theta0) + 1.0)

    def close(self) -> None:
        for site in self.sites.values():
            site.close()
        self.server.stop(grace=0)


def _deltas(layout: ModelLayout, names: list[str], scale: float = 0.01) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(7)
    return {
        n: torch.from_numpy((rng.standard_normal(layout.numel) * scale).astype(np.float32))
        for n in names
    }


@pytest.mark.parametrize(
    ("sites", "model"),
    [(3, "tiny"), (10, "blob:40000"), (50, "blob:20000")],
    ids=["3-sites-tiny", "10-sites", "50-sites-sparse"],
)
def test_a_secure_round_publishes_the_weighted_mean_within_the_bound(tmp_path, sites, model):
    names = [f"site-{k:02d}" for k in range(sites)]
    fed = SecureFederation(tmp_path, names, model=model)
    try:
        deltas = _deltas(fed.layout, names)
        deltas[names[0]][:5] = torch.tensor([3.0, -3.0, 0.9, -0.9, 0.0])  # clipped to [-1, 1]
        samples = {n: 100 + 37 * k for k, n in enumerate(names)}
        samples[names[-1]] = 50_000  # over the weight cap (10,000): weighs 10,000
        [record] = fed.run(deltas, samples)
        assert record["status"] == "published", record.get("reason")
        cap = fed.server.rounds.bounds.cap
        expected = fed.theta0 + weighted_mean(deltas, samples, clip=1.0, cap=cap)
        total = sum(min(n, cap) for n in samples.values())
        err = np.abs(fed.published() - expected)
        assert (err <= fed.bound(sites, total)).all(), float(err.max())
        # What the round log keeps of a secure round: the sum's weight, nothing per site.
        assert record["secure_aggregation"] is True and record["num_samples"] == total
        assert record["clients"] == [] and record["update_norm"] is None
        assert record["train_loss"] is None and record["val_loss"] is None
        assert record["secagg"]["ring_bits"] == 32
        assert record["secagg"]["masked_input"] == sites
        # Up to 20 sites the graph is complete; above, SecAgg+'s sparse one (k ~ 3 log2 n).
        assert record["secagg"]["neighbours"] == (sites - 1 if sites <= 20 else 18)
        for site in fed.sites.values():  # every site heard the round close, without lists
            wait_until(lambda s=site: s.closed, "RoundClosed at each site")
            assert site.error is None
            assert site.closed[0].success and site.closed[0].version == 1
    finally:
        fed.close()
