"""A server optimizer's state survives kill -9: FedAdam run for 2 rounds, the aggregator
process killed and restarted on its state directory, then round 3, publishes the same
model, bit for bit, as an uninterrupted 3-round run fed the same updates."""

from __future__ import annotations

from pathlib import Path

from aggregator_process import LAYOUT, Aggregator
from federation_harness import ScriptedClient, drive_rounds, make_identities, wait_until

from aggregator_service.checkpoint_store import CheckpointStore

ARGS = ("--strategy", "fedadam", "--server-lr", "0.01", "--min-clients", "2",
        "--min-participants", "1", "--rounds", "3", "--round-timeout", "120",
        "--max-update-norm", "off", "--final-grace", "0")  # fmt: skip


def _federation(tmp: Path) -> tuple[Aggregator, dict[str, Path]]:
    certs, ids = make_identities(tmp, ["a", "b"])
    return Aggregator(tmp, certs, *ARGS), ids


def _run(agg: Aggregator, ids: dict[str, Path], rounds: list[int]) -> None:
    """Two scripted clients answer ``rounds`` with seeded deltas (the same in any run)."""
    clients = {name: ScriptedClient(agg.port, ident) for name, ident in ids.items()}
    try:
        drive_rounds(clients, LAYOUT, rounds)
        wait_until(lambda: agg.published()[-1:] == rounds[-1:], "the rounds logged", 30)
    finally:
        for client in clients.values():
            client.close()


def test_fedadam_resumes_its_trajectory_after_kill9(tmp_path):
    once, once_ids = _federation(tmp_path / "once")
    twice, twice_ids = _federation(tmp_path / "twice")
    try:
        once.start()
        _run(once, once_ids, [1, 2, 3])
        once.stop()

        twice.start()
        _run(twice, twice_ids, [1, 2])
        twice.kill9()
        twice.start()
        _run(twice, twice_ids, [3])
        twice.stop()
    finally:
        once.stop()
        twice.stop()

    assert twice.published() == [1, 2, 3]
    assert (
        "resuming fedadam state of version 2 (step 2)"
        in (tmp_path / "twice" / "serve-2.log").read_text()
    )
    a = CheckpointStore(once.state / "checkpoints")
    b = CheckpointStore(twice.state / "checkpoints")
    for version in (1, 2, 3):
        assert b.state_path(version).exists()  # m and v beside each version
    _, expected = a.load(3, LAYOUT)
    _, resumed = b.load(3, LAYOUT)
    assert resumed.equal(expected)  # bit for bit
    state = b.load_state(3)
    assert state is not None and state.strategy == "fedadam" and state.step == 3
