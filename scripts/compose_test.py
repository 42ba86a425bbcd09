"""`make compose-test`: the docker compose cluster on a real Docker engine, offline.

1. install Debian's docker.io and debootstrap (apt), start dockerd with its data in a
   temporary folder (no iptables rules, no ip_forward change);
2. build a local base image without any registry: debootstrap a Debian bookworm
   minbase with python3, python3-venv and dataset-fashion-mnist, then `docker import`;
3. build the project image offline from wheels prepared on the host (`make wheels`),
   with the base pinned by its content digest (BASE_IMAGE=sha256:<id>), and check the
   tag form builds the same image (steps 1-3: scripts/compose_image.py);
4. `docker compose up` the cluster (certs, tokens, aggregator, 3 clients) and wait for 3
   published rounds, all with secure aggregation (FEDMAE_SECURE_AGGREGATION=1); check
   each replica enrolled as client-K with its own single-use token and trains on
   partition K-1, the aggregator holds neither the root CA key nor
   the admin key, its healthcheck uses the health identity (which is refused Admin),
   and every container runs hardened (read-only root, no capabilities, limits); print
   the memory and threads each container uses;
5. enroll one more client from the host through the published port with a token from
   the admin tool (`docker compose run --rm admin token create`), run it, and wait for
   a round that includes it;
6. scale out with FEDMAE_CLIENTS=4 and `up -d`: the three replicas keep their names,
   client-4 enrolls with a new token and joins a round; a second plain `up -d` changes
   nothing (same CA, no token, no container recreated); print the round log;
7. tear everything down whatever happens: containers, networks, volumes, the daemon,
   its bridges and any firewall rules it added.

FEDMAE_COMPOSE_BASE_TAR=PATH keeps the debootstrapped base as a tarball between runs
(made if missing, imported if present): saves about 90 s on a developer's machine.

Traffic goes only to 127.0.0.1 and to the containers this run creates (plus the Debian
package mirror this machine's apt already uses, for debootstrap).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedmae.cli.demo import free_port  # noqa: E402
from scripts.compose_image import (  # noqa: E402
    IMAGE,
    REPO,
    VENV_BIN,
    DockerEngine,
    apt_install,
    build_base,
    build_image,
    prepare_wheels,
    run,
    say,
)

PROJECT = "fedmae-ci"


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
            "FEDMAE_SECURE_AGGREGATION": "1",  # every round masked (docs/privacy.md)
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


def containers(cluster: Cluster) -> dict[str, str]:
    """Running container name -> id, for this project."""
    out = cluster.dc(["ps", "--format", "{{.Name}} {{.ID}}"], capture=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def inspect(cluster: Cluster, container: str) -> dict:
    res = cluster.engine.docker(["inspect", container], capture=True)
    return json.loads(res.stdout)[0]


def peak_memory(container_id: str) -> int | None:
    """The cgroup's peak memory (v1: max_usage_in_bytes, v2: memory.peak), if visible."""
    for path in (
        f"/sys/fs/cgroup/memory/docker/{container_id}/memory.max_usage_in_bytes",
        f"/sys/fs/cgroup/docker/{container_id}/memory.peak",
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.peak",
    ):
        try:
            return int(Path(path).read_text())
        except (OSError, ValueError):
            continue
    return None


def show_usage(cluster: Cluster, when: str) -> None:
    """What each container uses against its limit (docker stats) and its peak memory."""
    say(f"resource use {when} (docker stats --no-stream; cgroup peak incl. page cache)")
    stats = cluster.engine.docker(
        ["stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}\t{{.PIDs}}"], capture=True
    ).stdout
    ids = {name: cid for name, cid in containers(cluster).items()}
    for line in sorted(stats.splitlines()):
        name, mem, pids = line.split("\t")
        full = inspect(cluster, ids[name])["Id"] if name in ids else ""
        peak = peak_memory(full) if full else None
        peak_text = f"{peak / 2**20:.0f} MiB" if peak else "n/a"
        print(f"  {name:<28} memory {mem:<22} peak {peak_text:<9} pids {pids}", flush=True)


