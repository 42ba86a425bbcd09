"""Tensors on the wire: a manifest plus a flat payload cut into chunks.

A model (or a delta) is a set of named float tensors. On the wire it is one flat
payload, the tensors back to back in sorted-name order, each written in the chosen
encoding, described by a ``Manifest`` (name, shape, dtype, offset, size per tensor).
The payload travels as ~1 MiB ``Chunk`` messages, so no message approaches gRPC's
2 GiB cap whatever the model size.

Receiving decodes straight into one preallocated buffer (no joins of ``bytes``);
``PayloadDecoder.finish`` checks size, digest and finiteness and returns one flat
float32 tensor. Digests are "algorithm:hex" strings, xxh3-128 by default: an
end-to-end check that the chunks were put back together right, fast enough (about
20 GB/s here, sha256 1.7 GB/s) to cost nothing next to the TLS stream. It is not
what makes the bytes trustworthy; the mTLS channel authenticates them.

Sorted-name order is also safetensors' order for tensors of one dtype, so a
checkpoint's data section *is* the fp32 payload and downloads can be served from the
file without re-encoding.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from fedmae.errors import InvalidUpdate
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.channels import DEFAULT_CHUNK_SIZE
from fedmae.transport.frames import RawChunk

if sys.byteorder != "little":  # the wire format is little-endian; so are numpy views here
    raise ImportError("fedmae needs a little-endian host")

DEFAULT_DIGEST = "xxh3-128"
_DIGESTS: dict[str, Callable] = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}
INT8_BLOCK = 4096  # values per float32 scale in the int8 encoding

# encoding -> (wire dtype name, bytes per element)
_ENCODINGS: dict[int, tuple[str, int]] = {
    pb.ENCODING_FP32: ("float32", 4),
    pb.ENCODING_FP16: ("float16", 2),
    pb.ENCODING_BF16: ("bfloat16", 2),
    pb.ENCODING_INT8: ("int8", 1),
}
_BY_NAME = {
    "fp32": pb.ENCODING_FP32,
    "fp16": pb.ENCODING_FP16,
    "bf16": pb.ENCODING_BF16,
    "int8": pb.ENCODING_INT8,
}


def _int8_scales_bytes(numel: int) -> int:
    return 4 * -(-numel // INT8_BLOCK)


def encoding_from_name(name: str) -> int:
    """``"fp32"`` / ``"fp16"`` / ``"bf16"`` -> the proto enum value."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown encoding {name!r}; choose one of {sorted(_BY_NAME)}") from None


def encoding_name(encoding: int) -> str:
    for name, value in _BY_NAME.items():
        if value == encoding:
            return name
    return pb.Encoding.Name(encoding) if encoding in pb.Encoding.values() else str(encoding)


def _wire(encoding: int) -> tuple[str, int]:
    if encoding == pb.ENCODING_UNSPECIFIED:
        encoding = pb.ENCODING_FP32
    try:
        return _ENCODINGS[encoding]
    except KeyError:
        raise InvalidUpdate(
            f"unsupported encoding {encoding_name(encoding)}; "
            f"this server accepts {', '.join(sorted(_BY_NAME))}"
        ) from None


@dataclass(frozen=True)
class LayoutEntry:
    name: str
    shape: tuple[int, ...]
    offset: int  # element offset in the flat vector
    numel: int


