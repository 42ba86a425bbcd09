"""Property-based tests (hypothesis) of the decoder and the update validator.

Whatever arrives, the decoder either reproduces exactly what was sent or raises
``InvalidUpdate`` (a clean INVALID_ARGUMENT); it never raises anything else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmae.errors import InvalidUpdate
from fedmae.payload.decoder import PayloadDecoder
from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import Encoding, encode
from fedmae.payload.layout import ModelLayout
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.messages import manifest_from_proto, manifest_to_proto

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
layouts = st.dictionaries(
    st.text("abcdefgh._", min_size=1, max_size=8), shapes, min_size=1, max_size=5
).map(lambda d: ModelLayout.from_state({k: torch.zeros(v) for k, v in d.items()}))
encodings = st.sampled_from([Encoding.FP32, Encoding.FP16, Encoding.BF16])


def _values(layout: ModelLayout, seed: int) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).standard_normal(layout.numel).astype(np.float32)
    )


@SETTINGS
@given(layouts, encodings, st.integers(0, 2**31), st.data())
def test_any_chunking_roundtrips_exactly(layout, encoding, seed, data):
    values = _values(layout, seed)
    payload = bytes(encode(values, encoding))
    # Random cut points: chunks of any size, including single bytes.
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(payload) - 1)), max_size=8)))
    bounds = [0, *[c for c in cuts if c < len(payload)], len(payload)]
    dec = PayloadDecoder(layout, layout.manifest(encoding))
    for a, b in zip(bounds, bounds[1:], strict=False):
        dec.write(pb.Chunk(offset=a, data=payload[a:b]))
    out = dec.finish(payload_digest(payload))
    expected = {
        Encoding.FP32: values,
        Encoding.FP16: values.half().float(),
        Encoding.BF16: values.bfloat16().float(),
    }[encoding]
    assert torch.equal(out, expected)
    # digest and norm were taken chunk by chunk, across cuts inside float32 values
    assert dec.digest == payload_digest(payload)
    assert dec.norm == pytest.approx(float(torch.linalg.vector_norm(expected)), rel=1e-5)


@SETTINGS
@given(layouts, st.integers(0, 2**31), st.data())
def test_corrupted_streams_fail_cleanly(layout, seed, data):
    payload = bytearray(encode(_values(layout, seed)))
    sha = payload_digest(bytes(payload))
    action = data.draw(st.sampled_from(["flip", "drop", "repeat", "shift", "truncate", "extend"]))
    chunks = [(o, bytes(payload[o : o + 7])) for o in range(0, len(payload), 7)]
    if action == "flip":
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= 1 << data.draw(st.integers(0, 7))
        chunks = [(o, bytes(payload[o : o + 7])) for o in range(0, len(payload), 7)]
    elif action == "drop" and len(chunks) > 1:
        del chunks[data.draw(st.integers(0, len(chunks) - 2))]
    elif action == "repeat":
        i = data.draw(st.integers(0, len(chunks) - 1))
        chunks.insert(i, chunks[i])
    elif action == "shift":
        i = data.draw(st.integers(0, len(chunks) - 1))
        chunks[i] = (chunks[i][0] + data.draw(st.integers(1, 5)), chunks[i][1])
    elif action == "truncate":
        chunks = chunks[:-1]
    elif action == "extend":
        chunks.append((len(payload), b"\x00" * data.draw(st.integers(1, 9))))
    dec = PayloadDecoder(layout, layout.manifest())
    try:
        for offset, blob in chunks:
            dec.write(pb.Chunk(offset=offset, data=blob))
        dec.finish(sha)
    except InvalidUpdate:
        return
    # Only a no-op corruption may pass (e.g. dropping from a one-chunk stream is skipped).
    assert action in ("drop",) and len(chunks) == 1


@SETTINGS
@given(layouts, st.data())
def test_manifest_validator_accepts_exactly_the_layout(layout, data):
    manifest = manifest_to_proto(layout.manifest())  # edited as it arrives, then received
    field = data.draw(st.sampled_from(["none", "name", "shape", "dtype", "offset", "nbytes",
                                       "total", "drop", "encoding"]))  # fmt: skip
    i = data.draw(st.integers(0, len(manifest.tensors) - 1))
    t = manifest.tensors[i]
    if field == "name":
        t.name += "x"
    elif field == "shape":
        t.shape[0] += data.draw(st.integers(1, 3))
    elif field == "dtype":
        t.dtype = data.draw(st.sampled_from(["float64", "int8", "", "float16"]))
    elif field == "offset":
        t.offset += data.draw(st.integers(1, 4))
    elif field == "nbytes":
        t.nbytes += data.draw(st.integers(1, 4))
    elif field == "total":
        manifest.total_bytes = data.draw(st.integers(0, 2**62).filter(
            lambda v: v != layout.numel * 4))  # fmt: skip
    elif field == "drop":
        del manifest.tensors[i]
    elif field == "encoding":
        manifest.encoding = data.draw(st.integers(4, 1000))
    if field == "none":
        PayloadDecoder(layout, manifest_from_proto(manifest))
    else:
        try:
            PayloadDecoder(layout, manifest_from_proto(manifest))
        except InvalidUpdate:
            return
        raise AssertionError(f"a manifest with a changed {field} was accepted")


DIGEST_KINDS = ["none", "right", "right-sha256", "wrong", "wrong-sha256"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts, st.integers(0, 2**31), st.sampled_from(DIGEST_KINDS),
       st.sampled_from(DIGEST_KINDS))  # fmt: skip
def test_f10_every_given_digest_is_checked(layout, seed, in_header, in_trailer):
    """An upload's payload is accepted iff it carries a digest (manifest, trailer or
    both) and every digest given matches it."""
    payload = bytes(encode(_values(layout, seed)))
    other = payload[:-1] + bytes([payload[-1] ^ 1])  # one bit off
    digests = {
        "none": "",
        "right": payload_digest(payload),
        "right-sha256": payload_digest(payload, "sha256"),
        "wrong": payload_digest(other),
        "wrong-sha256": payload_digest(other, "sha256"),
    }
    manifest = layout.manifest(digest=digests[in_header])
    dec = PayloadDecoder(layout, manifest, require_digest=True)
    dec.write(pb.Chunk(offset=0, data=payload))
    given = [kind for kind in (in_header, in_trailer) if kind != "none"]
    try:
        dec.finish(digests[in_trailer])
        accepted = True
    except InvalidUpdate:
        accepted = False
    assert accepted == (bool(given) and all(kind.startswith("right") for kind in given))
