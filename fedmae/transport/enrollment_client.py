"""The Enrollment service for a device: send a CSR with a token over TLS (trusting
the federation's CA, no client certificate yet), get a certificate back.

A refusal is raised as the domain error of its status code
(``fedmae.transport.status.domain_error``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime

import grpc

from fedmae.transport._proto import enrollment_pb2 as epb
from fedmae.transport._proto import enrollment_pb2_grpc as epb_grpc
from fedmae.transport.channels import open_channel
from fedmae.transport.retry import RetryPolicy
from fedmae.transport.status import domain_error

log = logging.getLogger(__name__)

# The port is busy (its calls at once) or we are over its rate per address (e.g. a
# script enrolling many devices): wait and try again. Any other answer is final.
BUSY_ENROLL_RETRY = RetryPolicy(
    retry_on=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}),
    initial_s=0.5,
    max_s=8.0,
    max_fault_retries=0,
)


@dataclass(frozen=True)
class Enrollment:
    """The enrollment port's answer."""

    client_id: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    not_after: datetime  # of the certificate (UTC)
    renewed: bool  # the name was enrolled before: this certificate replaces its old one
    token_use: int  # which use of its token this was (0, 1, ...)


def request_certificate(
    server: str,
    ca_pem: bytes,
    *,
    token: str,
    csr_pem: bytes,
    name: str = "",
    labels: dict[str, str] | None = None,
    timeout: float = 30.0,
    busy_retries: int = 5,
    logger: logging.Logger = log,
) -> Enrollment:
    """Enroll at ``server`` (its enrollment port), trusting ``ca_pem``; tries again
    while the port is busy (each wait logged to ``logger``, the caller's)."""
    request = epb.EnrollRequest(
        token=token, csr_pem=csr_pem, requested_name=name, labels=labels or {}
    )
    with open_channel(server, ca_pem=ca_pem) as channel:
        stub = epb_grpc.EnrollmentStub(channel)
        retries = dataclasses.replace(BUSY_ENROLL_RETRY, max_retries=busy_retries).start()
        try:
            response = retries.call(
                lambda: stub.Enroll(request, timeout=timeout),
                "enrollment port busy",
                # A request over the size limit is not worth sending again.
                give_up_if=lambda err: "larger than max" in (err.details() or ""),
                logger=logger,
            )
        except grpc.RpcError as err:
            raise domain_error(err) from err
    return Enrollment(
        client_id=response.client_id,
        certificate_pem=response.certificate_pem,
        ca_certificate_pem=response.ca_certificate_pem,
        not_after=response.not_after.ToDatetime(),
        renewed=response.renewed,
        token_use=response.token_use,
    )
