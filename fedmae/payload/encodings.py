"""How tensor values are written in a payload: fp32, fp16, bf16 or int8 for a model or
a delta, ring32 or ring64 for a secure-aggregation masked input.

All little-endian. int8 carries one float32 scale per block of ``INT8_BLOCK`` values
(the flat vector cut into blocks, the last one shorter) with stochastic rounding, so
it is unbiased; its payload is all block scales first, then all values.

The ring encodings are no way of writing floats: a masked input is uniform-looking
integers mod 2^32 or 2^64 that only the server's masked sum makes sense of. So they
are not update encodings: ``encoding_from_name`` does not offer them, and
``wire_format``, ``encode`` and ``decode`` (the model and delta paths) refuse them;
``ring_format`` describes their payloads.
"""

from __future__ import annotations

import sys
from enum import IntEnum

import numpy as np
import torch

from fedmae.errors import InvalidUpdate

if sys.byteorder != "little":  # the wire format is little-endian; so are numpy views here
    raise ImportError("fedmae needs a little-endian host")

INT8_BLOCK = 4096  # values per float32 scale in the int8 encoding


class Encoding(IntEnum):
    """A payload encoding. Numbered like the wire's ``fedmae.v1.Encoding`` so a stored
    or logged number reads the same on both sides; ``fedmae.transport.messages``
    converts (the wire's UNSPECIFIED means FP32) and its test holds the tables equal."""

    FP32 = 1
    FP16 = 2
    BF16 = 3
    INT8 = 4
    RING32 = 5  # a masked secure-aggregation input in Z_2^32 (uint32)
    RING64 = 6  # the same in Z_2^64 (uint64)


# encoding -> (wire dtype name, bytes per element)
_WIRE_FORMATS: dict[Encoding, tuple[str, int]] = {
    Encoding.FP32: ("float32", 4),
    Encoding.FP16: ("float16", 2),
    Encoding.BF16: ("bfloat16", 2),
    Encoding.INT8: ("int8", 1),
}
# encoding -> (wire dtype name, bytes per element) of a masked input
_RING_FORMATS: dict[Encoding, tuple[str, int]] = {
    Encoding.RING32: ("uint32", 4),
    Encoding.RING64: ("uint64", 8),
}
RING_ENCODINGS = frozenset(_RING_FORMATS)
# The encodings of a model or a delta, the choices of ``update_encoding``.
ENCODING_NAMES = [e.name.lower() for e in _WIRE_FORMATS]  # "fp32", "fp16", "bf16", "int8"


def encoding_from_name(name: str) -> Encoding:
    """``"fp32"`` / ``"FP16"`` / ``"bf16"`` / ``"int8"`` -> the ``Encoding``; a ring
    encoding's name is refused too (it is secure aggregation's, never a user's choice)."""
    encoding = Encoding.__members__.get(name.upper())
    if encoding is None or encoding in RING_ENCODINGS:
        raise ValueError(
            f"unknown update encoding {name!r}; choose one of {sorted(ENCODING_NAMES)}"
        )
    return encoding


def encoding_name(encoding: int) -> str:
    """``Encoding.FP16`` -> ``"fp16"``; a number that is no encoding as itself."""
    try:
        return Encoding(encoding).name.lower()
    except ValueError:
        return str(encoding)


def wire_format(encoding: Encoding) -> tuple[str, int]:
    """(dtype name in a manifest, bytes per value) of a model or delta encoding;
    ``InvalidUpdate`` if unknown or a ring encoding (a masked input is no delta)."""
    try:
        return _WIRE_FORMATS[encoding]
    except KeyError:
        if encoding in RING_ENCODINGS:
            raise InvalidUpdate(
                f"encoding {encoding_name(encoding)} is a secure-aggregation masked input, "
                "not a model or delta; it is only accepted in a secure round's MASKED_INPUT"
            ) from None
        raise InvalidUpdate(
            f"unsupported encoding {encoding_name(encoding)}; "
            f"this server accepts {', '.join(sorted(ENCODING_NAMES))}"
        ) from None


def ring_format(encoding: Encoding) -> tuple[str, int]:
    """(dtype name in a manifest, bytes per element) of a ring encoding;
    ``InvalidUpdate`` for any other."""
    try:
        return _RING_FORMATS[encoding]
    except KeyError:
        raise InvalidUpdate(
            f"encoding {encoding_name(encoding)} is no secure-aggregation ring encoding; "
            "a masked input is ring32 or ring64"
        ) from None


def head_bytes(encoding: Encoding, numel: int) -> int:
    """Bytes before the first tensor value: int8's block scales, else none."""
    return 4 * -(-numel // INT8_BLOCK) if encoding == Encoding.INT8 else 0


def encode(
    flat: torch.Tensor, encoding: Encoding = Encoding.FP32, generator: torch.Generator | None = None
) -> memoryview:
    """Flat float32 [P] -> the payload bytes (zero-copy for fp32)."""
    wire_format(encoding)
    flat = flat.detach().contiguous()
    if encoding == Encoding.FP32:
        arr = flat.to(torch.float32).numpy()
    elif encoding == Encoding.FP16:
        arr = flat.to(torch.float16).numpy()
    elif encoding == Encoding.BF16:  # numpy has no bfloat16; ship its bits as int16
        arr = flat.to(torch.bfloat16).view(torch.int16).numpy()
    else:
        return memoryview(_encode_int8(flat.to(torch.float32), generator)).cast("B")
    return memoryview(arr).cast("B")


def decode(buf: np.ndarray, encoding: Encoding, numel: int) -> torch.Tensor:
    """Payload bytes -> flat float32 [P]: a view of ``buf`` for fp32, else a new tensor.
    ``InvalidUpdate`` for a ring encoding: a masked input never becomes a delta."""
    wire_format(encoding)
    if encoding == Encoding.FP32:
        return torch.from_numpy(buf.view(np.float32))  # zero-copy
    if encoding == Encoding.FP16:
        return torch.from_numpy(buf.view(np.float16)).to(torch.float32)
    if encoding == Encoding.BF16:
        return torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16).float()
    return _decode_int8(buf, numel)


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
