"""The centralized twin of a federated run: the same model, optimizer, data pipeline and
evaluation, on the pooled data of all sites.

A federated run of R rounds x E local epochs over sites holding T training images in
total makes R*E passes over T images; ``train_central`` with ``passes = R*E`` over the
union of the same shards makes the same number of passes, so the two losses can be set
side by side. Each pass is one call of the agent's ``train_local`` (AdamW by
``make_optimizer``, the same mask ratio, batch size and shuffling), and each evaluation
is the server's: ``evaluate`` on held-out images with the fixed masks of
``EVAL_MASK_SEED``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedmae.config import TrainingConfig
from fedmae.ml.datasets import ImageDataset
from fedmae.ml.mae import MaskedAutoencoderViT
from fedmae.ml.partitions import client_split
from fedmae.ml.training import EVAL_MASK_SEED, evaluate, make_optimizer, train_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassRecord:
    """One line of the central run's log; pass 0 is the initial model (no training)."""

    pass_: int
    train_loss: float | None
    eval_loss: float
    seconds: float  # training time of this pass (0 for pass 0)
    images: int

    def to_json(self) -> dict:
        record = asdict(self)
        return {"pass": record.pop("pass_"), **record}


def pooled_training_set(
    dataset: ImageDataset,
    sites: int,
    *,
    dirichlet_alpha: float | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    limit: int | None = None,
) -> ImageDataset:
    """The union of the training shards ``sites`` clients would hold (``fedmae client
    --partition k/sites --limit ... --data-seed seed``): each site's validation split
    stays out, exactly as in the federated run."""
    shards = [
        client_split(
            dataset,
            k,
            sites,
            dirichlet_alpha=dirichlet_alpha,
            seed=seed,
            val_fraction=val_fraction,
            limit=limit,
        ).train
        for k in range(sites)
    ]
    labels = None if dataset.labels is None else np.concatenate([s.labels for s in shards])
    return ImageDataset(
        images=np.concatenate([s.images for s in shards]),
        labels=labels,
        name=f"{dataset.name}/pooled{sites}",
        mean=dataset.mean,
        std=dataset.std,
        class_names=dataset.class_names,
    )


def train_central(
    model: MaskedAutoencoderViT,
    images: torch.Tensor,  # [N, C, H, W], normalised: the pooled training images
    eval_images: torch.Tensor,  # [M, C, H, W], normalised: held out
    cfg: TrainingConfig,
    passes: int,
    *,
    seed: int = 0,
    on_pass: Callable[[PassRecord, MaskedAutoencoderViT], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[PassRecord]:
    """Train ``passes`` passes over ``images`` with one AdamW; evaluate after each.

    ``on_pass`` sees every record (pass 0 first) with the model as it then is, e.g. to
    save a checkpoint; ``progress`` gets (step, total steps, loss) across all passes.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    one_pass = TrainingConfig(**{**asdict(cfg), "local_epochs": 1})
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    steps_per_pass = -(-len(images) // cfg.batch_size)
    records = [_record(model, 0, None, eval_images, cfg, 0.0, len(images))]
    if on_pass is not None:
        on_pass(records[0], model)
    for p in range(1, passes + 1):
        offset = (p - 1) * steps_per_pass

        def step_progress(step: int, _total: int, loss: float, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + step, passes * steps_per_pass, loss)

        # A seed per pass, as the agent derives one per round: a fresh shuffle each pass.
        pass_seed = zlib.crc32(f"{seed}/central/{p}".encode())
        result = train_local(
            model, optimizer, images, one_pass, seed=pass_seed, progress=step_progress
        )
        record = _record(model, p, result.train_loss, eval_images, cfg, result.seconds, len(images))
        records.append(record)
        if on_pass is not None:
            on_pass(record, model)
    return records


def _record(
    model: MaskedAutoencoderViT,
    pass_: int,
    train_loss: float | None,
    eval_images: torch.Tensor,
    cfg: TrainingConfig,
    seconds: float,
    images: int,
) -> PassRecord:
    eval_loss = evaluate(model, eval_images, cfg.mask_ratio, seed=EVAL_MASK_SEED)
    log.info(
        "central: pass %d train loss %s, eval loss %.4f (%d held-out images, fixed masks)",
        pass_,
        "-" if train_loss is None else f"{train_loss:.4f}",
        eval_loss,
        len(eval_images),
    )
    return PassRecord(pass_, train_loss, eval_loss, seconds, images)
