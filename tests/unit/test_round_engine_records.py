"""The round record: its JSON keys as docs/round-log.md lists them, and the record of a
round a crash kept out of the log (fake clock, no sockets)."""

from __future__ import annotations

import json

import pytest
from round_engine_harness import Client, EngineThread, FakeClock, delta, make_engine, tiny_layout

from aggregator_service.checkpoint_store import CheckpointStore
from aggregator_service.records import RoundRecord

# The round log's keys in order (docs/round-log.md); "reason" only when set.
LOGGED_KEYS = [
    "round", "attempt", "status", "version", "base_version", "selected", "participants",
    "dropped", "dropped_reasons", "rejected", "num_samples", "train_loss", "val_loss",
    "eval_loss", "update_norm", "norm_bound", "weight_cap", "duration_s", "phases",
    "bytes_in", "bytes_out", "encoding", "strategy", "clients", "time",
]  # fmt: skip
CLIENT_KEYS = [
    "id", "samples", "samples_claimed", "capped", "train_loss", "val_loss", "update_norm",
    "clipped", "bytes", "upload_s",
]  # fmt: skip


def test_a_published_round_is_logged_with_the_documented_keys(tmp_path):
    clock = FakeClock()
    engine = make_engine(tmp_path, clock, min_clients=2, rounds=1, min_participants=2,
                         server={"max_client_samples": 50})  # fmt: skip
    # a diverged model: logged as null
    engine.strategy.evaluator = lambda layout, flat: float("nan")
    a, b = Client(engine, "a"), Client(engine, "b")
    loop = EngineThread(engine)
    try:
        a.next_event("task", round=1)
        clock.advance(2.0)
        a.submit(delta(engine.layout, 1), 1, samples=80, metrics={"train_loss": 0.5})
        b.submit(delta(engine.layout, 2), 1, samples=20, metrics={"train_loss": 1.0})
        loop.join()
    finally:
        loop.stop()
    line = (tmp_path / "rounds.jsonl").read_text().splitlines()[0]
    record = json.loads(line)
    assert list(record) == LOGGED_KEYS
    assert [list(c) for c in record["clients"]] == [CLIENT_KEYS, CLIENT_KEYS]
    assert record["num_samples"] == 70 and record["weight_cap"] == 50  # a's 80 capped
    assert record["clients"][0]["capped"] and not record["clients"][1]["capped"]
    assert record["train_loss"] == pytest.approx((50 * 0.5 + 20 * 1.0) / 70)
    assert record["eval_loss"] is None and record["encoding"] == "fp32"
    assert record["duration_s"] == 2.0 and record["phases"]["training_s"] == 2.0
    assert record["time"] == "2023-11-14T22:30:02Z"  # the fake clock's wall time
    assert engine.status()["last_record"] == record
    assert RoundRecord.from_json(record).to_json() == record


def test_a_published_version_missing_from_the_log_is_recovered_once(tmp_path):
    clock = FakeClock()
    layout, flat = tiny_layout()
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(0, 0, "tiny", layout, flat)
    store.save(1, 1, "tiny", layout, flat + 0.5)  # published, then kill -9 before logging
    (tmp_path / "rounds.jsonl").write_text('{"round": 1, "status": "aborted", "ver')  # torn
    engine = make_engine(tmp_path, clock, min_clients=1, rounds=2, min_participants=1)
    assert (engine.version, engine.next_round) == (1, 2)
    record = engine.recover_log()
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the torn line is gone, the recovered record is logged
    logged = json.loads(lines[0])
    assert list(logged) == [*LOGGED_KEYS, "recovered", "reason"]
    assert logged["recovered"] is True and logged["version"] == 1 and logged["round"] == 1
    assert logged["base_version"] == 0 and logged["status"] == "published"
    assert record.to_json() == logged
    again = make_engine(tmp_path, clock, min_clients=1, rounds=2, min_participants=1).recover_log()
    assert again.to_json() == logged  # found in the log: not logged twice
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 1


def test_a_fresh_state_has_nothing_to_recover(tmp_path):
    engine = make_engine(tmp_path, FakeClock(), min_clients=1, min_participants=1)
    assert engine.recover_log() is None
    assert not (tmp_path / "rounds.jsonl").exists()
