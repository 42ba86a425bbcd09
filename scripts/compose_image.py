"""The offline image for `make compose-test`: host packages, the host's wheels, a Docker
engine of its own, and the image built without any registry.

- `apt_install`: Debian's docker.io and debootstrap (apt), as root;
- `prepare_wheels` (`make wheels`): every wheel the image needs, from the host's pip, into
  docker/wheels;
- `DockerEngine`: dockerd with its data in a temporary folder (no iptables rules, no
  ip_forward change), and everything it made removed on exit;
- `build_base`: a Debian bookworm minbase with python3, python3-venv and
  dataset-fashion-mnist, debootstrapped and `docker import`ed (FEDMAE_COMPOSE_BASE_TAR=PATH
  keeps it as a tarball between runs: about 90 s saved);
- `build_image`: the project image from docker/wheels with the base pinned by its content
  digest (BASE_IMAGE=sha256:<id>), and the tag form must build the same image.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / "docker" / "wheels"
BASE_IMAGE = "fedmae-base:bookworm"
IMAGE = "fedmae:local"
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


def build_base(engine: DockerEngine, work: Path) -> str:
    """A Debian bookworm minbase with python3 and Fashion-MNIST, imported without a
    registry; returns its image id (sha256:...)."""
    if engine.docker(["image", "inspect", BASE_IMAGE], check=False, capture=True).returncode:
        cached = os.environ.get("FEDMAE_COMPOSE_BASE_TAR")
        if cached and Path(cached).is_file():
            say(f"docker import {BASE_IMAGE} from {cached}")
            engine.docker(["import", cached, BASE_IMAGE], capture=True)
        else:
            rootfs = work / "rootfs"
            say("debootstrap bookworm minbase (python3, python3-venv, dataset-fashion-mnist)")
            run(["debootstrap", "--variant=minbase",
                 "--include=python3,python3-venv,passwd,dataset-fashion-mnist",
                 "bookworm", str(rootfs), debian_mirror()], capture=True)  # fmt: skip
            run(["rm", "-rf", str(rootfs / "var/cache/apt/archives"),
                 str(rootfs / "var/lib/apt/lists")])  # fmt: skip
            tarball = Path(cached) if cached else work / "base.tar"
            run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."])
            shutil.rmtree(rootfs, ignore_errors=True)
            say(f"docker import {BASE_IMAGE}")
            engine.docker(["import", str(tarball), BASE_IMAGE], capture=True)
            if not cached:
                tarball.unlink()
    return engine.docker(["image", "inspect", "--format", "{{.Id}}", BASE_IMAGE],
                         capture=True).stdout.strip()  # fmt: skip


def build_image(engine: DockerEngine, base_id: str) -> None:
    """Build with the base pinned by digest, then by tag: both must give one image."""
    built = {}
    for base in (base_id, BASE_IMAGE):
        say(f"docker build {IMAGE} (BASE_IMAGE={base}; offline: --no-index, docker/wheels)")
        built[base] = engine.docker(
            ["build", "--quiet", "--build-arg", f"BASE_IMAGE={base}",
             "--build-arg", "PIP_OFFLINE=--no-index", "-t", IMAGE, str(REPO)], capture=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
    assert len(set(built.values())) == 1, f"the two forms built different images: {built}"
