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

from fedmae.errors import InvalidUpdate


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
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        what = f"the request of {handler_call_details.method}"
        safe = _safe(handler.request_deserializer, what)
        if handler.request_streaming:
            inner = handler.stream_unary or handler.stream_stream
            name = "stream_unary" if handler.stream_unary else "stream_stream"

            def streaming(requests, context, _inner=inner):
                return _inner(_checked(requests), context)

            return handler._replace(request_deserializer=safe, **{name: streaming})
        inner = handler.unary_unary or handler.unary_stream
        name = "unary_unary" if handler.unary_unary else "unary_stream"

        def unary(request, context, _inner=inner):
            if isinstance(request, Malformed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
            return _inner(request, context)

        return handler._replace(request_deserializer=safe, **{name: unary})
