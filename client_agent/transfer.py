"""Moving tensors over the Federation service: fetch a model, submit a delta."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Mapping

import grpc
import torch

from fedmae._proto import federation_pb2 as pb
from fedmae._proto import federation_pb2_grpc as pb_grpc
from fedmae.errors import InvalidUpdate
from fedmae.tensor_codec import (
    DEFAULT_CHUNK_SIZE,
    ModelLayout,
    PayloadDecoder,
    encode,
    iter_slices,
    sha256_hex,
)

log = logging.getLogger(__name__)


def fetch_model(
    stub: pb_grpc.FederationStub,
    layout: ModelLayout,
    version: int = 0,
    encoding: int = pb.ENCODING_FP32,
    timeout: float | None = None,
    resume_attempts: int = 3,
) -> tuple[pb.ModelHeader, torch.Tensor]:
    """Download a published version into one flat float32 tensor, checked end to end.

    A broken download resumes from the last byte received instead of starting over.
    """
    header: pb.ModelHeader | None = None
    decoder: PayloadDecoder | None = None
    for attempt in range(resume_attempts + 1):
        request = pb.FetchModelRequest(
            version=header.version if header else version,
            encoding=encoding,
            offset=decoder.received if decoder else 0,
        )
        try:
            stream = stub.FetchModel(request, timeout=timeout)
            first = next(stream, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidUpdate("model stream did not start with a ModelHeader")
            if header is None:
                header = first.header
                decoder = PayloadDecoder(layout, header.manifest)  # refuses another shape
            elif first.header.manifest.sha256 != header.manifest.sha256:
                raise InvalidUpdate("the model changed while its download was resumed")
            for msg in stream:
                decoder.write(msg.chunk)
            return header, decoder.finish(header.manifest.sha256)
        except grpc.RpcError as err:
            if not is_retryable(err) or attempt == resume_attempts:
                raise
            log.warning(
                "model download broken at byte %d (%s); resuming",
                decoder.received if decoder else 0,
                err.code().name,
            )
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def update_messages(
    layout: ModelLayout,
    delta: torch.Tensor,
    *,
    round_: int,
    base_version: int,
    num_samples: int,
    encoding: int,
    metrics: Mapping[str, float],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[pb.UpdateMessage]:
    """Header, chunks, trailer of one update."""
    payload = encode(delta, encoding)
    header = _header(layout, round_, base_version, num_samples, encoding, metrics)
    return _messages(header, payload, sha256_hex(payload), chunk_size)


def _header(layout, round_, base_version, num_samples, encoding, metrics) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        round=round_,
        base_version=base_version,
        num_samples=num_samples,
        manifest=layout.manifest(encoding),
        metrics=dict(metrics),
    )


def _messages(
    header: pb.UpdateHeader, payload: memoryview, sha256: str, chunk_size: int
) -> Iterator[pb.UpdateMessage]:
    yield pb.UpdateMessage(header=header)
    for offset, data in iter_slices(payload, chunk_size):
        msg = pb.UpdateMessage()
        msg.chunk.offset = offset
        msg.chunk.data = data  # set in place: no second copy of the bytes
        yield msg
    yield pb.UpdateMessage(trailer=pb.UpdateTrailer(sha256=sha256))


def submit_update(
    stub: pb_grpc.FederationStub,
    layout: ModelLayout,
    delta: torch.Tensor,
    *,
    round_: int,
    base_version: int,
    num_samples: int,
    encoding: int = pb.ENCODING_FP32,
    metrics: Mapping[str, float] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float | None = None,
    busy_retries: int = 8,
) -> pb.UpdateReceipt:
    """Upload ``delta`` (local − global, flat float32) for a round; return the receipt.

    The payload is encoded and hashed once. When the server is busy (RESOURCE_EXHAUSTED:
    uploads in flight, request rate) the upload waits with backoff and is sent again.
    """
    payload = encode(delta, encoding)
    sha = sha256_hex(payload)
    header = _header(layout, round_, base_version, num_samples, encoding, metrics or {})
    for attempt in range(busy_retries + 1):
        try:
            return stub.SubmitUpdate(_messages(header, payload, sha, chunk_size), timeout=timeout)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == busy_retries:
                raise
            wait = min(30.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.5)
            log.info("server busy (%s); sending the update again in %.1fs", err.details(), wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def is_retryable(err: grpc.RpcError) -> bool:
    """Errors worth reconnecting for (server away, connection cut)."""
    return err.code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    )
