"""Findings 8 and 10 of issue 11: what an update's header and trailer may claim.

8: client-reported metrics are known keys with finite values in range, checked when
   the header arrives (before the upload is admitted); the round log is strict JSON.
10: a digest is required (header manifest or trailer) and every one given is checked.
"""

from __future__ import annotations

import json
import threading

import grpc
import numpy as np
import pytest
import torch
from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    fetch_flat,
    make_identities,
    make_server,
    random_delta,
)

from aggregator_service.round_log import RoundLog
from fedmae.config import UPDATE_METRICS
from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import encode
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.transfer import update_messages


@pytest.fixture
def site(tmp_path):
    """An aggregator with one selected client ``a`` and an open round 1."""
    certs, ids = make_identities(tmp_path, ["a"])
    server = make_server(tmp_path / "state", certs, min_clients=1, rounds=1, min_participants=1)
    port = server.start()
    client = ScriptedClient(port, ids["a"])
    client.wait_for("task", round=1)
    yield server, client
    client.close()
    server.stop(grace=0)


def _messages(layout, delta, metrics=None) -> list[pb.UpdateMessage]:
    return list(update_messages(
        layout, delta, round_=1, base_version=0, num_samples=5, encoding=pb.ENCODING_FP32,
        metrics=metrics or {}, chunk_size=1 << 20,
    ))  # fmt: skip


def _strict(line: str) -> dict:
    return json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in {line[:80]}"))


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        ({"train_loss": float("nan")}, "metric 'train_loss' is nan"),
        ({"val_loss": float("inf")}, "metric 'val_loss' is inf"),
        ({"train_loss": 1e308}, "metric 'train_loss' is 1e+308"),
        ({"val_loss": -0.5}, "metric 'val_loss' is -0.5"),
        ({"train_loss": 0.5, "accuracy": 0.9}, "unknown metric 'accuracy'"),
        ({f"k{i}": 1.0 for i in range(50_000)}, "50000 metrics reported"),
    ],
    ids=["nan", "inf", "1e308", "negative", "unknown key", "50000 keys"],
)
def test_f8_bad_metrics_are_refused_at_the_header(site, metrics, words):
    server, client = site
    layout = server.layout
    header = _messages(layout, random_delta(layout, 1), metrics)[0]
    release = threading.Event()

    def header_only():
        yield header
        release.wait(TIMEOUT)  # the chunks would come after admission; they never do

    call = client.stub.SubmitUpdate.future(header_only(), timeout=TIMEOUT)
    try:
        with pytest.raises(grpc.RpcError) as err:
            call.result()
    finally:
        release.set()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details(), err.value.details()
    # Refused on the header alone: nothing was received or held for it.
    assert server.rounds.state.bytes_in == 0 and not server.rounds.state.uploading
    assert server.rounds.version == 0


def test_f8_known_metrics_are_accepted_and_logged_as_strict_json(site):
    server, client = site
    layout = server.layout
    theta0 = fetch_flat(client, layout, 0)
    delta = random_delta(layout, 2)
    metrics = {k: (low + min(high, 10.0)) / 2 for k, (low, high) in UPDATE_METRICS.items()}
    receipt = client.stub.SubmitUpdate(iter(_messages(layout, delta, metrics)), timeout=TIMEOUT)
    assert receipt.updates_received == 1
    client.wait_for("model_published", version=1)
    assert torch.allclose(fetch_flat(client, layout, 1), theta0 + delta, atol=1e-6)
    path = server.config.state_dir / "rounds.jsonl"  # written before the round's events
    assert path.exists() and path.read_text().strip(), "round 1 announced before logged"
    record = _strict(path.read_text().splitlines()[-1])
    assert record["clients"][0]["train_loss"] == metrics["train_loss"]
    assert record["train_loss"] == pytest.approx(metrics["train_loss"])


def test_f8_round_log_refuses_non_finite_values(tmp_path):
    log = RoundLog(tmp_path / "rounds.jsonl")
    log.append({"round": 1, "val_loss": 0.5})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="JSON compliant"):
            log.append({"round": 2, "val_loss": bad})
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert [_strict(x) for x in lines] == [{"round": 1, "val_loss": 0.5}]


def _with_digests(messages, header_digest: str, trailer_digest: str) -> list[pb.UpdateMessage]:
    header = pb.UpdateMessage()
    header.CopyFrom(messages[0])
    header.header.manifest.digest = header_digest
    trailer = pb.UpdateMessage(trailer=pb.UpdateTrailer(digest=trailer_digest))
    return [header, *messages[1:-1], trailer]


def test_f10_every_given_digest_is_checked_and_one_is_required(site):
    server, client = site
    layout = server.layout
    theta0 = fetch_flat(client, layout, 0)
    delta = random_delta(layout, 3)
    messages = _messages(layout, delta)
    payload = bytes(encode(delta))
    right = payload_digest(payload)
    right_sha = payload_digest(payload, "sha256")
    wrong = "xxh3-128:" + "0" * 32
    wrong_sha = "sha256:" + "0" * 64
    refusals = {
        "header contradicts the payload, trailer right": (wrong, right, "disagree"),
        "header right, trailer contradicts": (right, wrong, "disagree"),
        "header wrong in another algorithm": (wrong_sha, right, "digest mismatch"),
        "no digest at all": ("", "", "no digest"),
        "header only, wrong": (wrong, "", "digest mismatch"),
    }
    for case, (in_header, in_trailer, words) in refusals.items():
        with pytest.raises(grpc.RpcError) as err:
            client.stub.SubmitUpdate(
                iter(_with_digests(messages, in_header, in_trailer)), timeout=TIMEOUT
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert words in err.value.details(), (case, err.value.details())
    assert server.rounds.version == 0 and not server.rounds.state.accepted

    # The digest in the header alone is enough, in any supported algorithm.
    receipt = client.stub.SubmitUpdate(
        iter(_with_digests(messages, right_sha, "")), timeout=TIMEOUT
    )
    assert receipt.digest == right_sha
    client.wait_for("model_published", version=1)
    np.testing.assert_allclose(
        fetch_flat(client, layout, 1).numpy(), (theta0 + delta).numpy(), atol=1e-6
    )
