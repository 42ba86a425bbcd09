"""``fedmae enroll`` on the edge device: make a key here, send a CSR with the token,
save the identity. The private key never leaves this machine."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmae.enrollment_policy import check_client_name, check_labels
from fedmae.errors import ConfigError
from fedmae.pki.ca import make_key_and_csr
from fedmae.pki.files import ClientIdentity, save_identity
from fedmae.transport.enrollment_client import request_certificate

log = logging.getLogger(__name__)


ENROLLMENT_FILE = "enrollment.json"


@dataclass(frozen=True)
class EnrollResult:
    client_id: str
    identity: ClientIdentity
    not_after: str
    renewed: bool
    token_use: int


def enrollment_ordinal(identity_dir: Path) -> int:
    """Which use of its token enrolled this identity (0, 1, ...), for ``--partition auto``."""
    path = identity_dir / ENROLLMENT_FILE
    try:
        return int(json.loads(path.read_text())["token_use"])
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"{path} is missing or unreadable ({err}); '--partition auto' needs an identity "
            "made by 'fedmae enroll'"
        ) from None


def enroll(
    server: str,
    ca_pem: bytes,
    token: str,
    out_dir: Path,
    name: str = "",
    labels: dict[str, str] | None = None,
    **request_options: Any,
) -> EnrollResult:
    """Enroll with the aggregator's enrollment port; write ``out_dir`` (ca, cert, key).

    The name and labels are checked here first (the server checks them again), so a bad
    one is reported before a key is made or the token is sent. A refusal is raised as a
    ``fedmae.errors`` type (``Unauthenticated`` for a used-up token, ...).
    ``request_options`` (``timeout``, ``busy_retries``) go to ``request_certificate``.
    """
    if name:
        check_client_name(name)
    labels = check_labels(labels or {})
    key_pem, csr_pem = make_key_and_csr(name)
    response = request_certificate(
        server, ca_pem, token=token.strip(), csr_pem=csr_pem, name=name, labels=labels,
        logger=log, **request_options,
    )  # fmt: skip
    if response.ca_certificate_pem.strip() != ca_pem.strip():
        raise ConfigError("the server answered with a different CA than the one you trust")
    ident = save_identity(out_dir, key_pem, response.certificate_pem, ca_pem)
    if ident.client_id != response.client_id:
        raise ConfigError("the issued certificate does not name the assigned client id")
    not_after = response.not_after.strftime("%Y-%m-%d")
    (ident.dir / ENROLLMENT_FILE).write_text(
        json.dumps(
            {
                "client_id": response.client_id,
                "server": server,
                "token_use": response.token_use,
                "not_after": not_after,
                "renewed": response.renewed,
            },
            indent=1,
        )  # fmt: skip
    )
    return EnrollResult(
        client_id=response.client_id,
        identity=ident,
        not_after=not_after,
        renewed=response.renewed,
        token_use=response.token_use,
    )
