"""``fedmae demo``: a real federation on this machine.

Creates certificates, starts the aggregator and N client agents as separate OS
processes talking gRPC over mutual TLS on 127.0.0.1, shows each round as it closes
and ends with a summary. Every process it started is stopped when it ends, also on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedmae.cli import ENCODING_NAMES
from fedmae.pki.files import ClientIdentity, ServerCerts
from fedmae.pki.issue import init_certs
from fedmae.transport.admin_client import AdminClient
from fedmae.transport.health import check_health

log = logging.getLogger(__name__)


EVAL_IMAGES = 500  # the server checks each new global model on this many test images


@dataclass(frozen=True)
class DemoConfig:
    clients: int = 3
    rounds: int = 5
    state_dir: Path = Path("demo-state")
    dirichlet: float | None = None
    images_per_client: int = 2000
    # Tuned by measurement (docs/BENCHMARKS.md, "The demo's defaults"): 2 local epochs at
    # lr 3e-3 reach a held-out loss of about 0.40 in 5 rounds (1 epoch at 1e-3: 0.49-0.51),
    # enough for recognisable reconstructions, well under 3 minutes here.
    local_epochs: int = 2
    learning_rate: float = 3e-3
    data: str = "fashion-mnist"
    encoding: str = "fp32"
    fresh: bool = True
    round_timeout_s: float = 300.0
    seed: int = 0
    secure_aggregation: bool = False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset(state_dir: Path) -> None:
    if not state_dir.exists():
        return
    ours = {"certs", "clients", "checkpoints", "logs", "rounds.jsonl"}
    strangers = [p.name for p in state_dir.iterdir() if p.name not in ours]
    if strangers:
        raise FileExistsError(
            f"{state_dir} holds files the demo did not make ({', '.join(strangers[:3])}); "
            "choose another --state-dir"
        )
    shutil.rmtree(state_dir)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:.4f}"


def _wait_healthy(server: subprocess.Popen, address: str, admin: ClientIdentity) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the aggregator exited during start-up")
        if check_health(address, admin, timeout=2).failure is None:
            return  # it answered
        time.sleep(0.3)
    raise RuntimeError(f"the aggregator did not become healthy on {address}")


def _enroll_clients(
    address: str, enroll_address: str, certs: ServerCerts, names: list[str], out: Path
) -> list[ClientIdentity]:
    """What an operator and each site would do: one token per site, then enroll."""

    from client_agent.enrollment import enroll

    with AdminClient(address, ClientIdentity(certs.dir / "admin")) as admin:
        tokens = [admin.create_token(name=n, ttl_s=600).token for n in names]
    ca_pem = certs.ca_cert.read_bytes()
    return [
        enroll(
            enroll_address, ca_pem, token, out / name, name=name, labels={"demo": "true"}
        ).identity
        for name, token in zip(names, tokens, strict=True)
    ]


def _row(rec: dict) -> str:
    mark = (
        ""
        if rec["status"] == "published"
        else f"  {rec['status'].upper()}: {rec.get('reason', '')}"
    )
    return (
        f"{rec['round']:>5} {rec['version']:>7} {len(rec['participants']):>7} "
        f"{rec['num_samples']:>7} {_fmt(rec['train_loss']):>10} {_fmt(rec['val_loss']):>9} "
        f"{_fmt(rec.get('eval_loss')):>9} "
        f"{rec['bytes_in'] / 1e6:>6.1f} {rec['bytes_out'] / 1e6:>6.1f} "
        f"{rec['duration_s']:>7.1f}{mark}"
    )


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join("    " + x for x in path.read_text().splitlines()[-lines:])
    except OSError:
        return ""


def run_demo(cfg: DemoConfig) -> int:
    from aggregator_service.config import SAFE_MIN_PARTICIPANTS

    fed = LocalFederation.prepare(cfg.state_dir, fresh=cfg.fresh)
    state, server_addr = fed.state, fed.server_addr
    print(
        f"fedmae demo: {cfg.clients} clients, {cfg.rounds} rounds, mTLS on {server_addr}"
        f"{', secure aggregation' if cfg.secure_aggregation else ''}, "
        f"state in {state}",
        flush=True,
    )
    if cfg.clients < SAFE_MIN_PARTICIPANTS:
        print(
            f"note: with {cfg.clients} client(s) a round publishes with fewer than "
            f"{SAFE_MIN_PARTICIPANTS} participants, so each can infer the others' updates "
            "from the published model; fine for a demo, not for real sites",
            flush=True,
        )
    start = time.monotonic()
    with sigterm_interrupts():
        return _run(cfg, fed, start)


def _run(cfg: DemoConfig, fed: LocalFederation, start: float) -> int:
    """Start the aggregator and the clients, follow the rounds; stop them all at the end."""
    from aggregator_service.config import SAFE_MIN_PARTICIPANTS

    py = [sys.executable, "-m", "fedmae"]
    procs: list[subprocess.Popen] = []
    files: list[IO] = []
    state, logs, certs = fed.state, fed.logs, fed.certs
    server_addr, enroll_addr, env = fed.server_addr, fed.enroll_addr, fed.env
    try:
        server_log = open(logs / "aggregator.log", "w")
        files.append(server_log)
        server = subprocess.Popen(
            [
                *py, "serve",
                "--state-dir", str(state),
                "--listen", server_addr,
                "--enroll-listen", enroll_addr,
                "--certs", str(certs.dir),
                "--min-clients", str(cfg.clients),
                # Fewer than 3 demo clients publish anyway: the sites are all ours (the
                # aggregator warns that such a round leaks updates between them).
                "--min-participants", str(min(cfg.clients, SAFE_MIN_PARTICIPANTS)),
                "--rounds", str(cfg.rounds),
                "--round-timeout", str(cfg.round_timeout_s),
                "--local-epochs", str(cfg.local_epochs),
                "--lr", str(cfg.learning_rate),
                "--encoding", cfg.encoding,
                "--seed", str(cfg.seed),
                "--eval-data", cfg.data,
                "--eval-images", str(EVAL_IMAGES),
                *(["--secure-aggregation"] if cfg.secure_aggregation else []),
            ],
            stdout=subprocess.PIPE,
            stderr=server_log,
            env=env,
            text=True,
        )  # fmt: skip
        procs.append(server)
        _wait_healthy(server, server_addr, ClientIdentity(certs.dir / "admin"))
        names = [f"site-{k + 1}" for k in range(cfg.clients)]
        identities = _enroll_clients(server_addr, enroll_addr, certs, names, state / "clients")
        print(
            f"enrolled {', '.join(names)} with one-time tokens (enrollment port {enroll_addr})",
            flush=True,
        )
        total_images = cfg.images_per_client * cfg.clients
        clients: dict[str, subprocess.Popen] = {}
        for k, (name, ident) in enumerate(zip(names, identities, strict=True)):
            client_log = open(logs / f"{name}.log", "w")
            files.append(client_log)
            args = [
                *py, "client",
                "--server", server_addr,
                "--identity", str(ident.dir),
                "--data", cfg.data,
                "--partition", f"{k}/{cfg.clients}",
                "--limit", str(total_images),
                "--data-seed", str(cfg.seed),
                "--threads", "1",
                "--give-up-after", "60",
            ]  # fmt: skip
            if cfg.dirichlet:
                args += ["--dirichlet", str(cfg.dirichlet)]
            clients[name] = subprocess.Popen(
                args, stdout=client_log, stderr=subprocess.STDOUT, env=env
            )
            procs.append(clients[name])
        print(f"started aggregator and {cfg.clients} clients; logs in {logs}", flush=True)
        print(ROUND_HEADER, flush=True)
        records: list[dict] = []
        try:
            for rec in follow_records(server, list(clients.values())):
                records.append(rec)
                print(_row(rec), flush=True)
        except ClientsGone:
            print("\nevery client exited before the run finished:", flush=True)
            for name in names:
                print(f"  {name} (exit {clients[name].returncode}):", flush=True)
                print(_tail(logs / f"{name}.log"), flush=True)
            return 1
        server_rc = server.wait()
        for p in clients.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        return _summary(cfg, state, records, server_rc, time.monotonic() - start)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the aggregator and clients", flush=True)
        return 130
    except RuntimeError as err:
        print(f"demo FAILED: {err}; see {logs / 'aggregator.log'}:", flush=True)
        print(_tail(logs / "aggregator.log", 10), flush=True)
        return 1
    finally:
        _stop_all(procs)
        for f in files:
            f.close()


@dataclass(frozen=True)
class LocalFederation:
    """Where a federation of local processes lives: its state dir and logs, its CA, and
    two free loopback ports (mTLS federation, enrollment). For ``demo`` and ``simulate``."""

    state: Path
    logs: Path
    certs: ServerCerts
    server_addr: str
    enroll_addr: str
    env: dict[str, str]

    @classmethod
    def prepare(cls, state_dir: Path, fresh: bool = True) -> LocalFederation:
        state = state_dir.resolve()
        if fresh:
            _reset(state)
        logs = state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return cls(
            state, logs, init_certs(state / "certs"), f"127.0.0.1:{free_port()}",
            f"127.0.0.1:{free_port()}", {**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so a launcher's ``finally``
    stops every process it started, as on Ctrl-C."""

    def _on_term(signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ClientsGone(Exception):
    """Every client (or worker) process exited while the aggregator still runs."""


ROUND_HEADER = (
    f"{'round':>5} {'version':>7} {'clients':>7} {'samples':>7} {'train_loss':>10} "
    f"{'val_loss':>9} {'eval_loss':>9} {'MB in':>6} {'MB out':>6} {'seconds':>7}"
)


def follow_records(server: subprocess.Popen, clients: list[subprocess.Popen]) -> Iterator[dict]:
    """The round records the aggregator prints (stdout, a JSON object a line) as they
    come, until it exits; ``ClientsGone`` when every client process exits first."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(server.stdout, lines), daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if all(p.poll() is not None for p in clients) and server.poll() is None:
                raise ClientsGone() from None
            continue
        if line is None:
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        yield record


def _pump(stream: IO[str], out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _start_loss(state: Path, cfg: DemoConfig) -> float:
    """The server's held-out check of the model the run started from (version 0)."""
    from aggregator_service.global_eval import GlobalEvaluator
    from fedmae.cli.checkpoints import load_checkpoint, locate
    from fedmae.config import TrainingConfig

    store, version = locate(state / "checkpoints", 0)
    loaded = load_checkpoint(store, version)
    check = GlobalEvaluator(loaded.model_name, cfg.data, EVAL_IMAGES, TrainingConfig().mask_ratio)
    return check.loss_of(loaded.model)


def _summary(cfg: DemoConfig, state: Path, records: list[dict], server_rc: int, secs: float) -> int:
    published = [r for r in records if r["status"] == "published"]
    ckpts = sorted((state / "checkpoints").glob("v*[0-9].safetensors"))  # not the .opt state files
    print()
    if server_rc != 0 or len(published) < cfg.rounds:
        print(
            f"demo FAILED: {len(published)} of {cfg.rounds} rounds published "
            f"(aggregator exit code {server_rc}); see {state / 'logs'}"
        )
        return 1
    first, last = published[0], published[-1]
    # The verdict compares the global model with the model the run started from, both
    # measured by the server's own check (500 held-out images, fixed masks). One round
    # against the next is no verdict: with small shards a round can go up by noise.
    start = _start_loss(state, cfg)
    better = (last.get("eval_loss") or math.inf) < start
    from fedmae.cli.report import write_report

    report = write_report(state, state / "report", data=cfg.data)
    # A secure round reports no sites' losses (they would be per site).
    sites = (
        f"sites' validation loss (sample-weighted): round {first['round']} "
        f"{_fmt(first.get('val_loss'))} -> round {last['round']} {_fmt(last.get('val_loss'))}\n"
        if last.get("val_loss") is not None
        else ""
    )
    print(
        f"done in {secs:.0f}s: {len(published)} rounds, {cfg.clients} clients each over mTLS"
        f"{' with secure aggregation' if cfg.secure_aggregation else ''}.\n"
        f"global model on {EVAL_IMAGES} held-out test images (masked-patch MSE): start "
        f"{_fmt(start)} -> round {first['round']} {_fmt(first.get('eval_loss'))} -> round "
        f"{last['round']} {_fmt(last.get('eval_loss'))} ({'lower' if better else 'NOT lower'})\n"
        f"{sites}"
        f"round log:   {state / 'rounds.jsonl'}\n"
        f"checkpoints: {len(ckpts)} in {state / 'checkpoints'} (latest {ckpts[-1].name})\n"
        f"report:      {report.summary} (loss, phases, bytes, clients, reconstructions)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(
        DemoConfig(
            clients=args.clients,
            rounds=args.rounds,
            state_dir=Path(args.state_dir),
            dirichlet=args.dirichlet,
            images_per_client=args.images_per_client,
            local_epochs=args.local_epochs,
            learning_rate=args.lr,
            data=args.data,
            encoding=args.encoding,
            fresh=not args.keep_state,
            secure_aggregation=args.secure_aggregation,
        )
    )


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``fedmae`` parser."""
    D = " (default %(default)s)"
    d = sub.add_parser("demo", help="a real federated cluster on this machine, over mTLS")
    d.add_argument("--clients", type=int, default=3, help="client processes" + D)
    d.add_argument("--rounds", type=int, default=5, help="rounds to run" + D)
    d.add_argument("--state-dir", default="demo-state", help="the aggregator's state directory" + D)
    d.add_argument(
        "--dirichlet", type=float, help="non-IID shards with Dirichlet(alpha) (default: IID)"
    )
    d.add_argument(
        "--images-per-client",
        type=int,
        default=2000,
        help="images per client, training and validation" + D,
    )
    d.add_argument("--local-epochs", type=int, default=2, help="epochs per round" + D)
    d.add_argument("--lr", type=float, default=3e-3, help="the sites' AdamW learning rate" + D)
    d.add_argument(
        "--data", default="fashion-mnist", help="fashion-mnist, a folder or .npy/.npz" + D
    )
    d.add_argument("--encoding", default="fp32", choices=ENCODING_NAMES, help="update encoding" + D)
    d.add_argument(
        "--keep-state", action="store_true", help="resume instead of starting fresh (default off)"
    )
    d.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="run the rounds with secure aggregation: the aggregator sees only the sum "
        "(docs/privacy.md; default off)",
    )
    d.set_defaults(func=cmd_demo, role="demo")
