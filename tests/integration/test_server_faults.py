"""A bug in the server, over real gRPC and mTLS: the caller sees INTERNAL with a short
message (never the exception's text), the aggregator logs the traceback, domain errors
keep their codes, and the client agent stops after a few tries instead of reconnecting
forever."""

from __future__ import annotations

import json
import logging
import threading

import grpc
import pytest
from federation_harness import TIMEOUT, ScriptedClient, make_identities, make_server

from client_agent.agent import AgentConfig, ClientAgent
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.partitions import client_split
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.channels import open_channel
from fedmae.transport.retry import RetryPolicy

SECRET = "/srv/fedmae/secret-path"


@pytest.fixture
def buggy_server(tmp_path):
    """A real aggregator whose Subscribe has a bug (raises KeyError): its calls counted."""
    certs, ids = make_identities(tmp_path, ["s1"])
    server = make_server(tmp_path / "state", certs, min_clients=1, rounds=1, min_participants=1)
    calls: list[str] = []

    def subscribe_with_a_bug(client_id: str, peer: str):
        calls.append(client_id)
        raise KeyError(SECRET)

    server.rounds.subscribe = subscribe_with_a_bug
    server.start()
    try:
        yield server, certs, ids, calls
    finally:
        server.stop(grace=0)


def test_a_bug_is_answered_internal_and_logged_with_its_traceback(buggy_server, caplog):
    server, _, ids, calls = buggy_server
    client = ScriptedClient(server.port, ids["s1"], subscribe=False)
    try:
        with caplog.at_level(logging.ERROR, logger="fedmae.transport.status"):
            with pytest.raises(grpc.RpcError) as caught:
                next(iter(client.stub.Subscribe(pb.SubscribeRequest(), timeout=TIMEOUT)))
    finally:
        client.channel.close()
    err = caught.value
    assert err.code() == grpc.StatusCode.INTERNAL, err.details()
    assert err.details().startswith("internal error in the server (ref ")
    assert SECRET not in err.details() and "KeyError" not in err.details()
    reference = err.details().split("(ref ", 1)[1].split(")", 1)[0]
    [record] = [r for r in caplog.records if reference in r.getMessage()]
    assert "Subscribe" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert calls == ["s1"]


def test_domain_errors_keep_their_codes_through_the_interceptor(buggy_server):
    server, _, ids, _ = buggy_server
    client = ScriptedClient(server.port, ids["s1"], subscribe=False)
    try:
        request = pb.FetchModelRequest(version=99)  # never published: VersionNotFound
        with pytest.raises(grpc.RpcError) as caught:
            list(client.stub.FetchModel(request, timeout=TIMEOUT))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:  # neither version nor latest
            list(client.stub.FetchModel(pb.FetchModelRequest(), timeout=TIMEOUT))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.channel.close()


def test_a_client_certificate_on_admin_is_still_permission_denied(buggy_server):
    server, _, ids, _ = buggy_server
    from fedmae.pki.files import ClientIdentity

    with open_channel(f"127.0.0.1:{server.port}", ClientIdentity(ids["s1"])) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            apb_grpc.AdminStub(channel).Status(apb.StatusRequest(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_agent_does_not_reconnect_forever_after_internal(buggy_server, tmp_path):
    server, _, ids, calls = buggy_server
    status_file = tmp_path / "agent.json"
    agent = ClientAgent(
        AgentConfig(
            server=f"127.0.0.1:{server.port}",
            identity=ids["s1"],
            backoff_initial_s=0.05,
            backoff_max_s=0.2,
            status_file=status_file,
        ),
        client_split(load_fashion_mnist(), 0, 1, seed=0, limit=50),
    )
    exit_codes: list[int] = []
    runner = threading.Thread(target=lambda: exit_codes.append(agent.run()), daemon=True)
    runner.start()
    try:
        runner.join(TIMEOUT)
        assert exit_codes == [2], "the agent is still reconnecting after INTERNAL"
    finally:
        agent.stop()
    faults = RetryPolicy().max_fault_retries
    assert len(calls) == 1 + faults  # the first try and a few more, then no more
    status = json.loads(status_file.read_text())
    assert status["state"] == "refused"
    assert status["error"].startswith(f"INTERNAL: INTERNAL {1 + faults} times in a row")
