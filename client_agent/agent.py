"""The client agent: subscribe, and for each task fetch, train, upload; reconnect
with exponential backoff and jitter while the server is away."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from client_agent.transfer import federation_stub, fetch_model, submit_update
from fedmae.config import TrainingConfig
from fedmae.errors import ConfigError
from fedmae.ml.model_state import load_trainable_state, trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.ml.partitions import ClientData
from fedmae.ml.training import evaluate, make_optimizer, train_local
from fedmae.payload.buffers import BufferPool
from fedmae.payload.chunks import DEFAULT_CHUNK_SIZE
from fedmae.payload.layout import ModelLayout
from fedmae.pki.files import ClientIdentity
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport._proto import federation_pb2_grpc as pb_grpc
from fedmae.transport.channels import open_channel
from fedmae.transport.messages import training_config_from_proto
from fedmae.transport.retry import CONNECTION_LOST, TRANSIENT, RetryPolicy, Verdict

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


class RunFinished(Exception):
    pass


class ClientAgent:
    def __init__(self, config: AgentConfig, data: ClientData):
        self.config = config
        self.data = data
        self.train_images = data.train.to_tensor()
        self.val_images = data.val.to_tensor()
        self.model: torch.nn.Module | None = None
        self.model_name: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.layout: ModelLayout | None = None
        self.cached: tuple[int, torch.Tensor] | None = None  # (version, flat)
        self._buffers = BufferPool(keep=1)  # the last model's memory, for the next download
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
        self._channel: grpc.Channel | None = None
        # RESOURCE_EXHAUSTED too: the server is at its limit of calls at once (or of
        # requests per second): back off and come again, as when it is away.
        self.reconnect_policy = RetryPolicy(
            retry_on=TRANSIENT | CONNECTION_LOST,
            initial_s=config.backoff_initial_s,
            max_s=config.backoff_max_s,
            give_up_after_s=config.give_up_after_s or None,
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

    def _connect(self) -> pb_grpc.FederationStub:
        channel = open_channel(
            self.config.server,
            None if self.config.insecure else self.identity,
            insecure=self.config.insecure,
            chunk_size=self.config.chunk_size,
        )
        self._channel = channel
        return federation_stub(channel)

    def _metadata(self) -> list[tuple[str, str]] | None:
        if self.config.insecure:
            return [("x-fedmae-client-id", self.client_id)]
        return None

    def run(self) -> int:
        """Serve the federation until the run ends; return a process exit code: 0 done,
        2 refused (or the server failed again and again), 3 unreachable too long."""
        retries = self.reconnect_policy.start(self.stop_event)
        while not self.stop_event.is_set():
            stub = self._connect()
            self._heard_from_server = False
            try:
                self._session(stub)
                return 0
            except RunFinished:
                return 0
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.ABORTED:
                    # Another agent connected with our identity. Reconnecting would evict
                    # it, and it would evict us again, forever: stop, and say why.
                    self._status("refused", error=f"ABORTED: {err.details()}")
                    log.error(
                        "%s: stopping: the server ended our event stream: %s. Another "
                        "agent uses this identity; give each site its own identity "
                        "(fedmae enroll) and run one agent per identity",
                        self.client_id,
                        err.details(),
                    )
                    return 2
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
                    self._status("refused", error=f"{final.code().name}: {final.details()}")
                    log.error(
                        "%s: server refused us: %s: %s",
                        self.client_id,
                        final.code().name,
                        final.details(),
                    )
                    return 2
                self._status("reconnecting", error=err.code().name)
                log.warning(
                    "%s: connection to %s lost (%s); reconnecting in %.1fs",
                    self.client_id,
                    self.config.server,
                    err.code().name,
                    decision.delay_s,
                )
                retries.wait(decision.delay_s)
            finally:
                if self._channel is not None:
                    self._channel.close()
        return 0

    def stop(self) -> None:
        self.stop_event.set()
        if self._channel is not None:
            self._channel.close()

    def _session(self, stub: pb_grpc.FederationStub) -> None:
        events = stub.Subscribe(
            pb.SubscribeRequest(
                agent_version=AGENT_VERSION, available_samples=len(self.train_images)
            ),
            metadata=self._metadata(),
        )
        for event in events:
            self._heard_from_server = True
            kind = event.WhichOneof("event")
            self._status("connected", event.task.round if kind == "task" else None)
            if kind == "task":
                self._handle_task(stub, event.task)
            elif kind == "round_closed":
                rc = event.round_closed
                if rc.success:
                    log.info(
                        "%s: round %d closed: version %d from %d clients, val_loss %.4f",
                        self.client_id,
                        rc.round,
                        rc.version,
                        len(rc.participants),
                        rc.val_loss,
                    )
                else:
                    log.info("%s: round %d failed: %s", self.client_id, rc.round, rc.reason)
            elif kind == "run_finished":
                log.info(
                    "%s: run finished at version %d after %d rounds; %d trained here",
                    self.client_id,
                    event.run_finished.final_version,
                    event.run_finished.rounds,
                    self.rounds_done,
                )
                self._final_model(stub, event.run_finished)
                self._status("finished")
                raise RunFinished()
        # The stream ended without RunFinished: the server went away.
        raise _Unavailable()

    def _final_model(self, stub: pb_grpc.FederationStub, done: pb.RunFinished) -> None:
        """Fetch the run's final model and log its loss on the local validation images.
        (The server serves it for a grace period, and exits early once every client
        subscribed at the end has fetched it.) A failure here does not fail the run."""
        name = done.model or self.model_name
        if not name:
            return
        try:
            self._ensure_model(name)
            flat = self._global(stub, done.final_version)
        except grpc.RpcError as err:
            log.warning(
                "%s: could not fetch the final model version %d: %s: %s",
                self.client_id,
                done.final_version,
                err.code().name,
                err.details(),
            )
            return
        load_trainable_state(self.model, self.layout.unflatten(flat))
        val_loss = evaluate(self.model, self.val_images, self._mask_ratio)
        log.info(
            "%s: final model version %d: val_loss %.4f on %d local images",
            self.client_id,
            done.final_version,
            val_loss,
            len(self.val_images),
        )

    # ------------------------------------------------------------ one task

    def _ensure_model(self, name: str) -> None:
        if self.model is None or self.model_name != name:
            self.model = build_model(name, seed=0)
            self.model_name = name
            self.optimizer = None
            self.layout = ModelLayout.from_state(trainable_state(self.model))
            self.cached = None

    def _global(self, stub: pb_grpc.FederationStub, version: int) -> torch.Tensor:
        if self.cached is not None and self.cached[0] == version:
            return self.cached[1]
        if self.cached is not None:  # the last round's model is done with: reuse its memory
            self._buffers.give(self.cached[1])
            self.cached = None
        t0 = time.perf_counter()
        header, flat = fetch_model(
            stub, self.layout, version, pool=self._buffers, stop=self.stop_event
        )
        log.info(
            "%s: fetched model version %d (%.1f MB) in %.2fs",
            self.client_id,
            header.version,
            header.manifest.total_bytes / 1e6,
            time.perf_counter() - t0,
        )
        self.cached = (header.version, flat)
        return flat

    def _handle_task(self, stub: pb_grpc.FederationStub, task: pb.RoundTask) -> None:
        cfg = training_config_from_proto(task.config).with_overrides(**self.config.overrides)
        self._mask_ratio = cfg.mask_ratio
        log.info(
            "%s: round %d task: train version %d for %d epoch(s) on %d images",
            self.client_id,
            task.round,
            task.model_version,
            cfg.local_epochs,
            len(self.train_images),
        )
        self._ensure_model(cfg.model)
        global_flat = self._global(stub, task.model_version)
        load_trainable_state(self.model, self.layout.unflatten(global_flat))  # copies in
        if self.optimizer is None:  # AdamW state stays local across rounds (as Fed-MAE)
            self.optimizer = make_optimizer(self.model, cfg.learning_rate, cfg.weight_decay)

        last_report = [time.monotonic()]

        def progress(step: int, total: int, loss: float) -> None:
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

        result = train_local(
            self.model,
            self.optimizer,
            self.train_images,
            cfg,
            seed=zlib.crc32(
                f"{self.config.seed}/{self.client_id}/{task.round}/{task.attempt}".encode()
            ),
            progress=progress,
        )
        val_loss = evaluate(self.model, self.val_images, cfg.mask_ratio)
        delta = self.layout.flatten(trainable_state(self.model)).sub_(global_flat)
        metrics = {
            "train_loss": result.train_loss,
            "val_loss": val_loss,
            "train_seconds": result.seconds,
            "images_per_s": result.images_per_s,
        }
        t0 = time.perf_counter()
        try:
            receipt = submit_update(
                stub,
                self.layout,
                delta,
                round_=task.round,
                base_version=task.model_version,
                num_samples=result.num_samples,
                encoding=cfg.encoding,
                metrics=metrics,
                chunk_size=self.config.chunk_size,
                stop=self.stop_event,
            )
        except grpc.RpcError as err:
            if err.code() in CONNECTION_LOST or err.code() == grpc.StatusCode.UNKNOWN:
                raise  # the connection, not the update: reconnect (as the policy says)
            # Refused (round closed, stale, ...): this update is lost, the agent is not.
            log.warning(
                "%s: round %d update refused: %s: %s",
                self.client_id,
                task.round,
                err.code().name,
                err.details(),
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


class _Unavailable(grpc.RpcError):
    """The event stream ended without RunFinished: treat like a lost connection."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "event stream ended"
