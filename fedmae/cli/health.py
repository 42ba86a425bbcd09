"""``fedmae health``: ask an aggregator through the standard gRPC health service."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_health(args: argparse.Namespace) -> int:
    from fedmae.pki.files import ClientIdentity
    from fedmae.transport.health import check_health

    identity = None if args.insecure else ClientIdentity(Path(args.identity))
    answer = check_health(args.server, identity, args.service, args.timeout)
    print(f"{args.server}: {answer}")
    return 0 if answer.serving else 1


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``health`` to the ``fedmae`` parser."""
    h = sub.add_parser("health", help="check an aggregator through gRPC health (exit 0 = serving)")
    h.add_argument("--server", default="127.0.0.1:50051", help="(default %(default)s)")
    h.add_argument(
        "--identity",
        help="any identity of this federation; CERTS/health has no other rights (no default)",
    )
    h.add_argument(
        "--insecure", action="store_true", help="plaintext, for a --insecure server (default off)"
    )
    h.add_argument(
        "--service",
        default="fedmae.v1.Federation",
        help="the service to ask about; '' = the whole server (default %(default)s)",
    )
    h.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the answer (default %(default)s)",
    )
    h.set_defaults(func=cmd_health)