def check_hardening(cluster: Cluster) -> None:
    """Every running container: read-only root, no capabilities, no-new-privileges,
    memory and pids limits, an unprivileged user."""
    for name, cid in containers(cluster).items():
        info = inspect(cluster, cid)
        host = info["HostConfig"]
        assert host["ReadonlyRootfs"], f"{name}: writable root filesystem"
        assert host["CapDrop"] == ["ALL"], f"{name}: capabilities {host['CapDrop']}"
        assert "no-new-privileges:true" in (host["SecurityOpt"] or []), name
        assert host["Memory"] > 0 and (host["PidsLimit"] or 0) > 0, f"{name}: no limits"
        assert info["Config"]["User"] not in ("", "0", "root"), f"{name} runs as root"
    say("every container: read-only root, cap_drop ALL, no-new-privileges, memory and pids "
        "limits, user 10001")  # fmt: skip


def check_secrets_placement(cluster: Cluster) -> None:
    """The root CA key only in the signer volume, the admin key only in the admin one."""
    agg = inspect(cluster, containers(cluster)[f"{PROJECT}-aggregator-1"])
    volumes = {m.get("Name", "").removeprefix(f"{PROJECT}_") for m in agg["Mounts"]}
    assert volumes == {"certs", "aggregator-state"}, f"the aggregator mounts {volumes}"
    find = "find / -path /proc -prune -o -path /sys -prune -o -name '*.key' -print 2>/dev/null"
    keys = cluster.dc(["exec", "-T", "aggregator", "sh", "-c", f"{find}; true"],
                      capture=True).stdout.split()  # fmt: skip
    expected = ["/certs/enrollment-ca.key", "/certs/health/client.key", "/certs/server.key"]
    assert sorted(keys) == expected, f"keys in the aggregator container: {keys}"
    signer = cluster.dc(["run", "--rm", "--no-deps", "--entrypoint", "ls", "certs", "/signer",
                         "/admin"], capture=True).stdout.split()  # fmt: skip
    assert "ca.key" in signer and "client.key" in signer, signer
    say(f"the aggregator holds only {', '.join(keys)}; the root CA key is in the signer "
        "volume and the admin key in the admin volume, which it does not mount")  # fmt: skip


def check_health_identity(cluster: Cluster) -> None:
    agg = inspect(cluster, containers(cluster)[f"{PROJECT}-aggregator-1"])
    assert "--identity=/certs/health" in agg["Config"]["Healthcheck"]["Test"]
    health = agg["State"]["Health"]
    assert health["Status"] == "healthy", health
    assert any("SERVING" in entry["Output"] for entry in health["Log"]), health["Log"]
    refused = cluster.dc(["exec", "-T", "aggregator", "fedmae", "clients", "list", "--identity",
                          "/certs/health", "--server", "localhost:50051"], check=False,
                         capture=True)  # fmt: skip
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr, refused.stderr
    say("healthcheck: the health identity gets SERVING; Admin refuses it (PERMISSION_DENIED)")


def admin(cluster: Cluster, *args: str) -> str:
    """An operator command through the admin tool (profile tools)."""
    return cluster.dc(["run", "--rm", "-T", "admin", *args], capture=True).stdout


def check_replica_enrollments(cluster: Cluster, names: list[str]) -> None:
    """Each name enrolled exactly once, each with its own token bound to it, used once."""
    audit = [json.loads(x) for x in admin(cluster, "audit", "--json", "--limit", "500").splitlines()
             if x.startswith("{")]  # fmt: skip
    enrolled = {e["target"]: e["actor"] for e in audit if e["action"] == "client.enroll"}
    created = {e["target"]: e["details"] for e in audit if e["action"] == "token.create"
               and e["actor"] == "compose:tokens"}  # fmt: skip
    for name in names:
        token_id = enrolled.get(name, "").removeprefix("token:")
        assert token_id in created, f"{name} did not enroll with a compose token: {enrolled}"
        assert created[token_id]["name"] == name and created[token_id]["uses"] == 1
        assert created[token_id]["ttl_s"] <= 3600, created[token_id]
    used = [enrolled[n] for n in names]
    assert len(set(used)) == len(names), f"replicas shared a token: {used}"
    say(f"{', '.join(names)}: each enrolled once with its own single-use token "
        f"({', '.join(used)})")  # fmt: skip


def check_partitions(cluster: Cluster, clients: int) -> None:
    logs = cluster.dc(["logs", "--no-log-prefix", "client"], capture=True).stdout
    seen = dict(re.findall(r"client (client-\d+): .*?\(partition (\d+/\d+)", logs))
    want = {f"client-{k}": f"{k - 1}/{clients}" for k in range(1, clients + 1)}
    assert {n: seen.get(n) for n in want} == want, f"partitions by name: {seen}"
    say(f"each replica trains on the partition its name gives: {want}")


