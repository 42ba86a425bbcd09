"""`make compose-test`: the docker compose cluster on a real Docker engine, offline.

1. install Debian's docker.io and debootstrap (apt), start dockerd with its data in a
   temporary folder (no iptables rules, no ip_forward change);
2. build a local base image without any registry: debootstrap a Debian bookworm
   minbase with python3, python3-venv and dataset-fashion-mnist, then `docker import`;
3. build the project image offline from wheels prepared on the host (`make wheels`);
4. `docker compose up` the cluster (certs, aggregator, 3 clients) and wait for 3
   published rounds;
5. enroll one more client from the host through the published port, run it, and wait
   for a round that includes it; print the round log;
6. tear everything down whatever happens: containers, networks, volumes, the daemon,
   its bridges and any firewall rules it added.

Traffic goes only to 127.0.0.1 and to the containers this run creates (plus the Debian
package mirror this machine's apt already uses, for debootstrap).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedmae.demo import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / "docker" / "wheels"
BASE_IMAGE = "fedmae-base:bookworm"
IMAGE = "fedmae:local"
PROJECT = "fedmae-ci"
VENV_BIN = Path(sys.executable).parent
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[compose-test {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def run(
    cmd: list[str], check: bool = True, capture: bool = False, **kw
) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, text=True, capture_output=capture, **kw)
    if check and res.returncode != 0:
        detail = (res.stderr or res.stdout or "").strip()[-3000:] if capture else ""
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{detail}")
    return res


# ------------------------------------------------------------------ host preparation


def apt_install(packages: list[str]) -> None:
    missing = [p for p in packages if run(["dpkg", "-s", p], check=False, capture=True).returncode]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"need root to install {missing} (apt-get)")
    say(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if run(["apt-get", "install", "-y", "-q", *missing], check=False, env=env).returncode:
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", *missing], env=env)


def prepare_wheels() -> None:
    """Every wheel the image needs, from the host's pip (torch from its local wheel)."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    say(f"downloading wheels into {WHEELS.relative_to(REPO)}")
    run([str(VENV_BIN / "pip"), "download", "--quiet", "--dest", str(WHEELS),
         "--only-binary=:all:", "torch==2.13.0", *deps, *build])  # fmt: skip


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (never hard-coded here)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        m = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.M)
        if m:
            return m.group(1)
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        m = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", listing.read_text(), re.M)
        if m:
            return m.group(1)
    raise RuntimeError("cannot find a Debian mirror in /etc/apt/sources.list(.d)")


# ------------------------------------------------------------------ the engine


class DockerEngine:
    """dockerd with its state under a temporary folder; removed again on exit."""

    def __init__(self, root: Path):
        self.root = root
        self.sock = root / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "0"}
        self.proc: subprocess.Popen | None = None
        self.links_before: set[str] = set()
        self.iptables_before: dict[str, str] = {}

    def __enter__(self) -> DockerEngine:
        self.links_before = _links()
        for tool in ("iptables-save", "ip6tables-save"):
            if shutil.which(tool):
                res = run([tool], check=False, capture=True)
                if res.returncode == 0:
                    self.iptables_before[tool] = res.stdout
        say("starting dockerd")
        log = open(self.root / "dockerd.log", "w")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root / "data"), "--exec-root",
             str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "-H", f"unix://{self.sock}", "--iptables=false", "--ip6tables=false",
             "--ip-forward=false", "--ip-masq=false", "--userland-proxy=true"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited: {_tail(self.root / 'dockerd.log')}")
            if self.docker(["info"], check=False, capture=True).returncode == 0:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not start: {_tail(self.root / 'dockerd.log')}")

    def docker(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return run(["docker", *args], env=self.env, **kw)

    def __exit__(self, *exc) -> None:
        say("stopping dockerd and removing what it made")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for link in sorted(_links() - self.links_before):
            if link == "docker0" or link.startswith(("br-", "veth")):
                run(["ip", "link", "delete", link], check=False, capture=True)
        for tool, saved in self.iptables_before.items():
            restore = tool.replace("-save", "-restore")
            now = run([tool], check=False, capture=True).stdout
            if _rules(now) != _rules(saved):
                run([restore], input=saved, check=False, capture=True)
                say(f"restored the firewall rules ({restore})")


def _links() -> set[str]:
    out = run(["ip", "-o", "link", "show"], check=False, capture=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _rules(dump: str) -> list[str]:
    return [x for x in dump.splitlines() if x and not x.startswith("#")]


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-n:])
    except OSError:
        return ""


