"""The Enrollment servicer: a one-time token and a CSR in, a certificate out.

Refusals are audited here and answered by ``fedmae.transport.status.StatusInterceptor``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from google.protobuf.timestamp_pb2 import Timestamp

from aggregator_service.registry import Registry
from fedmae.enrollment_policy import check_client_name, check_labels, new_generated_id
from fedmae.errors import FedmaeError, InvalidRequest
from fedmae.pki.ca import CertificateAuthority
from fedmae.transport._proto import enrollment_pb2 as epb
from fedmae.transport._proto import enrollment_pb2_grpc as epb_grpc
from fedmae.transport.status import status_code

log = logging.getLogger(__name__)


class EnrollmentServicer(epb_grpc.EnrollmentServicer):
    def __init__(self, registry: Registry, ca: CertificateAuthority, cert_days: int = 365):
        self.registry = registry
        self.ca = ca
        self.cert_days = cert_days

    def Enroll(self, request: epb.EnrollRequest, context) -> epb.EnrollResponse:
        with self._refusal_audited(request, context.peer()):
            return self._enroll(request, context.peer())

    @contextlib.contextmanager
    def _refusal_audited(self, request: epb.EnrollRequest, peer: str) -> Iterator[None]:
        """Log and audit a refused enrollment; the error goes on to be answered."""
        try:
            yield
        except FedmaeError as err:
            # str(err), not err: a record that keeps the exception keeps its traceback,
            # whose frames hold this call, and gRPC frees the call's HTTP/2 stream (one of
            # ENROLL_STREAMS_PER_CONNECTION) only when that is collected.
            log.warning("enrollment from %s refused: %s", peer, str(err))
            token_id = self.registry.token_id_of(request.token) if request.token else None
            self.registry.audit_refusal(
                f"token:{token_id}" if token_id else "anonymous", "enroll.refused",
                request.requested_name, peer, err, status_code(err).name, token_id=token_id,
            )  # fmt: skip
            raise

    def _enroll(self, request: epb.EnrollRequest, peer: str) -> epb.EnrollResponse:
        if not request.token:
            raise InvalidRequest("an enrollment token is required (fedmae enroll --token ...)")
        if request.requested_name:
            check_client_name(request.requested_name)
        labels = check_labels(dict(request.labels))
        record, issued, renewed, use = self.registry.enroll(
            token=request.token,
            requested_name=request.requested_name,
            make_id=new_generated_id,
            issue=lambda cid: self._issue(cid, bytes(request.csr_pem)),
            labels=labels,
            peer=peer,
        )
        not_after = Timestamp()
        not_after.FromSeconds(int(issued.not_after))
        return epb.EnrollResponse(
            client_id=record.client_id,
            certificate_pem=issued.pem,
            ca_certificate_pem=self.ca.cert_pem,  # the certificate only, never the key
            not_after=not_after,
            renewed=renewed,
            token_use=use,
        )

    def _issue(self, client_id: str, csr_pem: bytes):
        issued = self.ca.sign_csr(csr_pem, client_id, self.cert_days)
        return issued, issued.fingerprint, issued.serial, issued.not_after
