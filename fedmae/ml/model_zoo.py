"""What a federation trains: an MAE from the registry, or (for benchmarks) a synthetic
``blob:P`` model of P float32 parameters with no network behind it."""

from __future__ import annotations

import torch

from fedmae.ml.mae import MaskedAutoencoderViT
from fedmae.ml.mae_config import DEFAULT_MODEL, MAEConfig, get_config
from fedmae.ml.model_state import trainable_state

BLOB_PREFIX = "blob:"
BLOB_TENSOR = 1 << 22  # elements per tensor of a blob model (16 MiB)


def build_model(
    name_or_config: str | MAEConfig = DEFAULT_MODEL, seed: int | None = None
) -> MaskedAutoencoderViT:
    """Build a model from a registry name or a config.

    With ``seed`` set, initialisation is deterministic and does not disturb the caller's
    global RNG state (the seeded init runs inside ``torch.random.fork_rng``).
    """
    cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if seed is None:
        return MaskedAutoencoderViT(cfg)
    # fork_rng restores the global CPU RNG afterwards; devices=[] because init happens on CPU.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskedAutoencoderViT(cfg)


def is_blob(name: str) -> bool:
    return name.startswith(BLOB_PREFIX)


def initial_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The trainable tensors of version 0, by name."""
    if is_blob(name):
        try:
            numel = int(float(name[len(BLOB_PREFIX) :]))
        except ValueError:
            raise ValueError(
                f"blob model {name!r}: expected blob:<parameters>, e.g. blob:1e8"
            ) from None
        sizes = [BLOB_TENSOR] * (numel // BLOB_TENSOR) + (
            [numel % BLOB_TENSOR] if numel % BLOB_TENSOR else []
        )
        return {f"w{i:05d}": torch.zeros(n) for i, n in enumerate(sizes)}
    return trainable_state(build_model(name, seed=seed))
