"""Checkpoints: safetensors files whose data section is the fp32 wire payload."""

from __future__ import annotations

import torch
from safetensors.numpy import load_file

from aggregator_service.checkpoint_store import CheckpointStore
from fedmae.errors import VersionNotFound
from fedmae.ml.model_state import trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import encode
from fedmae.payload.layout import ModelLayout


def _layout_and_flat(seed=0):
    state = trainable_state(build_model("tiny", seed=seed))
    layout = ModelLayout.from_state(state)
    return layout, layout.flatten(state)


def test_save_load_and_serve_from_file(tmp_path):
    layout, flat = _layout_and_flat()
    store = CheckpointStore(tmp_path)
    ckpt = store.save(3, 2, "tiny", layout, flat)
    assert ckpt.path.name == "v000003.safetensors"
    assert not list(tmp_path.glob("*.tmp"))  # written through a temp file, then renamed
    assert (ckpt.version, ckpt.round, ckpt.model) == (3, 2, "tiny")
    payload = bytes(encode(flat))
    assert ckpt.payload_digest == payload_digest(payload)
    raw = ckpt.path.read_bytes()
    # The file's data section is exactly the fp32 payload: downloads need no re-encoding.
    assert raw[ckpt.data_offset : ckpt.data_offset + ckpt.total_bytes] == payload
    _, loaded = store.load(3, layout)
    assert torch.equal(loaded, flat)
    named = load_file(str(ckpt.path))  # any safetensors reader can open it
    assert set(named) == {e.name for e in layout.entries}


def test_versions_latest_prune_and_missing(tmp_path):
    layout, flat = _layout_and_flat()
    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None
    for v in range(4):
        store.save(v, v, "tiny", layout, flat)
    assert store.versions() == [2, 3]
    assert store.latest() == 3
    try:
        store.describe(0)
    except VersionNotFound as err:
        assert "not available" in str(err)
    else:
        raise AssertionError("pruned version still described")
