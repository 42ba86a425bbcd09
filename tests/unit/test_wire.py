"""fedmae.transport.frames: chunk frames are exactly protobuf's bytes, and the fast parser never
disagrees with protobuf's (it answers None and lets protobuf decide instead)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmae.transport import frames as wire
from fedmae.transport._proto import federation_pb2 as pb

MESSAGES = [pb.ModelChunk, pb.UpdateMessage]
offsets = st.integers(min_value=0, max_value=(1 << 64) - 1)
payloads = st.binary(max_size=3000)


@given(offset=offsets, data=payloads)
def test_frames_are_protobuf_bytes_and_parse_back(offset, data):
    for message_type in MESSAGES:
        msg = message_type()
        msg.chunk.offset = offset
        msg.chunk.data = data
        framed = wire.frame(offset, data)
        assert framed == msg.SerializeToString()
        assert message_type.FromString(framed) == msg
        chunk = wire.parse_chunk(framed)
        assert chunk is not None and chunk.offset == offset and bytes(chunk.data) == data


def test_parsed_chunk_is_a_view_of_the_received_bytes():
    framed = wire.frame(1 << 40, bytes(range(256)) * 4096)
    chunk = wire.parse_chunk(framed)
    assert chunk.data.obj is framed  # zero-copy: a view, not a copy
    assert chunk.data.readonly


def _protobuf_chunk(data: bytes, message_type):
    try:
        msg = message_type.FromString(data)
    except Exception:  # noqa: BLE001 - any refusal counts as "not a chunk"
        return None
    return msg if msg.WhichOneof("part") == "chunk" else None


@settings(max_examples=400)
@given(data=st.binary(max_size=64))
def test_fast_parser_never_disagrees_with_protobuf_on_any_bytes(data):
    _agrees(data)


@settings(max_examples=400)
@given(offset=offsets, payload=st.binary(min_size=1, max_size=40),
       cut=st.integers(min_value=0, max_value=60), flip=st.integers(min_value=0, max_value=60),
       bit=st.integers(min_value=0, max_value=7))  # fmt: skip
def test_fast_parser_agrees_on_damaged_frames(offset, payload, cut, flip, bit):
    framed = bytearray(wire.frame(offset, payload))
    if flip < len(framed):
        framed[flip] ^= 1 << bit
    _agrees(bytes(framed[: len(framed) - cut % (len(framed) + 1)]))


def _agrees(data: bytes) -> None:
    fast = wire.parse_chunk(data)
    for message_type in MESSAGES:
        slow = _protobuf_chunk(data, message_type)
        if fast is not None:  # whatever the fast path accepts, protobuf reads the same
            assert slow is not None
            assert (slow.chunk.offset, slow.chunk.data) == (fast.offset, bytes(fast.data))


def test_non_canonical_and_other_parts_go_to_protobuf():
    # Chunk fields in the other order: valid protobuf, not the canonical frame.
    inner = b"\x12\x03abc" + b"\x08\x05"
    reordered = b"\x12" + bytes([len(inner)]) + inner
    assert wire.parse_chunk(reordered) is None
    de = wire.deserializer(pb.UpdateMessage)
    msg = de(reordered)
    assert isinstance(msg, pb.UpdateMessage) and msg.chunk.offset == 5
    assert wire.part(msg) == "chunk" and wire.chunk_of(msg).data == b"abc"
    trailer = pb.UpdateMessage(trailer=pb.UpdateTrailer(digest="xxh3-128:00")).SerializeToString()
    assert wire.part(de(trailer)) == "trailer"
    assert wire.part(de(wire.frame(3, b"xyz"))) == "chunk"
    with pytest.raises(Exception, match="(?i)pars|decod|error"):
        de(b"\x12\xff\xff\xff\xff\x0f")  # a length past the end: protobuf refuses it


def test_serializer_passes_frames_through():
    ser = wire.serializer(pb.ModelChunk)
    framed = wire.frame(9, b"data")
    assert ser(framed) is framed
    header = pb.ModelChunk(header=pb.ModelHeader(version=3))
    assert ser(header) == header.SerializeToString()
