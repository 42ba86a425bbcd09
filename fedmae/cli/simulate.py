"""``fedmae simulate``: hundreds of sites on one machine, over the real protocol.

A real aggregator (a ``fedmae serve`` process, mTLS) and ``--workers`` worker
processes (``fedmae.cli.simulate_worker``) that host the ``--sites`` virtual sites
between them (``client_agent.simulation``). Every site is enrolled with a one-time
token of its own through the enrollment port, holds its own shard and its own mTLS
connection and event stream; only the memory to train in is shared. The state dir,
round log, ``fedmae report`` and ``fedmae watch`` are those of any cluster.

It shows each round as it closes (the demo's table) and the memory of all its
processes (``/proc``), and stops every process it started when it ends, also on
Ctrl-C or SIGTERM. ``--rounds 0`` connects every site, reports the memory of the
idle federation, and ends. ``--malicious K --attack NAME`` makes the first K sites
send poisoned updates (``client_agent.attacks``), to try defences before rolling out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from client_agent.attacks import ATTACKS, DEFAULT_SCALE
from fedmae.cli import ENCODING_NAMES
from fedmae.cli.demo import (
    ROUND_HEADER,
    ClientsGone,
    LocalFederation,
    _row,
    _stop_all,
    _wait_healthy,
    follow_records,
    sigterm_interrupts,
)
from fedmae.cli.process_memory import MemoryWatch
from fedmae.pki.files import ClientIdentity, ServerCerts
from fedmae.transport.admin_client import AdminClient

IDLE_HOLD_S = 15  # --rounds 0: how long the connected sites are watched idle
ENROLL_THREADS = 4  # key generation is the sites' work; the aggregator signs in turn


@dataclass(frozen=True)
class SimulationConfig:
    sites: int = 100
    workers: int = 2
    fraction: float = 0.1
    dirichlet: float | None = None
    rounds: int = 5
    strategy: str = "fedavg"
    images_per_site: int = 300
    state_dir: Path = Path("simulation-state")
    train_slots: int = 1
    threads: int = 1  # torch threads per worker
    local_epochs: int = 1
    data: str = "fashion-mnist"
    encoding: str = "fp32"
    seed: int = 0
    round_timeout_s: float = 600.0
    secure_aggregation: bool = False
    serve_args: list[str] = field(default_factory=list)  # more `fedmae serve` flags
    dump_dir: Path | None = None  # tests: each upload's delta (client_agent.simulation)
    malicious: int = 0  # the first K sites poison their updates
    attack: str = "scale"  # client_agent.attacks.ATTACKS
    attack_scale: float = DEFAULT_SCALE


def _serve_command(cfg: SimulationConfig, state: Path, server: str, enroll: str) -> list[str]:
    from aggregator_service.config import SAFE_MIN_PARTICIPANTS

    low = min(cfg.sites, SAFE_MIN_PARTICIPANTS)
    # The first round waits for every site (--start-clients), later ones for as few as
    # can publish, so --fraction samples from all of them. With --rounds 0 it waits for
    # one site more than there are: the sites stay connected and idle.
    return [
        sys.executable, "-m", "fedmae", "serve",
        "--state-dir", str(state),
        "--listen", server,
        "--enroll-listen", enroll,
        "--certs", str(state / "certs"),
        "--enroll-rate", "0",  # every site enrolls from 127.0.0.1
        "--min-clients", str(low),
        "--min-participants", str(low),
        "--start-clients", str(cfg.sites + (1 if cfg.rounds == 0 else 0)),
        "--fraction", str(cfg.fraction),
        "--rounds", str(max(cfg.rounds, 1)),
        "--strategy", cfg.strategy,
        "--round-timeout", str(cfg.round_timeout_s),
        "--local-epochs", str(cfg.local_epochs),
        "--encoding", cfg.encoding,
        "--seed", str(cfg.seed),
        "--eval-data", cfg.data,
        "--eval-images", "500",
        "--max-workers", str(max(2048, 2 * cfg.sites + 64)),
        *(["--secure-aggregation"] if cfg.secure_aggregation else []),
        *cfg.serve_args,
        *_dp_population(cfg),
    ]  # fmt: skip


def _dp_population(cfg: SimulationConfig) -> list[str]:
    """DP needs N, the population: here it is known, every site of the run."""
    args = cfg.serve_args
    private = any(
        a in ("--dp=central", "--dp=distributed")
        or (a == "--dp" and args[i + 1 : i + 2] in (["central"], ["distributed"]))
        for i, a in enumerate(args)
    )
    given = any(a == "--dp-sites" or a.startswith("--dp-sites=") for a in args)
    return ["--dp-sites", str(cfg.sites)] if private and not given else []


def enroll_sites(
    server: str, enroll_server: str, certs: ServerCerts, names: list[str], out: Path
) -> list[ClientIdentity]:
    """What an operator and each site do: one one-time token per site, then each site
    makes its key and enrolls with its token through the enrollment port."""
    from client_agent.enrollment import enroll

    with AdminClient(server, ClientIdentity(certs.dir / "admin")) as admin:
        tokens = [admin.create_token(name=n, ttl_s=3600).token for n in names]
    ca_pem = certs.ca_cert.read_bytes()

    def one(pair: tuple[str, str]) -> ClientIdentity:
        name, token = pair
        labels = {"simulation": "true"}
        return enroll(enroll_server, ca_pem, token, out / name, name=name, labels=labels).identity

    with ThreadPoolExecutor(ENROLL_THREADS) as pool:
        return list(pool.map(one, zip(names, tokens, strict=True)))


def _worker_specs(
    cfg: SimulationConfig, server: str, identities: list[ClientIdentity], logs: Path
) -> list[Path]:
    """Sites dealt round-robin to the workers, so each gets its share of any round."""
    paths = []
    for k in range(cfg.workers):
        sites = [(i, str(identities[i].dir)) for i in range(k, cfg.sites, cfg.workers)]
        spec = {
            "server": server, "sites": sites, "num_sites": cfg.sites, "data": cfg.data,
            "limit": cfg.images_per_site * cfg.sites, "dirichlet": cfg.dirichlet,
            "seed": cfg.seed, "train_slots": cfg.train_slots, "threads": cfg.threads,
            "dump_dir": str(cfg.dump_dir) if cfg.dump_dir else None,
            "malicious": cfg.malicious, "attack": cfg.attack, "attack_scale": cfg.attack_scale,
        }  # fmt: skip
        path = logs / f"worker-{k + 1}.json"
        path.write_text(json.dumps(spec))
        paths.append(path)
    return paths


def run_simulation(cfg: SimulationConfig) -> int:
    if cfg.sites < 1 or not 1 <= cfg.workers <= cfg.sites:
        raise ValueError("--sites must be >= 1 and --workers between 1 and --sites")
    if not 0 <= cfg.malicious <= cfg.sites:
        raise ValueError("--malicious must be between 0 and --sites")
    fed = LocalFederation.prepare(cfg.state_dir)
    print(
        f"fedmae simulate: {cfg.sites} sites in {cfg.workers} workers, fraction "
        f"{cfg.fraction:g}, {'IID' if cfg.dirichlet is None else f'Dirichlet {cfg.dirichlet:g}'}"
        f", {cfg.rounds} rounds, strategy {cfg.strategy}"
        f"{', secure aggregation' if cfg.secure_aggregation else ''}"
        f"{_describe_attack(cfg)}, mTLS on "
        f"{fed.server_addr}, state in {fed.state}",
        flush=True,
    )
    with sigterm_interrupts():
        return _simulate(cfg, fed)


def _describe_attack(cfg: SimulationConfig) -> str:
    if not cfg.malicious:
        return ""
    how = f" x{cfg.attack_scale:g}" if cfg.attack == "scale" else ""
    return f", {cfg.malicious} malicious site(s) ({cfg.attack}{how})"


def _simulate(cfg: SimulationConfig, fed: LocalFederation) -> int:
    """Start the aggregator and the workers, follow the rounds; stop them all at the end."""
    state, logs, certs = fed.state, fed.logs, fed.certs
    server_addr, enroll_addr, env = fed.server_addr, fed.enroll_addr, fed.env
    procs: list[subprocess.Popen] = []
    files: list[IO] = []
    start = time.monotonic()
    memory = MemoryWatch()
    try:
        server_log = open(logs / "aggregator.log", "w")
        files.append(server_log)
        server = subprocess.Popen(
            _serve_command(cfg, state, server_addr, enroll_addr),
            stdout=subprocess.PIPE, stderr=server_log, env=env, text=True,
        )  # fmt: skip
        procs.append(server)
        memory.add("aggregator", server.pid)
        _wait_healthy(server, server_addr, ClientIdentity(certs.dir / "admin"))
        names = [f"site-{k + 1:0{len(str(cfg.sites))}d}" for k in range(cfg.sites)]
        t0 = time.monotonic()
        identities = enroll_sites(server_addr, enroll_addr, certs, names, state / "clients")
        print(
            f"enrolled {cfg.sites} sites, each with its own one-time token, in "
            f"{time.monotonic() - t0:.1f}s",
            flush=True,
        )
        for k, spec in enumerate(_worker_specs(cfg, server_addr, identities, logs)):
            out = open(logs / f"worker-{k + 1}.log", "w")
            files.append(out)
            worker = subprocess.Popen(
                [sys.executable, "-m", "fedmae.cli.simulate_worker", str(spec)],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
            procs.append(worker)
            memory.add(f"worker-{k + 1}", worker.pid)
        memory.start()
        t0 = time.monotonic()
        _wait_connected(server, server_addr, certs, cfg.sites, procs[1:])
        print(
            f"all {cfg.sites} sites connected and subscribed in {time.monotonic() - t0:.1f}s; "
            f"memory {memory.describe()}",
            flush=True,
        )
        if cfg.rounds == 0:
            time.sleep(IDLE_HOLD_S)  # keepalives and stream heartbeats: memory settles
            print(f"idle federation after {IDLE_HOLD_S}s: peak {memory.describe_peak()}",
                  flush=True)  # fmt: skip
            return 0
        return _follow_rounds(cfg, state, server, procs[1:], memory, start)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the aggregator and workers", flush=True)
        return 130
    except RuntimeError as err:
        print(f"simulation FAILED: {err}; logs in {logs}", flush=True)
        return 1
    finally:
        memory.stop()
        _stop_all(procs)
        for f in files:
            f.close()


def _wait_connected(
    server: subprocess.Popen, address: str, certs: ServerCerts, n: int, workers: list
) -> None:
    with AdminClient(address, ClientIdentity(certs.dir / "admin")) as admin:
        while True:
            if server.poll() is not None:
                raise RuntimeError("the aggregator exited")
            if any(w.poll() is not None for w in workers):
                raise RuntimeError("a worker exited before its sites connected")
            status = admin.status()
            if len(status.connected) >= n or status.state != "waiting":
                return
            time.sleep(0.5)


def _follow_rounds(cfg, state: Path, server, workers, memory: MemoryWatch, start: float) -> int:
    print(f"{ROUND_HEADER} {'RSS MB':>7}", flush=True)
    published = 0
    try:
        for rec in follow_records(server, workers):
            published += rec["status"] == "published"
            print(f"{_row(rec)} {memory.total_mb():>7.0f}", flush=True)
    except ClientsGone:
        raise RuntimeError("every worker exited before the run finished") from None
    server_rc = server.wait()
    for w in workers:
        try:
            w.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    secs = time.monotonic() - start
    ok = server_rc == 0 and published >= cfg.rounds
    print(
        f"\n{'done' if ok else 'simulation FAILED'} in {secs:.0f}s: {published} of "
        f"{cfg.rounds} rounds published (aggregator exit code {server_rc}).\n"
        f"memory, all processes: peak {memory.describe_peak()}\n"
        f"round log: {state / 'rounds.jsonl'}; report: fedmae report --state-dir {state} "
        f"--out {state / 'report'}"
    )
    return 0 if ok else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    return run_simulation(
        SimulationConfig(
            sites=args.sites,
            workers=args.workers,
            fraction=args.fraction,
            dirichlet=args.dirichlet,
            rounds=args.rounds,
            strategy=args.strategy,
            images_per_site=args.images_per_site,
            state_dir=Path(args.state_dir),
            train_slots=args.train_slots,
            threads=args.threads,
            local_epochs=args.local_epochs,
            data=args.data,
            encoding=args.encoding,
            seed=args.seed,
            round_timeout_s=args.round_timeout,
            secure_aggregation=args.secure_aggregation,
            serve_args=shlex.split(args.serve_args),
            dump_dir=Path(args.dump_deltas) if args.dump_deltas else None,
            malicious=args.malicious,
            attack=args.attack,
            attack_scale=args.attack_scale,
        )
    )


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` to the ``fedmae`` parser."""
    D = " (default %(default)s)"
    s = sub.add_parser("simulate", help="many virtual sites in a few processes, over mTLS")
    s.add_argument("--sites", type=int, default=100, help="virtual sites" + D)
    s.add_argument("--workers", type=int, default=2, help="worker processes hosting them" + D)
    s.add_argument("--fraction", type=float, default=0.1, help="share of sites each round" + D)
    s.add_argument("--dirichlet", type=float, help="non-IID shards, Dirichlet(alpha) (default IID)")
    s.add_argument(
        "--rounds", type=int, default=5, help="rounds; 0 = connect every site, measure, end" + D
    )
    s.add_argument("--strategy", default="fedavg", help="aggregation rule (fedmae serve)" + D)
    s.add_argument("--images-per-site", type=int, default=300, help="training + validation" + D)
    s.add_argument("--state-dir", default="simulation-state", help="made afresh" + D)
    s.add_argument(
        "--train-slots", type=int, default=1, help="models each worker trains in at once" + D
    )
    s.add_argument("--threads", type=int, default=1, help="torch threads per worker" + D)
    s.add_argument("--local-epochs", type=int, default=1, help="epochs per round" + D)
    s.add_argument("--data", default="fashion-mnist", help="fashion-mnist, a folder or .npy" + D)
    s.add_argument("--encoding", default="fp32", choices=ENCODING_NAMES, help="update encoding" + D)
    s.add_argument("--seed", type=int, default=0, help="model, shards and selection" + D)
    s.add_argument("--round-timeout", type=float, default=600.0, help="seconds" + D)
    s.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="secure rounds (docs/privacy.md; default off)",
    )
    s.add_argument(
        "--serve-args",
        default="",
        help="more flags for fedmae serve, one string; with --dp, --dp-sites is "
        "--sites unless given (default none)",
    )
    s.add_argument(
        "--malicious", type=int, default=0, help="the first K sites poison their updates" + D
    )
    s.add_argument(
        "--attack",
        default="scale",
        choices=ATTACKS,
        help="what a malicious site sends: scale (delta x --attack-scale), signflip (-delta), "
        "noise (Gaussian, the delta's norm), claim (honest delta, 2^40 samples)" + D,
    )
    s.add_argument(
        "--attack-scale", type=float, default=DEFAULT_SCALE, help="the scale attack's factor" + D
    )
    s.add_argument("--dump-deltas", help="tests: write each site's update here (default off)")
    s.set_defaults(func=cmd_simulate, role="simulate")
