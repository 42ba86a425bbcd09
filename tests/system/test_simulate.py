"""``fedmae simulate``: many virtual sites in two worker processes against a real
aggregator, each site with its own enrolled certificate, shard and mTLS stream."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import torch
from cryptography import x509

from aggregator_service.checkpoint_store import CheckpointStore
from fedmae.ml.model_state import trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.payload.layout import ModelLayout
from fedmae.pki.peer import fingerprint

SITES, WORKERS, ROUNDS, FRACTION = 20, 2, 2, 0.5


def test_simulation_runs_real_sites_samples_by_fraction_and_averages_exactly(tmp_path):
    state, dumps = tmp_path / "sim", tmp_path / "deltas"
    dumps.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "fedmae", "simulate", "--sites", str(SITES),
         "--workers", str(WORKERS), "--rounds", str(ROUNDS), "--fraction", str(FRACTION),
         "--images-per-site", "60", "--state-dir", str(state), "--dump-deltas", str(dumps),
         # Clipping would make the average differ from the plain FedAvg recomputed here.
         "--serve-args", "--max-update-norm off"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"{ROUNDS} of {ROUNDS} rounds published" in result.stdout

    # Real per-site identities: 20 enrolled certificates, each site's own, in the registry.
    with sqlite3.connect(state / "fedmae.db") as db:
        registered = dict(db.execute("SELECT client_id, fingerprint FROM clients"))
    names = {f"site-{k + 1:02d}" for k in range(SITES)}
    assert set(registered) == names
    for name in names:
        pem = (state / "clients" / name / "client.pem").read_bytes()
        assert registered[name] == fingerprint(x509.load_pem_x509_certificate(pem))
    assert len(set(registered.values())) == SITES

    # Sampling by fraction: 10 distinct enrolled sites each round, every one of them heard.
    records = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["published"] * ROUNDS
    for rec in records:
        assert len(rec["selected"]) == round(FRACTION * SITES)
        assert sorted(rec["participants"]) == sorted(set(rec["selected"]))
        assert set(rec["participants"]) <= names
    assert records[0]["selected"] != records[1]["selected"]  # drawn afresh each round

    # FedAvg exactness: v_r = v_{r-1} + sum(n_i * delta_i) / sum(n_i), with the deltas
    # the sites computed and the weights the aggregator logged.
    layout = ModelLayout.from_state(trainable_state(build_model("tiny", seed=0)))
    store = CheckpointStore(state / "checkpoints")
    for rec in records:
        _, before = store.load(rec["base_version"], layout)
        _, after = store.load(rec["version"], layout)
        total = torch.zeros(layout.numel, dtype=torch.float64)
        weights = 0
        for client in rec["clients"]:
            dump = np.load(dumps / f"r{rec['round']}-a{rec['attempt']}-{client['id']}.npz")
            assert int(dump["num_samples"]) == client["samples"]
            total += torch.from_numpy(dump["delta"]).double() * client["samples"]
            weights += client["samples"]
        assert weights == rec["num_samples"]
        expected = before.double() + total / weights
        assert torch.allclose(after.double(), expected, atol=1e-6, rtol=0)
        assert not torch.equal(after, before)

    # Every process the simulation started has ended.
    left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout
    assert not left.split(), left

    # The state dir is any cluster's: fedmae report reads it (the 10 sites of each round).
    from fedmae.cli.report import write_report

    report = write_report(state, tmp_path / "report")
    summary = report.summary.read_text()
    assert f"rounds published: {ROUNDS}" in summary
    for rec in records:
        row = f"| {rec['round']} | published | {rec['version']} | {round(FRACTION * SITES)} |"
        assert row + f" {rec['num_samples']} |" in summary
    assert len(report.images) == 5 and all(p.stat().st_size > 10_000 for p in report.images)


def test_simulation_stops_every_process_on_sigterm(tmp_path):
    import signal

    from federation_harness import wait_until

    state = tmp_path / "sim"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmae", "simulate", "--sites", "6", "--workers", "2",
         "--rounds", "50", "--fraction", "0.5", "--images-per-site", "60",
         "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip().startswith("1 "):  # the first round closed: everything is running
            break
    children = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
    assert len(children.stdout.split()) >= 3, lines  # aggregator + 2 workers
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + out
    assert "interrupted" in out

    def left() -> str:
        return subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout

    try:
        wait_until(lambda: not left().split(), "the simulation's processes to be gone", timeout=10)
    except AssertionError:
        raise AssertionError(f"processes left behind: {left()}") from None


def test_worker_sites_share_one_uint8_dataset(tmp_path):
    """An idle virtual site holds indices into the worker's one dataset, no images."""
    from client_agent.simulation import WorkerSpec, site_images
    from fedmae.ml.loaders import load_dataset
    from fedmae.ml.partitions import client_split

    dataset = load_dataset("fashion-mnist")
    spec = WorkerSpec(server="-", sites=[(3, "x"), (7, "y")], num_sites=10, limit=600,
                      dirichlet=0.5)  # fmt: skip
    images = site_images(dataset, spec)
    for index in (3, 7):
        train, val = images[index].load()
        alone = client_split(dataset, index, 10, dirichlet_alpha=0.5, limit=600)
        # The same shard as `fedmae client --partition K/N --dirichlet 0.5` takes.
        assert torch.equal(train, alone.train.to_tensor())
        assert torch.equal(val, alone.val.to_tensor())
        assert images[index].train_count == len(alone.train)


def _simulate_moved(tmp_path, strategy: str) -> float:
    """How far a 2-round run of 5 sites, site-1 sending 100x its delta, moved the model."""
    state = tmp_path / strategy
    result = subprocess.run(
        [sys.executable, "-m", "fedmae", "simulate", "--sites", "5", "--workers", "2",
         "--rounds", "2", "--fraction", "1", "--images-per-site", "60",
         "--malicious", "1", "--attack", "scale", "--strategy", strategy,
         "--state-dir", str(state),
         # The server's own norm bound would clip the attack: each rule alone here.
         "--serve-args", "--max-update-norm off"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "1 malicious site(s) (scale x100)" in result.stdout
    records = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["published", "published"]
    assert all(len(r["participants"]) == 5 for r in records)  # the attacker took part
    layout = ModelLayout.from_state(trainable_state(build_model("tiny", seed=0)))
    store = CheckpointStore(state / "checkpoints")
    _, start = store.load(0, layout)
    _, final = store.load(records[-1]["version"], layout)
    return float((final.double() - start.double()).norm())


def test_a_scaling_attacker_moves_fedavg_far_more_than_the_median(tmp_path):
    """One of five sites sends 100x its honest delta over its own mTLS connection:
    FedAvg's mean follows it (about 20x an honest step), the median hardly notices."""
    fedavg, median = _simulate_moved(tmp_path, "fedavg"), _simulate_moved(tmp_path, "median")
    assert median > 0
    assert fedavg > 5 * median, (fedavg, median)
