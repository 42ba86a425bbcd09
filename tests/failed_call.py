"""A failed gRPC call as a client sees it, for tests of what clients do with one."""

from __future__ import annotations

import grpc

from fedmae.transport.status import Answered


class Failed(Answered, grpc.RpcError):
    """A failed call: a code and details (``code()``, ``details()``)."""

    def __init__(self, code: grpc.StatusCode, details: str = "it failed"):
        super().__init__(code, details)
