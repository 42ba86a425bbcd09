"""A checkpoint named on the command line, checked and loaded into a model.

Shared by ``probe``, ``export`` and ``report``: a checkpoint is a ``vNNNNNN.safetensors``
file, a folder of them, or a state directory (its ``checkpoints/``), optionally with a
version; the latest is taken otherwise. Loading refuses a file whose tensors do not
match the named model's layout, or whose values do not match its recorded digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from aggregator_service.checkpoint_store import Checkpoint, CheckpointStore
from fedmae.errors import ConfigError
from fedmae.ml.mae import MaskedAutoencoderViT
from fedmae.ml.model_state import load_trainable_state, trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.payload.digest import payload_digest
from fedmae.payload.layout import ModelLayout


@dataclass(frozen=True)
class LoadedCheckpoint:
    checkpoint: Checkpoint
    model_name: str
    model: MaskedAutoencoderViT
    state: dict[str, torch.Tensor]  # the trainable tensors, by name


def locate(spec: Path, version: int | None = None) -> tuple[CheckpointStore, int]:
    """The store and version that ``spec`` (file, checkpoint folder or state dir) names."""
    if spec.is_file():
        if version is not None:
            raise ConfigError(f"{spec} is a file: a version cannot be chosen in it")
        store = CheckpointStore(spec.parent)
        named = [v for v in store.versions() if store.path(v).name == spec.name]
        if not named:
            raise ConfigError(f"{spec} is not a checkpoint file (expected vNNNNNN.safetensors)")
        return store, named[0]
    if not spec.is_dir():
        raise FileNotFoundError(f"no checkpoint at {spec}")
    folder = spec / "checkpoints" if (spec / "checkpoints").is_dir() else spec
    store = CheckpointStore(folder)
    if version is None:
        version = store.latest()
        if version is None:
            raise ConfigError(f"no checkpoint in {folder}")
    return store, version


def load_checkpoint(
    store: CheckpointStore, version: int, model_name: str | None = None
) -> LoadedCheckpoint:
    """Build ``model_name`` (default: the checkpoint's own) and load the checkpoint into
    it; a ``ConfigError`` if the layout or the digest does not match."""
    meta = store.describe(version)
    name = model_name or meta.model
    if not name:
        raise ConfigError(f"{meta.path} does not name its model; pass --model")
    model = build_model(name, seed=0)
    layout = ModelLayout.from_state(trainable_state(model))
    try:
        ckpt, flat = store.load(version, layout)
    except ConfigError as err:
        raise ConfigError(f"{err} (model {name!r}; the checkpoint says {meta.model!r})") from None
    if ckpt.payload_digest:
        algorithm = ckpt.payload_digest.split(":", 1)[0]
        if payload_digest(flat.numpy(), algorithm) != ckpt.payload_digest:
            raise ConfigError(f"{ckpt.path}: tensor values do not match the recorded digest")
    state = layout.unflatten(flat)
    load_trainable_state(model, state)
    return LoadedCheckpoint(ckpt, name, model, state)
