"""Robust rules in a running aggregator over mTLS: five sites, one sending its delta
scaled 100x. With the server's own norm bound off (``--max-update-norm off``), FedAvg
publishes a model far from the honest sites' mean; median, trimmed-mean and
multi-krum publish one close to it, read back from the round's spilled updates."""

from __future__ import annotations

import pytest
import torch
from federation_harness import TIMEOUT, Federations, fetch_flat, random_delta

from aggregator_service.update_store import SPILL_FILE
from fedmae.transport.transfer import submit_update

NAMES = ["a", "b", "c", "d", "evil"]


@pytest.mark.parametrize("strategy", ["fedavg", "median", "trimmed-mean", "multi-krum"])
def test_one_scaled_outlier_moves_fedavg_but_not_the_robust_rules(tmp_path, strategy):
    with Federations(tmp_path, max_requests_per_s=0) as federations:
        server, clients = federations.start(NAMES, strategy=strategy, max_update_norm=0.0)
        layout = server.layout
        for c in clients.values():
            c.wait_for("task", round=1)
        theta0 = fetch_flat(clients["a"], layout, 0)
        # Honest sites agree on a direction (norm ~11, a real round-1 update is ~7) and
        # differ by noise a tenth of it; the attacker scales an honest update 100x.
        base = random_delta(layout, seed=0, scale=0.01)
        deltas = {n: base + random_delta(layout, seed=i + 1, scale=0.001)
                  for i, n in enumerate(NAMES[:-1])}  # fmt: skip
        deltas["evil"] = 100 * deltas["a"]
        for n in NAMES:
            submit_update(clients[n].stub, layout, deltas[n], round_=1, base_version=0,
                          num_samples=600, timeout=TIMEOUT)  # fmt: skip
        closed = clients["a"].wait_for("round_closed", round=1).round_closed
        assert closed.success and closed.version == 1
        published = fetch_flat(clients["a"], layout, 1)

        honest = torch.stack([deltas[n] for n in NAMES[:-1]]).mean(dim=0)
        size = float(honest.norm())
        off = float((published - (theta0 + honest)).norm()) / size
        record = server.rounds.round_log.read()[0]
        assert record["strategy"] == strategy and record["status"] == "published"
        assert not (server.config.state_dir / SPILL_FILE).exists()
        if strategy == "fedavg":
            assert off > 15, off  # (100 - 1) / 5 of an honest update away
        else:
            assert off < 0.1, off  # within the honest sites' own spread
