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

import functools
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
    errors.KeysRejected: grpc.StatusCode.INVALID_ARGUMENT,
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
    # A site stopped a secure-aggregation round on a failed check: trying the same
    # round again cannot pass it.
    errors.SecAggAborted: grpc.StatusCode.ABORTED,
    errors.SecAggFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ServerFault: grpc.StatusCode.INTERNAL,
}

# The reverse, for a client: the domain error a status code is raised as. A code that
# several types share is raised as the widest of them; codes only gRPC itself answers
# with join the nearest type (CANCELLED: a stream the server cut; UNKNOWN: gRPC's
# answer to an exception, in the server or in our own request iterator).
DOMAIN_ERRORS: Mapping[grpc.StatusCode, type[errors.FedmaeError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.LimitExceeded,
    grpc.StatusCode.ABORTED: errors.ConnectionReplaced,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Unavailable,
    grpc.StatusCode.INTERNAL: errors.ServerFault,
    grpc.StatusCode.UNKNOWN: errors.ServerFault,
}


def status_code(error: BaseException) -> grpc.StatusCode:
    """The code ``error`` is answered with: its type's entry (or its nearest base's) in
    ``STATUS_CODES``; INTERNAL for anything that is not a ``FedmaeError``."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


class Answered:
    """A peer's answer, kept as ``grpc.RpcError``'s ``code()`` and ``details()``: mixed
    into a domain error raised from one (and into a failed call a test makes up)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@functools.cache
def _answered(cls: type[errors.FedmaeError]) -> type[errors.FedmaeError]:
    return type(cls.__name__, (Answered, cls, grpc.RpcError), {"__module__": __name__})


def error_for(code: grpc.StatusCode, message: str) -> errors.FedmaeError:
    """The domain error a refusal with ``code`` stands for (``DOMAIN_ERRORS``; the base
    ``FedmaeError`` for another code), carrying ``message``."""
    return _answered(DOMAIN_ERRORS.get(code, errors.FedmaeError))(code, message)


def _answer_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return code, details or ""


def domain_error(err: grpc.RpcError) -> errors.FedmaeError:
    """``err``, a failed call, as the domain error of its code (``DOMAIN_ERRORS``; the
    base ``FedmaeError`` for another code), its details as the message: what a client
    of fedmae catches. It stays a ``grpc.RpcError`` with the same ``code()`` and
    ``details()``, so the retry policy and gRPC-level tools read it as before."""
    if isinstance(err, errors.FedmaeError):
        return err  # converted already (or raised as both, like ``retry.ServerFault``)
    code, details = _answer_of(err)
    error = error_for(code, details)
    error.__cause__ = err
    return error


def shown_error(err: grpc.RpcError) -> errors.FedmaeError:
    """A failed call as its domain error with the message ``CODE: details``: what an
    operator is shown (docs/errors.md explains each code)."""
    code, details = _answer_of(err)
    return error_for(code, f"{code.name}: {details}")


@contextmanager
def domain_errors() -> Iterator[None]:
    """Inside: a failed call that escapes is raised again as its ``shown_error``."""
    try:
        yield
    except grpc.RpcError as err:
        raise shown_error(err) from err


def status_name(error: BaseException) -> str:
    """The name of the code ``error`` came with (a peer's answer), or would be
    answered with (``status_code``): for logs and a client's status file."""
    code = error.code() if isinstance(error, grpc.RpcError) else status_code(error)
    return code.name


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
