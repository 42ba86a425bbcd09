"""Prometheus metrics for the aggregator (``--metrics-listen HOST:PORT``).

Counters are fed from the round records, so ``/metrics`` and ``rounds.jsonl`` agree
exactly. Each server has its own registry (tests run several in one process).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from aggregator_service.engine import RoundEngine
from aggregator_service.records import RoundRecord
from aggregator_service.subscriptions import RoundObserver

log = logging.getLogger(__name__)

ROUND_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics(RoundObserver):
    def __init__(self, rounds: RoundEngine):
        r = self.registry = CollectorRegistry()
        self.rounds_closed = Counter(
            "fedmae_rounds_closed", "Rounds closed, by status (published, failed, aborted)",
            ["status"], registry=r,
        )  # fmt: skip
        self.round_duration = Histogram(
            "fedmae_round_duration_seconds", "Seconds from a round's task to its close",
            buckets=ROUND_SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.phase_seconds = Gauge(
            "fedmae_last_round_phase_seconds", "Phase durations of the last closed round",
            ["phase"], registry=r,
        )  # fmt: skip
        self.updates = Counter(
            "fedmae_updates", "Client updates by outcome; rejected ones by gRPC status",
            ["outcome", "reason"], registry=r,
        )  # fmt: skip
        self.bytes_in = Counter(
            "fedmae_update_bytes_received", "Update payload bytes received in closed rounds",
            registry=r,
        )  # fmt: skip
        self.bytes_out = Counter(
            "fedmae_model_bytes_sent", "Model payload bytes served in closed rounds", registry=r
        )
        self.samples = Counter(
            "fedmae_samples_aggregated", "Training samples behind published rounds", registry=r
        )
        self.loss = Gauge(
            "fedmae_last_loss", "Losses of the last published round (sample-weighted)",
            ["kind"], registry=r,
        )  # fmt: skip
        Gauge("fedmae_model_version", "Latest published model version", registry=r).set_function(
            lambda: rounds.version
        )
        Gauge("fedmae_clients_connected", "Clients with an open event stream",
              registry=r).set_function(lambda: len(rounds.connected()))  # fmt: skip
        Gauge("fedmae_round", "The open (or next) round", registry=r).set_function(
            lambda: rounds.status()["round"]
        )
        if (private := rounds.private) is not None:  # with --dp off there is no ε to show
            Gauge("fedmae_dp_epsilon", "Central DP: ε at the run's δ spent by the rounds "
                  "published so far (privacy ledger)", registry=r).set_function(
                lambda: private.ledger.epsilon()
            )  # fmt: skip
        self._server = None

    def update_accepted(self, client_id: str, nbytes: int) -> None:
        self.updates.labels("accepted", "").inc()

    def update_rejected(self, client_id: str, reason: str, code: str) -> None:
        self.updates.labels("rejected", code).inc()

    def round_closed(self, record: RoundRecord) -> None:
        self.rounds_closed.labels(record.status).inc()
        self.round_duration.observe(record.duration_s)
        self.bytes_in.inc(record.bytes_in)
        self.bytes_out.inc(record.bytes_out)
        for phase, seconds in record.phases.items():
            self.phase_seconds.labels(phase.removesuffix("_s")).set(seconds)
        if record.published:
            self.samples.inc(record.num_samples)
            for kind, loss in (("train", record.train_loss), ("val", record.val_loss),
                               ("eval", record.eval_loss)):  # fmt: skip
                if loss is not None:
                    self.loss.labels(kind).set(loss)

    def serve(self, listen: str) -> int:
        """Start the ``/metrics`` HTTP endpoint; return its port."""
        host, _, port = listen.rpartition(":")
        self._server, _thread = start_http_server(int(port), addr=host or "127.0.0.1",
                                                  registry=self.registry)  # fmt: skip
        bound = self._server.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", host or "127.0.0.1", bound)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
