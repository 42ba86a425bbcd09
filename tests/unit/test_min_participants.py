"""A round publishes only with at least ``min_participants`` (default 3) accepted updates:
with two, each participant recovers the other's update from the published model and
its own (issue 13). The engine waits for them, fails a round short of them with the
reason, and a configuration that could never reach them fails at start."""

from __future__ import annotations

import logging

import pytest
from federation_harness import make_server
from round_engine_harness import FakeClock, start_engine

from aggregator_service.config import RoundPolicy
from fedmae.cli.main import build_parser
from fedmae.errors import ConfigError

TOO_FEW = "only 2 participants: a round needs at least 3 to publish (--min-participants)"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_two_accepted_updates_fail_a_round_with_the_reason(tmp_path, clock):
    # min_updates=2 alone would publish with a and b: the default floor of 3 does not.
    engine, clients, loop = start_engine(
        tmp_path, clock, "abc", min_clients=3, min_updates=2, rounds=1, retry_delay_s=5.0
    )
    try:
        for c in "ab":
            clients[c].take_part(round_=1)
        clock.advance(60.0)  # the deadline: c never sent
        closed = clients["a"].next_event("round_closed", round=1)
    finally:
        loop.stop()
    assert not closed.success and closed.reason == TOO_FEW and engine.version == 0
    record = engine.round_log.read()[0]
    assert record["status"] == "failed" and record["reason"] == TOO_FEW
    assert record["participants"] == ["a", "b"]  # the operator still sees who


def test_the_round_waits_for_the_third_participant_then_publishes(tmp_path, clock):
    # Over-selection would close at 2 updates; the round is not done before 3.
    engine, clients, loop = start_engine(
        tmp_path, clock, "abc", min_clients=3, min_updates=2, target_updates=2, rounds=1
    )
    try:
        for c in "ab":
            clients[c].take_part(round_=1)
        loop.settle(clock)
        assert engine.status()["state"] == "training"  # not closed at the target of 2
        clients["c"].take_part(round_=1)
        closed = clients["a"].next_event("round_closed", round=1)  # no time passed
    finally:
        loop.stop()
    assert closed.success and engine.version == 1
    assert engine.round_log.read()[0]["participants"] == ["a", "b", "c"]


def test_min_participants_below_3_lets_two_publish(tmp_path, clock):
    engine, clients, loop = start_engine(
        tmp_path, clock, "ab", min_clients=2, rounds=1, min_participants=2
    )
    try:
        for c in "ab":
            clients[c].take_part(round_=1)
        closed = clients["a"].next_event("round_closed", round=1)
    finally:
        loop.stop()
    assert closed.success and engine.version == 1


def test_fewer_clients_than_participants_is_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match="could never publish") as refused:
        RoundPolicy(min_clients=2)
    assert "--min-clients 3" in str(refused.value)  # how to fix it, both ways
    assert "lower --min-participants to 2" in str(refused.value)
    with pytest.raises(ValueError, match="min_participants must be at least 1"):
        RoundPolicy(min_clients=1, min_participants=0)
    assert RoundPolicy().min_participants == 3 and RoundPolicy().min_clients == 3


def test_the_serve_command_refuses_it_before_starting(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["serve", "--state-dir", str(tmp_path), "--min-clients", "2"])
    assert args.min_participants == 3
    with pytest.raises(ConfigError, match="--min-clients 2 is below --min-participants 3"):
        args.func(args)
    assert not (tmp_path / "certs").exists()  # refused before anything was made


def test_a_floor_below_3_is_warned_about_once_at_start(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aggregator_service"):
        server = make_server(tmp_path / "state", tmp_path / "certs", 2, 1,
                             server={"insecure": True}, min_participants=2)  # fmt: skip
    try:
        warned = [r for r in caplog.records if "--min-participants 2" in r.getMessage()]
        assert len(warned) == 1
        assert "infer another's update from the published model" in warned[0].getMessage()
    finally:
        server.registry.close()
