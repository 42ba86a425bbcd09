"""The Enrollment servicer: a one-time token and a CSR in, a certificate out."""

from __future__ import annotations

import logging
import re
import secrets

from google.protobuf.timestamp_pb2 import Timestamp

from aggregator_service.registry import Registry
from fedmae._proto import enrollment_pb2 as epb
from fedmae._proto import enrollment_pb2_grpc as epb_grpc
from fedmae.errors import FedmaeError, InvalidRequest, abort
from fedmae.tls import CertificateAuthority, validate_client_id

log = logging.getLogger(__name__)

_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class EnrollmentServicer(epb_grpc.EnrollmentServicer):
    def __init__(self, registry: Registry, ca: CertificateAuthority, cert_days: int = 365):
        self.registry = registry
        self.ca = ca
        self.cert_days = cert_days

    def Enroll(self, request: epb.EnrollRequest, context) -> epb.EnrollResponse:
        try:
            return self._enroll(request, context.peer())
        except FedmaeError as err:
            log.warning("enrollment from %s refused: %s", context.peer(), err)
            abort(context, err)

    def _enroll(self, request: epb.EnrollRequest, peer: str) -> epb.EnrollResponse:
        if not request.token:
            raise InvalidRequest("an enrollment token is required (fedmae enroll --token ...)")
        if request.requested_name:
            validate_client_id(request.requested_name)
        labels = dict(request.labels)
        for key, value in labels.items():
            if not _LABEL_KEY.match(key) or len(value) > 256:
                raise InvalidRequest(f"invalid label {key!r}: lowercase key, value <= 256 chars")
        record, issued, renewed, use = self.registry.enroll(
            token=request.token,
            requested_name=request.requested_name,
            make_id=lambda: f"client-{secrets.token_hex(3)}",
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
