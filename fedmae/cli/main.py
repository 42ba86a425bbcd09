"""The ``fedmae`` command: certs, serve, client, demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import grpc

from fedmae.errors import FedmaeError
from fedmae.log_format import setup_logging
from fedmae.runtime import tune_malloc

ENCODING_NAMES = ["fp32", "fp16", "bf16", "int8"]

log = logging.getLogger("fedmae")


# ---------------------------------------------------------------- certs


def cmd_certs_init(args: argparse.Namespace) -> int:
    from fedmae.pki.issue import init_certs

    certs = init_certs(
        args.out, hosts=args.host, force=args.force, signer=args.signer, admin_out=args.admin_out
    )
    root_key = Path(args.signer) / "ca.key" if args.signer else certs.ca_key
    print(f"CA and server certificate in {certs.dir}")
    print(f"  CA certificate (give to clients): {certs.ca_cert}")
    print(f"  root CA key (keep private):       {root_key}")
    print(f"  enrollment CA (the aggregator):   {certs.enrollment_ca_cert}")
    print(f"  admin identity:                   {args.admin_out or certs.dir / 'admin'}")
    print(f"  health-check identity:            {certs.health_dir}")
    return 0


def cmd_certs_issue_client(args: argparse.Namespace) -> int:
    from fedmae.pki.issue import issue_client
    from fedmae.pki.peer import certificate_info

    out = Path(args.out or Path(args.certs) / "clients" / args.name)
    ident = issue_client(args.certs, args.name, out, days=args.days, signer=args.signer)
    print(f"client identity {args.name!r} in {ident.dir} (ca.pem, client.pem, client.key)")
    if args.state_dir:
        from aggregator_service.registry import Registry

        info = certificate_info(ident.cert.read_bytes())
        registry = Registry(Path(args.state_dir) / "fedmae.db")
        try:
            registry.register(
                "operator:certs", args.name, info.fingerprint, info.serial, info.not_after
            )
        finally:
            registry.close()
        print(f"registered {args.name!r} in {args.state_dir}")
    else:
        print("note: not registered; the aggregator refuses it until you pass --state-dir")
    return 0


def cmd_certs_issue_admin(args: argparse.Namespace) -> int:
    from fedmae.pki.files import ServerCerts
    from fedmae.pki.issue import issue_admin

    ident = issue_admin(args.certs, args.name, args.out, days=args.days, signer=args.signer)
    pinned = ServerCerts(Path(args.certs)).admins_dir / f"{args.name}.pem"
    print(f"admin identity {args.name!r} in {ident.dir}; its certificate is also in {pinned}")
    print("the aggregator pins it when it next starts; to pin it now:")
    print(f"  fedmae admins add --cert {ident.cert}")
    return 0


# ---------------------------------------------------------------- enroll


def cmd_enroll(args: argparse.Namespace) -> int:
    from client_agent.enrollment import enroll

    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--label takes KEY=VALUE, got {item!r}")
        labels[key] = value
    ca_pem = Path(args.ca).read_bytes()
    token = args.token if args.token != "-" else sys.stdin.readline()
    result = enroll(args.server, ca_pem, token, Path(args.out), name=args.name or "", labels=labels)
    verb = "renewed" if result.renewed else "enrolled"
    print(
        f"{verb} as client {result.client_id!r}; identity in {result.identity.dir} "
        f"(certificate valid until {result.not_after}). Next:\n"
        f"  fedmae client --server HOST:FEDERATION_PORT --identity {result.identity.dir}"
    )
    return 0


# ---------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from aggregator_service.config import RoundPolicy, ServerConfig
    from aggregator_service.rpc.server import serve
    from fedmae.config import TrainingConfig

    state_dir = Path(args.state_dir)
    config = ServerConfig(
        state_dir=state_dir,
        listen=args.listen,
        enroll_listen=args.enroll_listen,
        certs_dir=Path(args.certs) if args.certs else None,
        ca_key=Path(args.ca_key) if args.ca_key else None,
        metrics_listen=args.metrics_listen,
        eval_data=args.eval_data,
        eval_images=args.eval_images,
        client_cert_days=args.client_cert_days,
        insecure=args.insecure,
        model_seed=args.seed,
        strategy=args.strategy,
        policy=RoundPolicy(
            min_clients=args.min_clients,
            fraction=args.fraction,
            min_updates=args.min_updates,
            rounds=args.rounds,
            round_timeout_s=args.round_timeout,
            seed=args.seed,
            dropout_grace_s=args.dropout_grace,
            target_updates=args.target_updates,
        ),
        training=TrainingConfig(
            model=args.model,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            mask_ratio=args.mask_ratio,
            update_encoding=args.encoding,
            max_samples=args.max_samples,
        ),
        keep_checkpoints=args.keep_checkpoints,
        max_workers=args.max_workers,
        max_uploads_in_flight=args.max_uploads_in_flight,
        transfer_wait_s=args.transfer_wait,
        download_budget_mb=args.download_budget_mb,
        max_downloads_per_client=args.max_downloads_per_client,
        download_idle_s=args.download_idle_timeout,
        upload_idle_s=args.upload_idle_timeout,
        final_grace_s=args.final_grace,
        max_requests_per_s=args.max_requests_per_s,
        max_client_samples=args.max_client_samples,
        max_update_norm=args.max_update_norm,
        norm_bound_factor=args.norm_bound_factor,
        norm_bound_ratio=args.norm_bound_ratio,
        reflection=args.reflection,
        max_connection_age_s=args.max_connection_age,
        max_connection_age_grace_s=args.max_connection_age_grace,
        enroll_rate=args.enroll_rate,
    )
    if not config.insecure and not (config.certs / "server.pem").exists():
        from fedmae.pki.issue import init_certs

        log.info("no certificates in %s yet: creating a CA and server certificate", config.certs)
        init_certs(config.certs)
    return serve(config)


# ---------------------------------------------------------------- client


def cmd_client(args: argparse.Namespace) -> int:
    import torch

    from client_agent.agent import AgentConfig, ClientAgent
    from client_agent.enrollment import enroll, enrollment_ordinal
    from fedmae.ml.loaders import load_dataset
    from fedmae.ml.partitions import client_split, parse_partition

    if args.threads:
        torch.set_num_threads(args.threads)
    identity = Path(args.identity) if args.identity else None
    if identity is not None and not (identity / "client.pem").exists() and args.enroll_token_file:
        # First start of a device that was given a token: enroll, then train.
        if not (args.enroll_server and args.ca):
            raise ValueError("--enroll-token-file needs --enroll-server and --ca")
        token = Path(args.enroll_token_file).read_text().strip()
        result = enroll(args.enroll_server, Path(args.ca).read_bytes(), token, identity,
                        name=args.name or "")  # fmt: skip
        log.info("enrolled as client %r (token use %d)", result.client_id, result.token_use)
    index_text, _, count_text = args.partition.partition("/")
    if index_text == "auto":
        if identity is None or not count_text.isdigit() or int(count_text) < 1:
            raise ValueError("--partition auto/N needs an enrolled --identity and N >= 1")
        index, count = enrollment_ordinal(identity) % int(count_text), int(count_text)
    else:
        index, count = parse_partition(args.partition)
    dataset = load_dataset(args.data)
    data = client_split(
        dataset,
        index,
        count,
        dirichlet_alpha=args.dirichlet or None,  # 0 = IID (compose default)
        seed=args.data_seed,
        val_fraction=args.val_fraction,
        limit=args.limit,
    )
    overrides = {
        "local_epochs": args.local_epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "update_encoding": args.encoding,
    }
    agent = ClientAgent(
        AgentConfig(
            server=args.server,
            identity=identity,
            insecure=args.insecure,
            client_id=args.client_id,
            overrides=overrides,
            give_up_after_s=args.give_up_after,
            seed=args.data_seed,
            status_file=Path(args.status_file) if args.status_file else None,
        ),
        data,
    )
    log.info(
        "client %s: %d training and %d validation images from %s (partition %d/%d%s)",
        agent.client_id,
        len(data.train),
        len(data.val),
        dataset.name,
        index,
        count,
        f", Dirichlet alpha {args.dirichlet}" if args.dirichlet else ", IID",
    )
    import signal

    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    return agent.run()


def cmd_client_health(args: argparse.Namespace) -> int:
    import json
    import time

    try:
        status = json.loads(Path(args.status_file).read_text())
    except (OSError, ValueError) as err:
        print(f"no client status yet: {err}")
        return 1
    age = time.time() - float(status.get("time", 0))
    print(f"{status.get('client_id')}: {status.get('state')} (round {status.get('round')}, "
          f"{age:.0f}s ago)")  # fmt: skip
    return 0 if age <= args.max_age and status.get("state") != "refused" else 1


# ---------------------------------------------------------------- health


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedmae.pki.files import ClientIdentity
    from fedmae.transport.channels import open_channel

    identity = None if args.insecure else ClientIdentity(Path(args.identity))
    with open_channel(args.server, identity, insecure=args.insecure) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
                .status
            )
        except grpc.RpcError as err:
            print(f"{args.server}: {err.code().name}: {err.details()}")
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{args.server}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


# ---------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    from fedmae.cli.report import write_report

    report = write_report(Path(args.state_dir), Path(args.out), data=args.data)
    print(f"report: {report.summary} ({len(report.images)} images)")
    return 0


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from fedmae.cli.demo import DemoConfig, run_demo

    return run_demo(
        DemoConfig(
            clients=args.clients,
            rounds=args.rounds,
            state_dir=Path(args.state_dir),
            dirichlet=args.dirichlet,
            images_per_client=args.images_per_client,
            local_epochs=args.local_epochs,
            data=args.data,
            encoding=args.encoding,
            fresh=not args.keep_state,
        )
    )


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmae",
        description="Federated Masked Autoencoder training over gRPC with mutual TLS.",
    )
    p.add_argument("--log-level", default=os.environ.get("FEDMAE_LOG_LEVEL", "INFO"))
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("FEDMAE_LOG_FORMAT", "text"),
        help="text for people (default), json for machines (env FEDMAE_LOG_FORMAT)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    certs = sub.add_parser("certs", help="make the CA, server and client certificates")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    ci = csub.add_parser(
        "init", help="create the CAs, the server, admin and health identities (idempotent)"
    )
    ci.add_argument("--out", required=True, help="certificates directory (made 0700)")
    ci.add_argument("--host", action="append", default=[], help="extra server name/IP (repeat)")
    ci.add_argument("--force", action="store_true", help="make a new CA (invalidates clients)")
    ci.add_argument(
        "--signer",
        help="keep the root CA key in this directory (0700), not in --out: the aggregator "
        "needs only the enrollment CA (default: the root key is --out/ca.key)",
    )
    ci.add_argument(
        "--admin-out",
        help="write the admin identity here; its public certificate still goes to "
        "--out/admins/ for the server to pin (default: --out/admin)",
    )
    ci.set_defaults(func=cmd_certs_init)
    cc = csub.add_parser("issue-client", help="issue a client identity signed by the CA")
    cc.add_argument("--certs", required=True, help="certificates directory (made by certs init)")
    cc.add_argument("--name", required=True, help="client id (becomes the certificate CN)")
    cc.add_argument("--out", help="identity directory (default: CERTS/clients/NAME)")
    cc.add_argument("--days", type=int, default=365, help="validity, <= 366 (default %(default)s)")
    cc.add_argument(
        "--signer",
        help="root CA key directory, for a CERTS without an enrollment CA (default: CERTS)",
    )
    cc.add_argument("--state-dir", help="register the client in this aggregator state dir")
    cc.set_defaults(func=cmd_certs_issue_client)
    ca = csub.add_parser("issue-admin", help="issue another admin identity, signed by the root CA")
    ca.add_argument("--certs", required=True, help="certificates directory (made by certs init)")
    ca.add_argument("--name", required=True, help="admin name (becomes the certificate CN)")
    ca.add_argument("--out", required=True, help="identity directory to write (made 0700)")
    ca.add_argument("--days", type=int, default=365, help="validity, <= 366 (default %(default)s)")
    ca.add_argument(
        "--signer", help="the directory holding the root CA key ca.key (default: CERTS)"
    )
    ca.set_defaults(func=cmd_certs_issue_admin)

    e = sub.add_parser("enroll", help="join a federation: key + CSR + one-time token")
    e.add_argument("--server", required=True, help="the aggregator's enrollment HOST:PORT")
    e.add_argument("--ca", required=True, help="the federation's CA certificate (ca.pem)")
    e.add_argument("--token", required=True, help="one-time token from the operator; - = stdin")
    e.add_argument("--name", help="client id to ask for (must match a token bound to a name)")
    e.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeat)")
    e.add_argument("--out", required=True, help="identity directory to write")
    e.set_defaults(func=cmd_enroll)

    from fedmae.cli import admin as admin_cli
    from fedmae.cli import watch as watch_cli

    admin_cli.build(sub)
    watch_cli.build(sub)

    D = " (default %(default)s)"
    s = sub.add_parser("serve", help="run the aggregator")
    s.add_argument(
        "--state-dir", required=True, help="checkpoints, round log, registry, certs (required)"
    )
    s.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (default %(default)s)")
    s.add_argument("--certs", help="certificates directory (default STATE_DIR/certs)")
    s.add_argument(
        "--enroll-listen",
        default="",
        help="TLS port for enrollment (default: --listen port + 1; 'off' to disable)",
    )
    s.add_argument(
        "--ca-key",
        help="the key to sign enrollments with, kept outside the certs dir (mode 0600): the "
        "enrollment CA's, or the root's for a certs dir without one (default: "
        "CERTS/enrollment-ca.key, else CERTS/ca.key)",
    )
    s.add_argument(
        "--client-cert-days",
        type=int,
        default=365,
        help="validity of enrolled clients' certificates, 1 to 366 days, never past the "
        "enrollment CA's (default %(default)s)",
    )
    s.add_argument(
        "--metrics-listen", help="serve Prometheus /metrics on HOST:PORT (off by default)"
    )
    s.add_argument(
        "--eval-data", help="held-out data the server evaluates each new model on (default: off)"
    )
    s.add_argument("--eval-images", type=int, default=500, help="images of --eval-data used" + D)
    s.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no client authentication, no Admin service; loopback --listen only "
        "(testing; default off)",
    )
    s.add_argument(
        "--enroll-rate",
        type=float,
        default=5.0,
        help="enrollment calls per second from one address (IPv6: one /64), bursts of twice "
        "that; more get RESOURCE_EXHAUSTED; 0 = no limit (default %(default)s)",
    )
    s.add_argument(
        "--reflection",
        action="store_true",
        help="serve gRPC reflection on the mTLS port (for grpcurl; default off)",
    )
    s.add_argument(
        "--max-connection-age",
        type=float,
        default=3600.0,
        help="seconds after which a connection is asked to go away, so the next call's TLS "
        "handshake checks the certificate again; 0 = never (default %(default)s)",
    )
    s.add_argument(
        "--max-connection-age-grace",
        type=float,
        default=0.0,
        help="seconds that calls running on such a connection may go on before it is cut; "
        "0 = until they end, so no transfer or event stream is cut (default %(default)s)",
    )
    s.add_argument("--model", default="tiny", help="MAE config: tiny, vit_base, ..." + D)
    s.add_argument("--seed", type=int, default=0, help="initial model and client selection" + D)
    s.add_argument(
        "--strategy",
        default="fedavg",
        help="aggregation rule by name; choices: fedavg (the sample-weighted mean of the "
        "clipped updates); default %(default)s",
    )
    s.add_argument(
        "--min-clients", type=int, default=2, help="connected clients to start a round" + D
    )
    s.add_argument(
        "--fraction", type=float, default=1.0, help="share of clients asked each round" + D
    )
    s.add_argument(
        "--min-updates", type=int, default=0, help="updates to publish; 0 = min-clients" + D
    )
    s.add_argument("--rounds", type=int, default=5, help="rounds to run; 0 = until stopped" + D)
    s.add_argument(
        "--round-timeout", type=float, default=600.0, help="round deadline in seconds" + D
    )
    s.add_argument(
        "--dropout-grace",
        type=float,
        default=30.0,
        help="close a round early once every client still owing an update has been "
        "disconnected this many seconds (default %(default)s)",
    )
    s.add_argument(
        "--target-updates",
        type=int,
        default=0,
        help="over-selection: close the round once this many updates arrived (0 = all)" + D,
    )
    s.add_argument(
        "--max-uploads-in-flight",
        type=int,
        default=8,
        help="updates received at once (each holds one model-sized buffer); more wait "
        "for a slot, first come first served (default %(default)s)",
    )
    s.add_argument(
        "--transfer-wait",
        type=float,
        default=120.0,
        help="seconds an upload or download may wait for a slot before RESOURCE_EXHAUSTED "
        "(default %(default)s)",
    )
    s.add_argument(
        "--download-budget-mb",
        type=int,
        default=128,
        help="memory for downloads in flight: budget / model size downloads run at once, "
        "2 to 64; more wait their turn (default %(default)s)",
    )
    s.add_argument(
        "--max-downloads-per-client",
        type=int,
        default=2,
        help="FetchModel streams one client may run at once; more get RESOURCE_EXHAUSTED "
        "(0 = no cap) (default %(default)s)",
    )
    s.add_argument(
        "--download-idle-timeout",
        type=float,
        default=60.0,
        help="seconds a download may go without the client reading; then it is cancelled "
        "and its slot freed (0 = never) (default %(default)s)",
    )
    s.add_argument(
        "--upload-idle-timeout",
        type=float,
        default=60.0,
        help="seconds an admitted upload may go without sending a chunk; then it is refused "
        "(DEADLINE_EXCEEDED) and its slot freed (0 = never) (default %(default)s)",
    )
    s.add_argument(
        "--final-grace",
        type=float,
        default=300.0,
        help="after the last round, seconds to keep serving the final model until every "
        "client subscribed at the end has fetched it (0 = exit at once) (default %(default)s)",
    )
    s.add_argument(
        "--max-requests-per-s",
        type=float,
        default=20.0,
        help="calls per second per client, bursts of 2x; 0 = off" + D,
    )
    s.add_argument(
        "--max-update-norm",
        type=_norm_bound,
        default="auto",
        help="clip each update's delta to this L2 norm before averaging: 'auto' (from the "
        "last round's norms, see --norm-bound-factor/--norm-bound-ratio), a number, or "
        "'off' / 0 (default %(default)s)",
    )
    s.add_argument(
        "--norm-bound-factor",
        type=float,
        default=5.0,
        help="auto bound: this many times the median update norm of the last published "
        "round (default %(default)s)",
    )
    s.add_argument(
        "--norm-bound-ratio",
        type=float,
        default=0.5,
        help="auto bound of a round without history (round 1, or a resumed log without "
        "norms): this fraction of the model's own L2 norm (default %(default)s)",
    )
    s.add_argument(
        "--max-client-samples",
        type=int,
        default=10_000,
        help="an update weighs at most this many samples, whatever it claims, when "
        "--max-samples is 0 (with --max-samples set, that is the cap) (default %(default)s)",
    )
    s.add_argument("--local-epochs", type=int, default=1, help="sent to clients" + D)
    s.add_argument("--batch-size", type=int, default=64, help="sent to clients" + D)
    s.add_argument("--lr", type=float, default=1e-3, help="clients' AdamW learning rate" + D)
    s.add_argument("--weight-decay", type=float, default=0.05, help="sent to clients" + D)
    s.add_argument("--mask-ratio", type=float, default=0.75, help="MAE mask ratio" + D)
    s.add_argument("--encoding", default="fp32", choices=ENCODING_NAMES, help="update encoding" + D)
    s.add_argument(
        "--max-samples",
        type=int,
        default=0,
        help="samples per client per round; 0 = all. Also caps an update's weight "
        "(default %(default)s)",
    )
    s.add_argument(
        "--keep-checkpoints", type=int, default=0, help="versions kept; 0 = keep all" + D
    )
    s.add_argument(
        "--max-workers",
        type=int,
        default=2048,
        help="gRPC handler threads, made as needed, and calls at once on the mTLS port: one "
        "per connected client plus one per transfer; more calls get RESOURCE_EXHAUSTED "
        "(default %(default)s)",
    )
    s.set_defaults(func=cmd_serve, role="aggregator")

    c = sub.add_parser("client", help="run a client agent")
    c.add_argument("--server", required=True, help="aggregator HOST:PORT")
    c.add_argument("--identity", help="identity directory (ca.pem, client.pem, client.key)")
    c.add_argument("--insecure", action="store_true")
    c.add_argument("--client-id", help="with --insecure only")
    c.add_argument("--data", default="fashion-mnist", help="fashion-mnist, a folder or .npy/.npz")
    c.add_argument(
        "--partition",
        default="0/1",
        help="K/N: this client's shard (default 0/1); auto/N: from the enrollment order",
    )
    c.add_argument("--dirichlet", type=float, help="non-IID shards with Dirichlet(alpha)")
    c.add_argument("--data-seed", type=int, default=0)
    c.add_argument("--limit", type=int, help="use a seeded subset of this many images in all")
    c.add_argument("--val-fraction", type=float, default=0.1)
    c.add_argument("--local-epochs", type=int, help="override the server's setting")
    c.add_argument("--batch-size", type=int, help="override the server's setting")
    c.add_argument("--lr", type=float, help="override the server's setting")
    c.add_argument("--encoding", choices=ENCODING_NAMES, help="override")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    c.add_argument("--give-up-after", type=float, default=0.0, help="seconds; 0 = never")
    c.add_argument("--status-file", help="write the agent's state here (for health checks)")
    c.add_argument("--enroll-token-file", help="enroll first if --identity has no certificate")
    c.add_argument("--enroll-server", help="the aggregator's enrollment HOST:PORT")
    c.add_argument("--ca", help="the federation's CA certificate, for enrolling")
    c.add_argument("--name", help="client id to ask for when enrolling")
    c.set_defaults(func=cmd_client)

    ch = sub.add_parser("client-health", help="exit 0 if a client agent's status is fresh")
    ch.add_argument("--status-file", required=True)
    ch.add_argument("--max-age", type=float, default=120.0, help="seconds (default %(default)s)")
    ch.set_defaults(func=cmd_client_health)

    h = sub.add_parser("health", help="check an aggregator through gRPC health (exit 0 = serving)")
    h.add_argument("--server", default="127.0.0.1:50051", help="(default %(default)s)")
    h.add_argument(
        "--identity",
        help="any identity of this federation; CERTS/health has no other rights (no default)",
    )
    h.add_argument("--insecure", action="store_true")
    h.add_argument("--service", default="fedmae.v1.Federation")
    h.add_argument("--timeout", type=float, default=5.0)
    h.set_defaults(func=cmd_health)

    r = sub.add_parser("report", help="PNG plots, reconstructions and a summary of a run")
    r.add_argument("--state-dir", required=True, help="the aggregator's state directory")
    r.add_argument("--out", required=True, help="directory for the PNGs and summary.md")
    r.add_argument("--data", default="fashion-mnist", help="held-out images to reconstruct")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="a real federated cluster on this machine, over mTLS")
    d.add_argument("--clients", type=int, default=3)
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--state-dir", default="demo-state")
    d.add_argument("--dirichlet", type=float, help="non-IID shards with Dirichlet(alpha)")
    d.add_argument("--images-per-client", type=int, default=2000)
    d.add_argument("--local-epochs", type=int, default=1)
    d.add_argument("--data", default="fashion-mnist")
    d.add_argument("--encoding", default="fp32", choices=ENCODING_NAMES)
    d.add_argument("--keep-state", action="store_true", help="resume instead of starting fresh")
    d.set_defaults(func=cmd_demo, role="demo")
    return p


def _norm_bound(text: str) -> float | str:
    from aggregator_service.update_bounds import parse_norm_bound

    try:
        return parse_norm_bound(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _client_name(args: argparse.Namespace) -> str:
    if args.client_id:
        return args.client_id
    if not args.identity:
        return "?"
    from fedmae.pki.files import ClientIdentity

    try:
        return ClientIdentity(Path(args.identity)).client_id
    except (FedmaeError, ValueError, OSError):
        return Path(args.identity).name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()  # every command here moves payloads in ~1 MiB blocks (fedmae.runtime)
    role = getattr(args, "role", "")
    if args.command == "client":
        role = f"client[{_client_name(args)}]"
    setup_logging(args.log_level, role, args.log_format)
    try:
        return args.func(args)
    except (FedmaeError, ValueError, FileNotFoundError) as err:
        log.error("%s", err)  # expected failures: a message, not a traceback
        return 2
    except grpc.RpcError as err:
        log.error("%s: %s", err.code().name, err.details())
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
