#!/opt/fedmae/bin/python3
"""Compose glue: one enrollment token per client replica, and one name per replica.

Installed in the image as ``fedmae-replica``; the compose file runs it twice:

``fedmae-replica issue --state-dir /state --tokens /bootstrap/tokens --clients N``
    (the one-shot ``tokens`` service). For each name ``client-1`` … ``client-N`` that is
    not in the registry yet it keeps a token file ``TOKENS/client-K.json`` (0600) holding
    a token bound to that name, single use, with a short TTL (``--ttl``, 1 h): a file
    whose token is still usable for ``--keep`` more minutes stays, any other is replaced
    (and its old token revoked). The token of a name that has enrolled, and of a name
    beyond N, is revoked and its file removed. Idempotent: run it on every ``up``.

``fedmae-replica start --slots /identities --tokens /bootstrap/tokens --clients N
--enroll-server aggregator:50052 --ca /bootstrap/ca.pem -- fedmae client ARGS``
    (every ``client`` replica). Takes the first free slot K of 1…N: an exclusive
    ``flock`` on ``SLOTS/client-K.lock``, held for the life of the process (the lock
    descriptor survives ``exec``), so no two running replicas share a name and a replica
    that dies frees its own. If ``SLOTS/client-K/`` holds no identity yet, enrolls as
    ``client-K`` with that slot's token (the private key is made here). Then execs
    ``ARGS --identity SLOTS/client-K --partition K-1/N``: the name picks the data shard.

Identities live in one named volume, so ``down`` then ``up`` (new containers) finds
them again; only ``down -v`` forgets them. The ``client`` replicas of one compose
project share that volume and the tokens: they are one trust domain (one image, one
host, one operator), each with its own name, certificate and shard.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("fedmae.replica")

NAME = "client-{}"
ACTOR = "compose:tokens"
_NAME_RE = re.compile(r"^client-([1-9][0-9]*)\.json$")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

# Exit codes of ``start`` before it execs the client (restart: on-failure retries them).
NO_SLOT = 3  # every slot 1..N is held by a running replica
NO_TOKEN = 4  # the slot has no identity and no usable token: `docker compose up` makes one
REFUSED = 5  # the enrollment port refused the token


def seconds(text: str) -> int:
    """``"90"``, ``"45s"``, ``"30m"``, ``"1h"`` -> seconds."""
    m = _DURATION.match(text)
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 30m or 1h")
    return int(m.group(1)) * _UNITS[m.group(2)]


# ---------------------------------------------------------------- issue (one-shot)


def issue(state_dir: Path, tokens: Path, clients: int, ttl_s: int, keep_s: int) -> list[str]:
    """Keep one usable token per name not yet enrolled; return the names given a new one."""
    from aggregator_service.registry import Registry
    from fedmae.private_files import private_dir, write_atomic

    private_dir(tokens)
    registry = Registry(state_dir / "fedmae.db")
    made = []
    try:
        now = time.time()
        for path in sorted(tokens.glob("client-*.json")):
            m = _NAME_RE.match(path.name)
            if m and int(m.group(1)) > clients:  # FEDMAE_CLIENTS went down
                _retire(registry, path, "beyond FEDMAE_CLIENTS")
        for k in range(1, clients + 1):
            name = NAME.format(k)
            path = tokens / f"{name}.json"
            current = _read_token_file(path)
            # The registry before the file: a replica removes nothing, and it enrolls
            # (commits) before the next run looks, so an enrolled name is never re-issued.
            if registry.find_client(name) is not None:
                if path.exists():
                    _retire(registry, path, "enrolled")
                continue
            if current is not None:
                record = _token_record(registry, current.get("token_id", ""))
                if record is not None and record.usable(now + keep_s) and record.name == name:
                    continue
            token, record = registry.create_token(ACTOR, name=name, ttl_s=ttl_s, uses=1)
            entry = {"name": name, "token_id": record.token_id, "token": token,
                     "expires": record.expires}  # fmt: skip
            write_atomic(path, json.dumps(entry).encode())
            made.append(name)
            if current is not None:
                _revoke(registry, current.get("token_id", ""))
            log.info("token %s for %s (1 use, expires in %d s)", record.token_id, name, ttl_s)
    finally:
        registry.close()
    return made


def _read_token_file(path: Path) -> dict | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("token") else None


def _token_record(registry, token_id: str):
    from fedmae.errors import NotFound

    try:
        return registry.token(token_id)
    except NotFound:
        return None


def _revoke(registry, token_id: str) -> None:
    record = _token_record(registry, token_id)
    if record is not None and record.usable(time.time()):
        registry.revoke_token(ACTOR, token_id)


def _retire(registry, path: Path, why: str) -> None:
    entry = _read_token_file(path)
    if entry is not None:
        _revoke(registry, entry.get("token_id", ""))
    path.unlink(missing_ok=True)
    log.info("removed %s (%s)", path.name, why)


# ---------------------------------------------------------------- start (each replica)


def claim_slot(slots: Path, clients: int) -> tuple[int, int]:
    """Lock the first free slot of 1..N; return (K, the lock's descriptor).

    The slot this container held last time (its hostname is recorded in the slot) is
    tried first, so a restarted replica keeps its name when it is still free.
    """
    from fedmae.private_files import private_dir

    private_dir(slots)
    me = socket.gethostname()
    order = list(range(1, clients + 1))
    mine = [k for k in order if _holder(slots, k) == me]
    for k in mine + [k for k in order if k not in mine]:
        fd = os.open(slots / f"{NAME.format(k)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, me.encode())
        return k, fd
    raise LookupError(
        f"all {clients} client slots in {slots} are taken by running replicas: to run more "
        "replicas, raise FEDMAE_CLIENTS and run `docker compose up -d` again (it issues the "
        "extra tokens)"
    )


def _holder(slots: Path, k: int) -> str:
    try:
        return (slots / f"{NAME.format(k)}.lock").read_text()
    except OSError:
        return ""


def ensure_identity(slot: Path, name: str, tokens: Path, enroll_server: str, ca: Path) -> bool:
    """Enroll ``slot`` as ``name`` unless it already holds that identity; True if it did."""
    from client_agent.enrollment import enroll
    from fedmae.errors import ConfigError
    from fedmae.pki.files import ClientIdentity
    from fedmae.private_files import private_dir

    if (slot / "client.pem").exists() and (slot / "client.key").exists():
        have = ClientIdentity(slot).client_id
        if have != name:
            raise ConfigError(f"{slot} holds the identity of {have!r}, not {name!r}")
        return False
    entry = _read_token_file(tokens / f"{name}.json")
    if entry is None or entry.get("name") != name or entry.get("expires", 0) <= time.time():
        raise FileNotFoundError(
            f"no usable enrollment token for {name} in {tokens}: run `docker compose up -d` "
            "(the tokens service issues one per replica, valid for FEDMAE_TOKEN_TTL)"
        )
    private_dir(slot)
    result = enroll(enroll_server, ca.read_bytes(), entry["token"], slot, name=name)
    log.info("enrolled as %s (token %s)", result.client_id, entry.get("token_id"))
    return True


def start(args: argparse.Namespace) -> int:
    import grpc

    from fedmae.errors import FedmaeError

    slots, tokens = Path(args.slots), Path(args.tokens)
    try:
        k, fd = claim_slot(slots, args.clients)
    except LookupError as err:
        log.error("%s", err)
        return NO_SLOT
    name = NAME.format(k)
    slot = slots / name
    log.info("this replica is %s (slot %d of %d)", name, k, args.clients)
    try:
        ensure_identity(slot, name, tokens, args.enroll_server, Path(args.ca))
    except FileNotFoundError as err:
        log.error("%s", err)
        return NO_TOKEN
    except grpc.RpcError as err:
        log.error("enrolling %s: %s: %s", name, err.code().name, err.details())
        return REFUSED if err.code() != grpc.StatusCode.UNAVAILABLE else 1
    except FedmaeError as err:  # e.g. the slot holds another name's identity
        log.error("%s", err)
        return REFUSED
    command = [*args.command, f"--identity={slot}", f"--partition={k - 1}/{args.clients}"]
    os.set_inheritable(fd, True)  # the slot stays ours for as long as the client runs
    sys.stdout.flush()
    os.execvp(command[0], command)
    return 1  # not reached


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmae-replica", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    i = sub.add_parser("issue", help="one token per client name not yet enrolled (one-shot)")
    i.add_argument("--state-dir", required=True, help="the aggregator's state directory")
    i.add_argument("--tokens", required=True, help="directory for client-K.json token files")
    i.add_argument("--clients", type=int, required=True, help="names client-1 .. client-N")
    i.add_argument(
        "--ttl", type=seconds, default=3600, help="token life, e.g. 30m, 1h (default %(default)s s)"
    )
    i.add_argument(
        "--keep",
        type=seconds,
        default=300,
        help="keep a token file still usable this long, e.g. 5m (default %(default)s s)",
    )
    s = sub.add_parser("start", help="take a free name, enroll once, exec the client")
    s.add_argument("--slots", required=True, help="the shared identities directory")
    s.add_argument("--tokens", required=True, help="where `issue` wrote the token files")
    s.add_argument("--clients", type=int, required=True, help="slots client-1 .. client-N")
    s.add_argument("--enroll-server", required=True, help="the enrollment HOST:PORT")
    s.add_argument("--ca", required=True, help="the federation's CA certificate")
    s.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="after --: the client command; gets --identity and --partition appended",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from fedmae.log_format import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging("INFO", f"replica-{args.step}", os.environ.get("FEDMAE_LOG_FORMAT", "text"))
    if args.clients < (0 if args.step == "issue" else 1):  # 0 replicas: edge clients only
        log.error("--clients must be at least %d", 0 if args.step == "issue" else 1)
        return 2
    if args.step == "issue":
        made = issue(Path(args.state_dir), Path(args.tokens), args.clients, args.ttl, args.keep)
        log.info("%d new token(s); %d name(s) in all", len(made), args.clients)
        return 0
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        log.error("start needs the client command after --")
        return 2
    return start(args)


if __name__ == "__main__":
    sys.exit(main())
