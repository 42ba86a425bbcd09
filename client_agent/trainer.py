"""Local training for a site: the model, its optimizer and the downloaded global model.

A ``Trainer`` owns the memory a site needs only while it trains (the model, AdamW's two
moments, the global model it fetched, the delta it computes), so sites can share one:
the agent of one site keeps its own for the whole run; a simulation worker
(``client_agent.simulation``) lends a few to hundreds of virtual sites, one site after
another (``TrainerPool``). A site's images come as ``SiteImages``: float tensors made
once (an agent), or made from a shared uint8 array only while the site trains.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedmae.config import TrainingConfig
from fedmae.ml.model_state import load_trainable_state, trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.ml.partitions import ClientData
from fedmae.ml.training import TrainResult, evaluate, make_optimizer, train_local
from fedmae.payload.buffers import BufferPool
from fedmae.payload.layout import ModelLayout
from fedmae.privacy.mechanisms import clip_to_norm
from fedmae.rounds import RoundTask
from fedmae.transport.federation_client import FederationClient

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass(frozen=True)
class SiteImages:
    """A site's training and validation images: their counts now, the float tensors
    ``[N, C, H, W]`` (normalised) when ``load()`` is called."""

    train_count: int
    val_count: int
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, data: ClientData) -> SiteImages:
        """Made once and kept (an agent trains every round on the same tensors)."""
        train, val = data.train.to_tensor(), data.val.to_tensor()
        return cls(len(train), len(val), lambda: (train, val))


@dataclass(frozen=True)
class Trained:
    """One task's local training: what the upload needs."""

    cfg: TrainingConfig
    result: TrainResult
    val_loss: float
    delta: torch.Tensor  # flat float32 [P]: local - global
    layout: ModelLayout  # where each tensor lies in ``delta``


class Trainer:
    """A model, its AdamW optimizer and the last fetched global model, for one site at
    a time.

    ``keep_optimizer``: AdamW's moments carry over from one round to the next (the
    agent of a single site, as Fed-MAE does). A trainer shared by many sites resets
    them for each task instead: keeping them would cost two model sizes per site.
    """

    def __init__(self, keep_optimizer: bool = True):
        self.keep_optimizer = keep_optimizer
        self.model: torch.nn.Module | None = None
        self.model_name: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.layout: ModelLayout | None = None
        self.cached: tuple[str, int, torch.Tensor] | None = None  # (site, version, flat)
        self._buffers = BufferPool(keep=1)  # the last model's memory, for the next download

    def ensure_model(self, name: str) -> None:
        if self.model is None or self.model_name != name:
            self.model = build_model(name, seed=0)
            self.model_name = name
            self.optimizer = None
            self.layout = ModelLayout.from_state(trainable_state(self.model))
            self.cached = None

    def global_model(
        self, client: FederationClient, site: str, version: int, stop: threading.Event
    ) -> torch.Tensor:
        """The published ``version`` as a flat tensor, fetched by ``site`` over its own
        connection (kept for a resent task of the same site and version)."""
        if self.cached is not None and self.cached[:2] == (site, version):
            return self.cached[2]
        if self.cached is not None:  # the last model is done with: reuse its memory
            self._buffers.give(self.cached[2])
            self.cached = None
        t0 = time.perf_counter()
        header, flat = client.fetch_model(self.layout, version, pool=self._buffers, stop=stop)
        log.info(
            "%s: fetched model version %d (%.1f MB) in %.2fs",
            site,
            header.version,
            header.manifest.total_bytes / 1e6,
            time.perf_counter() - t0,
        )
        self.cached = (site, header.version, flat)
        return flat

    def train(
        self,
        client: FederationClient,
        site: str,
        task: RoundTask,
        cfg: TrainingConfig,
        images: SiteImages,
        *,
        seed: int,
        stop: threading.Event,
        progress: Progress | None = None,
    ) -> Trained:
        """Fetch the task's model over ``client`` and train it on ``images``."""
        self.ensure_model(cfg.model)
        global_flat = self.global_model(client, site, task.model_version, stop)
        load_trainable_state(self.model, self.layout.unflatten(global_flat))  # copies in
        if self.optimizer is None or not self.keep_optimizer:
            self.optimizer = make_optimizer(self.model, cfg.learning_rate, cfg.weight_decay)
        train_images, val_images = images.load()
        result = train_local(
            self.model,
            self.optimizer,
            train_images,
            cfg,
            seed=zlib.crc32(f"{seed}/{site}/{task.round}/{task.attempt}".encode()),
            progress=progress,
        )
        val_loss = evaluate(self.model, val_images, cfg.mask_ratio)
        delta = self.layout.flatten(trainable_state(self.model)).sub_(global_flat)
        if cfg.dp_clip > 0:  # DP-FedAvg's clip at the site (the server clips again)
            clip_to_norm(delta, cfg.dp_clip)
        if not self.keep_optimizer:
            self.optimizer = None  # AdamW's moments are two model sizes: not kept idle
        return Trained(cfg, result, val_loss, delta, self.layout)

    def evaluate_version(
        self,
        client: FederationClient,
        site: str,
        name: str,
        version: int,
        images: SiteImages,
        mask_ratio: float,
        stop: threading.Event,
    ) -> float:
        """Fetch ``version`` of model ``name`` and return its loss on the site's
        validation images."""
        self.ensure_model(name)
        flat = self.global_model(client, site, version, stop)
        load_trainable_state(self.model, self.layout.unflatten(flat))
        return evaluate(self.model, images.load()[1], mask_ratio)


class TrainerPool:
    """``size`` trainers lent to sites one task at a time (a site waits for a free
    one): at most ``size`` models and optimizers in memory, however many sites."""

    def __init__(self, size: int = 1, keep_optimizer: bool = True):
        if size < 1:
            raise ValueError(f"a trainer pool needs at least one trainer, got {size}")
        self._free: queue.Queue[Trainer] = queue.Queue()
        for _ in range(size):
            self._free.put(Trainer(keep_optimizer))

    @contextlib.contextmanager
    def lease(self, stop: threading.Event) -> Iterator[Trainer]:
        """A trainer for the block; waits for one (``InterruptedError`` on ``stop``)."""
        while True:
            try:
                trainer = self._free.get(timeout=0.5)
                break
            except queue.Empty:
                if stop.is_set():
                    raise InterruptedError("stopped while waiting for a trainer") from None
        try:
            yield trainer
        finally:
            self._free.put(trainer)
