"""The round engine without sockets: revocation before, during and after the fold, the
fold's own lock, reconnects, and the end of a run (fake clock)."""

from __future__ import annotations

import threading

import pytest
import torch
from round_engine_harness import (
    WAIT_S,
    Client,
    EngineThread,
    FakeClock,
    delta,
    make_engine,
    start_engine,
    start_round_c_owes,
)

from aggregator_service.strategies import FedAvg
from fedmae.errors import ConnectionReplaced, PermissionDenied


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class GatedFedAvg(FedAvg):
    """FedAvg whose fold waits for the test: a full-model add_ that takes a while."""

    def __init__(self) -> None:
        super().__init__()
        self.folding = threading.Event()
        self.proceed = threading.Event()

    def accumulate(self, delta: torch.Tensor, weight: int, scale: float = 1.0) -> None:
        self.folding.set()
        assert self.proceed.wait(WAIT_S), "the test never let the fold finish"
        super().accumulate(delta, weight, scale)


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as err:  # handed to the test
            out.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_revoking_a_client_after_its_update_was_folded_fails_and_retries_the_round(tmp_path, clock):
    engine, clients, loop = start_engine(
        tmp_path, clock, "abc", min_clients=2, min_updates=2, rounds=1, retry_delay_s=1.0,
        min_participants=2,
    )  # fmt: skip
    try:
        for c in "abc":
            clients[c].next_event("task", round=1, attempt=1)
        clients["a"].submit(delta(engine.layout, seed=1), 1)
        engine.revoke("a", reason="key leaked")
        closed = clients["b"].next_event("round_closed", round=1, attempt=1)
        assert clients["a"].sub.closed and isinstance(clients["a"].sub.error, PermissionDenied)
        clock.advance(1.0)
        task = clients["b"].next_event("task", round=1, attempt=2)
        assert engine.state.selected == ["b", "c"]  # a is gone: not selected again
        for c in "bc":
            clients[c].submit(delta(engine.layout, seed=ord(c)), 1)
        clients["b"].next_event("round_closed", round=1, attempt=2)
    finally:
        loop.stop()
    assert not closed.success and "revoked after its update was aggregated" in closed.reason
    assert closed.reason.startswith("a selected client was")  # not named to the others
    assert task.model_version == 0
    records = engine.round_log.read()
    assert [(r["attempt"], r["status"], r["version"]) for r in records] == [
        (1, "failed", 0), (2, "published", 1)
    ]  # fmt: skip
    assert records[1]["participants"] == ["b", "c"]


def test_revoking_a_client_that_owes_an_update_drops_it_and_the_round_goes_on(tmp_path, clock):
    engine, clients, loop = start_round_c_owes(tmp_path, clock)
    try:
        engine.revoke("c", reason="decommissioned")
        closed = clients["a"].next_event("round_closed", round=1)  # no deadline waited for
    finally:
        loop.stop()
    assert closed.success
    record = engine.round_log.read()[0]
    assert record["rejected"] == [{"client": "c", "reason": "revoked (decommissioned)"}]
    assert record["dropped"] == [] and record["duration_s"] == 0.0


def test_the_fold_holds_no_lock_that_status_subscribe_or_revoke_need(tmp_path, clock):
    strategy = GatedFedAvg()
    engine, clients, loop = start_engine(
        tmp_path, clock, "ab", strategy, min_clients=2, rounds=1, min_participants=2
    )
    try:
        clients["a"].next_event("task", round=1)
        folding, receipt = in_thread(lambda: clients["a"].submit(delta(engine.layout, 1), 1))
        assert strategy.folding.wait(WAIT_S)
        # While a's update is being added in: the engine answers at once.
        answered, status = in_thread(engine.status)
        answered.join(WAIT_S)
        assert status and status[0]["uploading"] == ["a"]
        answered, _ = in_thread(lambda: Client(engine, "watcher"))
        answered.join(WAIT_S)
        assert not answered.is_alive()
        engine.revoke("a")  # during its fold: the sum will hold it, so the round fails
        strategy.proceed.set()
        folding.join(WAIT_S)
        assert receipt[0].updates_received == 1  # the fold that had begun completed
        closed = clients["b"].next_event("round_closed", round=1)
    finally:
        strategy.proceed.set()
        loop.stop()
    assert not closed.success and "revoked after its update was aggregated" in closed.reason
    assert engine.version == 0


def test_a_round_waits_for_a_fold_admitted_before_its_deadline(tmp_path, clock):
    strategy = GatedFedAvg()
    engine, clients, loop = start_engine(
        tmp_path, clock, "ab", strategy, min_clients=2, min_updates=1, rounds=1, min_participants=1
    )
    try:
        clients["a"].next_event("task", round=1)
        folding, _ = in_thread(lambda: clients["a"].submit(delta(engine.layout, 1), 1))
        assert strategy.folding.wait(WAIT_S)
        clock.advance(60.0)  # the deadline passes mid-fold
        strategy.proceed.set()
        closed = clients["b"].next_event("round_closed", round=1)
        folding.join(WAIT_S)
    finally:
        strategy.proceed.set()
        loop.stop()
    assert closed.success and engine.version == 1
    assert engine.round_log.read()[0]["participants"] == ["a"]


def test_a_client_that_reconnects_mid_round_gets_its_task_again(tmp_path, clock):
    engine = make_engine(tmp_path, clock, min_clients=2, rounds=1, min_participants=2)
    a, b = Client(engine, "a"), Client(engine, "b")
    loop = EngineThread(engine)
    try:
        first = a.next_event("task", round=1)
        b.next_event("task", round=1)
        session, payload = b.open(delta(engine.layout, 2), 1)
        clock.advance(10.0)
        again = Client(engine, "a")  # a new stream of the same identity
        assert isinstance(a.sub.error, ConnectionReplaced)
        task = again.next_event("task", round=1)
        assert task.deadline == first.deadline  # the same round, the same deadline
        assert Client(engine, "b").pending() == []  # b is uploading: nothing to resend
        b.finish(session, payload)
        assert Client(engine, "b").pending() == []  # b reported: nothing to resend
    finally:
        loop.stop()


def test_after_a_completed_run_a_new_stream_hears_that_it_finished(tmp_path, clock):
    engine = make_engine(tmp_path, clock, min_clients=1, rounds=1, min_participants=1)
    a = Client(engine, "a")
    loop = EngineThread(engine)
    try:
        a.next_event("task", round=1)
        a.submit(delta(engine.layout, 1), 1)
        loop.join()
    finally:
        loop.stop()
    assert engine.wait_final_fetches(0) == ["a"]  # a has not fetched version 1 yet
    late = Client(engine, "late")
    assert [e.kind for e in late.pending()] == ["run_finished"]
    engine.download_finished("a", 1)
    engine.download_finished("late", 1)
    assert engine.wait_final_fetches(0) == []
    assert engine.status()["state"] == "finished"
