"""Progress reports over real mTLS: a site still training past the round's deadline,
reporting its steps, is waited for, and the round publishes with its update."""

from __future__ import annotations

import threading
import time

from federation_harness import TIMEOUT, Federations, open_admin, random_delta, wait_until

from client_agent.progress_reports import ProgressReports
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport.events import event_from_proto
from fedmae.transport.federation_client import FederationClient
from fedmae.transport.transfer import submit_update

TOTAL = 400


def test_a_slow_site_that_reports_progress_is_waited_for(tmp_path):
    policy = dict(round_timeout_s=2.0, round_hard_timeout_s=10.0, progress_timeout_s=1.5)
    with Federations(tmp_path) as feds:
        fed = feds.launch(["a", "b", "c"], policy=policy)
        engine, layout = fed.server.rounds, fed.server.layout
        tasks = {n: c.wait_for("task", round=1) for n, c in fed.clients.items()}

        def submit(name: str, seed: int) -> None:
            submit_update(
                fed.clients[name].stub, layout, random_delta(layout, seed), round_=1,
                base_version=0, num_samples=10, metrics={}, timeout=TIMEOUT,
            )  # fmt: skip

        submit("a", 1)
        submit("b", 2)
        # c trains slowly: the agent's reports (at most every 0.5 s) from its train loop.
        task_c = event_from_proto(tasks["c"]).body
        report = ProgressReports(FederationClient(fed.clients["c"].channel), task_c, 0.5)
        done = threading.Event()

        def train() -> None:
            step = 0
            while not done.wait(0.05):  # a training step takes 50 ms here
                step = min(step + 1, TOTAL)
                report(step, TOTAL)

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        try:
            original = engine.state.started + 2.0
            wait_until(
                lambda: time.monotonic() > original + 1.0 and engine.state.deadline > original,
                "the round's deadline to pass, extended for c",
            )
            assert not engine.state.closed
            channel, admin = open_admin(fed.port, fed.server.config.certs)
            with channel:
                shown = admin.Status(apb.StatusRequest(), timeout=TIMEOUT).progress
            assert list(shown) == ["c"] and shown["c"].total == TOTAL and shown["c"].step > 0
            submit("c", 3)  # after the original deadline, before the hard one
        finally:
            done.set()
            trainer.join(TIMEOUT)
        closed = fed.clients["a"].wait_for("round_closed", round=1).round_closed
    assert closed.success and closed.version == 1
    record = engine.round_log.read()[-1]
    assert record["participants"] == ["a", "b", "c"] and record["dropped_reasons"] == {}
    assert 0 < record["deadline_extended_s"] < 8.0 and 3.0 < record["duration_s"] < 10.0
