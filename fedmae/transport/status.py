"""Domain errors as gRPC status codes: the one table, and the one server interceptor
that answers with it.

Servicers raise ``fedmae.errors`` types (or let them through) and never call
``context.abort`` themselves: ``StatusInterceptor`` answers a ``FedmaeError`` with its
code from ``STATUS_CODES`` and its message, and any other exception, a bug, with
INTERNAL and a short message that gives nothing away (the traceback goes to the log,
under a reference the message names). Before it, gRPC answered a bug with UNKNOWN and
the exception's text, and clients took UNKNOWN for a lost connection.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import NoReturn

import grpc

from fedmae import errors

log = logging.getLogger(__name__)

# docs/errors.md ("Where the codes come from") lists this table; tests/unit/
# test_status_table.py keeps the two equal and every FedmaeError type in it.
STATUS_CODES: Mapping[type[errors.FedmaeError], grpc.StatusCode] = {
    errors.FedmaeError: grpc.StatusCode.INTERNAL,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.InvalidUpdate: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.StaleUpdate: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DuplicateUpdate: grpc.StatusCode.FAILED_PRECONDITION,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RoundClosedError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.TransferIdle: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.VersionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # A conflict between two holders of one identity, not a server fault: agents stop
    # on ABORTED instead of evicting each other forever.
    errors.ConnectionReplaced: grpc.StatusCode.ABORTED,
}


def status_code(error: BaseException) -> grpc.StatusCode:
    """The code ``error`` is answered with: its type's entry (or its nearest base's) in
    ``STATUS_CODES``; INTERNAL for anything that is not a ``FedmaeError``."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


# The other way, for a client: the domain error a refusal with a code stands for. Where
# several share a code, the general one; a code no domain error stands for (UNAVAILABLE,
# CANCELLED, DEADLINE_EXCEEDED, which a client's own timeout gives too, UNKNOWN ...)
# gives FedmaeError itself. error_for(code, m) is answered with code again.
_ERRORS_FOR_CODES: Mapping[grpc.StatusCode, type[errors.FedmaeError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.LimitExceeded,
    grpc.StatusCode.ABORTED: errors.ConnectionReplaced,
}


def error_for(code: grpc.StatusCode, message: str) -> errors.FedmaeError:
    """The domain error a refusal with ``code`` stands for, carrying ``message``."""
    return _ERRORS_FOR_CODES.get(code, errors.FedmaeError)(message)


def domain_error(err: grpc.RpcError) -> errors.FedmaeError:
    """A failed call as a domain error whose message is ``CODE: details``: what an
    operator is shown (docs/errors.md explains each code)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return error_for(code, f"{code.name}: {details}")


@contextmanager
def domain_errors() -> Iterator[None]:
    """Inside: a failed call that escapes is raised again as its ``domain_error``."""
    try:
        yield
    except grpc.RpcError as err:
        raise domain_error(err) from err


Behaviour = Callable[..., object]  # (request or request iterator, context) -> response(s)
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def wrap_behaviour(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour, bool], Behaviour]
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour (whichever of the four kinds it has) replaced by
    ``wrap(behaviour, response_streaming)``: the one way fedmae's interceptors wrap a call."""
    for kind in _KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return handler._replace(**{kind: wrap(behaviour, handler.response_streaming)})
    return handler


def _answer(context: grpc.ServicerContext, method: str, error: Exception) -> NoReturn:
    """End the call that raised ``error`` with the status it deserves."""
    if isinstance(error, errors.FedmaeError):
        context.abort(status_code(error), str(error))
    if context.code() is not None or not context.is_active():
        # The call already has its status (context.abort raises too), or the client has
        # gone (a cancelled stream raises from the request iterator): nothing to answer.
        raise error
    reference = secrets.token_hex(4)
    log.error("%s failed (ref %s): %s", method, reference, type(error).__name__, exc_info=error)
    context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in the server (ref {reference}): the aggregator logged it; this "
        "is a bug, please report it with the reference",
    )
    raise AssertionError("context.abort returned")  # pragma: no cover


class StatusInterceptor(grpc.ServerInterceptor):
    """Answers every call that raises: a ``FedmaeError`` with its code and message, any
    other exception with INTERNAL after logging its traceback. Put it first in the
    server's interceptors, so it also answers what the other interceptors raise."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def answered(behaviour: Behaviour, response_streaming: bool) -> Behaviour:
            if response_streaming:

                def streaming(request, context):
                    try:
                        yield from behaviour(request, context)
                    except Exception as error:
                        _answer(context, method, error)

                return streaming

            def unary(request, context):
                try:
                    return behaviour(request, context)
                except Exception as error:
                    _answer(context, method, error)

            return unary

        return wrap_behaviour(handler, answered)
