"""``fedmae enroll`` on the edge device: make a key here, send a CSR with the token,
save the identity. The private key never leaves this machine."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedmae.enrollment_policy import check_client_name, check_labels
from fedmae.errors import ConfigError
from fedmae.pki.ca import make_key_and_csr
from fedmae.pki.files import ClientIdentity, save_identity
from fedmae.transport._proto import enrollment_pb2 as epb
from fedmae.transport._proto import enrollment_pb2_grpc as epb_grpc
from fedmae.transport.channels import open_channel
from fedmae.transport.retry import RetryPolicy

log = logging.getLogger(__name__)


ENROLLMENT_FILE = "enrollment.json"
# The port is busy (its calls at once) or we are over its rate per address (e.g. a
# script enrolling many devices): wait and try again. Any other answer is final.
BUSY_ENROLL_RETRY = RetryPolicy(
    retry_on=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}),
    initial_s=0.5,
    max_s=8.0,
    max_fault_retries=0,
)


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
    timeout: float = 30.0,
    busy_retries: int = 5,
) -> EnrollResult:
    """Enroll with the aggregator's enrollment port; write ``out_dir`` (ca, cert, key).

    The name and labels are checked here first (the server checks them again), so a bad
    one is reported before a key is made or the token is sent.
    """
    if name:
        check_client_name(name)
    labels = check_labels(labels or {})
    key_pem, csr_pem = make_key_and_csr(name)
    request = epb.EnrollRequest(
        token=token.strip(), csr_pem=csr_pem, requested_name=name, labels=labels or {}
    )
    with open_channel(server, ca_pem=ca_pem) as channel:
        stub = epb_grpc.EnrollmentStub(channel)
        retries = dataclasses.replace(BUSY_ENROLL_RETRY, max_retries=busy_retries).start()
        response = retries.call(
            lambda: stub.Enroll(request, timeout=timeout),
            "enrollment port busy",
            # A request over the size limit is not worth sending again.
            give_up_if=lambda err: "larger than max" in (err.details() or ""),
            logger=log,
        )
    if response.ca_certificate_pem.strip() != ca_pem.strip():
        raise ConfigError("the server answered with a different CA than the one you trust")
    ident = save_identity(out_dir, key_pem, response.certificate_pem, ca_pem)
    if ident.client_id != response.client_id:
        raise ConfigError("the issued certificate does not name the assigned client id")
    not_after = response.not_after.ToDatetime().strftime("%Y-%m-%d")
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
