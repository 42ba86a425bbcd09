"""gRPC TLS credentials from fedmae's certificate files, and the verified peer of a
call: the one place that builds TLS credentials (``fedmae.pki`` has no gRPC)."""

from __future__ import annotations

import grpc

from fedmae.errors import ConfigError
from fedmae.pki.files import ClientIdentity, ServerCerts, read_file
from fedmae.pki.peer import PeerCertificate, peer_from_pem


def server_credentials(
    certs: ServerCerts, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """TLS for the aggregator; with ``require_client_auth`` only CA-signed clients connect."""
    return grpc.ssl_server_credentials(
        [(read_file(certs.server_key), read_file(certs.server_cert))],
        root_certificates=read_file(certs.ca_cert),
        require_client_auth=require_client_auth,
    )


def channel_credentials(identity: ClientIdentity) -> grpc.ChannelCredentials:
    """TLS for a client: trusts only the federation's CA, presents the client cert."""
    if not identity.ca_cert.exists():
        raise ConfigError(
            f"no ca.pem in identity directory {identity.dir}: create it with "
            "'fedmae certs issue-client' (or 'fedmae enroll')"
        )
    if identity.cert.exists() and identity.key.exists():
        return grpc.ssl_channel_credentials(
            root_certificates=read_file(identity.ca_cert),
            private_key=read_file(identity.key),
            certificate_chain=read_file(identity.cert),
        )
    return grpc.ssl_channel_credentials(root_certificates=read_file(identity.ca_cert))


def trust_credentials(ca_pem: bytes) -> grpc.ChannelCredentials:
    """TLS that trusts the CA in ``ca_pem`` and presents no certificate: a device that
    has none yet, enrolling."""
    return grpc.ssl_channel_credentials(root_certificates=ca_pem)


def peer_certificate(context: grpc.ServicerContext) -> PeerCertificate | None:
    """The verified peer certificate of a call (chain checked by TLS), or None on a
    connection without one."""
    values = context.auth_context().get("x509_pem_cert")
    if not values:
        return None
    return peer_from_pem(bytes(values[0]))
