"""``fedmae enroll``, ``fedmae client`` and ``fedmae client-health``: the edge side."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedmae.cli import ENCODING_NAMES

log = logging.getLogger("fedmae")


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
            progress_every_s=args.progress_every,
            seed=args.data_seed,
            status_file=Path(args.status_file) if args.status_file else None,
            min_noise_multiplier=args.dp_min_noise_multiplier,
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


def build_enroll(sub: argparse._SubParsersAction) -> None:
    """Add ``enroll`` to the ``fedmae`` parser."""
    e = sub.add_parser("enroll", help="join a federation: key + CSR + one-time token")
    e.add_argument("--server", required=True, help="the aggregator's enrollment HOST:PORT")
    e.add_argument("--ca", required=True, help="the federation's CA certificate (ca.pem)")
    e.add_argument("--token", required=True, help="one-time token from the operator; - = stdin")
    e.add_argument(
        "--name",
        help="client id to ask for (must match a token bound to a name; default: the "
        "token's name, else one the aggregator makes)",
    )
    e.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeat; default: none)")
    e.add_argument("--out", required=True, help="identity directory to write")
    e.set_defaults(func=cmd_enroll)


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``client`` and ``client-health`` to the ``fedmae`` parser."""
    D = " (default %(default)s)"
    c = sub.add_parser("client", help="run a client agent")
    c.add_argument("--server", required=True, help="aggregator HOST:PORT")
    c.add_argument(
        "--identity",
        help="identity directory (ca.pem, client.pem, client.key; default: none, needs --insecure)",
    )
    c.add_argument(
        "--insecure", action="store_true", help="plaintext, no identity (testing; default off)"
    )
    c.add_argument("--client-id", help="with --insecure only (default: from the identity)")
    c.add_argument(
        "--data", default="fashion-mnist", help="fashion-mnist, a folder or .npy/.npz" + D
    )
    c.add_argument(
        "--partition",
        default="0/1",
        help="K/N: this client's shard (default 0/1); auto/N: from the enrollment order",
    )
    c.add_argument(
        "--dirichlet", type=float, help="non-IID shards with Dirichlet(alpha) (default: IID)"
    )
    c.add_argument("--data-seed", type=int, default=0, help="shards and sampling seed" + D)
    c.add_argument(
        "--limit",
        type=int,
        help="use a seeded subset of this many images in all (default: every image)",
    )
    c.add_argument("--val-fraction", type=float, default=0.1, help="share kept for validation" + D)
    c.add_argument(
        "--local-epochs", type=int, help="override the server's setting (default: the server's)"
    )
    c.add_argument(
        "--batch-size", type=int, help="override the server's setting (default: the server's)"
    )
    c.add_argument("--lr", type=float, help="override the server's setting (default: the server's)")
    c.add_argument(
        "--encoding",
        choices=ENCODING_NAMES,
        help="override the server's update encoding (default: the server's)",
    )
    c.add_argument(
        "--threads", type=int, default=0, help="torch threads; 0 = torch's own choice" + D
    )
    c.add_argument("--give-up-after", type=float, default=0.0, help="seconds; 0 = never" + D)
    c.add_argument(
        "--dp-min-noise-multiplier", type=float, default=0.0,
        help="distributed DP: the least σ this site adds its noise share for; a secure "
        "round announcing less (or none) is aborted before training, failing the round "
        "loudly; 0 = accept the server's σ" + D,
    )  # fmt: skip
    c.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        help="seconds between training progress reports to the aggregator (it extends a "
        "round's deadline while every site it waits for progresses); 0 = none" + D,
    )
    c.add_argument(
        "--status-file", help="write the agent's state here (for health checks; default: none)"
    )
    c.add_argument(
        "--enroll-token-file",
        help="enroll first if --identity has no certificate (default: no enrollment)",
    )
    c.add_argument("--enroll-server", help="the aggregator's enrollment HOST:PORT (default: none)")
    c.add_argument("--ca", help="the federation's CA certificate, for enrolling (default: none)")
    c.add_argument("--name", help="client id to ask for when enrolling (default: the token's name)")
    c.set_defaults(func=cmd_client)

    ch = sub.add_parser("client-health", help="exit 0 if a client agent's status is fresh")
    ch.add_argument("--status-file", required=True, help="the client's --status-file")
    ch.add_argument("--max-age", type=float, default=120.0, help="seconds (default %(default)s)")
    ch.set_defaults(func=cmd_client_health)
