"""Monitoring: WatchRounds, Status, Prometheus /metrics, the report, JSON logs."""

from __future__ import annotations

import argparse
import json
import queue
import threading
import urllib.request
from dataclasses import replace

import grpc
import numpy as np
import pytest
from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    drive_rounds,
    make_identities,
    make_server,
    open_admin,
    wait_until,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fedmae.cli.watch import follow_rounds
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc


def _watcher(port: int, certs):
    args = argparse.Namespace(server=f"127.0.0.1:{port}", identity=str(certs / "admin"))
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=follow_rounds, args=(args, out, stop), daemon=True).start()
    return out, stop


def _drain(q: queue.Queue) -> list:
    """Everything a watcher got until the stream ended with the run."""
    items = []
    while (item := q.get(timeout=TIMEOUT)) is not None:
        items.append(item)
    return items


def test_watchers_get_every_round_once_in_order_across_a_restart(tmp_path):
    certs, ids = make_identities(tmp_path, ["a", "b"])
    server = make_server(tmp_path / "state", certs, min_clients=2, rounds=5, min_participants=1)
    port = server.start()
    watchers = [_watcher(port, certs), _watcher(port, certs)]
    clients = {n: ScriptedClient(port, ids[n]) for n in ids}
    try:
        drive_rounds(clients, server.layout, [1, 2, 3])
        for c in clients.values():
            c.close()
        server.stop(grace=0)  # a crash after round 3: the watchers lose the aggregator ...
        server = make_server(
            tmp_path / "state", certs, min_clients=2, rounds=5, port=port, min_participants=1
        )
        server.start()  # ... and find it again, resuming after the last record they saw
        clients = {n: ScriptedClient(port, ids[n]) for n in ids}
        drive_rounds(clients, server.layout, [4, 5])
        assert server.wait(TIMEOUT)
        log_file = tmp_path / "state" / "rounds.jsonl"
        logged = [json.loads(x) for x in log_file.read_text().splitlines()]
        assert [r["round"] for r in logged if r["status"] == "published"] == [1, 2, 3, 4, 5]
        for out, _ in watchers:
            got = _drain(out)  # ends when the run finished
            assert [seq for seq, _ in got] == sorted({seq for seq, _ in got})  # ordered, unique
            # Every record of the log exactly once, in order: the 5 published rounds and,
            # when the crash hit round 4 after it started, that round's "aborted" record.
            assert [r for _, r in got] == logged
    finally:
        for _, stop in watchers:
            stop.set()
        for c in clients.values():
            c.close()
        server.stop(grace=0)


