"""Operator commands (``fedmae token|clients|admins|audit``) over the Admin service."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from fedmae.admin_view import ClientInfo
from fedmae.cli import add_env_argument
from fedmae.enrollment_policy import printable
from fedmae.errors import ConfigError
from fedmae.pki.files import ClientIdentity, validate_client_id
from fedmae.transport.admin_client import AdminClient

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``"90"``, ``"45s"``, ``"30m"``, ``"1h"``, ``"7d"`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r}: use e.g. 45s, 30m, 1h or 7d")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def add_connection_args(p: argparse.ArgumentParser) -> None:
    add_env_argument(p, "--server", "FEDMAE_SERVER", "aggregator HOST:PORT", "127.0.0.1:50051")
    add_env_argument(
        p, "--identity", "FEDMAE_ADMIN_IDENTITY", "the admin identity directory, CERTS/admin"
    )


def admin_client(args: argparse.Namespace) -> AdminClient:
    """The Admin service of ``--server``, as the operator of ``--identity``."""
    if not args.identity:
        raise ConfigError(
            "admin commands need the operator identity: --identity CERTS/admin "
            "(or set FEDMAE_ADMIN_IDENTITY)"
        )
    return AdminClient(args.server, ClientIdentity(Path(args.identity)))


def _when(seconds: int | None) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


def _labels(c: ClientInfo) -> str:
    """``k=v,k=v`` with anything a terminal would interpret escaped."""
    text = ",".join(f"{printable(k)}={printable(v)}" for k, v in sorted(c.labels.items()))
    if c.labels_omitted:
        text += f" (+{c.labels_omitted} more not shown)"
    return text


def _create_token_offline(args: argparse.Namespace) -> int:
    """Write a token straight into a state directory (no server running yet)."""
    from aggregator_service.registry import Registry

    if args.name:
        validate_client_id(args.name)
    registry = Registry(Path(args.state_dir) / "fedmae.db")
    try:
        token, record = registry.create_token(
            "operator:offline", name=args.name, ttl_s=parse_duration(args.ttl), uses=args.uses
        )
    finally:
        registry.close()
    print(token, flush=True)
    print(
        f"token {record.token_id}: {record.uses} use(s), expires "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.expires))}",
        file=sys.stderr,
    )
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    if args.token_command == "create" and args.state_dir:
        return _create_token_offline(args)
    with admin_client(args) as admin:
        if args.token_command == "create":
            issued = admin.create_token(args.name or "", parse_duration(args.ttl), args.uses)
            info = issued.info
            bound = f" for client {info.name!r}" if info.name else ""
            print(issued.token, flush=True)  # alone on stdout: TOKEN=$(fedmae token create)
            print(
                f"token {info.token_id}{bound}: {info.uses} use(s), "
                f"expires {_when(info.expires)}. Shown once; only its hash is stored.",
                file=sys.stderr,
            )
        elif args.token_command == "list":
            rows = [
                [t.token_id, t.name or "-", f"{t.used}/{t.uses}", _when(t.expires), t.state(),
                 t.created_by]
                for t in admin.list_tokens(include_inactive=args.all)
            ]  # fmt: skip
            print(_table(rows, ["TOKEN", "NAME", "USED", "EXPIRES", "STATE", "CREATED BY"]))
        else:
            print(f"token {admin.revoke_token(args.token_id).token_id} revoked")
    return 0


def cmd_clients(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        if args.clients_command == "list":
            rows = [
                [c.client_id, c.status, "yes" if c.connected else "no", str(c.rounds_joined),
                 _when(c.last_seen), _when(c.not_after), _labels(c)]
                for c in admin.list_clients()
            ]  # fmt: skip
            print(
                _table(rows, ["CLIENT", "STATUS", "CONNECTED", "ROUNDS", "LAST SEEN", "CERT UNTIL",
                              "LABELS"])
            )  # fmt: skip
        elif args.clients_command == "show":
            c = admin.get_client(args.client_id)
            for key, value in [
                ("client", c.client_id), ("status", c.status), ("connected", c.connected),
                ("rounds joined", c.rounds_joined), ("enrolled", _when(c.created)),
                ("last seen", _when(c.last_seen)), ("certificate serial", c.serial),
                ("certificate sha256", c.fingerprint_sha256), ("valid until", _when(c.not_after)),
                ("revoked at", _when(c.revoked_at)), ("labels", _labels(c) or "-"),
            ]:  # fmt: skip
                print(f"{key:>20}: {value}")
        else:
            c = admin.revoke_client(args.client_id, args.reason or "")
            print(f"client {c.client_id} revoked: its next call is refused, it is disconnected now")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        entries = admin.audit(args.limit)
    if args.json:
        for e in entries:
            print(json.dumps({"time": _when(e.time), "actor": e.actor, "action": e.action,
                              "target": e.target, "details": json.loads(e.details)}))  # fmt: skip
    else:
        rows = [
            [_when(e.time), printable(e.actor), e.action, printable(e.target), printable(e.details)]
            for e in entries
        ]
        print(_table(rows, ["TIME", "ACTOR", "ACTION", "TARGET", "DETAILS"]))
    return 0


def cmd_admins(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        if args.admins_command == "list":
            rows = [
                [a.name + (" (you)" if a.is_caller else ""), a.status, a.serial,
                 a.fingerprint_sha256[:16], _when(a.created), _when(a.not_after), a.added_by,
                 a.revoke_reason or "-"]
                for a in admin.list_admins()
            ]  # fmt: skip
            print(_table(rows, ["ADMIN", "STATUS", "SERIAL", "SHA256", "PINNED", "CERT UNTIL",
                                "ADDED BY", "REVOKED FOR"]))  # fmt: skip
        elif args.admins_command == "add":
            a = admin.add_admin(Path(args.cert).read_bytes())
            print(f"admin {a.name!r} pinned (serial {a.serial}, valid until {_when(a.not_after)})")
        else:
            revoked = admin.revoke_admin(args.name, args.reason or "")
            serials = ", ".join(a.serial for a in revoked)
            print(f"admin {args.name!r} revoked (serial {serials}): refused from its next call on")
    return 0


def _family(
    sub: argparse._SubParsersAction, name: str, help: str, dest: str
) -> argparse._SubParsersAction:
    """``fedmae NAME SUBCOMMAND``: the subcommands' parsers, the one chosen in ``dest``."""
    return sub.add_parser(name, help=help).add_subparsers(dest=dest, required=True)


