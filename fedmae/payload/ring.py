"""A secure-aggregation masked input on the wire: one vector of ring elements.

A masked input is ``d + 1`` elements of Z_{2^32} or Z_{2^64} (the delta's values and
the site's weight, each masked), little-endian, sent as one tensor
``secagg.masked_input`` in a payload of encoding RING32 or RING64. It is received
chunk by chunk into one preallocated buffer, like any update, and never decoded into
floats: the server only adds it into the round's masked sum.
"""

from __future__ import annotations

import numpy as np

from fedmae.errors import InvalidUpdate
from fedmae.payload.buffers import BufferPool
from fedmae.payload.decoder import check_digests
from fedmae.payload.digest import PayloadDigest
from fedmae.payload.encodings import Encoding
from fedmae.payload.layout import Manifest, check_ring_manifest

_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_ENCODINGS = {32: Encoding.RING32, 64: Encoding.RING64}


class RingDecoder:
    """Receive a masked input into one buffer; ``finish`` checks the digest and returns
    the ring vector (a view of the buffer until ``release``)."""

    def __init__(self, manifest: Manifest, length: int, bits: int, pool: BufferPool | None):
        check_ring_manifest(manifest, length, _ENCODINGS[bits])
        self.bits = bits
        self.length = length
        self.total = int(manifest.total_bytes)
        self.declared_digest = manifest.digest
        self.received = 0
        self.digest = ""
        self.norm = 0.0  # a masked input has no meaningful norm (the server keeps none)
        self._pool = pool
        self._buf: np.ndarray | None = (
            pool.take(self.total) if pool else np.empty(self.total, dtype=np.uint8)
        )
        self._hash = PayloadDigest()

    def write(self, chunk) -> None:
        """Append one chunk (``offset``, ``data``), in order, without gaps or overlap."""
        n = len(chunk.data)
        if chunk.offset != self.received:
            raise InvalidUpdate(
                f"chunk at offset {chunk.offset}, expected {self.received} "
                "(chunks must arrive in order, without gaps or repeats)"
            )
        if n == 0 or self.received + n > self.total:
            raise InvalidUpdate(
                f"chunk at offset {chunk.offset} of {n} bytes does not fit the declared "
                f"masked input of {self.total} bytes"
            )
        self._buf[self.received : self.received + n] = np.frombuffer(chunk.data, dtype=np.uint8)
        self._hash.update(chunk.data)
        self.received += n

    def finish(self, trailer_digest: str = "") -> np.ndarray:
        """The ring vector, once complete and matching every digest given (one needed)."""
        if self.received != self.total:
            raise InvalidUpdate(
                f"masked input incomplete: received {self.received} of {self.total} bytes"
            )
        self.digest = check_digests(
            self._buf, self.declared_digest, trailer_digest, self._hash.hexdigest(), True
        )
        return self._buf[: self.total].view(_DTYPES[self.bits])

    def hand_over(self) -> None:
        """The buffer now belongs to the vector from ``finish`` (the round's sum took
        it): it is not given back to the pool."""
        self._buf = None

    def release(self) -> None:
        """Give the buffer back to the pool (the vector from ``finish`` is a view of it)."""
        buf, self._buf = self._buf, None
        if buf is not None and self._pool is not None:
            self._pool.give(buf)