@dataclass(frozen=True)
class ModelLayout:
    """Where each named tensor lives in one flat float32 vector (sorted-name order)."""

    entries: tuple[LayoutEntry, ...]
    numel: int

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> ModelLayout:
        entries, offset = [], 0
        for name in sorted(state):
            shape = tuple(int(d) for d in state[name].shape)
            numel = int(np.prod(shape, dtype=np.int64))
            entries.append(LayoutEntry(name, shape, offset, numel))
            offset += numel
        return cls(tuple(entries), offset)

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Named tensors -> one new flat float32 tensor [P]."""
        flat = torch.empty(self.numel, dtype=torch.float32)
        for e in self.entries:
            flat[e.offset : e.offset + e.numel].copy_(state[e.name].detach().reshape(-1))
        return flat

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat [P] -> named views (no copy)."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} elements, layout {self.numel}")
        return {e.name: flat[e.offset : e.offset + e.numel].view(e.shape) for e in self.entries}

    def payload_bytes(self, encoding: int) -> tuple[int, int]:
        """(bytes before the tensor values, total payload bytes) for an encoding."""
        _, size = _wire(encoding)
        head = _int8_scales_bytes(self.numel) if encoding == pb.ENCODING_INT8 else 0
        return head, head + self.numel * size

    def manifest(self, encoding: int = pb.ENCODING_FP32, digest: str = "") -> pb.Manifest:
        dtype, size = _wire(encoding)
        head, total = self.payload_bytes(encoding)
        tensors = [
            pb.TensorSpec(
                name=e.name,
                shape=list(e.shape),
                dtype=dtype,
                offset=head + e.offset * size,
                nbytes=e.numel * size,
            )
            for e in self.entries
        ]
        return pb.Manifest(tensors=tensors, encoding=encoding, total_bytes=total, digest=digest)

    def check_manifest(self, manifest: pb.Manifest) -> None:
        """Raise ``InvalidUpdate`` unless ``manifest`` describes exactly this layout."""
        dtype, size = _wire(manifest.encoding)
        head, total = self.payload_bytes(manifest.encoding or pb.ENCODING_FP32)
        if len(manifest.tensors) != len(self.entries):
            got = {t.name for t in manifest.tensors}
            want = {e.name for e in self.entries}
            raise InvalidUpdate(
                f"manifest lists {len(manifest.tensors)} tensors, the model has "
                f"{len(self.entries)} (missing: {sorted(want - got)[:5]}, "
                f"unexpected: {sorted(got - want)[:5]})"
            )
        for spec, e in zip(manifest.tensors, self.entries, strict=True):
            if spec.name != e.name:
                raise InvalidUpdate(
                    f"manifest tensor {spec.name!r} where {e.name!r} was expected "
                    "(tensors must be listed in sorted-name order)"
                )
            if tuple(spec.shape) != e.shape:
                raise InvalidUpdate(
                    f"tensor {e.name!r} has shape {list(spec.shape)}, the model has {list(e.shape)}"
                )
            if spec.dtype != dtype:
                raise InvalidUpdate(
                    f"tensor {e.name!r} has dtype {spec.dtype!r}, but encoding "
                    f"{encoding_name(manifest.encoding)} means {dtype!r}"
                )
            if spec.offset != head + e.offset * size or spec.nbytes != e.numel * size:
                raise InvalidUpdate(
                    f"tensor {e.name!r} declares offset {spec.offset} and {spec.nbytes} bytes; "
                    f"expected offset {head + e.offset * size} and {e.numel * size} bytes"
                )
        if manifest.total_bytes != total:
            raise InvalidUpdate(
                f"manifest declares {manifest.total_bytes} bytes in total; the model needs {total}"
            )


def encode(
    flat: torch.Tensor, encoding: int = pb.ENCODING_FP32, generator: torch.Generator | None = None
) -> memoryview:
    """Flat float32 [P] -> the payload bytes (zero-copy for fp32)."""
    _wire(encoding)
    flat = flat.detach().contiguous()
    if encoding in (pb.ENCODING_FP32, pb.ENCODING_UNSPECIFIED):
        arr = flat.to(torch.float32).numpy()
    elif encoding == pb.ENCODING_FP16:
        arr = flat.to(torch.float16).numpy()
    elif encoding == pb.ENCODING_BF16:  # numpy has no bfloat16; ship its bits as int16
        arr = flat.to(torch.bfloat16).view(torch.int16).numpy()
    else:
        return memoryview(_encode_int8(flat.to(torch.float32), generator)).cast("B")
    return memoryview(arr).cast("B")


def _encode_int8(flat: torch.Tensor, generator: torch.Generator | None) -> np.ndarray:
    """Per-block absmax scale, stochastic rounding: E[decode(encode(x))] = x."""
    n = flat.numel()
    blocks = -(-n // INT8_BLOCK)
    x = torch.nn.functional.pad(flat, (0, blocks * INT8_BLOCK - n)).view(blocks, INT8_BLOCK)
    scales = x.abs().amax(dim=1) / 127.0  # [blocks]
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    noise = torch.rand(x.shape, generator=generator)
    q = torch.floor(x / scales[:, None] + noise).clamp_(-127, 127).to(torch.int8)
    out = np.empty(4 * blocks + n, dtype=np.uint8)
    out[: 4 * blocks] = scales.numpy().view(np.uint8)
    out[4 * blocks :] = q.view(-1)[:n].numpy().view(np.uint8)
    return out


def _decode_int8(buf: np.ndarray, numel: int) -> torch.Tensor:
    blocks = -(-numel // INT8_BLOCK)
    scales = torch.from_numpy(buf[: 4 * blocks].view(np.float32))
    q = torch.from_numpy(buf[4 * blocks :].view(np.int8)).to(torch.float32)
    q = torch.nn.functional.pad(q, (0, blocks * INT8_BLOCK - numel)).view(blocks, INT8_BLOCK)
    return (q * scales[:, None]).view(-1)[:numel].contiguous()


def payload_digest(
    payload: memoryview | bytes | np.ndarray, algorithm: str = DEFAULT_DIGEST
) -> str:
    """``"algorithm:hex"`` of a payload."""
    try:
        make = _DIGESTS[algorithm]
    except KeyError:
        raise InvalidUpdate(
            f"unsupported digest algorithm {algorithm!r}; use one of {', '.join(_DIGESTS)}"
        ) from None
    return f"{algorithm}:{make(payload).hexdigest()}"


class PayloadDigest:
    """The default digest taken piece by piece; ``hexdigest()`` is "algorithm:hex"."""

    def __init__(self) -> None:
        self._hash = _DIGESTS[DEFAULT_DIGEST]()

    def update(self, piece: memoryview | bytes) -> None:
        self._hash.update(piece)

    def hexdigest(self) -> str:
        return f"{DEFAULT_DIGEST}:{self._hash.hexdigest()}"


def check_digest(
    payload: memoryview | bytes | np.ndarray, expected: str, default: str | None = None
) -> str:
    """The payload's digest in ``expected``'s algorithm; ``InvalidUpdate`` if they differ.
    An empty ``expected`` checks nothing and returns the default digest. ``default`` is
    the default algorithm's digest when the caller already has it (hashed as received)."""
    algorithm, sep, _ = expected.partition(":")
    if expected and not sep:
        raise InvalidUpdate(f"digest {expected[:40]!r} is not of the form 'algorithm:hex'")
    if default is not None and algorithm in ("", DEFAULT_DIGEST):
        actual = default
    else:
        actual = payload_digest(payload, algorithm or DEFAULT_DIGEST)
    if expected and actual != expected.lower():
        raise InvalidUpdate(
            f"payload digest mismatch: sender says {expected[:28]}..., received data "
            f"hashes to {actual[:28]}... (corrupted in transit?)"
        )
    return actual


