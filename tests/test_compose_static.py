"""Static checks of the deployment files: docker-compose config, project rules, hadolint.

No Docker daemon needed; `make compose-test` runs the cluster on a real engine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE = REPO / "docker-compose.yml"


def _tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: it comes with pip install -e '.[dev]'"
    return found


def _config(
    path: Path, *args: str, env_file: Path | None = None, profile: str | None = None
) -> subprocess.CompletedProcess:
    cmd = [_tool("docker-compose"), "-f", str(path)]
    if profile:
        cmd += ["--profile", profile]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    return subprocess.run([*cmd, "config", *args], capture_output=True, text=True, timeout=60,
                          cwd=path.parent)  # fmt: skip


def _normalized(
    path: Path = COMPOSE, env_file: Path | None = None, profile: str | None = None
) -> dict:
    res = _config(path, "--format", "json", env_file=env_file, profile=profile)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_compose_file_is_valid():
    res = _config(COMPOSE, "-q")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "old,new,why",
    [
        ("      interval: 5s\n", "      intervall: 5s\n", "unknown key"),
        ("      retries: 24\n", "      retries: twenty\n", "bad healthcheck value"),
        ("        condition: service_healthy\n", "        condition: service_happy\n", "bad enum"),
        ("  aggregator-state:\n", "", "undefined volume"),
    ],
)
def test_broken_compose_files_are_caught(tmp_path, old, new, why):
    text = COMPOSE.read_text()
    assert old in text, f"the fixture no longer matches the compose file ({why})"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    res = _config(broken, "-q")
    assert res.returncode != 0, f"{why} was not caught"


def test_project_rules():
    cfg = _normalized(profile="monitoring")
    services = cfg["services"]
    assert set(services) == {"certs", "aggregator", "client", "prometheus", "grafana"}
    assert set(_normalized()["services"]) == {"certs", "aggregator", "client"}  # default
    one_shot = {
        name
        for s in services.values()
        for name, dep in s.get("depends_on", {}).items()
        if dep["condition"] == "service_completed_successfully"
    }
    assert one_shot == {"certs"}
    for name, svc in services.items():
        command = " ".join(svc.get("command") or [])
        entry = " ".join(svc.get("entrypoint") or [])
        assert "--insecure" not in command + entry, f"{name} uses a plaintext flag"
        assert "healthcheck" in svc or name in one_shot, f"{name} has no healthcheck"
        if name in one_shot:
            assert svc.get("restart", "no") == "no"
        if name in ("certs", "aggregator", "client"):
            assert svc["environment"]["FEDMAE_LOG_FORMAT"] == "json", f"{name} logs for people"
    agg = services["aggregator"]
    assert any(v["target"] == "/state" and v["type"] == "volume" for v in agg["volumes"])
    assert services["client"]["depends_on"]["aggregator"]["condition"] == "service_healthy"
    # Published ports default to loopback: an edge client on the host may enroll,
    # the outside world may not, unless FEDMAE_BIND says so.
    for svc in services.values():
        assert {p["host_ip"] for p in svc.get("ports", [])} <= {"127.0.0.1"}
    assert {int(p["target"]) for p in agg["ports"]} == {50051, 50052}
    # Each client replica keeps its identity in a volume of its own.
    client = services["client"]
    assert any(v["target"] == "/identity" and v["type"] == "volume" and not v.get("source")
               for v in client["volumes"])  # fmt: skip
    assert "--identity=/identity" in client["command"]
    assert client["deploy"]["replicas"] == 3
    # The CA key stays with the certs service and the aggregator, never with clients.
    assert not any(v.get("source") == "certs" for v in client["volumes"])


def test_env_example_documents_and_drives_the_settings(tmp_path):
    cfg = _normalized(env_file=REPO / ".env.example")
    assert cfg["services"]["client"]["deploy"]["replicas"] == 3
    custom = tmp_path / ".env"
    custom.write_text("FEDMAE_CLIENTS=5\nFEDMAE_ROUNDS=7\nFEDMAE_DIRICHLET=0.5\n")
    cfg = _normalized(env_file=custom)
    client = cfg["services"]["client"]
    assert client["deploy"]["replicas"] == 5
    assert "--partition=auto/5" in client["command"] and "--dirichlet=0.5" in client["command"]
    assert "--rounds=7" in cfg["services"]["aggregator"]["command"]
    documented = {line.split("=")[0] for line in (REPO / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#")}  # fmt: skip
    used = set(
        __import__("re").findall(r"\$\{(FEDMAE_\w+|BASE_IMAGE|PIP_\w+)", COMPOSE.read_text())
    )
    assert used <= documented, f"undocumented settings: {used - documented}"


def test_dockerfile_passes_hadolint():
    res = subprocess.run([_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True,
                         text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\n")
    res = subprocess.run([_tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3003" in res.stdout


def test_monitoring_profile_scrapes_the_aggregator():
    cfg = _normalized(profile="monitoring")
    assert "--metrics-listen=0.0.0.0:9100" in cfg["services"]["aggregator"]["command"]
    prom = (REPO / "monitoring" / "prometheus.yml").read_text()
    assert '"aggregator:9100"' in prom
    dash = json.loads((REPO / "monitoring" / "grafana" / "dashboards" / "fedmae.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for series in ("fedmae_last_loss", "fedmae_round_duration_seconds_bucket",
                   "fedmae_last_round_phase_seconds", "fedmae_updates_total"):  # fmt: skip
        assert series in exprs
