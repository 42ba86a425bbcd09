"""fedmae.payload: manifests, chunking, decoding and its refusals."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fedmae.errors import InvalidUpdate
from fedmae.ml.model_state import trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.payload.buffers import BufferPool
from fedmae.payload.decoder import PayloadDecoder
from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import Encoding, encode, encoding_from_name
from fedmae.payload.layout import ModelLayout
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.messages import iter_chunks, manifest_from_proto, manifest_to_proto

ENCODINGS = {
    Encoding.FP32: (lambda t: t, 0.0),
    Encoding.FP16: (lambda t: t.half().float(), 1e-3),
    Encoding.BF16: (lambda t: t.bfloat16().float(), 1e-2),
}


@pytest.fixture(scope="module")
def layout() -> ModelLayout:
    return ModelLayout.from_state(trainable_state(build_model("tiny", seed=0)))


def _roundtrip(layout, flat, encoding, chunk_size):
    payload = encode(flat, encoding)
    decoder = PayloadDecoder(layout, layout.manifest(encoding))
    chunks = list(iter_chunks(payload, chunk_size))
    for chunk in chunks:
        decoder.write(chunk)
    return decoder.finish(payload_digest(payload)), len(chunks)


@pytest.mark.parametrize("encoding", list(ENCODINGS), ids=["fp32", "fp16", "bf16"])
def test_roundtrip_every_encoding_multi_chunk(layout, encoding):
    flat = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0))
    out, n_chunks = _roundtrip(layout, flat, encoding, chunk_size=100_003)  # odd size on purpose
    assert n_chunks > 10
    as_sent, tol = ENCODINGS[encoding]
    assert torch.equal(out, as_sent(flat))  # exactly what the encoding can carry
    assert torch.allclose(out, flat, rtol=tol, atol=tol)


def test_layout_flatten_unflatten_and_manifest(layout):
    model = build_model("tiny", seed=1)
    state = trainable_state(model)
    flat = layout.flatten(state)
    back = layout.unflatten(flat)
    assert list(back) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor)
    m = layout.manifest(Encoding.FP16)
    assert m.total_bytes == layout.numel * 2
    assert [t.name for t in m.tensors] == sorted(state)
    assert all(t.dtype == "float16" for t in m.tensors)
    offsets = [(t.offset, t.nbytes) for t in m.tensors]
    assert all(a + n == b for (a, n), (b, _) in zip(offsets, offsets[1:], strict=False))


def test_fp32_encode_is_zero_copy(layout):
    flat = torch.zeros(layout.numel)
    payload = encode(flat)
    flat[0] = 1.5
    assert np.frombuffer(payload, np.float32)[0] == 1.5


def _wire_manifest(layout, **edit):
    """The layout's manifest as it arrives (a protobuf message), with fields edited."""
    m = manifest_to_proto(layout.manifest(Encoding.FP32))
    for key, value in edit.items():
        setattr(m, key, value)
    return m


def _decoder(layout, wire_manifest):
    """A decoder for a received manifest, converted as the servicers do."""
    return PayloadDecoder(layout, manifest_from_proto(wire_manifest))


def test_manifest_refusals(layout):
    m = _wire_manifest(layout)
    m.tensors[3].shape[0] += 1
    with pytest.raises(InvalidUpdate, match="shape"):
        _decoder(layout, m)
    m = _wire_manifest(layout)
    m.tensors[0].dtype = "float64"
    with pytest.raises(InvalidUpdate, match="dtype"):
        _decoder(layout, m)
    m = _wire_manifest(layout)
    del m.tensors[-1]
    with pytest.raises(InvalidUpdate, match="tensors"):
        _decoder(layout, m)
    with pytest.raises(InvalidUpdate, match="in total"):
        _decoder(layout, _wire_manifest(layout, total_bytes=10**15))  # hostile size: no allocation
    with pytest.raises(InvalidUpdate, match="unsupported encoding"):
        _decoder(layout, _wire_manifest(layout, encoding=9))
    m = _wire_manifest(layout)
    m.tensors[0].name, m.tensors[1].name = m.tensors[1].name, m.tensors[0].name
    with pytest.raises(InvalidUpdate, match="sorted-name order"):
        _decoder(layout, m)


def test_chunk_refusals(layout):
    flat = torch.randn(layout.numel)
    payload = encode(flat)
    chunks = list(iter_chunks(payload, 1 << 20))
    dec = PayloadDecoder(layout, layout.manifest())
    with pytest.raises(InvalidUpdate, match="in order"):
        dec.write(chunks[1])
    dec.write(chunks[0])
    with pytest.raises(InvalidUpdate, match="in order"):
        dec.write(chunks[0])  # a repeat
    with pytest.raises(InvalidUpdate, match="empty chunk"):
        dec.write(pb.Chunk(offset=dec.received, data=b""))
    with pytest.raises(InvalidUpdate, match="incomplete"):
        dec.finish()
    big = pb.Chunk(offset=dec.received, data=bytes(len(payload)))
    with pytest.raises(InvalidUpdate, match="runs past"):
        dec.write(big)


