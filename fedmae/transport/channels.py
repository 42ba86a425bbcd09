"""gRPC channel and server options both roles share: bounded messages, keepalive.

No torch here: admin commands and health checks import this, and torch costs 3-5 s of
start-up (25 s on a loaded host) that a 10 s health-check timeout cannot pay.
"""

from __future__ import annotations

from fedmae.payload.chunks import DEFAULT_CHUNK_SIZE


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