def build_base(engine: DockerEngine, work: Path) -> None:
    """A Debian bookworm minbase with python3 and Fashion-MNIST, imported without a registry."""
    if engine.docker(["image", "inspect", BASE_IMAGE], check=False, capture=True).returncode == 0:
        return
    rootfs = work / "rootfs"
    say("debootstrap bookworm minbase (python3, python3-venv, dataset-fashion-mnist)")
    run(["debootstrap", "--variant=minbase",
         "--include=python3,python3-venv,passwd,dataset-fashion-mnist",
         "bookworm", str(rootfs), debian_mirror()], capture=True)  # fmt: skip
    run(["rm", "-rf", str(rootfs / "var/cache/apt/archives"), str(rootfs / "var/lib/apt/lists")])
    say(f"docker import {BASE_IMAGE}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    engine.docker(["import", "-", BASE_IMAGE], stdin=tar.stdout, capture=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def build_image(engine: DockerEngine) -> None:
    say(f"docker build {IMAGE} (offline: --no-index, from docker/wheels)")
    engine.docker(["build", "--quiet", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                   "--build-arg", "PIP_OFFLINE=--no-index", "-t", IMAGE, str(REPO)],
                  capture=True)  # fmt: skip


# ------------------------------------------------------------------ the cluster


class Cluster:
    def __init__(self, engine: DockerEngine, work: Path):
        self.engine = engine
        self.work = work
        self.port, self.enroll_port = free_port(), free_port()
        self.env = {
            **engine.env,
            "FEDMAE_IMAGE": IMAGE,
            "FEDMAE_CLIENTS": "3",
            "FEDMAE_MIN_CLIENTS": "3",
            "FEDMAE_ROUNDS": "0",  # until stopped: the host client joins a later round
            "FEDMAE_IMAGES": "1500",
            "FEDMAE_ROUND_TIMEOUT": "120",
            "FEDMAE_PORT": str(self.port),
            "FEDMAE_ENROLL_PORT": str(self.enroll_port),
        }
        self.seen = 0
        self.compose = [str(VENV_BIN / "docker-compose"), "-p", PROJECT, "-f",
                        str(REPO / "docker-compose.yml")]  # fmt: skip

    def dc(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return run([*self.compose, *args], env=self.env, **kw)

    def rounds(self) -> list[dict]:
        res = self.dc(["exec", "-T", "aggregator", "cat", "/state/rounds.jsonl"], check=False,
                      capture=True)  # fmt: skip
        return [json.loads(x) for x in res.stdout.splitlines() if '"participants"' in x]

    def wait_rounds(self, predicate, timeout: float, what: str) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.rounds()
            for r in records[self.seen :]:
                say(f"round {r['round']} {r['status']}: version {r['version']}, "
                    f"participants {r['participants']}, val_loss {r['val_loss']}")  # fmt: skip
            self.seen = len(records)
            if predicate(records):
                return records
            time.sleep(2)
        self.dc(["ps"], check=False)
        self.dc(["logs", "--tail", "30"], check=False)
        raise RuntimeError(f"timed out waiting for {what}")


def published(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "published"]


def run_cluster(engine: DockerEngine, work: Path) -> None:
    cluster = Cluster(engine, work)
    host_client: subprocess.Popen | None = None
    try:
        say("docker-compose config -q")
        cluster.dc(["config", "-q"])
        say(f"docker compose up: certs, aggregator (127.0.0.1:{cluster.port}/"
            f"{cluster.enroll_port}), 3 clients")  # fmt: skip
        cluster.dc(["up", "-d", "--no-build"], capture=True)
        cluster.dc(["ps"])
        records = cluster.wait_rounds(
            lambda rs: len(published(rs)) >= 3, 600, "3 published rounds from the compose clients"
        )
        compose_ids = sorted({c for r in published(records) for c in r["participants"]})
        assert len(compose_ids) == 3, compose_ids
        say(f"3 rounds closed with the compose clients {compose_ids}")
        client_logs = cluster.dc(["logs", "--no-log-prefix", "client"], capture=True).stdout
        shards = sorted(set(re.findall(r"\(partition (\d+/\d+)", client_logs)))
        assert shards == ["0/3", "1/3", "2/3"], f"replicas did not get distinct shards: {shards}"
        say(f"each replica trains on its own partition: {shards}")

        say("enrolling an edge client from the host through the published enrollment port")
        token = cluster.dc(["exec", "-T", "aggregator", "fedmae", "token", "create", "--name",
                            "edge-host", "--ttl", "10m"], capture=True).stdout.strip()  # fmt: skip
        ca = work / "ca.pem"
        ca.write_text(cluster.dc(["exec", "-T", "aggregator", "cat", "/certs/ca.pem"],
                                 capture=True).stdout)  # fmt: skip
        fedmae = str(VENV_BIN / "fedmae")
        run([fedmae, "enroll", "--server", f"127.0.0.1:{cluster.enroll_port}", "--ca", str(ca),
             "--token", token, "--name", "edge-host", "--out", str(work / "edge")])  # fmt: skip
        log = open(work / "edge-client.log", "w")
        host_client = subprocess.Popen(
            [fedmae, "client", "--server", f"127.0.0.1:{cluster.port}", "--identity",
             str(work / "edge"), "--limit", "600", "--threads", "1"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        before = len(published(records))
        records = cluster.wait_rounds(
            lambda rs: any("edge-host" in r["participants"] for r in published(rs)[before:]),
            300,
            "a round that includes the host-enrolled client",
        )
        joined = next(r for r in published(records)[before:] if "edge-host" in r["participants"])
        say(f"round {joined['round']} included the host-enrolled client: {joined['participants']}")
        clients = cluster.dc(["exec", "-T", "aggregator", "fedmae", "clients", "list"],
                             capture=True).stdout  # fmt: skip
        print(clients, flush=True)
        say("round log (docker compose logs aggregator, JSON lines):")
        logs = cluster.dc(["logs", "--no-log-prefix", "aggregator"], capture=True).stdout
        for line in logs.splitlines():
            if line.startswith("{") and '"participants"' in line:  # not the JSON log lines
                r = json.loads(line)
                print(f"  round {r['round']:>3} {r['status']:<9} v{r['version']:<3} "
                      f"{len(r['participants'])} clients {r['num_samples']:>5} samples "
                      f"val_loss {r['val_loss']}", flush=True)  # fmt: skip
        say("a second run of the one-shot certs service reuses the CA and the token")
        peek = ["run", "--rm", "--no-deps", "--entrypoint", "cat", "certs"]
        before = cluster.dc([*peek, "/bootstrap/ca.pem", "/bootstrap/client.token"],
                            capture=True).stdout  # fmt: skip
        cluster.dc(["run", "--rm", "--no-deps", "certs"], capture=True)
        after = cluster.dc([*peek, "/bootstrap/ca.pem", "/bootstrap/client.token"],
                           capture=True).stdout  # fmt: skip
        assert before == after and "BEGIN CERTIFICATE" in before, "certs rotated the CA or token"
        print(
            f"compose-test PASSED: 3 rounds closed with the 3 compose clients, then round "
            f"{joined['round']} included the host-enrolled client edge-host",
            flush=True,
        )
    finally:
        if host_client is not None and host_client.poll() is None:
            host_client.terminate()
            host_client.wait(timeout=30)
        say("docker compose down -v")
        cluster.dc(["down", "-v", "--remove-orphans", "--timeout", "10"], check=False,
                   capture=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", default="all", choices=["all", "wheels"])
    args = parser.parse_args()
    if args.step == "wheels":
        prepare_wheels()
        return 0
    apt_install(["docker.io", "debootstrap", "iproute2"])
    prepare_wheels()
    work = Path(tempfile.mkdtemp(prefix="fedmae-compose-"))
    try:
        with DockerEngine(work) as engine:
            build_base(engine, work)
            build_image(engine)
            run_cluster(engine, work)
        say("done")
        return 0
    except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as err:
        print(f"compose-test FAILED: {err}", flush=True)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
