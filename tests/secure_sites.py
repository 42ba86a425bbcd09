"""Sites that take part in secure rounds with deltas a test chose, over real mTLS.

Each ``SecureSite`` is a thread with its own identity and channel that subscribes and
answers every phase with the agent's own code (``client_agent.secure_rounds``), but
skips training: its ADVERTISE_KEYS answer comes with the delta and sample count the
test gave it for that round. Many sites run in one process (50 in a test).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch
from federation_harness import make_identities, make_server, wait_until

from aggregator_service.config import SecureAggregation
from aggregator_service.privacy_config import PrivacyConfig
from aggregator_service.strategies import StrategyOptions
from client_agent.secure_rounds import SecureRounds
from fedmae.config import TrainingConfig
from fedmae.ml.model_zoo import initial_state
from fedmae.pki.files import ClientIdentity
from fedmae.rounds import Phase, RoundClosed, RoundTask, RunFinished
from fedmae.transport.channels import open_channel
from fedmae.transport.federation_client import FederationClient


class SecureFederation:
    """An aggregator with --secure-aggregation and one ``SecureSite`` per name."""

    def __init__(self, tmp_path: Path, names: list[str], model: str = "tiny",
                 secure: SecureAggregation | None = None, interceptors: tuple = (),
                 rounds: int = 1, strategy: str = "fedavg",
                 options: StrategyOptions | None = None, privacy: PrivacyConfig | None = None,
                 **policy: object):  # fmt: skip
        self.tmp_path = tmp_path
        self.names = names
        self.certs, self.ids = make_identities(tmp_path, names)
        policy = {"min_participants": 3, "dropout_grace_s": 1.0, **policy}
        self.server = make_server(
            tmp_path / "state", self.certs, min_clients=len(names), rounds=rounds,
            server={"secure": secure or SecureAggregation(), "strategy": strategy,
                    "strategy_options": options or StrategyOptions(), "privacy": privacy},
            training=TrainingConfig(model=model), interceptors=interceptors, **policy,
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
        return wait_until(self.records, "the round's record", timeout=120.0)

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


class SecureSite(threading.Thread):
    """One site: ``deltas[round]`` (float32 [P]) with weight ``samples[round]``.

    ``stop_after`` = a phase: the site stops answering (and disconnects) once that
    phase's task arrives, as if it died there (it answered the phases before).
    ``hang_at`` = a phase: the site writes the phase's name to ``marker`` when its task
    arrives and then hangs, connected, until the test kills its process (``main``).
    """

    def __init__(
        self,
        port: int,
        identity_dir: Path,
        deltas: dict[int, torch.Tensor],
        samples: dict[int, int],
        stop_after: Phase | None = None,
        hang_at: Phase | None = None,
        marker: Path | None = None,
    ):
        super().__init__(daemon=True)
        self.identity = ClientIdentity(identity_dir)
        self.name_ = self.identity.client_id
        self.client = FederationClient(open_channel(f"127.0.0.1:{port}", self.identity))
        self.secure = SecureRounds(self.name_, self.identity)
        self.deltas = deltas
        self.samples = samples
        self.stop_after = stop_after
        self.hang_at = hang_at
        self.marker = marker
        self.closed: list[RoundClosed] = []
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def run(self) -> None:
        try:
            events = self.client.subscribe("secure-site-test", 0)
            self._events = events
            for event in events:
                body = event.body
                if isinstance(body, RoundTask):
                    if self.stop_after is not None and body.phase == self.stop_after:
                        self.client.close()  # gone, as a killed site is
                        return
                    if body.phase == self.hang_at and self.marker is not None:
                        self.marker.write_text(body.phase.name)
                        threading.Event().wait()  # until kill -9
                    self._answer(body)
                elif isinstance(body, RoundClosed):
                    self.secure.closed(body.round, body.attempt)
                    self.closed.append(body)
                elif isinstance(body, RunFinished):
                    break
        except BaseException as err:  # noqa: BLE001 - reported to the test
            if not self._stop.is_set():
                self.error = err
        finally:
            self.finished.set()

    def _answer(self, task: RoundTask) -> None:
        if task.phase == Phase.ADVERTISE_KEYS:
            delta = self.deltas[task.round]
            self.secure.trained(self.client, task, delta, self.samples[task.round])
        else:
            self.secure.answer(self.client, task, 1 << 20, self._stop)

    def close(self) -> None:
        self._stop.set()
        self.client.close()


def weighted_mean(
    deltas: dict[str, torch.Tensor], samples: dict[str, int], clip: float, cap: int
) -> np.ndarray:
    """Σ wᵢ clip(Δᵢ) / Σ wᵢ with wᵢ = min(nᵢ, cap), in float64: what a secure round
    publishes, up to its quantization bound."""
    weights = {name: min(n, cap) for name, n in samples.items()}
    total = sum(weights.values())
    acc = sum(
        weights[name] * np.clip(deltas[name].numpy().astype(np.float64), -clip, clip)
        for name in deltas
    )
    return acc / total


def site_delta(numel: int, seed: int, scale: float = 0.01) -> torch.Tensor:
    """The delta a site process sends for a seed (the test computes the same)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_normal(numel) * scale).astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    """A site as its own process (``python tests/secure_sites.py ...``), for kill -9."""
    import argparse

    from fedmae.ml.model_zoo import initial_state
    from fedmae.payload.layout import ModelLayout

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--hang-at", choices=[ph.name for ph in Phase])
    p.add_argument("--marker")
    args = p.parse_args(argv)
    numel = ModelLayout.from_state(initial_state(args.model)).numel
    site = SecureSite(
        args.port, Path(args.identity), {1: site_delta(numel, args.seed)}, {1: args.samples},
        hang_at=Phase[args.hang_at] if args.hang_at else None,
        marker=Path(args.marker) if args.marker else None,
    )  # fmt: skip
    site.start()
    site.finished.wait()
    if site.error is not None:
        raise site.error
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
