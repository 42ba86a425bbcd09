"""Domain objects <-> protobuf messages: the one place the two meet.

The core (``fedmae.config``, ``fedmae.payload``) speaks dataclasses and ``Encoding``;
the servicers and the client's transfer code convert at the edge with these.
"""

from __future__ import annotations

from collections.abc import Iterator

from fedmae.config import TrainingConfig
from fedmae.errors import InvalidUpdate
from fedmae.payload.chunks import DEFAULT_CHUNK_SIZE, iter_slices
from fedmae.payload.encodings import ENCODING_NAMES, Encoding, encoding_from_name
from fedmae.payload.layout import Manifest, TensorSpec
from fedmae.transport._proto import federation_pb2 as pb

_TO_PROTO: dict[Encoding, int] = {
    Encoding.FP32: pb.ENCODING_FP32,
    Encoding.FP16: pb.ENCODING_FP16,
    Encoding.BF16: pb.ENCODING_BF16,
    Encoding.INT8: pb.ENCODING_INT8,
    Encoding.RING32: pb.ENCODING_RING32,
    Encoding.RING64: pb.ENCODING_RING64,
}
_FROM_PROTO: dict[int, Encoding] = {v: k for k, v in _TO_PROTO.items()}
_FROM_PROTO[pb.ENCODING_UNSPECIFIED] = Encoding.FP32  # proto3's default: the plain encoding


def encoding_to_proto(encoding: Encoding) -> int:
    """``Encoding`` -> the wire's ``fedmae.v1.Encoding`` number."""
    return _TO_PROTO[encoding]


def encoding_from_proto(value: int) -> Encoding:
    """The wire's encoding number -> ``Encoding`` (UNSPECIFIED is FP32);
    ``InvalidUpdate`` for a number this side does not know."""
    try:
        return _FROM_PROTO[value]
    except KeyError:
        name = pb.Encoding.Name(value) if value in pb.Encoding.values() else str(value)
        raise InvalidUpdate(
            f"unsupported encoding {name}; this server accepts {', '.join(sorted(ENCODING_NAMES))}"
        ) from None


def manifest_to_proto(manifest: Manifest) -> pb.Manifest:
    return pb.Manifest(
        tensors=[
            pb.TensorSpec(
                name=t.name, shape=list(t.shape), dtype=t.dtype, offset=t.offset, nbytes=t.nbytes
            )
            for t in manifest.tensors
        ],
        encoding=encoding_to_proto(manifest.encoding),
        total_bytes=manifest.total_bytes,
        digest=manifest.digest,
    )


def manifest_from_proto(msg: pb.Manifest) -> Manifest:
    """The received manifest as a ``Manifest``; ``InvalidUpdate`` for an unknown
    encoding (the layout checks the rest, ``ModelLayout.check_manifest``)."""
    return Manifest(
        tensors=tuple(
            TensorSpec(t.name, tuple(t.shape), t.dtype, t.offset, t.nbytes) for t in msg.tensors
        ),
        encoding=encoding_from_proto(msg.encoding),
        total_bytes=msg.total_bytes,
        digest=msg.digest,
    )


def training_config_to_proto(cfg: TrainingConfig) -> pb.TrainingConfig:
    return pb.TrainingConfig(
        model=cfg.model,
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        mask_ratio=cfg.mask_ratio,
        update_encoding=encoding_to_proto(encoding_from_name(cfg.update_encoding)),
        max_samples=cfg.max_samples,
        proximal_mu=cfg.proximal_mu,
        dp_clip=cfg.dp_clip,
    )


def training_config_from_proto(msg: pb.TrainingConfig) -> TrainingConfig:
    """A task's config; fields left at proto3's zero take ``TrainingConfig``'s defaults."""
    defaults = TrainingConfig()
    return TrainingConfig(
        model=msg.model or defaults.model,
        local_epochs=msg.local_epochs or defaults.local_epochs,
        batch_size=msg.batch_size or defaults.batch_size,
        learning_rate=msg.learning_rate or defaults.learning_rate,
        weight_decay=msg.weight_decay,
        mask_ratio=msg.mask_ratio or defaults.mask_ratio,
        update_encoding=encoding_from_proto(msg.update_encoding).name.lower(),
        max_samples=msg.max_samples,
        proximal_mu=msg.proximal_mu,
        dp_clip=msg.dp_clip,
    )


def iter_chunks(payload: memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[pb.Chunk]:
    """Cut a payload into ``Chunk`` messages, for tools and tests that build them
    (the hot path writes ``fedmae.transport.frames`` frames)."""
    for offset, data in iter_slices(payload, chunk_size):
        yield pb.Chunk(offset=offset, data=bytes(data))
