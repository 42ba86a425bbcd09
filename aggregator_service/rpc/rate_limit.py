"""Token buckets: per client (``Authorizer``) and per peer address (enrollment port)."""

from __future__ import annotations

import ipaddress
import threading
import time

import grpc

from fedmae.errors import LimitExceeded
from fedmae.transport.status import Behaviour, wrap_behaviour


class RateLimiter:
    """A token bucket per key: ``rate`` requests per second, bursts of ``2 * rate``
    (at least 1). ``rate <= 0`` allows everything.

    At most ``max_keys`` buckets are kept: when there are more, the buckets that have
    refilled (idle for a burst's worth of time) are dropped, as they hold nothing a new
    bucket would not. So many peers cost bounded memory.
    """

    def __init__(self, rate: float, max_keys: int = 100_000):
        self.rate = rate
        self.burst = max(1.0, 2 * rate)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
        return ok

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}


def peer_address(peer: str) -> str:
    """The rate-limit key of a gRPC peer string: the IPv4 address, or the /64 network of
    an IPv6 address (one host usually owns a whole /64, so per-address limits would be
    free to dodge). ``"ipv4:203.0.113.7:51234"`` -> ``"203.0.113.7"``,
    ``"ipv6:[2001:db8::1]:443"`` -> ``"2001:db8::/64"``; anything else is kept whole."""
    kind, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0].strip("[]")
    try:
        if kind == "ipv4":
            return str(ipaddress.IPv4Address(host))
        if kind == "ipv6":
            address = ipaddress.IPv6Address(host.split("%")[0])
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
    except ValueError:
        pass
    return peer


class PeerRateLimit(grpc.ServerInterceptor):
    """Refuse calls over ``rate`` per second from one peer address (``peer_address``)
    with ``LimitExceeded`` (RESOURCE_EXHAUSTED), before the servicer runs."""

    def __init__(self, rate: float, what: str):
        self.limiter = RateLimiter(rate)
        self.what = what

    def _check(self, context: grpc.ServicerContext) -> None:
        address = peer_address(context.peer())
        if not self.limiter.allow(address):
            raise LimitExceeded(
                f"{self.what}: more than {self.limiter.rate:g} requests per second from "
                f"{address}; wait a few seconds and try again"
            )

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or self.limiter.rate <= 0:
            return handler

        def limited(behaviour: Behaviour, _streaming: bool) -> Behaviour:
            def call(request, context):
                self._check(context)
                return behaviour(request, context)

            return call

        return wrap_behaviour(handler, limited)
