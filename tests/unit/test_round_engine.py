"""The round engine without sockets: a round's life, stale and duplicate updates,
over-selection, dropouts and early close, the deadline, retries (fake clock)."""

from __future__ import annotations

import pytest
import torch
from round_engine_harness import Client, FakeClock, delta, start_engine, start_round_c_owes

from aggregator_service.round_state import Phase
from aggregator_service.strategies import FedAvg
from fedmae.errors import DuplicateUpdate, PermissionDenied, RoundClosedError, StaleUpdate


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_round_publishes_the_weighted_mean_and_tells_every_client(tmp_path, clock):
    engine, clients, loop = start_engine(tmp_path, clock, "abc", min_clients=3, rounds=1)
    base = engine.global_flat.clone()
    try:
        deltas = {c: delta(engine.layout, seed=i) for i, c in enumerate("abc")}
        samples = {"a": 10, "b": 20, "c": 70}
        for c, client in clients.items():
            task = client.next_event("task", round=1)
            assert (task.attempt, task.model_version, task.phase) == (1, 0, Phase.TRAIN)
            assert task.selected_clients == 3
            assert task.deadline == pytest.approx(clock.time() + 60.0)
            receipt = client.submit(deltas[c], 1, samples=samples[c], metrics={"val_loss": 1.0})
            assert receipt.round == 1 and receipt.bytes_received == engine.layout.numel * 4
        published = clients["a"].next_event("model_published")
        closed = clients["b"].next_event("round_closed")
        loop.join()  # rounds=1: the run is complete
    finally:
        loop.stop()
    expected = base + sum(samples[c] * deltas[c] for c in "abc") / 100
    assert published.version == 1 and engine.version == 1
    assert torch.allclose(engine.global_flat, expected, atol=1e-6)
    # Clients hear the version and the aggregate metrics; the operator's log says who.
    assert closed.success and closed.version == 1 and closed.val_loss == pytest.approx(1.0)
    record = engine.round_log.read()[-1]
    assert record["status"] == "published" and record["participants"] == ["a", "b", "c"]
    assert record["num_samples"] == 100
    assert record["val_loss"] == pytest.approx(1.0) and record["dropped"] == []
    assert clients["c"].next_event("run_finished").final_version == 1
    assert engine.completed


def test_stale_updates_are_refused_by_round_and_base_version(tmp_path, clock):
    engine, clients, loop = start_engine(
        tmp_path, clock, "ab", min_clients=2, rounds=1, min_participants=2
    )
    a = clients["a"]
    try:
        a.next_event("task", round=1)
        d = delta(engine.layout, seed=1)
        with pytest.raises(StaleUpdate, match="round 1 is open"):
            a.submit(d, round_=2)
        with pytest.raises(StaleUpdate, match="trains version 0"):
            a.submit(d, round_=1, base_version=3)
        assert engine.state.accepted == {} and engine.state.uploading == set()
        a.submit(d, round_=1)  # the refusals cost it nothing
        assert set(engine.state.accepted) == {"a"}
    finally:
        loop.stop()


def test_a_second_update_from_a_client_is_a_duplicate(tmp_path, clock):
    engine, clients, loop = start_engine(tmp_path, clock, "abc", min_clients=3, rounds=1)
    a, b = clients["a"], clients["b"]
    try:
        a.next_event("task", round=1)
        d = delta(engine.layout, seed=1)
        a.submit(d, 1)
        with pytest.raises(DuplicateUpdate):
            a.submit(d, 1)
        session, payload = b.open(d, 1)  # admitted, still sending
        with pytest.raises(DuplicateUpdate):
            b.open(d, 1)
        b.finish(session, payload)
        assert sorted(engine.state.accepted) == ["a", "b"]
        assert engine.state.rejected == {}  # a refused duplicate is not a refused update
    finally:
        loop.stop()


def test_over_selection_closes_once_the_target_number_arrived(tmp_path, clock):
    engine, clients, loop = start_engine(
        tmp_path, clock, "abcd", min_clients=4, min_updates=2, target_updates=2, rounds=1,
        min_participants=2,
    )  # fmt: skip
    try:
        for c in "ab":
            clients[c].take_part(round_=1)
        closed = clients["c"].next_event("round_closed", round=1)  # no time passed
        with pytest.raises(StaleUpdate):
            clients["c"].submit(delta(engine.layout, seed=3), 1)
    finally:
        loop.stop()
    record = engine.round_log.read()[0]
    assert closed.success and record["participants"] == ["a", "b"]
    assert record["duration_s"] == 0.0
    assert record["dropped_reasons"] == {
        "c": "no update before the round closed", "d": "no update before the round closed"
    }  # fmt: skip