def _connect(family: argparse._SubParsersAction, func) -> None:
    """Every subcommand of ``family`` talks to the Admin service through ``func``: the
    connection flags, after its own (as ``--help`` lists them)."""
    for p in family.choices.values():
        add_connection_args(p)
        p.set_defaults(func=func)


def build(sub: argparse._SubParsersAction) -> None:
    """Add ``token``, ``clients``, ``admins`` and ``audit`` to the ``fedmae`` parser."""
    tsub = _family(sub, "token", "enrollment tokens (admin)", "token_command")
    tc = tsub.add_parser("create", help="make a one-time enrollment token (printed once)")
    tc.add_argument(
        "--name", help="bind the token to this client id (default: any name the client asks for)"
    )
    tc.add_argument("--ttl", default="1h", help="validity, e.g. 30m, 1h, 7d (default 1h)")
    tc.add_argument("--uses", type=int, default=1, help="enrollments allowed (default 1)")
    tc.add_argument(
        "--state-dir",
        help="write into this aggregator state dir directly (server not running; default: "
        "through the running server)",
    )
    tl = tsub.add_parser("list", help="tokens that can still be used")
    tl.add_argument(
        "--all", action="store_true", help="also expired, used-up and revoked (default off)"
    )
    tr = tsub.add_parser("revoke", help="revoke a token by its id")
    tr.add_argument("token_id")
    _connect(tsub, cmd_token)

    csub = _family(sub, "clients", "enrolled clients (admin)", "clients_command")
    csub.add_parser("list", help="every registered client")
    cs = csub.add_parser("show", help="one client in detail")
    cs.add_argument("client_id")
    cr = csub.add_parser("revoke", help="revoke a client: refused from its next call on")
    cr.add_argument("client_id")
    cr.add_argument(
        "--reason", help="recorded in the audit log and shown to the client (default: none)"
    )
    _connect(csub, cmd_clients)

    adsub = _family(sub, "admins", "pinned admin certificates (admin)", "admins_command")
    adsub.add_parser("list", help="every pinned admin certificate, active and revoked")
    aa = adsub.add_parser("add", help="pin another admin's certificate")
    aa.add_argument(
        "--cert",
        required=True,
        help="its client.pem (from 'fedmae certs issue-admin'; the public part only)",
    )
    ar = adsub.add_parser("revoke", help="revoke an admin: refused from its next call on")
    ar.add_argument("name", help="the admin's name (certificate CN)")
    ar.add_argument("--reason", help="recorded in the audit log (default: none)")
    _connect(adsub, cmd_admins)

    a = sub.add_parser("audit", help="the audit log (admin)")
    a.add_argument(
        "--limit", type=int, default=100, help="newest entries to show (default %(default)s)"
    )
    a.add_argument("--json", action="store_true", help="one JSON object per line (default off)")
    add_connection_args(a)
    a.set_defaults(func=cmd_audit)
