"""The training deadline with progress reports (fake clock, no sockets): extended while
every site still owed is connected and progressing, up to the hard limit; not for a
site that stalled or left; and the round log says which site was slow and which gone."""

from __future__ import annotations

import pytest
from round_engine_harness import Client, EngineThread, FakeClock, delta, make_engine, start_engine
from secagg_cases import Pki

from aggregator_service.config import SecureAggregation
from aggregator_service.round_state import ROUND_PHASES
from aggregator_service.secure_rounds import SECURE_PHASES
from fedmae.errors import InvalidRequest, PermissionDenied, StaleUpdate
from fedmae.rounds import TrainingProgress

# Round 1 of 1 for a, b, c (one attempt); it publishes with 2 updates. Deadline 60 s
# after the task, never past 180 s; a site progresses if its step advanced within 30 s.
POLICY = dict(
    min_clients=3, min_updates=2, min_participants=2, rounds=1, max_attempts=1,
    round_timeout_s=60.0, round_hard_timeout_s=180.0, progress_timeout_s=30.0,
)  # fmt: skip
TOTAL = 400


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Sites:
    """Round 1 running: every site has its task, ``a`` has sent its update."""

    def __init__(self, tmp_path, clock, **policy):
        self.clock = clock
        self.engine, self.clients, self.loop = start_engine(
            tmp_path, clock, "abc", **{**POLICY, **policy}
        )
        self.steps: dict[str, int] = {}
        try:
            for client in self.clients.values():
                client.next_event("task", round=1)
            self.submit("a")
        except BaseException:
            self.loop.stop()
            raise
        self.start = self.engine.state.started

    def submit(self, site: str) -> None:
        self.clients[site].submit(delta(self.engine.layout, seed=ord(site)), 1)

    def report(self, *sites: str) -> None:
        for site in sites:
            self.steps[site] = self.steps.get(site, 0) + 10
            self.engine.training_progress(site, TrainingProgress(1, 1, self.steps[site], TOTAL))

    def tick(self, *reporting: str, seconds: float = 20.0) -> None:
        """``reporting`` sites report a step, then time moves on and the loop looks."""
        self.report(*reporting)
        self.clock.advance(seconds)
        self.loop.settle(self.clock)

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.start

    def record(self) -> dict:
        self.loop.join()
        return self.engine.round_log.read()[-1]


def test_sites_that_progress_are_waited_for_up_to_the_hard_limit(tmp_path, clock):
    sites = Sites(tmp_path, clock)
    try:
        while sites.elapsed() < 100:
            sites.tick("b", "c")
            assert not sites.engine.state.closed  # past 60 s: extended
        assert sites.engine.state.deadline > sites.start + 60.0
        sites.submit("b")  # b finishes late
        while not sites.engine.state.closed:
            sites.tick("c")
            assert sites.elapsed() <= 180.0
        record = sites.record()
    finally:
        sites.loop.stop()
    assert record["status"] == "published" and record["participants"] == ["a", "b"]
    # The deadline last moved to 170 s (c's step at 140 s + 30 s); at 180 s, the hard
    # limit, it could move no more.
    assert record["duration_s"] == 180.0 and record["deadline_extended_s"] == 110.0
    assert record["dropped_reasons"] == {"c": "slow: step 90/400 at the hard deadline"}


def test_a_site_that_stops_progressing_ends_the_extension(tmp_path, clock):
    sites = Sites(tmp_path, clock)
    try:
        for _ in range(4):  # 0..60 s: both report; extended at 60 s
            sites.tick("b", "c")
        assert not sites.engine.state.closed and sites.elapsed() == 80.0
        while not sites.engine.state.closed:  # c stalls at step 40
            sites.tick("b")
        record = sites.record()
    finally:
        sites.loop.stop()
    # c last advanced at 60 s: the deadline moved to 90 s, the loop looked at 100 s.
    assert record["duration_s"] == 100.0 and record["deadline_extended_s"] == 30.0
    assert record["status"] == "failed"  # only a's update
    assert record["dropped_reasons"] == {
        "b": "slow: step 50/400 at the deadline",
        "c": "no progress for 40 s (last step 40/400)",
    }


