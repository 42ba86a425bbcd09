"""A server interceptor that turns unparsable protobuf into INVALID_ARGUMENT.

Left alone, gRPC answers a request it cannot deserialize with INTERNAL and "Exception
deserializing request!", which tells a person nothing. Here a message that fails to
parse becomes a ``Malformed`` marker; unary calls are refused before the servicer runs,
and in request streams the marker raises ``InvalidUpdate`` where the servicer reads
it, so an upload's slot is released like for any other bad update.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from fedmae.errors import InvalidRequest, InvalidUpdate
from fedmae.transport.status import Behaviour, wrap_behaviour


@dataclass(frozen=True)
class Malformed:
    what: str
    error: str

    def message(self) -> str:
        return f"malformed protobuf: cannot parse {self.what} ({self.error})"


def _safe(deserializer, what: str):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as err:
            return Malformed(what, str(err) or type(err).__name__)

    return parse


def _checked(requests: Iterator) -> Iterator:
    for request in requests:
        if isinstance(request, Malformed):
            raise InvalidUpdate(request.message())
        yield request


class RequestGuard(grpc.ServerInterceptor):
    """Parse requests leniently; refuse unparsable ones with INVALID_ARGUMENT. Raises
    domain errors: ``StatusInterceptor`` (before it) answers them."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        what = f"the request of {handler_call_details.method}"
        safe = _safe(handler.request_deserializer, what)
        if handler.request_streaming:

            def checked_stream(behaviour: Behaviour, _streaming: bool) -> Behaviour:
                return lambda requests, context: behaviour(_checked(requests), context)

            return wrap_behaviour(handler, checked_stream)._replace(request_deserializer=safe)

        def checked_request(behaviour: Behaviour, _streaming: bool) -> Behaviour:
            def call(request, context):
                if isinstance(request, Malformed):
                    raise InvalidRequest(request.message())
                return behaviour(request, context)

            return call

        return wrap_behaviour(handler, checked_request)._replace(request_deserializer=safe)
