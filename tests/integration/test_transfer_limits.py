"""Finding 9 of issue 11: no client holds transfer slots it does not use.

Each test runs a real aggregator on 127.0.0.1 with mTLS; idle timeouts are set to 1 s,
and the tests wait on observable state (status codes, server counters), not on time.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from federation_harness import (
    TIMEOUT,
    UNREAD_DOWNLOADS,
    Federations,
    ScriptedClient,
    held_upload,
    random_delta,
    wait_until,
)

from aggregator_service.downloads import MIN_DOWNLOAD_CHUNK
from fedmae.transport import frames as wire
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.transfer import fetch_model, submit_update


@pytest.fixture
def federation(tmp_path):
    """Factory: a started server and its clients (one client starts a round, none
    subscribes unless asked, downloads may be held unread); all torn down."""
    defaults = {
        "min_clients": 1, "subscribe": False, "client_options": UNREAD_DOWNLOADS,
        "policy": {"min_participants": 1},
    }  # fmt: skip
    with Federations(tmp_path, **defaults) as federations:
        yield federations.start


def _held_download(client: ScriptedClient):
    """A download that receives its header and then reads nothing: it stalls in the
    server's send once gRPC's window is full (``UNREAD_DOWNLOADS``: well before the end)."""
    stream = client.stub.FetchModel(pb.FetchModelRequest(version=0), timeout=TIMEOUT)
    assert wire.part(next(stream)) == "header"
    return stream


def test_f9_fetch_chunk_size_is_clamped(federation):
    """``chunk_size=1`` would be one message per byte: the server sends 64 KiB chunks."""
    server, clients = federation(["a"])
    stream = clients["a"].stub.FetchModel(
        pb.FetchModelRequest(version=0, chunk_size=1), timeout=TIMEOUT
    )
    header = next(stream).header
    first = len(wire.chunk_of(next(stream)).data)
    assert first == MIN_DOWNLOAD_CHUNK == 64 << 10
    sizes = [first, *(len(wire.chunk_of(msg).data) for msg in stream)]
    assert sum(sizes) == header.manifest.total_bytes
    assert len(sizes) == -(-header.manifest.total_bytes // MIN_DOWNLOAD_CHUNK)


def test_f9_downloads_per_client_are_capped(federation):
    """One client cannot take every download slot: its third stream at once is refused,
    and another client still downloads."""
    server, clients = federation(["a", "b"])
    assert server.rounds.downloads.max_downloads > 3  # the global limit is not what refuses here
    held = [_held_download(clients["a"]) for _ in range(2)]
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as refused:
            fetch_model(clients["a"].stub, server.layout, 0, timeout=TIMEOUT, resume_attempts=0)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already has 2 downloads in flight" in refused.value.details()
    _, flat = fetch_model(clients["b"].stub, server.layout, 0, timeout=TIMEOUT)
    assert flat.numel() == server.layout.numel
    held[0].cancel()  # a's own slot frees with it
    wait_until(lambda: server.rounds.downloads.per_client.get("a") == 1, "a's slot to be freed")
    _, flat = fetch_model(clients["a"].stub, server.layout, 0, timeout=TIMEOUT)
    assert flat.numel() == server.layout.numel
    held[1].cancel()


def test_f9_an_unread_download_is_cancelled_and_frees_its_slot(federation):
    """Two unread downloads hold both slots; after the idle timeout (1 s) the server
    cancels them, and a waiting download gets a slot. (The held ones use two connections:
    on one, cancelling the first would let the second finish into the client's buffer.)"""
    server, clients = federation(
        ["a", "b", "c"], download_budget_mb=1, download_idle_s=1.0, transfer_wait_s=15.0
    )
    assert server.rounds.downloads.max_downloads == 2
    held = [_held_download(clients[n]) for n in ("a", "b")]
    _, flat = fetch_model(clients["c"].stub, server.layout, 0, timeout=TIMEOUT, resume_attempts=0)
    assert flat.numel() == server.layout.numel  # it waited for a slot, and got one
    wait_until(lambda: server.rounds.downloads.idle.fired == 2, "both idle downloads to end")
    for stream in held:
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: not server.rounds.downloads.per_client, "every download slot to be free")


def test_f9_an_idle_upload_is_refused_and_frees_its_slot(federation):
    """An admitted upload that then sends nothing for the idle timeout (1 s) is refused
    with DEADLINE_EXCEEDED; its slot serves the next upload; the client may send again."""
    server, clients = federation(
        ["a", "b"], min_clients=2, subscribe=True, max_uploads_in_flight=1, upload_idle_s=1.0,
        transfer_wait_s=15.0,
    )  # fmt: skip
    for c in clients.values():
        c.wait_for("task", round=1)
    layout = server.layout
    release, started = threading.Event(), threading.Event()
    pool = ThreadPoolExecutor(1)
    try:
        held = held_upload(clients["a"], layout, random_delta(layout, 1), 1, release, started)
        assert started.wait(TIMEOUT)
        wait_until(lambda: server.rounds.state.uploading == {"a"}, "a's upload to be admitted")
        waiting = pool.submit(
            submit_update, clients["b"].stub, layout, random_delta(layout, 2), round_=1,
            base_version=0, num_samples=3, busy_retries=0, timeout=TIMEOUT,
        )  # fmt: skip
        err = held.exception(timeout=TIMEOUT)
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no chunk for 1s" in err.details() and "send the update again" in err.details()
        assert waiting.result(TIMEOUT).updates_received == 1  # b got the freed slot
        assert "no chunk for 1s" in server.rounds.state.rejected["a"]
        # The server's reader thread of a's upload ended with the call, although a's
        # stream is still open on the client side (its generator waits for ``release``).
        wait_until(
            lambda: not any(t.name == "upload-reader" for t in threading.enumerate()),
            "upload reader threads to end",
        )
        receipt = submit_update(clients["a"].stub, layout, random_delta(layout, 1), round_=1,
                                base_version=0, num_samples=5, timeout=TIMEOUT)  # fmt: skip
        assert receipt.updates_received == 2
    finally:
        release.set()
        pool.shutdown(wait=False)


def test_f9_download_slots_fit_the_budget(federation):
    """The tiny model is 5.2 MB (4.97 MiB): a 12 MiB budget fits 2 downloads, not 3
    (whole MiB rounded the model down to 4 and allowed 3)."""
    server, clients = federation(["a", "b", "c"], download_budget_mb=12, transfer_wait_s=1.0)
    model_bytes = server.layout.numel * 4
    assert server.rounds.downloads.max_downloads == 2
    assert server.rounds.downloads.max_downloads * model_bytes <= 12 << 20
    held = [_held_download(clients[n]) for n in ("a", "b")]
    with pytest.raises(grpc.RpcError) as refused:
        fetch_model(clients["c"].stub, server.layout, 0, timeout=TIMEOUT, resume_attempts=0)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 downloads are in flight" in refused.value.details()
    for stream in held:
        stream.cancel()
