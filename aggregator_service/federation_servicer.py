"""The Federation servicer: translate messages to RoundManager calls and domain
errors to status codes; nothing else."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from aggregator_service.auth import Authorizer
from aggregator_service.round_manager import RoundManager
from fedmae._proto import federation_pb2 as pb
from fedmae._proto import federation_pb2_grpc as pb_grpc
from fedmae.errors import FedmaeError, InvalidUpdate, abort

log = logging.getLogger(__name__)


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, rounds: RoundManager, auth: Authorizer, heartbeat_s: float):
        self.rounds = rounds
        self.auth = auth
        self.heartbeat_s = heartbeat_s

    def Subscribe(self, request: pb.SubscribeRequest, context) -> Iterator[pb.RoundEvent]:
        try:
            client_id = self.auth.client(context)
        except FedmaeError as err:
            abort(context, err)
        sub = self.rounds.subscribe(client_id)
        context.add_callback(lambda: self.rounds.unsubscribe(sub))
        while True:
            event = sub.next(timeout=self.heartbeat_s)
            if event is None:
                if sub.error is not None:
                    abort(context, sub.error)
                return
            if event.HasField("heartbeat"):
                try:  # a revocation written by another process is noticed here
                    self.auth.client(context)
                except FedmaeError as err:
                    self.rounds.unsubscribe(sub)
                    abort(context, err)
            yield event
            if event.HasField("run_finished"):
                return

    def FetchModel(self, request: pb.FetchModelRequest, context) -> Iterator[pb.ModelChunk]:
        try:
            client_id = self.auth.client(context)
            header, chunks = self.rounds.model_stream(
                request.version, request.encoding, request.chunk_size, request.offset
            )
        except FedmaeError as err:
            abort(context, err)
        log.debug("client %s fetches version %d", client_id, header.version)
        yield pb.ModelChunk(header=header)
        for offset, data in chunks:
            msg = pb.ModelChunk()
            msg.chunk.offset = offset
            msg.chunk.data = data  # set in place: no second copy of the bytes
            yield msg

    def SubmitUpdate(self, request_iterator, context) -> pb.UpdateReceipt:
        try:
            client_id = self.auth.client(context)
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidUpdate("an update stream must start with an UpdateHeader")
            session = self.rounds.open_upload(client_id, first.header)
        except FedmaeError as err:
            abort(context, err)
        try:
            for msg in request_iterator:
                part = msg.WhichOneof("part")
                if part == "chunk":
                    session.write(msg.chunk)
                elif part == "trailer":
                    return self.rounds.complete_upload(session, msg.trailer.sha256)
                else:
                    raise InvalidUpdate(f"unexpected {part or 'empty message'} after the header")
            raise InvalidUpdate(
                f"update stream ended after {session.bytes} bytes without an UpdateTrailer "
                "(truncated upload)"
            )
        except FedmaeError as err:
            self.rounds.abort_upload(session, str(err), err.code.name.lower())
            abort(context, err)
        except Exception as err:  # a cancelled or broken stream: free the client's slot
            self.rounds.abort_upload(session, f"upload broken: {type(err).__name__}")
            raise
