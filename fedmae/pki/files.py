"""Certificate files: where each one lives, reading and writing them safely.

Layout of a certificates directory (``fedmae certs init --out CERTS``), mode 0700::

    ca.pem                      the federation's root CA (EC P-256, 5 years): what clients trust
    ca.key                      its key, 0600; with ``--signer DIR`` it lives in DIR/ca.key instead
                                and never in CERTS (the aggregator does not need it)
    enrollment-ca.pem/.key      the enrollment CA (2 years), signed by the root: signs the
                                certificates of enrolled clients; clientAuth only and no sub-CAs,
                                so its key cannot make a server certificate a client accepts
    server.pem  server.key      the aggregator (1 year); SANs: localhost, 127.0.0.1, ::1,
                                aggregator, --host
    admins/NAME.pem             public certificates of the admins the server pins at start
    admin/                      the operator's identity (OU=admin); ``--admin-out DIR`` puts it
                                elsewhere (keep its key away from the aggregator)
    health/                     a health-check identity (OU=health): no rights but gRPC health

Layout of a client identity directory (``fedmae certs issue-client``, later ``fedmae
enroll``), mode 0700::

    ca.pem  client.pem  client.key   CN of client.pem = the client id; client.pem holds the
                                     certificate, then the enrollment CA that signed it
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedmae.errors import ConfigError
from fedmae.private_files import PRIVATE_FILE, PUBLIC_FILE, private_dir, write_atomic

CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

ADMIN_ROLE = "admin"
HEALTH_ROLE = "health"  # may call grpc.health.v1.Health only (needs no app-level auth)


@dataclass(frozen=True)
class ServerCerts:
    """The paths in a certificates directory (the layout above)."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def enrollment_ca_cert(self) -> Path:
        return self.dir / "enrollment-ca.pem"

    @property
    def enrollment_ca_key(self) -> Path:
        return self.dir / "enrollment-ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    def root_pem(self) -> bytes:
        return read_file(self.ca_cert)

    @property
    def admins_dir(self) -> Path:
        """Public certificates of admins to pin (``NAME.pem``)."""
        return self.dir / "admins"

    @property
    def health_dir(self) -> Path:
        return self.dir / "health"


@dataclass(frozen=True)
class ClientIdentity:
    """The paths in an identity directory (a client's, the admin's or health's)."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def key(self) -> Path:
        return self.dir / "client.key"

    @property
    def client_id(self) -> str:
        cert = x509.load_pem_x509_certificate(read_file(self.cert))
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def validate_client_id(name: str) -> str:
    """``name`` if it is a valid client id (``CLIENT_ID_RE``), else ``ConfigError``."""
    if not CLIENT_ID_RE.match(name):
        raise ConfigError(
            f"invalid client id {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def write_file(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` atomically in a 0700 directory: 0600 if ``private``, else 0644."""
    private_dir(path.parent)
    write_atomic(path, data, PRIVATE_FILE if private else PUBLIC_FILE)


def read_file(path: Path) -> bytes:
    """The bytes of a file that must exist (``ConfigError`` naming it if not)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"missing file {path}") from None


def check_private_file(path: Path) -> None:
    """Refuse a key file that group or others can read, or that another user owns."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"CA key {path} not found") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"CA key {path} is accessible by group or others (mode {st.st_mode & 0o777:o}): "
            f"run 'chmod 600 {path}'"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(f"CA key {path} is owned by uid {st.st_uid}, not by this user")


def save_identity(
    out_dir: Path | str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes
) -> ClientIdentity:
    """Write an identity directory (0700, the key 0600) that ``fedmae client`` can use.

    ``cert_pem`` is the certificate followed by the CA certificates between it and the
    root (the enrollment CA): gRPC presents the whole chain.
    """
    ident = ClientIdentity(Path(out_dir))
    private_dir(ident.dir)
    write_file(ident.key, key_pem, private=True)
    write_file(ident.cert, cert_pem)
    write_file(ident.ca_cert, ca_pem)
    return ident
