"""The Federation service for a client, in the domain's words: round events, model
versions, updates and receipts in, ``fedmae.errors`` out.

The client agent talks to the aggregator through this and nothing else of gRPC: a
failed call is raised as the domain error of its status code
(``fedmae.transport.status.domain_error``), and the retry policies decide on those.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from fedmae.payload.encodings import Encoding
from fedmae.payload.layout import ModelLayout
from fedmae.rounds import ModelHeader, RoundEvent, TrainingProgress, UpdateReceipt
from fedmae.transport import transfer
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.events import (
    event_from_proto,
    model_header_from_proto,
    progress_message,
    receipt_from_proto,
)
from fedmae.transport.retry import CONNECTION_LOST, TRANSIENT, RetryPolicy
from fedmae.transport.secagg import SecAggAnswer, answer_message
from fedmae.transport.status import domain_error

T = TypeVar("T")
log = logging.getLogger(__name__)

CLIENT_ID_KEY = "x-fedmae-client-id"  # who a client is on an insecure channel (no certificate)

# The event stream: the server away, busy or slow, or the connection cut: reconnect
# later (RESOURCE_EXHAUSTED too: the server is at its limit of calls at once, or of
# requests per second). The agent sets the delays.
RECONNECT_RETRY = RetryPolicy(retry_on=TRANSIENT | CONNECTION_LOST)


def _in_domain_terms(call: Callable[[], T]) -> T:
    try:
        return call()
    except grpc.RpcError as err:
        raise domain_error(err) from err


class EventStream:
    """One Subscribe call: iterate for the round events (heartbeats included; kinds this
    side does not know are skipped) until the server ends the stream; ``cancel()``
    ends it from another thread. A failure is raised as a ``fedmae.errors`` type."""

    def __init__(self, call: grpc.Call):
        self._call = call

    def __iter__(self) -> Iterator[RoundEvent]:
        try:
            for msg in self._call:
                event = event_from_proto(msg)
                if event is not None:
                    yield event
        except grpc.RpcError as err:
            raise domain_error(err) from err

    def cancel(self) -> None:
        self._call.cancel()


class FederationClient:
    """The Federation service over one channel (``fedmae.transport.channels.open_channel``).

    ``client_id`` names the client on an insecure channel (``--insecure``); with mTLS
    the server takes it from the certificate. ``close()`` ends every call in flight.
    """

    def __init__(self, channel: grpc.Channel, client_id: str | None = None):
        self._channel = channel
        self._stub = transfer.federation_stub(channel)
        self._metadata = [(CLIENT_ID_KEY, client_id)] if client_id else None
        self._progress_call: grpc.Future | None = None

    def subscribe(self, agent_version: str, available_samples: int) -> EventStream:
        """Open the event stream: the tasks, closed rounds and the run's end."""
        request = pb.SubscribeRequest(
            agent_version=agent_version, available_samples=available_samples
        )
        return EventStream(self._stub.Subscribe(request, metadata=self._metadata))

    def fetch_model(
        self,
        layout: ModelLayout,
        version: int | None = None,
        encoding: Encoding = Encoding.FP32,
        **options: Any,
    ) -> tuple[ModelHeader, torch.Tensor]:
        """A published version (``None`` = the latest) as one flat float32 tensor,
        checked end to end; a broken download resumes from its last byte. ``options``
        are those of ``transfer.fetch_model`` (``timeout``, ``resume_attempts``,
        ``pool``, ``stop``)."""
        header, flat = _in_domain_terms(
            lambda: transfer.fetch_model(self._stub, layout, version, encoding, **options)
        )
        return model_header_from_proto(header), flat

    def submit_update(
        self, layout: ModelLayout, delta: torch.Tensor, **options: Any
    ) -> UpdateReceipt:
        """Upload ``delta`` (local − global, flat float32) for a round; the server's
        receipt. Waits while the server is busy. ``options`` are those of
        ``transfer.submit_update`` (``round_``, ``base_version``, ``num_samples`` and
        ``encoding``, ``metrics``, ``chunk_size``, ``timeout``, ``busy_retries``, ``stop``)."""
        receipt = _in_domain_terms(
            lambda: transfer.submit_update(self._stub, layout, delta, **options)
        )
        return receipt_from_proto(receipt)

    def submit_masked_input(
        self, ring: np.ndarray, round_: int, base_version: int, **options: Any
    ) -> UpdateReceipt:
        """Upload a secure round's masked input (d+1 ring elements, uint32 or uint64)
        in encoding RING32/RING64; the server's receipt. ``options`` are those of
        ``transfer.submit_masked_input`` (``chunk_size``, ``timeout``, ``busy_retries``,
        ``stop``)."""
        receipt = _in_domain_terms(
            lambda: transfer.submit_masked_input(
                self._stub, ring, round_=round_, base_version=base_version, **options
            )
        )
        return receipt_from_proto(receipt)

    def send_secagg(self, message: SecAggAnswer, **options: Any) -> UpdateReceipt:
        """Answer a secure round's phase (``AdvertiseKeys``, ``ShareKeys``,
        ``UnmaskShares``, or ``SecAggAbort`` for any): a SubmitUpdate of that one
        message. ``options`` are those of ``transfer.submit_secagg`` (``timeout``,
        ``busy_retries``, ``stop``)."""
        request = answer_message(message)
        receipt = _in_domain_terms(lambda: transfer.submit_secagg(self._stub, request, **options))
        return receipt_from_proto(receipt)

    def send_progress(self, progress: TrainingProgress, timeout: float = 10.0) -> bool:
        """Report local training progress (a SubmitUpdate of that one message) without
        waiting for the answer: training never stops for it. A failure is logged at
        debug level and forgotten (a lost connection shows at the next upload, and the
        agent reconnects then). Returns False, sending nothing, while the last report
        is still in flight."""
        if self._progress_call is not None and not self._progress_call.done():
            return False
        try:
            call = self._stub.SubmitUpdate.future(
                iter((progress_message(progress),)), timeout=timeout, metadata=self._metadata
            )
        except Exception as err:  # e.g. the channel was closed: the report is only a hint
            log.debug("progress report not sent: %s", err)
            return False
        call.add_done_callback(_log_progress_failure)
        self._progress_call = call
        return True

    def close(self) -> None:
        """Close the channel: calls in flight end (an event stream with CANCELLED)."""
        self._channel.close()


def _log_progress_failure(call: grpc.Future) -> None:
    if not call.cancelled() and (err := call.exception()) is not None:
        log.debug("progress report failed: %s", domain_error(err))


def reconnect_policy(initial_s: float, max_s: float, give_up_after_s: float | None) -> RetryPolicy:
    """``RECONNECT_RETRY`` with the caller's delays and its limit (None: none)."""
    return dataclasses.replace(
        RECONNECT_RETRY, initial_s=initial_s, max_s=max_s, give_up_after_s=give_up_after_s
    )