def iter_slices(
    payload: memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE, start: int = 0
) -> Iterator[tuple[int, memoryview]]:
    """``(offset, view)`` pieces of a payload from ``start``, at most ``chunk_size``
    bytes each; views, not copies (``fedmae.transport.frames.frame`` copies each once)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    for offset in range(start, len(payload), chunk_size):
        yield offset, payload[offset : offset + chunk_size]


def iter_chunks(payload: memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[pb.Chunk]:
    """Cut a payload into ``Chunk`` messages, for tools and tests that build them
    (the hot path writes ``fedmae.transport.frames`` frames)."""
    for offset, data in iter_slices(payload, chunk_size):
        yield pb.Chunk(offset=offset, data=bytes(data))


class BufferPool:
    """Receive buffers kept for reuse: at most ``keep`` of them, of one size.

    A fresh buffer the size of a model costs more than the transfer into it: every
    page is faulted in and zeroed on first touch (about 45 ms per 100 MB here), and
    when numpy asks for huge pages the kernel may stop to compact memory first
    (measured up to 240 ms). A reused buffer costs only the copy.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if buf.nbytes == nbytes:
                    return buf
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buf: np.ndarray | torch.Tensor) -> None:
        """Offer memory for reuse: a buffer from ``take``, or a tensor decoded into one
        (its bytes are overwritten by the next ``take``: only when it is done with)."""
        if isinstance(buf, torch.Tensor):
            buf = buf.numpy().view(np.uint8)
        with self._lock:
            if self._free and self._free[0].nbytes != buf.nbytes:
                self._free.clear()  # the model changed size: keep the new kind only
            if len(self._free) < self.keep:
                self._free.append(buf)

    def trim(self, keep: int) -> None:
        """Keep at most ``keep`` free buffers; the rest go back to the system."""
        with self._lock:
            del self._free[keep:]

    def clear(self) -> None:
        self.trim(0)