def run_cluster(engine: DockerEngine, work: Path) -> None:
    cluster = Cluster(engine, work)
    host_client: subprocess.Popen | None = None
    try:
        say("docker-compose config -q")
        cluster.dc(["config", "-q"])
        say(f"docker compose up: certs, tokens, aggregator (127.0.0.1:{cluster.port}/"
            f"{cluster.enroll_port}), 3 clients")  # fmt: skip
        cluster.dc(["up", "-d", "--no-build"], capture=True)
        cluster.dc(["ps"])
        records = cluster.wait_rounds(
            lambda rs: len(published(rs)) >= 3, 600, "3 published rounds from the compose clients"
        )
        compose_ids = sorted({c for r in published(records) for c in r["participants"]})
        assert compose_ids == ["client-1", "client-2", "client-3"], compose_ids
        secure = [r for r in published(records) if r.get("secure_aggregation") is True]
        assert len(secure) == len(published(records)), "a round ran without secure aggregation"
        assert all(not r["clients"] for r in secure), "a secure round logged per-site details"
        say(f"3 rounds closed with the compose clients {compose_ids}, all with secure "
            f"aggregation (ring {secure[0]['secagg']['ring_bits']} bits)")  # fmt: skip
        check_partitions(cluster, 3)
        check_hardening(cluster)
        check_secrets_placement(cluster)
        check_health_identity(cluster)
        show_usage(cluster, "after 3 rounds")

        say("enrolling an edge client from the host through the published enrollment port")
        token = admin(cluster, "token", "create", "--name", "edge-host", "--ttl", "10m").strip()
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

        say("FEDMAE_CLIENTS=4 docker compose up -d: one more name, one more token")
        ca_before = cluster.dc(["exec", "-T", "aggregator", "cat", "/certs/ca.pem"],
                               capture=True).stdout  # fmt: skip
        cluster.env["FEDMAE_CLIENTS"] = "4"
        cluster.dc(["up", "-d", "--no-build"], capture=True)
        before = len(published(records))
        four = {"client-1", "client-2", "client-3", "client-4"}
        records = cluster.wait_rounds(
            lambda rs: any(four <= set(r["participants"]) for r in published(rs)[before:]),
            420,
            "a round with client-1 .. client-4",
        )
        scaled = next(r for r in published(records)[before:] if four <= set(r["participants"]))
        say(f"round {scaled['round']} included all four replicas: {scaled['participants']}")
        check_partitions(cluster, 4)
        check_replica_enrollments(cluster, sorted(four))
        clients = admin(cluster, "clients", "list")
        print(clients, flush=True)
        listed = {line.split()[0] for line in clients.splitlines()[1:] if line.strip()}
        assert listed == four | {"edge-host"}, f"the registry holds {listed}"

        say("a second `up -d` changes nothing: same CA, no new token, no container recreated")
        running = containers(cluster)
        cluster.dc(["up", "-d", "--no-build"], capture=True)
        assert containers(cluster) == running, "a second `up` recreated containers"
        issued = cluster.dc(["logs", "--no-log-prefix", "tokens"], capture=True).stdout
        assert "0 new token(s); 4 name(s)" in issued.splitlines()[-1], issued.splitlines()[-1:]
        ca_after = cluster.dc(["exec", "-T", "aggregator", "cat", "/certs/ca.pem"],
                              capture=True).stdout  # fmt: skip
        assert ca_before == ca_after and "BEGIN CERTIFICATE" in ca_after, "the CA was rotated"
        show_usage(cluster, "with 4 replicas and the edge client")

        say("round log (docker compose logs aggregator, JSON lines):")
        logs = cluster.dc(["logs", "--no-log-prefix", "aggregator"], capture=True).stdout
        for line in logs.splitlines():
            if line.startswith("{") and '"participants"' in line:  # not the JSON log lines
                r = json.loads(line)
                print(f"  round {r['round']:>3} {r['status']:<9} v{r['version']:<3} "
                      f"{len(r['participants'])} clients {r['num_samples']:>5} samples "
                      f"val_loss {r['val_loss']}", flush=True)  # fmt: skip
        print(
            f"compose-test PASSED: 3 rounds closed with client-1..3, round {joined['round']} "
            f"included the host-enrolled edge-host, round {scaled['round']} the scaled-out "
            "client-4",
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
            build_image(engine, build_base(engine, work))
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
