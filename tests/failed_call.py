"""A failed gRPC call as a client sees it, for tests of what clients do with one."""

from __future__ import annotations

import grpc


class Failed(grpc.RpcError):
    """A failed call: a code and details."""

    def __init__(self, code: grpc.StatusCode, details: str = "it failed"):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details
