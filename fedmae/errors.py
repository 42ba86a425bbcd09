"""Domain errors: what went wrong, in the words of the domain, with no transport.

Business logic raises these. Each maps to one gRPC status code in one table,
``fedmae.transport.status.STATUS_CODES``, and one server interceptor answers a call
with it: servicers translate messages and nothing else. Messages are written for a
person: say what was wrong and what to do.
"""

from __future__ import annotations


class FedmaeError(Exception):
    """Base of every error fedmae reports to a peer."""


class Unauthenticated(FedmaeError):
    """No identity, or one we do not know."""


class PermissionDenied(FedmaeError):
    """Known identity, not allowed (revoked, wrong role, not selected)."""


class InvalidUpdate(FedmaeError):
    """A malformed request: manifest, shape, dtype, offset, size, checksum, NaN."""


class StaleUpdate(FedmaeError):
    """An update for a round or base version that is not the current one."""


class DuplicateUpdate(FedmaeError):
    """A second update from the same client in the same round."""


class RoundClosedError(FedmaeError):
    """The round closed (deadline) before the update was complete."""


class NotFound(FedmaeError):
    """An unknown client, token or other named thing."""


class VersionNotFound(NotFound):
    """A model version that was never published or is no longer kept."""


class AlreadyExists(FedmaeError):
    """A name that belongs to someone else (e.g. another enrolled client)."""


class InvalidRequest(FedmaeError):
    """A malformed request other than an update (bad CSR, name, ttl ...)."""


class FailedPrecondition(FedmaeError):
    """A request the current state forbids (revoking the last admin, or oneself)."""


class KeysRejected(InvalidRequest):
    """Secure-aggregation keys whose signature or certificate chain does not verify."""


class SecAggAborted(FedmaeError):
    """A site refuses to go on with a secure-aggregation round: one of its checks failed."""


class SecAggFailed(FedmaeError):
    """A secure-aggregation round that cannot be unmasked (too few sites or shares)."""


class LimitExceeded(FedmaeError):
    """Over a size or rate limit."""


class TransferIdle(FedmaeError):
    """An admitted transfer that moved no data for the idle timeout: its slot is freed."""


class ConnectionReplaced(FedmaeError):
    """A newer connection of the same identity took over this one: a conflict between
    two holders of one identity, not a server fault. Agents stop on it instead of
    reconnecting, or two agents sharing an identity would evict each other forever."""


class ConfigError(FedmaeError):
    """A local configuration problem (files, flags); reported before serving."""


# What a client hears back besides the refusals above: the server away, late, or broken.


class Unavailable(FedmaeError):
    """The peer cannot be reached, or the connection went (a stream cut, a download
    cancelled to free its slot): worth another try later."""


class DeadlineExceeded(FedmaeError):
    """A call ran past its deadline: the caller's timeout, or the round's."""


class ServerFault(FedmaeError):
    """A fault in the peer (a bug), not a refusal: trying again will not mend it."""
