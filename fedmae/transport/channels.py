"""Channels: the one factory every client of fedmae opens them with, and the options
both roles share (bounded messages, keepalive).

No torch here: admin commands and health checks import this, and torch costs 3-5 s of
start-up (25 s on a loaded host) that a 10 s health-check timeout cannot pay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from fedmae.payload.chunks import DEFAULT_CHUNK_SIZE
from fedmae.pki.files import ClientIdentity
from fedmae.transport.credentials import channel_credentials, trust_credentials


def grpc_options(chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[tuple[str, int]]:
    """Channel/server options shared by both ends: bounded messages, keepalive."""
    max_msg = chunk_size * 4 + (1 << 20)  # a chunk plus its envelope; anything bigger is hostile
    return [
        ("grpc.max_receive_message_length", max_msg),
        ("grpc.max_send_message_length", max_msg),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def open_channel(
    target: str,
    identity: ClientIdentity | None = None,
    *,
    ca_pem: bytes | None = None,
    insecure: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``target`` with the shared options (``grpc_options``, then
    ``options``), secured in exactly one of three ways: mTLS with ``identity`` (an
    agent, an operator, a health check), TLS trusting ``ca_pem`` without a certificate
    of our own (a device enrolling), or ``insecure`` plaintext (``--insecure`` only)."""
    if (identity is not None) + (ca_pem is not None) + insecure != 1:
        raise ValueError("open_channel needs exactly one of identity, ca_pem or insecure")
    merged = [*grpc_options(chunk_size), *options]
    if insecure:
        return grpc.insecure_channel(target, options=merged)
    if identity is not None:
        return grpc.secure_channel(target, channel_credentials(identity), options=merged)
    return grpc.secure_channel(target, trust_credentials(ca_pem), options=merged)
