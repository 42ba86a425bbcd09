"""The agent's part in secure rounds: its keys, shares and delta between phases.

A secure round's first task (ADVERTISE_KEYS) trains like a plain one, but the delta
stays here: the agent advertises fresh keys signed with its enrolled key, and answers
the later phases (SHARE_KEYS, MASKED_INPUT, UNMASK) from ``fedmae.secagg.site``.
Only the masked input leaves the site, in a ring encoding the server can add up but
not read. A check that fails (a peer's key not signed by the federation, a share that
does not decrypt, a request for both of a site's secrets) aborts the round: the agent
tells the server why (``SecAggAbort``) and forgets the round's secrets.

An answer already sent is sent again, unchanged, if the server asks again (a resent
task after a reconnect); a task for a round the agent holds no state of (it restarted
since it trained) is sat out.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmae.errors import FedmaeError, SecAggAborted
from fedmae.pki.files import ClientIdentity, read_file
from fedmae.rounds import Phase, RoundTask
from fedmae.secagg.messages import SecAggAbort
from fedmae.secagg.signing import CertificateCheck
from fedmae.secagg.site import SiteRound
from fedmae.transport.federation_client import FederationClient
from fedmae.transport.retry import connection_failed
from fedmae.transport.status import status_name

log = logging.getLogger(__name__)


@dataclass
class _Round:
    """One secure round in progress at this site."""

    round: int
    attempt: int
    base_version: int
    site: SiteRound
    delta: np.ndarray | None  # float32 [P], until it is masked
    num_samples: int
    answers: dict[Phase, object] = field(default_factory=dict)  # sent, for a resend


class SecureRounds:
    """The agent's secure-aggregation state: at most one round at a time."""

    def __init__(self, client_id: str, identity: ClientIdentity, min_noise_multiplier: float = 0.0):
        self.client_id = client_id
        self.min_noise_multiplier = min_noise_multiplier  # distributed DP's floor on σ
        self._key_pem = read_file(identity.key)
        self._chain_pem = read_file(identity.cert)  # the certificate, then its CA
        self._check = CertificateCheck(read_file(identity.ca_cert))
        self.current: _Round | None = None

    def refuses(self, client: FederationClient, task: RoundTask) -> bool:
        """Before training for ADVERTISE_KEYS: whether this site sits the round out
        because its distributed DP noise σ is below the site's floor (it then tells the
        server why with ``SecAggAbort``, before any key or input leaves the site)."""
        floor = self.min_noise_multiplier
        sigma = task.secagg.dp_noise_multiplier if task.secagg is not None else 0.0
        if floor <= 0 or sigma >= floor:
            return False
        reason = (f"distributed DP noise σ = {sigma:g} is below this site's floor {floor:g} "
                  "(fedmae client --dp-min-noise-multiplier)")  # fmt: skip
        log.error("%s: round %d: %s: sitting the round out", self.client_id, task.round, reason)
        self._send(client, Phase.ADVERTISE_KEYS, SecAggAbort(task.round, task.attempt, reason))
        return True

    def trained(
        self, client: FederationClient, task: RoundTask, delta: torch.Tensor, num_samples: int
    ) -> None:
        """ADVERTISE_KEYS: keep the delta, advertise this round's keys."""
        if task.secagg is None:
            raise SecAggAborted("a secure task without secure-aggregation parameters")
        site = SiteRound(
            task.round, task.attempt, self.client_id, task.secagg, self._key_pem,
            self._chain_pem, self._check,
        )  # fmt: skip
        flat = delta.detach().to(torch.float32).numpy()  # [P]
        self.current = _Round(task.round, task.attempt, task.model_version, site, flat,
                              num_samples)  # fmt: skip
        keys = self.current.answers[Phase.ADVERTISE_KEYS] = site.advertise()
        self._send(client, Phase.ADVERTISE_KEYS, keys)

    def answer(
        self, client: FederationClient, task: RoundTask, chunk_size: int, stop: threading.Event
    ) -> None:
        """SHARE_KEYS, MASKED_INPUT or UNMASK: compute the answer (once) and send it."""
        now = self.current
        if now is None or (now.round, now.attempt) != (task.round, task.attempt):
            log.warning("%s: round %d %s: this agent holds no keys for it (restarted since "
                        "it trained?): sitting the round out", self.client_id, task.round,
                        task.phase.name)  # fmt: skip
            return
        try:
            answer = now.answers.get(task.phase)
            if answer is None:
                answer = self._compute(now, task)
                now.answers[task.phase] = answer
        except SecAggAborted as err:
            log.error("%s: round %d: aborting secure aggregation: %s", self.client_id,
                      task.round, err)  # fmt: skip
            self.current = None  # the round's secrets are forgotten
            self._send(client, task.phase, SecAggAbort(task.round, task.attempt, str(err)))
            return
        if task.phase == Phase.MASKED_INPUT:
            self._upload(client, now, answer, chunk_size, stop)
        else:
            self._send(client, task.phase, answer)

    def closed(self, round_: int, attempt: int) -> None:
        """The round closed: its secrets are no longer needed."""
        if self.current is not None and (self.current.round, self.current.attempt) == (
            round_,
            attempt,
        ):
            self.current = None

    def _compute(self, now: _Round, task: RoundTask) -> object:
        if task.phase == Phase.SHARE_KEYS:
            return now.site.share_keys(task.phase_data)
        if task.phase == Phase.MASKED_INPUT:
            if now.delta is None:
                raise SecAggAborted("asked for a masked input twice")
            ring = now.site.masked_input(task.phase_data, now.delta, now.num_samples)
            now.delta = None  # masked: the clear delta is no longer needed
            return ring
        if task.phase == Phase.UNMASK:
            return now.site.unmask(task.phase_data)
        raise SecAggAborted(f"unexpected phase {task.phase.name}")

    def _send(self, client: FederationClient, phase: Phase, message: object) -> None:
        try:
            receipt = client.send_secagg(message)
        except FedmaeError as err:
            if connection_failed(err):
                raise  # the connection, not the answer: reconnect, the task comes again
            log.warning("%s: %s answer refused: %s: %s", self.client_id, phase.name,
                        status_name(err), err)  # fmt: skip
            return
        log.info("%s: round %d %s sent (%d answered so far)", self.client_id, receipt.round,
                 phase.name, receipt.updates_received)  # fmt: skip

    def _upload(self, client, now: _Round, ring: np.ndarray, chunk_size: int, stop) -> None:
        try:
            receipt = client.submit_masked_input(
                ring, round_=now.round, base_version=now.base_version, chunk_size=chunk_size,
                stop=stop,
            )  # fmt: skip
        except FedmaeError as err:
            if connection_failed(err):
                raise
            log.warning("%s: round %d masked input refused: %s: %s", self.client_id,
                        now.round, status_name(err), err)  # fmt: skip
            return
        log.info("%s: round %d masked input sent (%.1f MB; %d in round)", self.client_id,
                 now.round, receipt.bytes_received / 1e6, receipt.updates_received)  # fmt: skip
