"""Domain errors. Each maps to one gRPC status code, in one place (``grpc_status``).

Business logic raises these; servicers translate them and nothing else. Messages are
written for a person: say what was wrong and what to do.
"""

from __future__ import annotations

from typing import NoReturn

import grpc


class FedmaeError(Exception):
    """Base of every error fedmae reports to a peer."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class Unauthenticated(FedmaeError):
    """No identity, or one we do not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FedmaeError):
    """Known identity, not allowed (revoked, wrong role, not selected)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class InvalidUpdate(FedmaeError):
    """A malformed request: manifest, shape, dtype, offset, size, checksum, NaN."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class StaleUpdate(FedmaeError):
    """An update for a round or base version that is not the current one."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DuplicateUpdate(FedmaeError):
    """A second update from the same client in the same round."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RoundClosedError(FedmaeError):
    """The round closed (deadline) before the update was complete."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(FedmaeError):
    """An unknown client, token or other named thing."""

    code = grpc.StatusCode.NOT_FOUND


class VersionNotFound(NotFound):
    """A model version that was never published or is no longer kept."""


class AlreadyExists(FedmaeError):
    """A name that belongs to someone else (e.g. another enrolled client)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidRequest(FedmaeError):
    """A malformed request other than an update (bad CSR, name, ttl ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(FedmaeError):
    """A request the current state forbids (revoking the last admin, or oneself)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LimitExceeded(FedmaeError):
    """Over a size or rate limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TransferIdle(FedmaeError):
    """An admitted transfer that moved no data for the idle timeout: its slot is freed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ConnectionReplaced(FedmaeError):
    """A newer connection of the same identity took over this one. ABORTED (a conflict
    between two holders of one identity, not a server fault): agents stop on it instead
    of reconnecting, or two agents sharing an identity would evict each other forever."""

    code = grpc.StatusCode.ABORTED


class ConfigError(FedmaeError):
    """A local configuration problem (files, flags); reported before serving."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The status code a domain error is reported with."""
    if isinstance(error, FedmaeError):
        return error.code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, error: FedmaeError) -> NoReturn:
    """End an RPC with the error's status code and its message."""
    context.abort(error.code, str(error))
    raise AssertionError("context.abort returned")  # pragma: no cover
