"""The pieces a payload travels in. No torch here (see ``fedmae.payload``)."""

from __future__ import annotations

from collections.abc import Iterator

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: payload chunks on the wire


def iter_slices(
    payload: memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE, start: int = 0
) -> Iterator[tuple[int, memoryview]]:
    """``(offset, view)`` pieces of a payload from ``start``, at most ``chunk_size``
    bytes each; views, not copies (``fedmae.transport.frames.frame`` copies each once)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    for offset in range(start, len(payload), chunk_size):
        yield offset, payload[offset : offset + chunk_size]