class PayloadDecoder:
    """Receive one payload chunk by chunk into a preallocated buffer, then decode.

    Construction validates the manifest against the expected layout, so a hostile
    size declaration is refused before any memory is allocated. With a ``pool`` the
    buffer comes from it, and ``release()`` gives it back once the decoded tensor
    (a view of the buffer for fp32) is no longer used.

    The payload is checked against every digest it is given: the manifest's and the
    one passed to ``finish`` (an update's trailer). With ``require_digest`` (the
    aggregator's uploads) at least one must be given.
    """

    def __init__(
        self,
        layout: ModelLayout,
        manifest: pb.Manifest,
        max_bytes: int | None = None,
        pool: BufferPool | None = None,
        require_digest: bool = False,
    ):
        layout.check_manifest(manifest)
        if max_bytes is not None and manifest.total_bytes > max_bytes:
            raise InvalidUpdate(
                f"payload of {manifest.total_bytes} bytes is over the limit of {max_bytes}"
            )
        self.layout = layout
        self.declared_digest = manifest.digest  # the manifest's; "" = none
        self.require_digest = require_digest
        self.encoding = manifest.encoding or pb.ENCODING_FP32
        self.total = int(manifest.total_bytes)
        self.received = 0
        self._pool = pool
        self._buf: np.ndarray | None = (
            pool.take(self.total) if pool else np.empty(self.total, dtype=np.uint8)
        )
        self.digest = ""  # "algorithm:hex" of the payload, set by finish()
        self.norm = 0.0  # L2 norm of the decoded values, set by finish()
        # Digest and (fp32) sum of squares are taken chunk by chunk as the bytes arrive,
        # while they are still in cache, instead of in passes over the whole buffer.
        self._hash = PayloadDigest()
        self._sumsq = 0.0
        self._summed = 0  # payload bytes folded into _sumsq

    def write(self, chunk: pb.Chunk | RawChunk) -> None:
        """Append one chunk; chunks must arrive in order without gaps or overlap."""
        n = len(chunk.data)
        if chunk.offset != self.received:
            raise InvalidUpdate(
                f"chunk at offset {chunk.offset}, expected {self.received} "
                "(chunks must arrive in order, without gaps or repeats)"
            )
        if n == 0:
            raise InvalidUpdate(f"empty chunk at offset {chunk.offset}")
        if self.received + n > self.total:
            raise InvalidUpdate(
                f"chunk at offset {chunk.offset} of {n} bytes runs past the declared "
                f"payload size of {self.total} bytes"
            )
        self._buf[self.received : self.received + n] = np.frombuffer(chunk.data, dtype=np.uint8)
        self._hash.update(chunk.data)
        self.received += n
        if self.encoding == pb.ENCODING_FP32:
            end = self.received - self.received % 4
            if end > self._summed:
                part = self._buf[self._summed : end].view(np.float32)
                with np.errstate(over="ignore", invalid="ignore"):  # Inf/NaN: finish() says
                    self._sumsq += float(np.dot(part, part))  # BLAS sdot: 15 µs a MiB here
                self._summed = end

    def finish(self, expected_digest: str = "") -> torch.Tensor:
        """Check completeness, digests and finiteness; return the flat float32 [P].

        ``expected_digest`` (e.g. an update's trailer) and the manifest's digest are
        each checked when given; two given with the same algorithm must be equal."""
        if self.received != self.total:
            raise InvalidUpdate(
                f"payload incomplete: received {self.received} of {self.total} bytes"
            )
        self.digest = self._check_digests(expected_digest)
        if self.encoding == pb.ENCODING_FP32:
            flat = torch.from_numpy(self._buf.view(np.float32))  # zero-copy
            self.norm = check_finite(flat, self.layout, norm=math.sqrt(self._sumsq))
            return flat
        if self.encoding == pb.ENCODING_FP16:
            flat = torch.from_numpy(self._buf.view(np.float16)).to(torch.float32)
        elif self.encoding == pb.ENCODING_BF16:
            flat = torch.from_numpy(self._buf.view(np.int16)).view(torch.bfloat16).float()
        else:
            flat = _decode_int8(self._buf, self.layout.numel)
        self.release()  # decoded into a tensor of its own: the buffer is free now
        self.norm = check_finite(flat, self.layout)
        return flat

    def _check_digests(self, trailer: str) -> str:
        declared = [d for d in dict.fromkeys((self.declared_digest, trailer)) if d]
        if not declared:
            if self.require_digest:
                raise InvalidUpdate(
                    "no digest: give the payload's digest ('algorithm:hex') in the "
                    "header's manifest.digest or in the trailer"
                )
            return check_digest(self._buf, "", self._hash.hexdigest())
        if len(declared) == 2:
            header_alg, trailer_alg = (d.partition(":")[0].lower() for d in declared)
            if header_alg == trailer_alg and declared[0].lower() != declared[1].lower():
                raise InvalidUpdate(
                    f"the header's manifest.digest {declared[0][:28]}... and the trailer's "
                    f"digest {declared[1][:28]}... disagree; send one, or the same in both"
                )
        digest = ""
        for expected in declared:
            checked = check_digest(self._buf, expected, self._hash.hexdigest())
            digest = digest or checked  # the header's when given (the receipt's digest)
        return digest

    def release(self) -> None:
        """Give the buffer back to the pool. The fp32 tensor from ``finish`` is a view
        of it: call this only when that tensor is no longer used."""
        buf, self._buf = self._buf, None
        if buf is not None and self._pool is not None:
            self._pool.give(buf)


def check_finite(flat: torch.Tensor, layout: ModelLayout, norm: float | None = None) -> float:
    """The L2 norm of ``flat`` (``norm`` when the caller already took it), always
    finite; ``InvalidUpdate`` naming the first tensor with NaN/Inf."""
    # Fast path: one reduction, no mask. NaN and Inf propagate into the norm; a finite
    # norm means every value is finite. An infinite norm may also be a harmless
    # overflow of large finite values, which the exact pass below tells apart.
    if norm is None:
        norm = float(torch.linalg.vector_norm(flat))
    if math.isfinite(norm):
        return norm
    for e in layout.entries:
        part = flat[e.offset : e.offset + e.numel]
        if not bool(torch.isfinite(part).all()):
            bad = int((~torch.isfinite(part)).sum())
            raise InvalidUpdate(f"tensor {e.name!r} holds {bad} NaN/Inf values")
    # Finite values whose float32 sum of squares overflowed (|x| ~ 1e19 and up): the
    # exact norm, which clipping divides by and the round log records.
    return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