def test_a_disconnected_site_is_not_waited_for(tmp_path, clock):
    sites = Sites(tmp_path, clock)
    try:
        sites.tick("b", "c")
        sites.clients["c"].leave()  # its stream ended: gone, whatever it reported
        while not sites.engine.state.closed:
            sites.tick("b")
        record = sites.record()
    finally:
        sites.loop.stop()
    assert record["duration_s"] == 60.0 and "deadline_extended_s" not in record
    assert record["dropped_reasons"] == {
        "b": "slow: step 30/400 at the deadline", "c": "disconnected"
    }  # fmt: skip


def test_a_site_that_never_reports_gets_no_extension(tmp_path, clock):
    sites = Sites(tmp_path, clock)  # c is an older agent: no progress reports
    try:
        while not sites.engine.state.closed:
            sites.tick("b")
        record = sites.record()
    finally:
        sites.loop.stop()
    assert record["duration_s"] == 60.0 and "deadline_extended_s" not in record
    assert record["dropped_reasons"] == {
        "b": "slow: step 30/400 at the deadline", "c": "no update before the round closed"
    }  # fmt: skip


def test_a_hard_timeout_of_zero_never_extends(tmp_path, clock):
    sites = Sites(tmp_path, clock, round_hard_timeout_s=0.0)
    try:
        while not sites.engine.state.closed:
            sites.tick("b", "c")
        record = sites.record()
    finally:
        sites.loop.stop()
    assert record["duration_s"] == 60.0 and "deadline_extended_s" not in record
    assert set(record["dropped_reasons"].values()) == {"slow: step 30/400 at the deadline"}


def test_progress_reports_are_checked_and_shown_in_status(tmp_path, clock):
    engine, _clients, loop = start_engine(tmp_path, clock, "abcd", **{**POLICY, "fraction": 0.75})
    try:
        loop.settle(clock)  # round 1 is open
        site, outsider = (
            engine.state.selected[0],
            next(c for c in "abcd" if c not in engine.state.selected),
        )
        with pytest.raises(PermissionDenied, match="not selected"):
            engine.training_progress(outsider, TrainingProgress(1, 1, 1, TOTAL))
        with pytest.raises(StaleUpdate, match="round 2 attempt 1"):
            engine.training_progress(site, TrainingProgress(2, 1, 1, TOTAL))
        with pytest.raises(InvalidRequest, match="above total"):
            engine.training_progress(site, TrainingProgress(1, 1, TOTAL + 1, TOTAL))
        receipt = engine.training_progress(site, TrainingProgress(1, 1, 7, TOTAL))
        assert (receipt.round, receipt.updates_received) == (1, 0)
        clock.advance(5.0)
        engine.training_progress(site, TrainingProgress(1, 1, 7, TOTAL))  # no step: heard
        assert engine.status()["progress"] == {
            site: {"step": 7, "total": TOTAL, "since_step_s": 5.0}
        }  # fmt: skip
    finally:
        loop.stop()


def test_a_secure_round_extends_its_training_phase(tmp_path, clock):
    check = Pki(tmp_path / "pki").check()
    policy = {**POLICY, "min_participants": 3, "min_updates": 3}
    engine = make_engine(tmp_path / "state", clock, server={"secure": SecureAggregation()},
                         keys_check=check, **policy)  # fmt: skip
    clients = {c: Client(engine, c) for c in "abc"}
    loop = EngineThread(engine)
    try:
        for client in clients.values():
            assert client.next_event("task", round=1).phase.name == "ADVERTISE_KEYS"
        start, step = engine.state.started, 0
        while clock.monotonic() - start < 100:  # all three train past the 60 s deadline
            step += 10
            for c in "abc":
                engine.training_progress(c, TrainingProgress(1, 1, step, TOTAL))
            clock.advance(20.0)
            loop.settle(clock)
            assert not engine.state.closed and engine.phase == "training"
        while not engine.state.closed:  # they stall: no keys advertised, the round fails
            clock.advance(20.0)
            loop.settle(clock)
        loop.join()
    finally:
        loop.stop()
    record = engine.round_log.read()[-1]
    # Last step at 80 s: the deadline moved to 110 s; at 120 s they had stalled 40 s.
    assert record["status"] == "failed" and record["deadline_extended_s"] == 50.0
    assert record["dropped_reasons"] == dict.fromkeys(
        "abc", "no progress for 40 s (last step 50/400)"
    )


def test_only_training_phases_are_extended():
    assert [p.trains for p in ROUND_PHASES] == [True]
    assert [p.trains for p in SECURE_PHASES] == [True, False, False, False]  # ADVERTISE_KEYS
