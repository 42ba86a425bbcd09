"""The client agent: subscribe, and for each task fetch, train, upload; reconnect
with exponential backoff and jitter while the server is away.

``SiteSession`` is one site's part (its identity, connection, event stream, tasks and
secure rounds); the model it trains in is borrowed from a ``TrainerPool``
(``client_agent.trainer``) for each task. ``ClientAgent`` is a site with a trainer of
its own, as ``fedmae client`` runs it; a simulation worker runs many sessions over one
small pool (``client_agent.simulation``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from client_agent.progress_reports import ProgressReports
from client_agent.secure_rounds import SecureRounds
from client_agent.trainer import SiteImages, Trained, TrainerPool
from fedmae.config import TrainingConfig
from fedmae.errors import ConfigError, ConnectionReplaced, FedmaeError, Unavailable
from fedmae.ml.partitions import ClientData
from fedmae.payload.chunks import DEFAULT_CHUNK_SIZE
from fedmae.pki.files import ClientIdentity
from fedmae.rounds import Phase, RoundClosed, RoundTask, RunFinished
from fedmae.transport.channels import open_channel
from fedmae.transport.federation_client import FederationClient, reconnect_policy
from fedmae.transport.retry import Verdict, connection_failed
from fedmae.transport.status import status_name

log = logging.getLogger(__name__)

AGENT_VERSION = "fedmae-client/0.1"


@dataclass
class AgentConfig:
    server: str
    identity: Path | None  # None with insecure
    insecure: bool = False
    client_id: str | None = None  # only with insecure; otherwise the certificate CN
    overrides: dict[str, object] = field(default_factory=dict)  # local TrainingConfig overrides
    chunk_size: int = DEFAULT_CHUNK_SIZE
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    give_up_after_s: float = 0.0  # 0 = keep trying forever
    seed: int = 0
    status_file: Path | None = None  # JSON state for health checks (``fedmae client-health``)
    progress_every_s: float = 10.0  # training progress to the server at most this often; 0 = off
    channel_options: tuple[tuple[str, object], ...] = ()  # extra gRPC channel options
    # Distributed DP: the least σ this site adds its noise share for; a secure round that
    # announces less (or no distributed DP) is aborted. 0 = the server's σ is accepted.
    min_noise_multiplier: float = 0.0


class _RunDone(Exception):
    """The run ended (``RunFinished``) and this agent is done with it."""


class SiteSession:
    """One site: its identity, its connection and event stream, its tasks. The model
    it trains in is leased from ``trainers`` for each task, so a site that is not
    training holds no model."""

    def __init__(self, config: AgentConfig, images: SiteImages, trainers: TrainerPool):
        self.config = config
        self.images = images
        self.trainers = trainers
        self.model_name: str | None = None  # of the last task, for the final model
        self.rounds_done = 0
        self._mask_ratio = TrainingConfig().mask_ratio  # of the last task, for evaluation
        self.stop_event = threading.Event()
        if config.insecure:
            self.client_id = config.client_id or "anonymous"
        else:
            if config.identity is None:
                raise ConfigError("--identity DIR is required (or --insecure)")
            self.identity = ClientIdentity(config.identity)
            self.client_id = self.identity.client_id
        self._client: FederationClient | None = None
        self._secure: SecureRounds | None = None  # created by the first secure task
        # The server away, busy (at its limit of calls at once, or of requests per
        # second) or slow: back off and come again (``RECONNECT_RETRY``).
        self.reconnect_policy = reconnect_policy(
            config.backoff_initial_s, config.backoff_max_s, config.give_up_after_s or None
        )

    def _status(self, state: str, round_: int | None = None, **extra: object) -> None:
        """Write the agent's state atomically (read by container health checks)."""
        if self.config.status_file is None:
            return
        record = {"client_id": self.client_id, "state": state, "round": round_,
                  "rounds_done": self.rounds_done, "time": time.time(), **extra}  # fmt: skip
        tmp = self.config.status_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.config.status_file)
        except OSError as err:  # a full disk must not stop training
            log.debug("cannot write status file: %s", err)

    # ------------------------------------------------------------ connection

    def _connect(self) -> FederationClient:
        channel = open_channel(
            self.config.server,
            None if self.config.insecure else self.identity,
            insecure=self.config.insecure,
            chunk_size=self.config.chunk_size,
            options=self.config.channel_options,
        )
        # Without a certificate the client says who it is (``--insecure`` only).
        self._client = FederationClient(channel, self.client_id if self.config.insecure else None)
        return self._client

    def run(self) -> int:
        """Serve the federation until the run ends; return a process exit code: 0 done,
        2 refused (or the server failed again and again), 3 unreachable too long."""
        retries = self.reconnect_policy.start(self.stop_event)
        while not self.stop_event.is_set():
            client = self._connect()
            self._heard_from_server = False
            try:
                self._session(client)
                return 0
            except _RunDone:
                return 0
            except InterruptedError:  # stopped while waiting for a trainer
                return 0
            except ConnectionReplaced as err:
                # Another agent connected with our identity. Reconnecting would evict
                # it, and it would evict us again, forever: stop, and say why.
                self._status("refused", error=f"{status_name(err)}: {err}")
                log.error(
                    "%s: stopping: the server ended our event stream: %s. Another "
                    "agent uses this identity; give each site its own identity "
                    "(fedmae enroll) and run one agent per identity",
                    self.client_id,
                    err,
                )
                return 2
            except FedmaeError as err:
                if self.stop_event.is_set():  # stop() closed the connection: not a fault
                    return 0
                if self._heard_from_server:  # we were connected: start backing off afresh
                    retries.reset()
                decision = retries.decide(err)
                if decision.verdict is Verdict.TIMED_OUT:
                    log.error(
                        "%s: server unreachable for %.0fs; giving up",
                        self.client_id,
                        retries.failing_for(),
                    )
                    return 3
                if not decision.retry:
                    final = retries.give_up(err, decision)
                    self._status("refused", error=f"{status_name(final)}: {final}")
                    log.error(
                        "%s: server refused us: %s: %s",
                        self.client_id,
                        status_name(final),
                        final,
                    )
                    return 2
                self._status("reconnecting", error=status_name(err))
                log.warning(
                    "%s: connection to %s lost (%s); reconnecting in %.1fs",
                    self.client_id,
                    self.config.server,
                    status_name(err),
                    decision.delay_s,
                )
                retries.wait(decision.delay_s)
            finally:
                client.close()
        return 0

    def stop(self) -> None:
        self.stop_event.set()
        if self._client is not None:
            self._client.close()

    def _session(self, client: FederationClient) -> None:
        events = client.subscribe(AGENT_VERSION, self.images.train_count)
        for event in events:
            self._heard_from_server = True
            body = event.body
            self._status("connected", body.round if isinstance(body, RoundTask) else None)
            if isinstance(body, RoundTask):
                self._handle_task(client, body)
            elif isinstance(body, RoundClosed):
                if self._secure is not None:
                    self._secure.closed(body.round, body.attempt)
                if body.success:
                    log.info(
                        "%s: round %d closed: version %d, val_loss %.4f",
                        self.client_id,
                        body.round,
                        body.version,
                        body.val_loss,
                    )
                else:
                    log.info("%s: round %d failed: %s", self.client_id, body.round, body.reason)
            elif isinstance(body, RunFinished):
                log.info(
                    "%s: run finished (%s) at version %d after %d rounds; %d trained here",
                    self.client_id,
                    body.reason,
                    body.final_version,
                    body.rounds,
                    self.rounds_done,
                )
                self._final_model(client, body)
                self._status("finished")
                raise _RunDone()
        # The stream ended without RunFinished: the server went away.
        raise Unavailable("event stream ended")

    def _final_model(self, client: FederationClient, done: RunFinished) -> None:
        """Fetch the run's final model and log its loss on the local validation images.
        (The server serves it for a grace period, and exits early once every client
        subscribed at the end has fetched it.) A failure here does not fail the run."""
        name = done.model or self.model_name
        if not name:
            return
        try:
            with self.trainers.lease(self.stop_event) as trainer:
                val_loss = trainer.evaluate_version(
                    client, self.client_id, name, done.final_version, self.images,
                    self._mask_ratio, self.stop_event,
                )  # fmt: skip
        except FedmaeError as err:
            log.warning(
                "%s: could not fetch the final model version %d: %s: %s",
                self.client_id,
                done.final_version,
                status_name(err),
                err,
            )
            return
        log.info(
            "%s: final model version %d: val_loss %.4f on %d local images",
            self.client_id,
            done.final_version,
            val_loss,
            self.images.val_count,
        )

    # ------------------------------------------------------------ one task

    def _handle_task(self, client: FederationClient, task: RoundTask) -> None:
        if task.phase not in (Phase.TRAIN, Phase.ADVERTISE_KEYS):  # a later secure phase
            self._secure_rounds().answer(client, task, self.config.chunk_size, self.stop_event)
            return
        if task.phase == Phase.ADVERTISE_KEYS and self._secure_rounds().refuses(client, task):
            return  # its distributed DP noise is below this site's floor
        trained = self._train(client, task)
        if task.phase == Phase.ADVERTISE_KEYS:  # secure: the delta stays here, masked later
            self._secure_rounds().trained(client, task, trained.delta, trained.result.num_samples)
            self.rounds_done += 1
            return
        self._upload(client, task, trained)

    def _secure_rounds(self) -> SecureRounds:
        if self._secure is None:
            if self.config.insecure:
                raise ConfigError("secure aggregation needs an enrolled identity, not --insecure")
            self._secure = SecureRounds(
                self.client_id, self.identity, self.config.min_noise_multiplier
            )
        return self._secure

    def _train(self, client: FederationClient, task: RoundTask) -> Trained:
        """Lease a trainer, fetch the task's model and train it on this site's images."""
        cfg = task.training.with_overrides(**self.config.overrides)
        self._mask_ratio, self.model_name = cfg.mask_ratio, cfg.model
        log.info(
            "%s: round %d task: train version %d for %d epoch(s) on %d images",
            self.client_id,
            task.round,
            task.model_version,
            cfg.local_epochs,
            self.images.train_count,
        )
        last_report = [time.monotonic()]
        report = ProgressReports(client, task, self.config.progress_every_s)

        def progress(step: int, total: int, loss: float) -> None:
            report(step, total)  # to the server: the round waits while this site progresses
            if time.monotonic() - last_report[0] >= 5 or step == total:
                last_report[0] = time.monotonic()
                self._status("training", task.round, step=step, steps=total)
                log.info(
                    "%s: round %d training %3d%% (step %d/%d) loss %.4f",
                    self.client_id,
                    task.round,
                    100 * step // total,
                    step,
                    total,
                    loss,
                )

        # The trainer goes back to the pool once the delta is computed: the upload
        # needs only the delta, and the next site can train meanwhile.
        with self.trainers.lease(self.stop_event) as trainer:
            return trainer.train(
                client, self.client_id, task, cfg, self.images, seed=self.config.seed,
                stop=self.stop_event, progress=progress,
            )  # fmt: skip

    def _upload(self, client: FederationClient, task: RoundTask, trained: Trained) -> None:
        """Send a plain round's update (the server sees it, clipped and weighted)."""
        cfg, result, val_loss, delta = trained.cfg, trained.result, trained.val_loss, trained.delta
        metrics = {
            "train_loss": result.train_loss,
            "val_loss": val_loss,
            "train_seconds": result.seconds,
            "images_per_s": result.images_per_s,
        }
        t0 = time.perf_counter()
        try:
            receipt = client.submit_update(
                trained.layout,
                delta,
                round_=task.round,
                base_version=task.model_version,
                num_samples=result.num_samples,
                encoding=cfg.encoding,
                metrics=metrics,
                chunk_size=self.config.chunk_size,
                stop=self.stop_event,
            )
        except FedmaeError as err:
            if connection_failed(err):
                raise  # the connection, not the update: reconnect (as the policy says)
            # Refused (round closed, stale, ...): this update is lost, the agent is not.
            log.warning(
                "%s: round %d update refused: %s: %s",
                self.client_id,
                task.round,
                status_name(err),
                err,
            )
            return
        self.rounds_done += 1
        log.info(
            "%s: round %d update sent (%d samples, train_loss %.4f, val_loss %.4f, "
            "%.0f img/s, %.1f MB in %.2fs; %d updates in round)",
            self.client_id,
            task.round,
            result.num_samples,
            result.train_loss,
            val_loss,
            result.images_per_s,
            receipt.bytes_received / 1e6,
            time.perf_counter() - t0,
            receipt.updates_received,
        )


class ClientAgent(SiteSession):
    """A site with a trainer of its own (``fedmae client``): its images are float
    tensors made once, and AdamW's state stays local across rounds (as Fed-MAE)."""

    def __init__(self, config: AgentConfig, data: ClientData):
        super().__init__(config, SiteImages.of(data), TrainerPool(1, keep_optimizer=True))
        self.data = data
