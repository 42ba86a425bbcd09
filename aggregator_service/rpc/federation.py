"""The Federation servicer: translate messages to round-engine calls; nothing else.
Domain errors are answered by ``fedmae.transport.status.StatusInterceptor``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from aggregator_service.engine import RoundEngine
from aggregator_service.idle_transfers import read_with_idle_limit
from aggregator_service.rpc.auth import Authorizer
from fedmae.errors import FedmaeError, InvalidRequest, InvalidUpdate, TransferIdle
from fedmae.rounds import Heartbeat, RunFinished
from fedmae.transport import frames as wire
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport._proto import federation_pb2_grpc as pb_grpc
from fedmae.transport.events import (
    event_to_proto,
    model_header_to_proto,
    progress_from_proto,
    receipt_to_proto,
    update_header_from_proto,
)
from fedmae.transport.messages import encoding_from_proto
from fedmae.transport.secagg import secagg_answer
from fedmae.transport.status import status_code

log = logging.getLogger(__name__)

ADMITTED_KEY = "fedmae-upload-admitted"  # initial metadata of an admitted SubmitUpdate


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, rounds: RoundEngine, auth: Authorizer, heartbeat_s: float):
        self.rounds = rounds
        self.auth = auth
        self.heartbeat_s = heartbeat_s

    def Subscribe(self, request: pb.SubscribeRequest, context) -> Iterator[pb.RoundEvent]:
        client_id = self.auth.client(context)
        sub = self.rounds.subscribe(client_id, context.peer())
        context.add_callback(lambda: self.rounds.unsubscribe(sub))
        while True:
            event = sub.next(timeout=self.heartbeat_s)
            if event is None:
                if sub.error is not None:
                    raise sub.error
                return
            if isinstance(event.body, Heartbeat):
                try:  # a revocation written by another process is noticed here
                    self.auth.client(context)
                except FedmaeError:
                    self.rounds.unsubscribe(sub)
                    raise
            yield event_to_proto(event)
            if isinstance(event.body, RunFinished):
                return

    def FetchModel(self, request: pb.FetchModelRequest, context) -> Iterator[pb.ModelChunk]:
        client_id = self.auth.client(context)
        version = _requested_version(request)
        download = self.rounds.downloads.acquire(client_id, context.is_active, context.cancel)
        try:
            header, chunks = self.rounds.downloads.stream(
                version, encoding_from_proto(request.encoding), request.chunk_size, request.offset
            )
            log.debug("client %s fetches version %d", client_id, header.version)
            download.touch()  # preparing it (encoding a version once) is not the client's idling
            yield pb.ModelChunk(header=model_header_to_proto(header))
            for frame in chunks:  # serialized ModelChunk frames (fedmae.transport.frames)
                download.touch()  # the previous frame left: the client reads
                yield frame
            self.rounds.download_finished(client_id, header.version)
        finally:
            self.rounds.downloads.release(download)

    def SubmitUpdate(self, request_iterator, context) -> pb.UpdateReceipt:
        client_id = self.auth.client(context)
        first = next(request_iterator, None)
        answer = secagg_answer(first) if first is not None else None
        if answer is not None:  # a secure-aggregation message: one per stream
            return receipt_to_proto(self.rounds.secagg_answer(client_id, answer))
        progress = progress_from_proto(first) if first is not None else None
        if progress is not None:  # a progress report: one per stream
            return receipt_to_proto(self.rounds.training_progress(client_id, progress))
        if first is None or wire.part(first) != "header":
            raise InvalidUpdate("an update stream must start with an UpdateHeader")
        header = update_header_from_proto(first.header)
        session = self.rounds.uploads.open(client_id, header, context.is_active)
        # Admitted: tell the client to send its chunks now. Until then a waiting upload
        # holds only its header here (fedmae.transport.transfer waits for this).
        context.send_initial_metadata(((ADMITTED_KEY, "1"),))
        idle_s = self.rounds.config.upload_idle_s

        def idle() -> TransferIdle:
            return TransferIdle(
                f"no chunk for {idle_s:g}s after {session.bytes} bytes: the upload was "
                "dropped to free its slot; send the update again while the round is open"
            )

        try:
            for msg in read_with_idle_limit(request_iterator, idle_s, idle):
                part = wire.part(msg)
                if part == "chunk":
                    session.write(wire.chunk_of(msg))
                elif part == "trailer":
                    receipt = self.rounds.uploads.complete(session, msg.trailer.digest)
                    return receipt_to_proto(receipt)
                else:
                    raise InvalidUpdate(f"unexpected {part or 'empty message'} after the header")
            raise InvalidUpdate(
                f"update stream ended after {session.bytes} bytes without an UpdateTrailer "
                "(truncated upload)"
            )
        except FedmaeError as err:  # refused: free the client's slot, then answer
            self.rounds.uploads.abort(session, str(err), status_code(err).name.lower())
            raise
        except Exception as err:  # a cancelled or broken stream: free the client's slot
            self.rounds.uploads.abort(session, f"upload broken: {type(err).__name__}")
            raise
        finally:  # folded in or refused: the receive buffer serves the next upload
            session.decoder.release()


def _requested_version(request: pb.FetchModelRequest) -> int | None:
    """The version a FetchModel asks for; ``None`` = the latest."""
    which = request.WhichOneof("which")
    if which == "version":
        return request.version
    if which == "latest" and request.latest:
        return None
    raise InvalidRequest("FetchModel needs a version: set 'version' (0 = the initial model) "
                         "or 'latest: true'")  # fmt: skip


def add_to_server(servicer: FederationServicer, server) -> None:
    """Register the servicer like the generated ``add_FederationServicer_to_server``,
    with payload chunks framed by ``fedmae.transport.frames`` (no protobuf copies of the bytes)."""
    handlers = {
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            servicer.Subscribe,
            request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=pb.RoundEvent.SerializeToString,
        ),
        "FetchModel": grpc.unary_stream_rpc_method_handler(
            servicer.FetchModel,
            request_deserializer=pb.FetchModelRequest.FromString,
            response_serializer=wire.serializer(pb.ModelChunk),
        ),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitUpdate,
            request_deserializer=wire.deserializer(pb.UpdateMessage),
            response_serializer=pb.UpdateReceipt.SerializeToString,
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["Federation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
