"""Local MAE training and evaluation: one readable loop, knobs in ``TrainingConfig``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedmae.config import TrainingConfig
from fedmae.ml.mae import MaskedAutoencoderViT

log = logging.getLogger(__name__)

EVAL_MASK_SEED = 1234  # fixed masks: validation losses are comparable across rounds


@dataclass(frozen=True)
class TrainResult:
    train_loss: float  # mean over the last epoch's batches
    num_samples: int  # samples seen per epoch: the aggregation weight
    seconds: float
    images_per_s: float


# Parameters that must not be shrunk towards zero (the reference skips these by name too).
_NO_DECAY_NAMES = ("cls_token", "mask_token")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95), as in MAE pre-training.

    Weight decay is applied to matrices only; biases, LayerNorm parameters and the cls / mask
    tokens go in a no-decay group (group 0 decays, group 1 does not).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.split(".")[-1] in _NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_local(
    model: MaskedAutoencoderViT,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,  # [N, C, H, W], normalised
    cfg: TrainingConfig,
    *,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train ``cfg.local_epochs`` epochs over ``images``; report the last epoch's loss.

    With ``cfg.proximal_mu`` = μ > 0 (FedProx, Li et al. 2020) the loss minimised is the
    MAE loss + (μ/2)·‖w − w_global‖² over the trainable parameters, ``w_global`` being
    their values on entry (the round's global model): a copy kept for this call only.
    The reported loss stays the MAE loss, comparable with FedAvg's."""
    if cfg.max_samples and len(images) > cfg.max_samples:
        images = images[: cfg.max_samples]
    for group in optimizer.param_groups:
        group["lr"] = cfg.learning_rate
    model.train()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total_steps, step = cfg.local_epochs * steps_per_epoch, 0
    start = time.perf_counter()
    epoch_loss = float("nan")
    anchor = _proximal_anchor(model) if cfg.proximal_mu > 0 else None
    for _epoch in range(cfg.local_epochs):
        loss_sum, count = 0.0, 0
        for batch in batches(images, cfg.batch_size, shuffle=True, generator=gen):
            loss, _, _ = model(batch, mask_ratio=cfg.mask_ratio)
            objective = loss if anchor is None else loss + _proximal(anchor, cfg.proximal_mu)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            value = loss.item()  # one host sync per step
            loss_sum += value * len(batch)
            count += len(batch)
            step += 1
            if progress is not None:
                progress(step, total_steps, value)
        epoch_loss = loss_sum / max(count, 1)
    seconds = time.perf_counter() - start
    seen = cfg.local_epochs * len(images)
    return TrainResult(epoch_loss, len(images), seconds, seen / max(seconds, 1e-9))


def _proximal_anchor(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Each trainable parameter with a detached copy of its value now (w_global)."""
    return [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]


def _proximal(anchor: list[tuple[nn.Parameter, torch.Tensor]], mu: float) -> torch.Tensor:
    """FedProx's term (μ/2)·‖w − w_global‖², differentiable in w."""
    return 0.5 * mu * sum((p - g).pow(2).sum() for p, g in anchor)


@torch.no_grad()
def evaluate(
    model: MaskedAutoencoderViT,
    images: torch.Tensor,
    mask_ratio: float,
    batch_size: int = 256,
    seed: int = EVAL_MASK_SEED,
) -> float:
    """Masked-patch MSE with fixed, seeded masks (the same masks every round)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches(images, batch_size, shuffle=False):
        loss, _, _ = model(batch, mask_ratio=mask_ratio, generator=gen)
        total += loss.item() * len(batch)
        count += len(batch)
    return total / max(count, 1)


def batches(
    images: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield mini-batches along dim 0 of an in-memory tensor (one pass = one epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Validate eagerly; the generator below only starts running on the first next().
    return _iter_batches(images, batch_size, shuffle, generator, drop_last)


def _iter_batches(
    images: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> Iterator[torch.Tensor]:
    n = images.shape[0]
    stop = n - n % batch_size if drop_last else n
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        yield images[start:end] if order is None else images[order[start:end]]
