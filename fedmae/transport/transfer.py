"""Moving tensors over the Federation service: fetch a model, submit a delta (or a
secure round's masked input, or one of its answers), at the level of the generated
stub and its messages (``FederationClient`` speaks the domain's
objects over these; tools and tests that take the messages apart use them directly).

Payload chunks go out and come in as ``fedmae.transport.frames`` frames: no protobuf
copy of the bytes on either side."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Mapping

import grpc
import numpy as np
import torch

from fedmae.errors import InvalidUpdate
from fedmae.payload.buffers import BufferPool
from fedmae.payload.chunks import DEFAULT_CHUNK_SIZE, iter_slices
from fedmae.payload.decoder import PayloadDecoder
from fedmae.payload.digest import PayloadDigest, payload_digest
from fedmae.payload.encodings import Encoding, encode
from fedmae.payload.layout import ModelLayout, ring_manifest
from fedmae.rounds import UpdateHeader
from fedmae.transport import frames as wire
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport._proto import federation_pb2_grpc as pb_grpc
from fedmae.transport.events import update_header_to_proto
from fedmae.transport.messages import encoding_to_proto, manifest_from_proto
from fedmae.transport.retry import CONNECTION_LOST, RetryPolicy

log = logging.getLogger(__name__)

# A broken download resumes from its last byte; a busy server (no download slot
# freed) is asked again.
DOWNLOAD_RETRY = RetryPolicy(
    retry_on=CONNECTION_LOST | {grpc.StatusCode.RESOURCE_EXHAUSTED}, initial_s=0.5
)
# Uploads in flight or the request rate at their limit: wait, then send it again.
# Nothing else: a refused update (stale, round closed) is not worth a second try.
BUSY_UPLOAD_RETRY = RetryPolicy(
    retry_on=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}),
    initial_s=0.25,
    max_s=30.0,
    max_fault_retries=0,
)


def federation_stub(channel: grpc.Channel) -> pb_grpc.FederationStub:
    """The generated stub, with payload chunks framed by ``fedmae.transport.frames`` (no protobuf
    copies of the bytes). Same RPCs and the same bytes on the wire."""
    stub = pb_grpc.FederationStub(channel)
    service = "/" + pb.DESCRIPTOR.services_by_name["Federation"].full_name
    stub.FetchModel = channel.unary_stream(
        f"{service}/FetchModel",
        request_serializer=pb.FetchModelRequest.SerializeToString,
        response_deserializer=wire.deserializer(pb.ModelChunk),
        _registered_method=True,
    )
    stub.SubmitUpdate = channel.stream_unary(
        f"{service}/SubmitUpdate",
        request_serializer=wire.serializer(pb.UpdateMessage),
        response_deserializer=pb.UpdateReceipt.FromString,
        _registered_method=True,
    )
    return stub


def fetch_model(
    stub: pb_grpc.FederationStub,
    layout: ModelLayout,
    version: int | None = None,
    encoding: Encoding = Encoding.FP32,
    timeout: float | None = None,
    resume_attempts: int = 3,
    pool: BufferPool | None = None,
    stop: threading.Event | None = None,
) -> tuple[pb.ModelHeader, torch.Tensor]:
    """Download a published version (``None`` = the latest) into one flat float32
    tensor, checked end to end.

    A broken download resumes from the last byte received (of the same version, also
    when the latest was asked for) instead of starting over.
    With a ``pool`` the receive buffer is taken from it (see ``BufferPool``); ``stop``
    cuts a wait before resuming short.
    """
    header: pb.ModelHeader | None = None
    decoder: PayloadDecoder | None = None
    retries = dataclasses.replace(DOWNLOAD_RETRY, max_retries=resume_attempts).start(stop)
    while True:
        if header is not None:
            version = header.version
        request = pb.FetchModelRequest(
            encoding=encoding_to_proto(encoding), offset=decoder.received if decoder else 0
        )
        if version is None:
            request.latest = True
        else:
            request.version = version
        try:
            stream = stub.FetchModel(request, timeout=timeout)
            first = next(stream, None)
            if first is None or wire.part(first) != "header":
                raise InvalidUpdate("model stream did not start with a ModelHeader")
            if header is None:
                header = first.header
                manifest = manifest_from_proto(header.manifest)
                decoder = PayloadDecoder(layout, manifest, pool=pool)  # checks shapes
            elif first.header.manifest.digest != header.manifest.digest:
                raise InvalidUpdate("the model changed while its download was resumed")
            for msg in stream:
                if wire.part(msg) != "chunk":
                    raise InvalidUpdate("model stream holds a second header")
                decoder.write(wire.chunk_of(msg))
            return header, decoder.finish(header.manifest.digest)
        except grpc.RpcError as err:
            decision = retries.decide(err)
            if not decision.retry:
                final = retries.give_up(err, decision)
                if final is err:
                    raise
                raise final from err
            busy = err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # no download slot freed
            log.warning(
                "model download %s at byte %d (%s); resuming in %.1fs",
                "refused, server busy," if busy else "broken",
                decoder.received if decoder else 0,
                err.code().name,
                decision.delay_s,
            )
            if not retries.wait(decision.delay_s):
                raise


def update_messages(
    layout: ModelLayout,
    delta: torch.Tensor,
    *,
    round_: int,
    base_version: int,
    num_samples: int,
    encoding: Encoding,
    metrics: Mapping[str, float],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[pb.UpdateMessage]:
    """Header, chunks, trailer of one update as protobuf messages, for tools and tests
    that take them apart (``submit_update`` sends the same bytes as ready frames)."""
    payload = encode(delta, encoding)
    header = _header(layout, round_, base_version, num_samples, encoding, metrics)
    for msg in _messages(header, payload, chunk_size):
        yield pb.UpdateMessage.FromString(msg) if isinstance(msg, bytes) else msg


def _header(layout, round_, base_version, num_samples, encoding, metrics) -> pb.UpdateHeader:
    manifest = layout.manifest(encoding)
    return update_header_to_proto(
        UpdateHeader(round_, base_version, num_samples, manifest, dict(metrics))
    )


def _messages(
    header: pb.UpdateHeader, payload: memoryview, chunk_size: int
) -> Iterator[pb.UpdateMessage | bytes]:
    """Header, chunks as serialized frames (``fedmae.transport.frames``), trailer. The digest is
    taken chunk by chunk as they go out (one pass, while each is in cache)."""
    yield pb.UpdateMessage(header=header)
    digest = PayloadDigest()
    for offset, piece in iter_slices(payload, chunk_size):
        digest.update(piece)
        yield wire.frame(offset, piece)
    yield pb.UpdateMessage(trailer=pb.UpdateTrailer(digest=digest.hexdigest()))


def submit_update(
    stub: pb_grpc.FederationStub,
    layout: ModelLayout,
    delta: torch.Tensor,
    *,
    round_: int,
    base_version: int,
    num_samples: int,
    encoding: Encoding = Encoding.FP32,
    metrics: Mapping[str, float] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float | None = None,
    busy_retries: int = 8,
    stop: threading.Event | None = None,
) -> pb.UpdateReceipt:
    """Upload ``delta`` (local − global, flat float32) for a round; return the receipt.

    The payload is encoded once. When the server is busy (RESOURCE_EXHAUSTED:
    uploads in flight, request rate) the upload waits with backoff (``stop`` cuts it
    short) and is sent again.
    """
    payload = encode(delta, encoding)
    header = _header(layout, round_, base_version, num_samples, encoding, metrics or {})
    retries = dataclasses.replace(BUSY_UPLOAD_RETRY, max_retries=busy_retries).start(stop)
    return retries.call(
        lambda: _admitted_upload(stub, _messages(header, payload, chunk_size), timeout),
        "server busy; sending the update again",
        logger=log,
    )


_RING_ENCODINGS = {np.dtype(np.uint32): Encoding.RING32, np.dtype(np.uint64): Encoding.RING64}


def submit_masked_input(
    stub: pb_grpc.FederationStub,
    ring: np.ndarray,
    *,
    round_: int,
    base_version: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float | None = None,
    busy_retries: int = 8,
    stop: threading.Event | None = None,
) -> pb.UpdateReceipt:
    """Upload a secure round's masked input (``ring``: d+1 elements, uint32 or uint64)
    as an update in RING32/RING64, with the same waits as ``submit_update``.

    The chunks are views of ``ring`` (each copied once into its frame); its sample
    count is 0, as the weight travels masked in its last element.
    """
    encoding = _RING_ENCODINGS.get(ring.dtype)
    if encoding is None or ring.ndim != 1 or not ring.flags.c_contiguous:
        raise ValueError(
            f"a masked input is one contiguous uint32 or uint64 vector, not {ring.dtype} "
            f"of shape {list(ring.shape)}"
        )
    payload = memoryview(ring).cast("B")
    manifest = ring_manifest(len(ring), encoding, payload_digest(payload))
    header = update_header_to_proto(UpdateHeader(round_, base_version, 0, manifest))
    retries = dataclasses.replace(BUSY_UPLOAD_RETRY, max_retries=busy_retries).start(stop)
    return retries.call(
        lambda: _admitted_upload(stub, _messages(header, payload, chunk_size), timeout),
        "server busy; sending the masked input again",
        logger=log,
    )


def submit_secagg(
    stub: pb_grpc.FederationStub,
    message: pb.UpdateMessage,
    *,
    timeout: float | None = None,
    busy_retries: int = 8,
    stop: threading.Event | None = None,
) -> pb.UpdateReceipt:
    """Send a secure-aggregation answer (``fedmae.transport.secagg.answer_message``)
    as a SubmitUpdate stream of that one message; the receipt. A busy server is asked
    again as in ``submit_update``; one small message, so nothing waits for admission."""
    retries = dataclasses.replace(BUSY_UPLOAD_RETRY, max_retries=busy_retries).start(stop)
    return retries.call(
        lambda: stub.SubmitUpdate(iter((message,)), timeout=timeout),
        "server busy; sending the secure-aggregation answer again",
        logger=log,
    )


def _admitted_upload(
    stub: pb_grpc.FederationStub, messages: Iterator[pb.UpdateMessage | bytes], timeout
) -> pb.UpdateReceipt:
    """Send the header, then the chunks once the server admits the upload (its initial
    metadata): an upload waiting for a slot on a busy server holds nothing there but
    its header, however many clients wait."""
    admitted = threading.Event()

    def gated() -> Iterator[pb.UpdateMessage | bytes]:
        yield next(messages)  # the header
        admitted.wait()
        yield from messages

    call = stub.SubmitUpdate.future(gated(), timeout=timeout)
    try:
        call.initial_metadata()  # returns once admitted, or once the call has ended
    except BaseException:  # interrupted (Ctrl-C, agent stop): do not send it after all
        call.cancel()
        raise
    finally:
        admitted.set()
    return call.result()
