"""Which admin certificates the aggregator trusts: those pinned in the registry.

At start the server pins the public certificates in ``CERTS/admins/*.pem`` (written by
``fedmae certs init`` and ``fedmae certs issue-admin``) that it does not know yet; a
certificate once revoked stays revoked, whatever the directory holds. Later admins are
pinned online by an admin (``fedmae admins add --cert``).
"""

from __future__ import annotations

import logging
import time

from aggregator_service.registry import Registry
from aggregator_service.registry.records import AdminRecord
from fedmae.errors import InvalidRequest
from fedmae.pki.files import ServerCerts
from fedmae.pki.peer import admin_certificate

log = logging.getLogger(__name__)

STARTUP_ACTOR = "server:startup"


def pin_admin(registry: Registry, actor: str, pem: bytes, root_pem: bytes) -> AdminRecord:
    """Check ``pem`` (an admin certificate of this federation's root CA) and pin it."""
    peer = admin_certificate(pem, root_pem, time.time())
    record = registry.pin_admin(actor, peer.common_name, peer.fingerprint, peer.serial,
                                peer.not_after)  # fmt: skip
    assert record is not None
    return record


def pin_from_certs_dir(registry: Registry, certs: ServerCerts) -> list[str]:
    """Pin the admin certificates found in ``CERTS/admins`` (and, for a directory made
    before it existed, ``CERTS/admin/client.pem``); return the names newly pinned."""
    files = sorted(certs.admins_dir.glob("*.pem")) if certs.admins_dir.is_dir() else []
    legacy = certs.dir / "admin" / "client.pem"
    if not files and legacy.exists():
        files = [legacy]
    root_pem = certs.root_pem()
    pinned: list[str] = []
    for path in files:
        try:
            peer = admin_certificate(path.read_bytes(), root_pem, time.time())
        except (InvalidRequest, OSError) as err:
            log.warning("not pinning %s: %s", path, err)
            continue
        known = registry.find_admin(peer.fingerprint)
        if known is not None:
            if known.status == "revoked":
                log.info("%s is a revoked admin certificate: not pinned again", path)
            continue
        registry.pin_admin(STARTUP_ACTOR, peer.common_name, peer.fingerprint, peer.serial,
                           peer.not_after, if_new=True)  # fmt: skip
        pinned.append(peer.common_name)
        log.info("pinned admin %r from %s", peer.common_name, path)
    if not any(a.status == "active" for a in registry.admins()):
        log.warning(
            "no admin is pinned: the Admin service refuses every caller until an admin "
            "certificate is in %s at start ('fedmae certs init' or 'fedmae certs issue-admin')",
            certs.admins_dir,
        )
    return pinned