def test_a_client_not_selected_is_refused(tmp_path, clock):
    engine, clients, loop = start_engine(
        tmp_path, clock, "abcd", min_clients=2, fraction=0.5, rounds=1, min_participants=2
    )
    selected = FedAvg().configure_round(1, 1, list("abcd"), 0.5, 2, 0)  # seeded
    try:
        task = clients[selected[0]].next_event("task", round=1)
        assert task.selected_clients == 2 and engine.state.selected == selected
        outsider = next(c for c in "abcd" if c not in selected)
        with pytest.raises(PermissionDenied, match="not selected"):
            clients[outsider].submit(delta(engine.layout, seed=1), 1)
        assert clients[outsider].pending() == []  # it was never sent a task
    finally:
        loop.stop()


def test_a_round_closes_early_when_every_owing_client_is_gone(tmp_path, clock):
    engine, clients, loop = start_round_c_owes(tmp_path, clock)
    try:
        clients["c"].next_event("task", round=1)
        clients["c"].leave()
        loop.settle(clock)
        clock.advance(4.9)  # under dropout_grace_s (5): the round waits for c to return
        loop.settle(clock)
        assert engine.status()["state"] == "training"
        clock.advance(0.2)
        closed = clients["a"].next_event("round_closed", round=1)
    finally:
        loop.stop()
    assert closed.success
    record = engine.round_log.read()[0]
    assert record["dropped_reasons"] == {"c": "disconnected"}
    assert record["duration_s"] == pytest.approx(5.1, abs=0.01)  # not the 60 s deadline


def test_the_deadline_closes_a_round_and_refuses_what_comes_later(tmp_path, clock):
    # min_updates is what closes this round short: no participant floor above it.
    engine, clients, loop = start_engine(
        tmp_path, clock, "abc", min_clients=3, min_updates=2, rounds=1, retry_delay_s=5.0,
        min_participants=1,
    )  # fmt: skip
    try:
        for c in "abc":
            clients[c].next_event("task", round=1)
        clients["a"].submit(delta(engine.layout, seed=1), 1)
        late, payload = clients["b"].open(delta(engine.layout, seed=2), 1)  # still sending
        clock.advance(59.0)
        assert engine.status()["deadline_in_s"] == pytest.approx(1.0)
        clock.advance(1.0)
        closed = clients["a"].next_event("round_closed", round=1)
        with pytest.raises(RoundClosedError):
            clients["b"].finish(late, payload)
    finally:
        loop.stop()
    assert not closed.success and engine.version == 0
    record = engine.round_log.read()[0]
    assert record["status"] == "failed" and record["reason"] == "only 1 of 2 required updates"
    assert record["duration_s"] == pytest.approx(60.0)
    assert record["participants"] == ["a"]


def test_a_failed_round_is_retried_with_the_next_attempt(tmp_path, clock):
    engine, clients, loop = start_engine(
        tmp_path, clock, "ab", min_clients=2, rounds=1, retry_delay_s=5.0, max_attempts=2,
        min_participants=2,
    )  # fmt: skip
    try:
        clients["a"].next_event("task", round=1, attempt=1)
        clock.advance(60.0)
        clients["a"].next_event("round_closed", round=1, attempt=1)
        loop.settle(clock)  # the engine idles: in the pause (or, broken, in the next round)
        assert clients["a"].pending() == []
        clock.advance(4.0)  # the pause before the retry is not over
        clock.advance(1.0)
        task = clients["a"].next_event("task", round=1)
        assert task.attempt == 2 and task.model_version == 0
        assert task.deadline == clock.time() + 60.0  # opened after the 5 s pause, not before
        clock.advance(60.0)
        clients["a"].next_event("round_closed", round=1, attempt=2)
        clock.advance(5.0)
        loop.join()  # max_attempts=2: the run stops failed
    finally:
        loop.stop()
    records = engine.round_log.read()
    assert [(r["round"], r["attempt"], r["status"]) for r in records] == [
        (1, 1, "failed"), (1, 2, "failed")
    ]  # fmt: skip
    assert not engine.completed and engine.version == 0


def test_the_first_round_waits_for_start_clients_then_samples_from_all(tmp_path, clock):
    """``--start-clients`` (a simulation's N sites): the first round does not start on
    the first ``min_clients`` to connect, so ``fraction`` samples from every site."""
    engine, clients, loop = start_engine(
        tmp_path, clock, "ab", min_clients=2, start_clients=4, fraction=0.5, rounds=1,
        min_participants=2,
    )  # fmt: skip
    try:
        loop.settle(clock)
        assert engine.status()["state"] == "waiting" and engine.state is None
        clients.update({c: Client(engine, c) for c in "cd"})
        selected = FedAvg().configure_round(1, 1, list("abcd"), 0.5, 2, 0)  # seeded
        assert selected != ["a", "b"]  # what a round started on the first two would ask
        task = clients[selected[0]].next_event("task", round=1)
        assert task.selected_clients == 2 and engine.state.selected == selected
    finally:
        loop.stop()
