"""The fedmae command as a user runs it: certificates, errors, refused flags, watch and
JSON logs, and the demo cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from cryptography import x509
from cryptography.x509.oid import NameOID
from federation_harness import ScriptedClient, drive_rounds, make_identities, make_server

from fedmae.cli.main import main


def _fedmae(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedmae", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_certs_init_is_idempotent_and_issue_client_sets_cn(tmp_path, caplog):
    certs = tmp_path / "certs"
    assert main(["certs", "init", "--out", str(certs), "--host", "fl.example.org"]) == 0
    ca_before = (certs / "ca.pem").read_bytes()
    assert oct((certs / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert main(["certs", "init", "--out", str(certs)]) == 0
    assert (certs / "ca.pem").read_bytes() == ca_before  # no CA rotation
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "aggregator", "fl.example.org"} <= set(
        san.get_values_for_type(x509.DNSName)
    )
    assert main(["certs", "issue-client", "--certs", str(certs), "--name", "site-7"]) == 0
    cert = x509.load_pem_x509_certificate(
        (certs / "clients" / "site-7" / "client.pem").read_bytes()
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-7"
    assert main(["certs", "issue-client", "--certs", str(certs), "--name", "bad name!"]) == 2
    assert "invalid client id" in caplog.text


def test_client_reports_missing_identity_without_traceback(tmp_path):
    result = _fedmae(
        "client", "--server", "127.0.0.1:1", "--identity", str(tmp_path / "nope"),
        "--limit", "100", timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "missing file" in result.stderr and "Traceback" not in result.stderr


def _assert_demo_learned(stdout: str, records: list[dict]) -> None:
    """The demo's verdict: its 2 rounds' global model against the model it started from,
    on the server's held-out check (one round against the next may go up by noise)."""
    found = re.search(
        r"start (\d+\.\d+) -> round 1 (\d+\.\d+) -> round 2 (\d+\.\d+) \(lower\)", stdout
    )
    assert found, stdout
    start, first, last = map(float, found.groups())
    assert (first, last) == tuple(round(r["eval_loss"], 4) for r in records)
    assert last < 0.8 * start  # it learned, by a margin noise does not reach


def test_demo_runs_a_real_federation(tmp_path):
    state = tmp_path / "demo"
    result = _fedmae(
        "demo", "--clients", "2", "--rounds", "2", "--images-per-client", "400",
        "--state-dir", str(state),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["published", "published"]
    assert all(r["participants"] == ["site-1", "site-2"] for r in records)
    # The verdict: the global model against the model it started from, on the server's
    # held-out check (one round against the next may go up by noise with 400 images).
    _assert_demo_learned(result.stdout, records)
    assert sorted(p.name for p in (state / "checkpoints").iterdir()) == [
        "v000000.safetensors",
        "v000001.safetensors",
        "v000002.safetensors",
    ]
    assert "over mTLS" in result.stdout
    # Two sites: the demo lowers --min-participants to 2 itself, and says what that costs.
    assert "fewer than 3 participants" in result.stdout
    report = state / "report"
    assert {p.name for p in report.glob("*.png")} == {
        "loss.png",
        "phases.png",
        "bytes.png",
        "clients.png",
        "reconstructions.png",
    }
    assert "rounds published: 2" in (report / "summary.md").read_text()
    assert all(r["eval_loss"] is not None for r in records)  # the demo evaluates globally
    # Every process the demo started has ended.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(state) not in ps


def test_demo_with_secure_aggregation_trains_real_agents_on_masked_rounds(tmp_path):
    state = tmp_path / "demo"
    result = _fedmae(
        "demo", "--clients", "3", "--rounds", "2", "--images-per-client", "300",
        "--secure-aggregation", "--state-dir", str(state),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with secure aggregation" in result.stdout
    records = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["published", "published"]
    assert all(r["secure_aggregation"] and r["clients"] == [] for r in records)
    assert all(r["train_loss"] is None and r["val_loss"] is None for r in records)
    _assert_demo_learned(result.stdout, records)
    # Each real agent trained, advertised keys, shared them, masked its delta, unmasked.
    for k in (1, 2, 3):
        log = (state / "logs" / f"site-{k}.log").read_text()
        for what in ("ADVERTISE_KEYS sent", "SHARE_KEYS sent", "masked input sent",
                     "UNMASK sent"):  # fmt: skip
            assert log.count(what) == 2, (k, what)
    # The aggregator logged each round's sum of samples, never a site's count or norm.
    server_log = (state / "logs" / "aggregator.log").read_text()
    assert "accepted update from" not in server_log and "L2 norm" not in server_log
    assert server_log.count("(secure aggregation), 810 samples in all") == 2


def test_health_command_over_mtls(tmp_path, capsys):
    from federation_harness import make_identities, make_server

    certs, _ = make_identities(tmp_path, [])
    server = make_server(tmp_path / "state", certs, min_clients=1, rounds=1, min_participants=1)
    port = server.start()
    try:
        assert (
            main(["health", "--server", f"127.0.0.1:{port}", "--identity", str(certs / "admin")])
            == 0
        )
        assert "SERVING" in capsys.readouterr().out
    finally:
        server.stop(grace=0)
    assert main(["health", "--server", f"127.0.0.1:{port}", "--identity", str(certs / "admin"),
                 "--timeout", "1"]) == 1  # fmt: skip
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_demo_stops_every_process_on_ctrl_c(tmp_path):
    import signal

    from federation_harness import wait_until

    state = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmae", "demo", "--clients", "2", "--rounds", "50",
         "--images-per-client", "300", "--state-dir", str(state)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # Ctrl-C as in a terminal: a run started in the background by a non-interactive
        # shell (nohup ... &) ignores SIGINT, and children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip().startswith("1 "):  # the first round closed: everything is running
            break
    children = subprocess.run(
        ["pgrep", "-f", str(state)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) >= 3, lines  # aggregator + 2 clients
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out

    def left() -> str:
        return subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout

    # The demo has waited for its children; pgrep may still see them while they are reaped.
    try:
        wait_until(lambda: not left().split(), "the demo's processes to be gone", timeout=10)
    except AssertionError:
        raise AssertionError(f"processes left behind: {left()}") from None


def test_f13_serve_insecure_on_a_public_address_is_refused(tmp_path):
    # A process of its own: were the flag accepted, it would serve (until the timeout).
    result = subprocess.run(
        [sys.executable, "-m", "fedmae", "serve", "--state-dir", str(tmp_path / "state"),
         "--insecure", "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--insecure" in result.stderr and "loopback" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


def test_watch_json_cli_prints_each_round_of_a_run(tmp_path):
    certs, ids = make_identities(tmp_path, ["a"])
    server = make_server(tmp_path / "state", certs, min_clients=1, rounds=3, min_participants=1)
    port = server.start()
    watch = subprocess.Popen(
        [sys.executable, "-m", "fedmae", "watch", "--json", "--server", f"127.0.0.1:{port}",
         "--identity", str(certs / "admin")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    client = ScriptedClient(port, ids["a"])
    try:
        drive_rounds({"a": client}, server.layout, [1, 2, 3])
        out, err = watch.communicate(timeout=60)
    finally:
        client.close()
        server.stop(grace=0)
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["status"] == "published" and r["participants"] == ["a"] for r in records)


def test_json_logs_are_one_object_per_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "fedmae", "--log-format", "json", "certs", "init", "--out",
         str(tmp_path / "c")], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0
    lines = [json.loads(x) for x in res.stderr.splitlines()]
    assert lines and all({"time", "level", "msg", "logger"} <= set(x) for x in lines)
