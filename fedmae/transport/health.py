"""Asking an aggregator how it is, through the standard gRPC health service."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedmae.pki.files import ClientIdentity
from fedmae.transport.channels import open_channel

_STATUS = health_pb2.HealthCheckResponse.ServingStatus


@dataclass(frozen=True)
class HealthAnswer:
    """What a health check learned: the server's answer, or why there was none."""

    status: str  # the serving status by name (SERVING, NOT_SERVING ...), else the call's code
    failure: str | None = None  # the failed call's details; None when the server answered

    @property
    def serving(self) -> bool:
        return self.failure is None and self.status == _STATUS.Name(_STATUS.SERVING)

    def __str__(self) -> str:
        return self.status if self.failure is None else f"{self.status}: {self.failure}"


def check_health(
    target: str, identity: ClientIdentity | None, service: str = "", timeout: float = 5.0
) -> HealthAnswer:
    """Ask ``target`` about ``service`` ('' = the whole server): over mTLS with
    ``identity``, plaintext without one. A call that fails (not reachable, an unknown
    service ...) is an answer too, not an error; a local problem (no ``ca.pem``) is."""
    with open_channel(target, identity, insecure=identity is None) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as err:
            return HealthAnswer(err.code().name, str(err.details()))
    return HealthAnswer(_STATUS.Name(answer.status))
