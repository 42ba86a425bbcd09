"""What a federation trains: an MAE from the registry, or (for benchmarks) a synthetic
``blob:P`` model of P float32 parameters with no network behind it."""

from __future__ import annotations

import torch

from fedmae.ml.mae import build_model, trainable_state

BLOB_PREFIX = "blob:"
BLOB_TENSOR = 1 << 22  # elements per tensor of a blob model (16 MiB)


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
