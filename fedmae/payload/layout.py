"""Where each named tensor lives in one flat vector, and the manifest describing it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedmae.errors import InvalidUpdate
from fedmae.payload.encodings import (
    Encoding,
    encoding_name,
    head_bytes,
    ring_format,
    wire_format,
)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a payload: its bytes are ``payload[offset : offset + nbytes]``."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # on the wire: "float32", "float16", "bfloat16", "int8"; "uint32", "uint64"
    offset: int  # byte offset in the flat payload
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    """Describes one flat payload: the tensors back to back, in the listed order.
    ``digest`` is "algorithm:hex" (see ``fedmae.payload.digest``), "" when not known."""

    tensors: tuple[TensorSpec, ...]
    encoding: Encoding
    total_bytes: int
    digest: str = ""


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

    def payload_bytes(self, encoding: Encoding) -> tuple[int, int]:
        """(bytes before the tensor values, total payload bytes) for an encoding."""
        _, size = wire_format(encoding)
        head = head_bytes(encoding, self.numel)
        return head, head + self.numel * size

    def manifest(self, encoding: Encoding = Encoding.FP32, digest: str = "") -> Manifest:
        """The manifest of this layout's payload in ``encoding``."""
        dtype, size = wire_format(encoding)
        head, total = self.payload_bytes(encoding)
        tensors = tuple(
            TensorSpec(e.name, e.shape, dtype, offset=head + e.offset * size, nbytes=e.numel * size)
            for e in self.entries
        )
        return Manifest(tensors, Encoding(encoding), total, digest)

    def check_manifest(self, manifest: Manifest) -> None:
        """Raise ``InvalidUpdate`` unless ``manifest`` describes exactly this layout."""
        dtype, size = wire_format(manifest.encoding)
        head, total = self.payload_bytes(manifest.encoding)
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


MASKED_INPUT_TENSOR = "secagg.masked_input"  # the one tensor of a ring payload


def ring_manifest(length: int, encoding: Encoding, digest: str = "") -> Manifest:
    """The manifest of a secure-aggregation masked input: one tensor of ``length``
    (d+1) ring elements, little-endian, in ``encoding`` (RING32 or RING64)."""
    dtype, size = ring_format(encoding)
    spec = TensorSpec(MASKED_INPUT_TENSOR, (length,), dtype, offset=0, nbytes=length * size)
    return Manifest((spec,), Encoding(encoding), length * size, digest)


def check_ring_manifest(manifest: Manifest, length: int, encoding: Encoding) -> None:
    """Raise ``InvalidUpdate`` unless ``manifest`` is the masked input this round
    expects (``ring_manifest(length, encoding)``, any digest)."""
    if manifest.encoding != encoding:
        raise InvalidUpdate(
            f"masked input in encoding {encoding_name(manifest.encoding)}; this round's "
            f"ring is {encoding_name(encoding)}"
        )
    want = ring_manifest(length, encoding, manifest.digest)
    if manifest != want:
        spec = manifest.tensors[0] if len(manifest.tensors) == 1 else None
        got = (
            f"{spec.name!r} {list(spec.shape)} {spec.dtype} at {spec.offset}, {spec.nbytes} bytes"
            if spec
            else f"{len(manifest.tensors)} tensors"
        )
        raise InvalidUpdate(
            f"masked input manifest lists {got} ({manifest.total_bytes} in total); expected "
            f"one tensor {MASKED_INPUT_TENSOR!r} [{length}] {want.tensors[0].dtype} at 0, "
            f"{want.total_bytes} bytes"
        )
