"""``fedmae certs init|issue-client|issue-admin``: the CAs and the identities they sign."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``certs`` and its three subcommands to the ``fedmae`` parser."""
    certs = sub.add_parser("certs", help="make the CA, server and client certificates")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    ci = csub.add_parser(
        "init", help="create the CAs, the server, admin and health identities (idempotent)"
    )
    ci.add_argument("--out", required=True, help="certificates directory (made 0700)")
    ci.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra server name/IP (repeat; default: only the built-in names)",
    )
    ci.add_argument(
        "--force", action="store_true", help="make a new CA (invalidates clients; default off)"
    )
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
    cc.add_argument(
        "--state-dir",
        help="register the client in this aggregator state dir (default: not registered)",
    )
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