def test_status_metrics_and_who_may_watch(tmp_path):
    certs, ids = make_identities(tmp_path, ["a", "b"])
    server = make_server(tmp_path / "state", certs, min_clients=2, rounds=3, min_participants=1)
    server.config = replace(server.config, metrics_listen="127.0.0.1:0")
    port = server.start()
    clients = {n: ScriptedClient(port, ids[n]) for n in ids}
    admin_ch, admin = open_admin(port, certs)
    try:

        def training():  # round 1 is open (the tasks stay queued for drive_rounds)
            status = admin.Status(apb.StatusRequest(), timeout=TIMEOUT)
            return status if status.state == "training" else None

        status = wait_until(training, "round 1 to open")
        assert status.state == "training" and status.round == 1 and status.version == 0
        assert list(status.connected) == ["a", "b"] and list(status.selected) == ["a", "b"]
        assert status.rounds_target == 3 and status.finish_reason == ""  # still running
        # A client certificate may not watch or ask for status.
        for call in (
            lambda s: list(s.WatchRounds(apb.WatchRoundsRequest(), timeout=TIMEOUT)),
            lambda s: s.Status(apb.StatusRequest(), timeout=TIMEOUT),
        ):
            with pytest.raises(grpc.RpcError) as denied:
                call(apb_grpc.AdminStub(clients["a"].channel))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        url = f"http://127.0.0.1:{server.metrics_port}/metrics"

        def scrape():
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples
            }
            return lambda name, **labels: samples[(name, tuple(sorted(labels.items())))]

        value = scrape()
        assert value("fedmae_clients_connected") == 2
        with pytest.raises(KeyError):  # --dp off: no ε, not even 0
            value("fedmae_dp_epsilon")
        assert value("fedmae_round") == 1 and value("fedmae_model_version") == 0

        drive_rounds(clients, server.layout, [1, 2, 3])
        assert server.wait(TIMEOUT)
        done = admin.Status(apb.StatusRequest(), timeout=TIMEOUT)
        assert (done.state, done.finish_reason) == ("finished", "completed")
        records = server.rounds.round_log.read()
        value = scrape()

        assert value("fedmae_rounds_closed_total", status="published") == 3
        assert value("fedmae_round_duration_seconds_count") == 3
        assert value("fedmae_round_duration_seconds_sum") == pytest.approx(
            sum(r["duration_s"] for r in records)
        )
        assert value("fedmae_updates_total", outcome="accepted", reason="") == 6
        assert value("fedmae_update_bytes_received_total") == sum(r["bytes_in"] for r in records)
        assert value("fedmae_model_bytes_sent_total") == sum(r["bytes_out"] for r in records)
        assert value("fedmae_samples_aggregated_total") == sum(r["num_samples"] for r in records)
        assert value("fedmae_model_version") == 3
        assert value("fedmae_last_loss", kind="val") == pytest.approx(records[-1]["val_loss"])
        assert value("fedmae_last_loss", kind="train") == pytest.approx(records[-1]["train_loss"])
        checkpoint_s = records[-1]["phases"]["checkpoint_s"]
        assert value("fedmae_last_round_phase_seconds", phase="checkpoint") == checkpoint_s
        last = json.loads(admin.Status(apb.StatusRequest(), timeout=TIMEOUT).last_record_json)
        assert last == records[-1]
    finally:
        admin_ch.close()
        for c in clients.values():
            c.close()
        server.stop(grace=0)


def test_report_plots_a_real_run(tmp_path):
    # Imported here: the report loads matplotlib (1 s), which no other test here needs,
    # and every pytest-xdist worker imports every test module.
    from fedmae.cli.report import write_report

    certs, ids = make_identities(tmp_path, ["a", "b"])
    server = make_server(tmp_path / "state", certs, min_clients=2, rounds=2, min_participants=1)
    port = server.start()
    clients = {n: ScriptedClient(port, ids[n]) for n in ids}
    try:
        drive_rounds(clients, server.layout, [1, 2])
        assert server.wait(TIMEOUT)
    finally:
        for c in clients.values():
            c.close()
        server.stop(grace=0)
    report = write_report(tmp_path / "state", tmp_path / "report")
    names = sorted(p.name for p in report.images)
    assert names == ["bytes.png", "clients.png", "loss.png", "phases.png", "reconstructions.png"]
    for path in report.images:
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.width >= 400 and img.height >= 250
            assert len(np.unique(np.asarray(img.convert("L")))) > 20  # a plot, not blank
    records = [
        json.loads(x) for x in (tmp_path / "state" / "rounds.jsonl").read_text().splitlines()
    ]
    summary = report.summary.read_text()
    assert f"rounds published: {len(records)}" in summary
    assert (f"round 1 {records[0]['val_loss']:.4f} → round 2 {records[1]['val_loss']:.4f}"
            in summary)  # fmt: skip
    total_in = sum(r["bytes_in"] for r in records) / 1e6
    assert f"{total_in:.1f} MB of updates in" in summary
    for r in records:
        assert f"| {r['round']} | published | {r['version']} | 2 | {r['num_samples']} |" in summary
    for name in names:
        assert f"]({name})" in summary
    assert "linear probe" not in summary  # only when asked: it takes a minute by default
    assert "ε" not in summary and "differential privacy" not in summary  # --dp off
    from fedmae.ml.probe import ProbeConfig

    probed = write_report(tmp_path / "state", tmp_path / "report", probe=ProbeConfig(
        train_images=300, test_images=200, epochs=5))  # fmt: skip
    assert probed.probe is not None and 0.0 <= probed.probe.test_accuracy <= 1.0
    assert (f"linear probe of version {records[-1]['version']}'s frozen encoder (cls features, "
            f"300 train / 200 test images): test accuracy {probed.probe.test_accuracy:.4f}"
            in probed.summary.read_text())  # fmt: skip
