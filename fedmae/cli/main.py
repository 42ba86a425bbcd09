"""The ``fedmae`` command: the parser, assembled from one module per command family.

certs (``certs``), enroll / client / client-health (``client``), serve (``serve``),
health (``health``), token / clients / admins / audit (``admin``), watch / status
(``watch``), demo (``demo``), simulate (``simulate``), train-central (``central``), probe
(``probe``), export (``export``) and report (here: ``fedmae.cli.report`` loads torch and
matplotlib, which the parser must not).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fedmae.cli import (
    add_env_argument,
    admin,
    central,
    certs,
    client,
    demo,
    export,
    health,
    probe,
    serve,
    simulate,
    watch,
)
from fedmae.errors import FedmaeError
from fedmae.log_format import setup_logging
from fedmae.runtime import tune_malloc
from fedmae.transport.status import domain_errors

log = logging.getLogger("fedmae")


def cmd_report(args: argparse.Namespace) -> int:
    from fedmae.cli.report import write_report

    probe_cfg = None
    if args.probe:
        from fedmae.cli.probe import probe_config

        probe_cfg = probe_config(args, prefix="probe-")
    report = write_report(Path(args.state_dir), Path(args.out), data=args.data, probe=probe_cfg,
                          probe_data=args.probe_data)  # fmt: skip
    print(f"report: {report.summary} ({len(report.images)} images)")
    if report.probe is not None:
        print(f"linear probe: test accuracy {report.probe.test_accuracy:.4f}")
    return 0


def _build_report(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="PNG plots, reconstructions and a summary of a run")
    r.add_argument("--state-dir", required=True, help="the aggregator's state directory")
    r.add_argument("--out", required=True, help="directory for the PNGs and summary.md")
    r.add_argument(
        "--data",
        default="fashion-mnist",
        help="held-out images to reconstruct (default %(default)s)",
    )
    r.add_argument(
        "--probe",
        action="store_true",
        help="add the latest checkpoint's linear-probe accuracy (~1.5 min; default off)",
    )
    probe.add_probe_options(r, prefix="probe-")
    r.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``fedmae`` parser. Imports no torch: ``--help`` and the admin commands
    start in half a second (tests/unit/test_compose_static.py checks)."""
    p = argparse.ArgumentParser(
        prog="fedmae",
        description="Federated Masked Autoencoder training over gRPC with mutual TLS.",
    )
    add_env_argument(
        p, "--log-level", "FEDMAE_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", default="INFO"
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("FEDMAE_LOG_FORMAT", "text"),
        help="text for people (default), json for machines (env FEDMAE_LOG_FORMAT)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    certs.build(sub)
    client.build_enroll(sub)
    admin.build(sub)
    watch.build(sub)
    serve.build(sub)
    client.build(sub)
    health.build(sub)
    _build_report(sub)
    demo.build(sub)
    simulate.build(sub)
    central.build(sub)
    probe.build(sub)
    export.build(sub)
    return p


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
    """Run one ``fedmae`` command; the exit code: 0 ok, 2 an expected failure (logged
    as one line, no traceback), 130 interrupted, else the command's own."""
    args = build_parser().parse_args(argv)
    tune_malloc()  # every command here moves payloads in ~1 MiB blocks (fedmae.runtime)
    role = getattr(args, "role", "")
    if args.command == "client":
        role = f"client[{_client_name(args)}]"
    setup_logging(args.log_level, role, args.log_format)
    try:
        with domain_errors():  # a refused call: "CODE: details", like any expected failure
            return args.func(args)
    except (FedmaeError, ValueError, FileNotFoundError) as err:
        log.error("%s", err)  # expected failures: a message, not a traceback
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