def test_digest_and_nan_refusals(layout):
    flat = torch.randn(layout.numel)
    payload = encode(flat)
    dec = PayloadDecoder(layout, layout.manifest())
    for c in iter_chunks(payload):
        dec.write(c)
    refusals = {
        "sha256:" + "ab" * 32: "digest mismatch",
        "xxh3-128:" + "ab" * 16: "digest mismatch",
        "md5:" + "ab" * 16: "unsupported digest algorithm 'md5'",
        "ab" * 32: "not of the form 'algorithm:hex'",
    }
    for digest, words in refusals.items():
        with pytest.raises(InvalidUpdate, match=words):
            dec.finish(digest)
    sha = "sha256:" + hashlib.sha256(payload).hexdigest()
    assert dec.finish(sha.upper().replace("SHA256", "sha256")) is not None  # hex case-blind
    assert dec.digest == sha
    assert dec.finish() is not None and dec.digest == payload_digest(payload)
    assert dec.digest.startswith("xxh3-128:") and len(dec.digest) == len("xxh3-128:") + 32
    bad = flat.clone()
    last = layout.entries[-1]
    bad[last.offset + 2] = float("inf")
    with pytest.raises(InvalidUpdate, match=last.name):
        _roundtrip(layout, bad, Encoding.FP32, 1 << 20)
    overflow = torch.full((layout.numel,), 1e6)  # finite in fp32, Inf in fp16
    with pytest.raises(InvalidUpdate, match="NaN/Inf"):
        _roundtrip(layout, overflow, Encoding.FP16, 1 << 20)


def test_encoding_names():
    assert encoding_from_name("FP16") == Encoding.FP16
    with pytest.raises(ValueError, match="fp32"):
        encoding_from_name("int4")


def test_int8_is_unbiased_bounded_and_small(layout):
    flat = torch.randn(layout.numel, generator=torch.Generator().manual_seed(1)) * 0.01
    payload = encode(flat, Encoding.INT8, torch.Generator().manual_seed(2))
    assert len(payload) == layout.manifest(Encoding.INT8).total_bytes
    assert len(payload) <= 0.26 * layout.numel * 4  # 1 byte a value + a scale per 4096
    dec = PayloadDecoder(layout, layout.manifest(Encoding.INT8))
    for c in iter_chunks(payload, 100_000):
        dec.write(c)
    out = dec.finish(payload_digest(payload))
    # Each value is off by less than one quantisation step of its block.
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % 4096)).view(-1, 4096)
    step = (blocks.abs().amax(1) / 127).repeat_interleave(4096)[: flat.numel()]
    assert bool(((out - flat).abs() <= step * 1.0001).all())
    # Stochastic rounding is unbiased: the mean of many encodings converges on x.
    x = flat[:4096]
    small = ModelLayout.from_state({"w": x})
    mean = torch.zeros_like(x)
    for seed in range(200):
        p = encode(x, Encoding.INT8, torch.Generator().manual_seed(seed))
        d = PayloadDecoder(small, small.manifest(Encoding.INT8))
        d.write(pb.Chunk(offset=0, data=bytes(p)))
        mean += d.finish() / 200
    err = (mean - x).abs().max() / (x.abs().max() / 127)
    assert err < 0.25  # within a quarter step after 200 draws (up to half a step if biased)


def test_int8_with_a_nan_scale_is_refused(layout):
    flat = torch.zeros(layout.numel)
    payload = bytearray(encode(flat, Encoding.INT8))
    payload[0:4] = np.float32(np.nan).tobytes()
    dec = PayloadDecoder(layout, layout.manifest(Encoding.INT8))
    dec.write(pb.Chunk(offset=0, data=bytes(payload)))
    with pytest.raises(InvalidUpdate, match="NaN"):
        dec.finish()


def test_buffer_pool_reuses_receive_buffers(layout):
    pool = BufferPool(keep=1)
    flat = torch.randn(layout.numel)
    payload = encode(flat)
    first = PayloadDecoder(layout, layout.manifest(), pool=pool)
    for c in iter_chunks(payload):
        first.write(c)
    out = first.finish()
    assert torch.equal(out, flat)
    first.release()
    second = PayloadDecoder(layout, layout.manifest(), pool=pool)
    assert np.shares_memory(second._buf, out.numpy())  # the same memory, reused
    third = PayloadDecoder(layout, layout.manifest(), pool=pool)  # pool empty: a new one
    assert not np.shares_memory(third._buf, out.numpy())
    second.release()
    third.release()  # over ``keep``: dropped
    assert len(pool._free) == 1
    # fp16 decodes into a tensor of its own, so finish() frees the buffer at once
    half = PayloadDecoder(layout, layout.manifest(Encoding.FP16), pool=pool)
    for c in iter_chunks(encode(flat, Encoding.FP16)):
        half.write(c)
    decoded = half.finish()
    assert half._buf is None and pool._free[0].nbytes == layout.numel * 2
    assert torch.allclose(decoded, flat.half().float())
    pool.give(np.empty(layout.numel * 4, np.uint8))  # another size: the old kind goes
    assert [b.nbytes for b in pool._free] == [layout.numel * 4]
