"""Payload chunks on the wire without a trip through the protobuf runtime.

``ModelChunk`` and ``UpdateMessage`` carry the payload in field 2, a ``Chunk``
(offset, data). The protobuf runtime copies ``data`` when it parses a message and
again when it serializes one, and for a 400 MB update those copies cost more than
the TLS stream itself. Here a chunk message is written straight from the payload
(``frame``) and read as a zero-copy view of the received bytes (``parse_chunk``).

The bytes are exactly what ``SerializeToString`` writes, so the ``.proto`` stays the
single source of truth: any peer with plain generated stubs interoperates, and any
message that is not a chunk in this canonical form (a header, a trailer, fields in
another order, unknown fields, garbage) goes to the protobuf parser as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

CHUNK_FIELD = 2  # ModelChunk.chunk and UpdateMessage.chunk
_OUTER_TAG = (CHUNK_FIELD << 3) | 2  # length-delimited
_OFFSET_TAG = (1 << 3) | 0  # Chunk.offset, varint
_DATA_TAG = (2 << 3) | 2  # Chunk.data, length-delimited
_MAX_VARINT = 10


class RawChunk:
    """A received payload chunk: ``offset`` and a read-only view of ``data``."""

    __slots__ = ("offset", "data")

    def __init__(self, offset: int, data: memoryview):
        self.offset = offset
        self.data = data

    def __repr__(self) -> str:
        return f"RawChunk(offset={self.offset}, {len(self.data)} bytes)"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame_prefix(offset: int, size: int) -> bytes:
    """The bytes of a chunk message that come before ``size`` bytes of data at
    ``offset``; ``frame_prefix(o, len(d)) + d`` is the serialized message."""
    inner = b""
    if offset:  # proto3 leaves default values out
        inner = bytes((_OFFSET_TAG,)) + _varint(offset)
    if size:
        inner += bytes((_DATA_TAG,)) + _varint(size)
    return bytes((_OUTER_TAG,)) + _varint(len(inner) + size) + inner


def frame(offset: int, data: bytes | memoryview) -> bytes:
    """A serialized ``ModelChunk``/``UpdateMessage`` holding one chunk (one copy)."""
    return b"".join((frame_prefix(offset, len(data)), data))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position); raises ValueError on a truncated or overlong varint."""
    value = shift = 0
    for i in range(pos, min(pos + _MAX_VARINT, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >= 1 << 64:
                raise ValueError("varint over 64 bits")
            return value, i + 1
        shift += 7
    raise ValueError("truncated varint")


def parse_chunk(data: bytes) -> RawChunk | None:
    """The chunk in a serialized chunk message, or None when ``data`` is anything else
    (then the protobuf parser decides). Never copies the payload bytes."""
    buf = memoryview(data)
    if len(buf) < 2 or buf[0] != _OUTER_TAG:
        return None
    try:
        inner_len, pos = _read_varint(buf, 1)
        if pos + inner_len != len(buf):
            return None
        offset = 0
        if pos < len(buf) and buf[pos] == _OFFSET_TAG:
            offset, pos = _read_varint(buf, pos + 1)
        if pos == len(buf):
            return RawChunk(offset, buf[pos:])  # an empty chunk
        if buf[pos] != _DATA_TAG:
            return None
        size, pos = _read_varint(buf, pos + 1)
    except ValueError:
        return None
    if pos + size != len(buf):
        return None
    return RawChunk(offset, buf[pos:])


def serializer(message_type: type[Message]) -> Callable[[Any], bytes]:
    """Serializer that passes ready ``frame`` bytes through."""
    serialize = message_type.SerializeToString

    def ser(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return ser


def deserializer(message_type: type[Message]) -> Callable[[bytes], Any]:
    """Deserializer giving a ``RawChunk`` for chunk messages, the message otherwise."""
    parse = message_type.FromString

    def de(data: bytes) -> Any:
        chunk = parse_chunk(data)
        return chunk if chunk is not None else parse(data)

    return de


def part(message: Any) -> str | None:
    """Which part a received ``ModelChunk``/``UpdateMessage`` holds."""
    return "chunk" if isinstance(message, RawChunk) else message.WhichOneof("part")


def chunk_of(message: Any) -> Any:
    """The chunk (``RawChunk`` or ``pb.Chunk``) of a chunk message."""
    return message if isinstance(message, RawChunk) else message.chunk
