"""Sites killed (kill -9) in the middle of a secure round: one after SHARE_KEYS, one
after MASKED_INPUT. The round publishes the exact aggregate of the rest; with fewer
than the threshold left to unmask, it fails, says why, and reveals nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from federation_harness import make_identities, make_server, wait_until
from secure_sites import site_delta, weighted_mean

from aggregator_service.config import SecureAggregation
from fedmae.config import TrainingConfig
from fedmae.ml.model_zoo import initial_state

MODEL = "blob:20000"
TIMEOUT = 120.0
SITES = Path(__file__).parent.parent / "secure_sites.py"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class Cluster:
    """An aggregator with --secure-aggregation and a site process per name."""

    def __init__(self, tmp: Path, names: list[str], **policy: object):
        self.tmp = tmp
        self.certs, self.ids = make_identities(tmp, names)
        self.server = make_server(
            tmp / "state", self.certs, min_clients=len(names), rounds=1,
            server={"secure": SecureAggregation(**policy.pop("secure", {}))},
            training=TrainingConfig(model=MODEL), dropout_grace_s=1.0, max_attempts=1,
            **policy,
        )  # fmt: skip
        self.port = self.server.start()
        self.procs: dict[str, subprocess.Popen] = {}

    def site(self, name: str, seed: int, samples: int, hang_at: str | None = None) -> None:
        args = [sys.executable, str(SITES), "--port", str(self.port), "--identity",
                str(self.ids[name]), "--model", MODEL, "--seed", str(seed),
                "--samples", str(samples)]  # fmt: skip
        if hang_at:
            args += ["--hang-at", hang_at, "--marker", str(self.marker(name))]
        log = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=ENV)

    def marker(self, name: str) -> Path:
        return self.tmp / f"{name}.reached"

    def kill_when_reached(self, name: str, phase: str) -> None:
        """kill -9 the site once it holds the task of ``phase`` (it answered the ones
        before: its keys and shares, or its masked input, are with the server)."""
        marker = self.marker(name)
        wait_until(lambda: marker.exists() and marker.read_text() == phase,
                   f"{name} to reach {phase}", timeout=TIMEOUT)  # fmt: skip
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(TIMEOUT)

    def record(self) -> dict:
        path = self.tmp / "state" / "rounds.jsonl"

        def read():
            return path.exists() and [json.loads(x) for x in path.read_text().splitlines()]

        return wait_until(read, "the round's record", timeout=TIMEOUT)[0]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.server.stop(grace=0)


def test_sites_killed_after_share_keys_and_after_masked_input_leave_the_rest_exact(tmp_path):
    names = ["a", "b", "c", "d", "e"]
    samples = {"a": 120, "b": 340, "c": 560, "d": 780, "e": 900}
    cluster = Cluster(tmp_path, names, min_updates=3)
    try:
        for k, name in enumerate(names):
            hang = {"d": "MASKED_INPUT", "e": "UNMASK"}.get(name)
            cluster.site(name, seed=k, samples=samples[name], hang_at=hang)
        marker = cluster.marker("d")
        wait_until(marker.exists, "d to hold its MASKED_INPUT task", timeout=TIMEOUT)
        # Operators see the phase and who answered it (fedmae status / watch).
        status = wait_until(
            lambda: (s := cluster.server.rounds.status())["reported"] == ["a", "b", "c", "e"] and s,
            "four masked inputs in",
            timeout=TIMEOUT,
        )
        assert status["state"] == "masked_input"
        cluster.kill_when_reached("d", "MASKED_INPUT")  # shared keys, sent no input
        cluster.kill_when_reached("e", "UNMASK")  # sent its input, reveals no shares
        record = cluster.record()
        assert record["status"] == "published", record.get("reason")
        counts = record["secagg"]
        assert (counts["share_keys"], counts["masked_input"], counts["unmask"]) == (5, 4, 3)
        layout_numel = cluster.server.layout.numel
        kept = ["a", "b", "c", "e"]  # e's input is in the sum; d's never was
        deltas = {n: site_delta(layout_numel, names.index(n)) for n in kept}
        theta0 = np.concatenate([t.flatten().numpy() for t in initial_state(MODEL).values()])
        expected = theta0 + weighted_mean(deltas, {n: samples[n] for n in kept}, 1.0, 10_000)
        published = cluster.server.rounds.global_flat.numpy().astype(np.float64)
        frac = cluster.server.rounds.secagg.frac_bits
        bound = 4 * 2.0**-frac / sum(samples[n] for n in kept) + 2.0**-22 * (abs(theta0) + 1)
        assert (np.abs(published - expected) <= bound).all()
        assert record["num_samples"] == sum(samples[n] for n in kept)
    finally:
        cluster.close()


def test_below_the_threshold_the_round_fails_and_reveals_nothing(tmp_path):
    names = ["a", "b", "c", "d"]  # 4 share holders each: threshold 3
    cluster = Cluster(tmp_path, names, min_updates=2, min_participants=2)
    try:
        for k, name in enumerate(names):
            cluster.site(name, seed=k, samples=100, hang_at="UNMASK" if name in "cd" else None)
        cluster.kill_when_reached("c", "UNMASK")
        cluster.kill_when_reached("d", "UNMASK")
        record = cluster.record()
        assert record["status"] == "failed"
        reason = record["reason"]
        assert "secure aggregation of round 1 failed" in reason
        assert "only 2 of the 4 holders" in reason and "3 are needed" in reason, reason
        assert cluster.server.rounds.version == 0  # nothing published
        checkpoints = sorted(p.name for p in (tmp_path / "state" / "checkpoints").iterdir())
        assert checkpoints == ["v000000.safetensors"]
    finally:
        cluster.close()
