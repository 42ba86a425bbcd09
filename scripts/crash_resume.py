"""`make crash-resume`: a 10-round run that survives kill -9 of the aggregator at round 4
and of one client at round 7, and ends with versions 1..10, each published exactly once.

Everything is a real process talking gRPC over mutual TLS on 127.0.0.1; the state is
in a temporary directory (or --state-dir). Prints the round log as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedmae.cli.demo import free_port  # noqa: E402

FEDMAE = [sys.executable, "-m", "fedmae"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def records(state: Path) -> list[dict]:
    path = state / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def published(state: Path) -> list[int]:
    return [r["round"] for r in records(state) if r["status"] == "published"]


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", help="default: a new temporary directory")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kill-server-at", type=int, default=4)
    parser.add_argument("--kill-client-at", type=int, default=7)
    args = parser.parse_args()
    work = Path(args.state_dir or tempfile.mkdtemp(prefix="fedmae-crash-"))
    state, certs = work / "state", work / "certs"
    port = free_port()
    subprocess.run([*FEDMAE, "certs", "init", "--out", str(certs)], check=True,
                   capture_output=True)  # fmt: skip
    names = ["site-1", "site-2", "site-3"]
    for name in names:
        subprocess.run([*FEDMAE, "certs", "issue-client", "--certs", str(certs), "--name", name,
                        "--out", str(work / name), "--state-dir", str(state)], check=True,
                       capture_output=True)  # fmt: skip
    serve_args = [*FEDMAE, "serve", "--state-dir", str(state), "--certs", str(certs),
                  "--listen", f"127.0.0.1:{port}", "--enroll-listen", "off",
                  "--min-clients", "2", "--min-participants", "2", "--min-updates", "2",
                  "--rounds", str(args.rounds),
                  "--round-timeout", "120", "--dropout-grace", "3"]  # fmt: skip
    logs: list = []

    def start_server(n: int) -> subprocess.Popen:
        logs.append(open(work / f"aggregator-{n}.log", "w"))
        return subprocess.Popen(serve_args, stdout=logs[-1], stderr=subprocess.STDOUT, env=ENV)

    def start_client(i: int, n: int) -> subprocess.Popen:
        logs.append(open(work / f"{names[i]}-{n}.log", "w"))
        return subprocess.Popen(
            [*FEDMAE, "client", "--server", f"127.0.0.1:{port}", "--identity",
             str(work / names[i]), "--partition", f"{i}/3", "--limit", "900", "--threads", "1",
             "--give-up-after", "120"],
            stdout=logs[-1], stderr=subprocess.STDOUT, env=ENV,
        )  # fmt: skip

    server = start_server(1)
    clients = [start_client(i, 1) for i in range(3)]
    say(f"aggregator (pid {server.pid}) and 3 clients started; state in {state}")
    try:
        wait(lambda: len(published(state)) >= args.kill_server_at - 1, 300, "round 4 to open")
        time.sleep(0.5)  # inside round 4: tasks out, clients training
        server.send_signal(signal.SIGKILL)
        server.wait()
        say(f"kill -9 aggregator during round {args.kill_server_at} "
            f"(published so far: {published(state)})")  # fmt: skip
        server = start_server(2)
        say(f"aggregator restarted (pid {server.pid}) on the same state directory")
        wait(lambda: len(published(state)) >= args.kill_client_at - 1, 300, "round 7 to open")
        time.sleep(0.5)
        clients[1].send_signal(signal.SIGKILL)
        clients[1].wait()
        say(f"kill -9 {names[1]} during round {args.kill_client_at}")
        wait(lambda: len(published(state)) >= args.kill_client_at, 300, "round 7 to close")
        clients[1] = start_client(1, 2)
        say(f"{names[1]} restarted; it reconnects with the identity it has")
        server.wait(timeout=600)
        for c in clients:
            c.wait(timeout=60)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    print()
    print(f"{'round':>5} {'attempt':>7} {'status':<9} {'version':>7}  participants / reason")
    for r in records(state):
        extra = ", ".join(r["participants"]) or r.get("reason", "")
        if r.get("recovered"):
            extra = "(recovered after the crash) " + extra
        print(f"{r['round']:>5} {r['attempt']:>7} {r['status']:<9} {r['version']:>7}  {extra}")
    pub = [r for r in records(state) if r["status"] == "published"]
    versions = [r["version"] for r in pub]
    ok = [r["round"] for r in pub] == list(range(1, args.rounds + 1)) and versions == list(
        range(1, args.rounds + 1)
    )
    ckpts = sorted(
        p.name for p in (state / "checkpoints").glob("v*[0-9].safetensors")
    )  # not the .opt state files
    print(f"\n{len(pub)} published versions {versions[0]}..{versions[-1]}, each exactly once: "
          f"{'yes' if ok else 'NO'}; {len(ckpts)} checkpoints (v0..v{args.rounds}); "
          f"aggregator exit code {server.returncode}")  # fmt: skip
    return 0 if ok and server.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
