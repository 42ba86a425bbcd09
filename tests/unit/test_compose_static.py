"""Static checks of the deployment files: docker-compose config, project rules, hadolint.

No Docker daemon needed; `make compose-test` runs the cluster on a real engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = REPO / "docker-compose.yml"


def _tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: it comes with pip install -e '.[dev]'"
    return found


def _config(
    path: Path,
    *args: str,
    env_file: Path | None = None,
    profile: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    cmd = [_tool("docker-compose"), "-f", str(path)]
    for name in (profile or "").split(","):
        cmd += ["--profile", name] if name else []
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMAE_", "GRAFANA_"))}
    return subprocess.run([*cmd, "config", *args], capture_output=True, text=True, timeout=60,
                          cwd=path.parent, env={**clean, **(env or {})})  # fmt: skip


def _normalized(
    path: Path = COMPOSE,
    env_file: Path | None = None,
    profile: str | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    res = _config(path, "--format", "json", env_file=env_file, profile=profile, env=env)
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
    assert set(services) == {"certs", "tokens", "aggregator", "client", "prometheus", "grafana"}
    assert set(_normalized()["services"]) == {"certs", "tokens", "aggregator", "client"}  # default
    one_shot = {
        name
        for s in services.values()
        for name, dep in s.get("depends_on", {}).items()
        if dep["condition"] == "service_completed_successfully"
    }
    assert one_shot == {"certs", "tokens"}
    for name, svc in services.items():
        command = " ".join(svc.get("command") or [])
        entry = " ".join(svc.get("entrypoint") or [])
        assert "--insecure" not in command + entry, f"{name} uses a plaintext flag"
        assert "healthcheck" in svc or name in one_shot, f"{name} has no healthcheck"
        if name in one_shot:
            assert svc.get("restart", "no") == "no"
        if name in ("certs", "tokens", "aggregator", "client"):
            assert svc["environment"]["FEDMAE_LOG_FORMAT"] == "json", f"{name} logs for people"
    agg = services["aggregator"]
    assert any(v["target"] == "/state" and v["type"] == "volume" for v in agg["volumes"])
    assert services["client"]["depends_on"]["aggregator"]["condition"] == "service_healthy"
    # Published ports default to loopback: an edge client on the host may enroll,
    # the outside world may not, unless FEDMAE_BIND says so.
    for svc in services.values():
        assert {p["host_ip"] for p in svc.get("ports", [])} <= {"127.0.0.1"}
    assert {int(p["target"]) for p in agg["ports"]} == {50051, 50052}
    # Client replicas keep their identities (one directory per name) in a volume only
    # they mount, and take their name and data partition from fedmae-replica.
    client = services["client"]
    assert any(v["target"] == "/identities" and v["type"] == "volume"
               and v["source"] == "client-identities" for v in client["volumes"])  # fmt: skip
    assert client["entrypoint"] == ["fedmae-replica", "start"]
    assert "--slots=/identities" in client["command"]
    assert client["deploy"]["replicas"] == 3
    mounting = {s: {v.get("source") for v in svc.get("volumes", [])} for s, svc in services.items()}
    assert [s for s, vols in mounting.items() if "client-identities" in vols] == ["client"]
    # No client sees the server's or the enrollment CA's keys.
    assert "certs" not in mounting["client"]


def test_env_example_documents_and_drives_the_settings(tmp_path):
    cfg = _normalized(env_file=REPO / ".env.example")
    assert cfg["services"]["client"]["deploy"]["replicas"] == 3
    custom = tmp_path / ".env"
    custom.write_text("FEDMAE_CLIENTS=5\nFEDMAE_ROUNDS=7\nFEDMAE_DIRICHLET=0.5\n")
    cfg = _normalized(env_file=custom)
    client = cfg["services"]["client"]
    assert client["deploy"]["replicas"] == 5
    assert "--clients=5" in client["command"] and "--dirichlet=0.5" in client["command"]
    assert "--clients=5" in cfg["services"]["tokens"]["command"]  # one token per replica
    assert "--rounds=7" in cfg["services"]["aggregator"]["command"]
    # DP and the robust rules are settings too; unset numbers reach serve as empty values,
    # which its parser reads as "not given" (the flags' own defaults).
    custom.write_text("FEDMAE_DP=distributed\nFEDMAE_DP_SITES=3\nFEDMAE_DP_TARGET_EPSILON=8\n"
                      "FEDMAE_SECURE_AGGREGATION=1\nFEDMAE_STRATEGY=fedavg\n")  # fmt: skip
    command = _normalized(env_file=custom)["services"]["aggregator"]["command"]
    assert {"--dp=distributed", "--dp-sites=3", "--dp-target-epsilon=8"} <= set(command)
    assert "--dp-noise-multiplier=" in command and "--dp-delta=" in command
    from fedmae.cli.main import build_parser

    args = build_parser().parse_args(command)
    assert (args.dp, args.dp_sites, args.dp_target_epsilon) == ("distributed", 3, 8.0)
    assert args.dp_noise_multiplier is None and args.dp_delta is None
    documented = {line.split("=")[0] for line in (REPO / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#")}  # fmt: skip
    used = set(
        __import__("re").findall(
            r"\$\{(FEDMAE_\w+|BASE_IMAGE|PIP_\w+|GRAFANA_\w+|PROMETHEUS_\w+)", COMPOSE.read_text()
        )
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


# ---------------------------------------------------------------- finding 5: compose hardening


def _all_services() -> dict:
    return _normalized(profile="monitoring,tools")["services"]


def _sources(svc: dict) -> set[str]:
    return {v.get("source", "") for v in svc.get("volumes", []) if v["type"] == "volume"}


def test_f5_every_service_drops_all_capabilities():
    for name, svc in _all_services().items():
        assert svc.get("cap_drop") == ["ALL"], f"{name} keeps Linux capabilities"
        assert not svc.get("cap_add"), f"{name} adds capabilities back"
        assert not svc.get("privileged"), name


def test_f5_every_service_has_no_new_privileges():
    for name, svc in _all_services().items():
        assert "no-new-privileges:true" in svc.get("security_opt", []), name


def test_f5_root_filesystems_are_read_only_with_a_small_tmp():
    for name, svc in _all_services().items():
        assert svc.get("read_only") is True, f"{name} has a writable root filesystem"
        tmp = [t for t in svc.get("tmpfs", []) if t.split(":")[0] == "/tmp"]
        assert tmp and "size=" in tmp[0], f"{name}: /tmp must be a size-capped tmpfs"


def test_f5_every_service_has_memory_and_pids_limits():
    services = _all_services()
    for name, svc in services.items():
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert int(limits.get("memory", 0)) > 0, f"{name} has no memory limit"
        assert int(limits.get("pids", 0)) > 0, f"{name} has no pids limit"
    # Measured under the compose test (tiny MAE): the aggregator peaks near 0.5 GiB and
    # 32 threads, a client near 0.55 GiB and 15: 1 GiB each leaves headroom, not more.
    for name in ("aggregator", "client"):
        limits = services[name]["deploy"]["resources"]["limits"]
        assert 512 << 20 < int(limits["memory"]) <= 2 << 30, name
    bigger = _normalized(env={"FEDMAE_AGGREGATOR_MEMORY": "6g", "FEDMAE_CLIENT_PIDS": "300"})
    assert int(bigger["services"]["aggregator"]["deploy"]["resources"]["limits"]["memory"]) == (
        6 << 30
    )
    assert bigger["services"]["client"]["deploy"]["resources"]["limits"]["pids"] == 300


def test_f5_only_the_certs_service_mounts_the_root_ca_key():
    services = _all_services()
    assert [n for n, s in services.items() if "signer" in _sources(s)] == ["certs"]
    agg = services["aggregator"]
    assert "signer" not in _sources(agg) and "admin" not in _sources(agg)
    certs_mount = next(v for v in agg["volumes"] if v.get("source") == "certs")
    assert certs_mount.get("read_only") is True, "the aggregator must not rewrite its certs"
    # The certs service writes the root key to the signer volume, never to certs.
    command = " ".join(services["certs"]["command"])
    assert "--signer /signer" in command and "--admin-out /admin" in command


def test_f5_the_admin_identity_lives_only_in_the_admin_tool():
    services = _all_services()
    assert sorted(n for n, s in services.items() if "admin" in _sources(s)) == ["admin", "certs"]
    admin = services["admin"]
    assert admin["profiles"] == ["tools"], "`docker compose up` must not start the admin tool"
    assert admin["environment"]["FEDMAE_ADMIN_IDENTITY"] == "/admin"
    assert all(v.get("read_only") for v in admin["volumes"])
    assert "FEDMAE_ADMIN_IDENTITY" not in services["aggregator"].get("environment", {})
    assert "admin" not in _normalized()["services"]  # not part of a plain `up`


def test_f5_aggregator_healthcheck_uses_the_health_identity():
    test = _all_services()["aggregator"]["healthcheck"]["test"]
    assert "--identity=/certs/health" in test
    assert not any("admin" in part for part in test)


def test_f5_no_shared_multi_use_token():
    services = _all_services()
    text = COMPOSE.read_text()
    assert "--uses" not in text and "TOKEN_USES" not in text, "a token with several uses"
    assert "client.token" not in text, "one token file shared by every replica"
    tokens = services["tokens"]
    assert tokens["entrypoint"] == ["fedmae-replica"] and tokens["command"][0] == "issue"
    assert "--clients=3" in tokens["command"]  # one per replica
    ttl = next(c for c in tokens["command"] if c.startswith("--ttl="))
    assert ttl in ("--ttl=1h", "--ttl=30m"), f"enrollment tokens live too long: {ttl}"
    assert "--clients=3" in services["client"]["command"]
    mounting = [n for n, s in services.items() if "bootstrap" in _sources(s)]
    for name in mounting:
        if name not in ("certs", "tokens"):
            vol = next(v for v in services[name]["volumes"] if v.get("source") == "bootstrap")
            assert vol.get("read_only") is True, f"{name} can rewrite the tokens"


def test_f5_monitoring_ports_have_their_own_bind_address():
    def hosts(cfg: dict, name: str) -> set[str]:
        return {p["host_ip"] for p in cfg["services"][name].get("ports", [])}

    open_federation = _normalized(profile="monitoring", env={"FEDMAE_BIND": "0.0.0.0"})
    assert hosts(open_federation, "aggregator") == {"0.0.0.0"}
    assert (
        hosts(open_federation, "prometheus") == hosts(open_federation, "grafana") == {"127.0.0.1"}
    )
    open_monitoring = _normalized(profile="monitoring", env={"FEDMAE_MONITORING_BIND": "0.0.0.0"})
    assert hosts(open_monitoring, "aggregator") == {"127.0.0.1"}
    assert hosts(open_monitoring, "grafana") == {"0.0.0.0"}


def test_f5_grafana_has_no_anonymous_admin_and_reads_its_password_from_a_secret():
    cfg = _normalized(profile="monitoring")
    grafana = cfg["services"]["grafana"]
    env = grafana["environment"]
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED", "false") == "false"
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer"  # at most, if enabled
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env, "a password in the environment"
    secret = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert [s["target"] for s in grafana["secrets"]] == [secret]
    assert cfg["secrets"]["grafana_admin_password"]["file"].endswith(
        "secrets/grafana_admin_password"
    )
    anonymous = _normalized(profile="monitoring", env={"GRAFANA_ANONYMOUS": "true"})
    assert anonymous["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    ignore = (REPO / ".gitignore").read_text().split()
    assert "secrets/" in ignore, "the password file must not be committed"


def test_f5_base_image_can_be_pinned_by_digest(tmp_path):
    digest = "python:3.11-slim@sha256:" + "ab" * 32
    env_file = tmp_path / ".env"
    env_file.write_text(f"BASE_IMAGE={digest}\n")
    cfg = _normalized(env_file=env_file)
    assert cfg["services"]["aggregator"]["build"]["args"]["BASE_IMAGE"] == digest
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM ${BASE_IMAGE}" in dockerfile and "@sha256:" in dockerfile
    documented = (REPO / ".env.example").read_text()
    assert "@sha256:" in documented, ".env.example must show the pinned form"


def _heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; which of torch and the aggregator's server
    module it loaded."""
    heavy = ("torch", "aggregator_service.rpc.server")
    probe = f"; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", "import sys; " + code + probe],
                         capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().replace("'", '"'))


def test_f5_health_checks_do_not_import_torch():
    """`fedmae health` and `client-health` run every few seconds under load: the CLI's
    parser must not import torch (3-5 s idle, over the 10 s check timeout on a busy host)."""
    loaded = _heavy_modules_after("from fedmae.cli import main; main.build_parser()")
    assert loaded == [], f"the fedmae parser imports {loaded}"


def test_admin_commands_do_not_import_torch(tmp_path):
    """`fedmae status`, `watch`, `clients …` (and compose's admin tool) open their channel
    without torch: a status answer is worth nothing if the command needs 5-25 s to start."""
    loaded = _heavy_modules_after(
        "import argparse, pathlib; from fedmae.cli import admin as admin_cli, watch; "
        "from fedmae.pki.issue import init_certs; "
        f"certs = init_certs(pathlib.Path({str(tmp_path)!r})); "
        "admin_cli.admin_client(argparse.Namespace("
        "identity=str(certs.dir / 'admin'), server='127.0.0.1:1'))"
    )
    assert loaded == [], f"admin commands import {loaded}"
