"""``fedmae export``: the encoder's tensors round-trip, a mismatched checkpoint is refused,
and docs/encoder.md's loading snippet runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from aggregator_service.checkpoint_store import CheckpointStore
from fedmae.cli.main import main
from fedmae.ml.encoder import encoder_state, extract_features
from fedmae.ml.mae_config import MAEConfig
from fedmae.ml.model_state import trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.payload.layout import ModelLayout

DOC = Path(__file__).resolve().parents[2] / "docs" / "encoder.md"


def _checkpoint(directory: Path, model_seed: int = 1, config: str | MAEConfig = "tiny"):
    """Version 4 of a (random-init, seeded) model in an aggregator's checkpoint folder."""
    state = trainable_state(build_model(config, seed=model_seed))
    layout = ModelLayout.from_state(state)
    CheckpointStore(directory / "checkpoints").save(4, 4, "tiny", layout, layout.flatten(state))
    return state


def test_encoder_export_round_trips(tmp_path):
    state = _checkpoint(tmp_path)
    out = tmp_path / "encoder.safetensors"
    argv = ["export", "--state-dir", str(tmp_path), "--version", "4", "--encoder-only"]
    assert main([*argv, "--out", str(out)]) == 0
    exported = load_file(str(out))
    want = encoder_state(state)
    assert list(want) == sorted(exported)
    assert all(torch.equal(exported[n], want[n]) for n in want)
    assert not any(n.startswith(("decoder", "mask_token")) for n in exported)
    described = json.loads((tmp_path / "encoder.json").read_text())
    assert (described["model"], described["version"], described["part"]) == ("tiny", "4", "encoder")
    assert MAEConfig(**described["config"]) == build_model("tiny").config


def test_whole_model_export_is_every_trainable_tensor(tmp_path):
    state = _checkpoint(tmp_path)
    out = tmp_path / "model.safetensors"
    config = tmp_path / "elsewhere.json"
    argv = ["export", "--state-dir", str(tmp_path), "--config-out", str(config)]
    assert main([*argv, "--out", str(out)]) == 0  # the latest version, by default
    exported = load_file(str(out))
    assert sorted(exported) == sorted(state)
    assert all(torch.equal(exported[n], state[n]) for n in state)
    assert json.loads(config.read_text())["part"] == "model"


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    # A smaller ViT's tensors under a "tiny" label: the names fit, the shapes do not.
    shallow = MAEConfig(
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=4,
    )
    _checkpoint(tmp_path, config=shallow)
    out = tmp_path / "encoder.safetensors"
    argv = ["export", "--state-dir", str(tmp_path), "--encoder-only", "--out", str(out)]
    assert main(argv) == 2
    assert not out.exists()


def test_a_tampered_checkpoint_is_refused(tmp_path):
    _checkpoint(tmp_path)
    path = tmp_path / "checkpoints" / "v000004.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    tensors = load_numpy(str(path))
    tensors["cls_token"] = tensors["cls_token"] + 1.0  # same layout, other values
    save_numpy(tensors, str(path), metadata=meta)
    out = tmp_path / "encoder.safetensors"
    argv = ["export", "--state-dir", str(tmp_path), "--encoder-only", "--out", str(out)]
    assert main(argv) == 2
    del tensors["norm.bias"]  # and a tensor missing: another layout
    save_numpy(tensors, str(path), metadata=meta)
    assert main(argv) == 2
    assert not out.exists()


def test_the_documented_snippet_loads_the_encoder(tmp_path, monkeypatch):
    state = _checkpoint(tmp_path)
    out = tmp_path / "encoder.safetensors"
    argv = ["export", "--state-dir", str(tmp_path), "--encoder-only", "--out", str(out)]
    assert main(argv) == 0
    section = DOC.read_text().split("## Loading it for fine-tuning", 1)[1].split("\n## ", 1)[0]
    load_block, tune_block = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(load_block, str(DOC), "exec"), scope)  # the blocks exactly as documented
    model = scope["model"]
    loaded = {n: t.clone() for n, t in trainable_state(model).items()}
    assert all(torch.equal(loaded[n], t) for n, t in encoder_state(state).items())
    exec(compile(tune_block, str(DOC), "exec"), scope)
    assert scope["logits"].shape == (8, 10)
    assert not torch.equal(trainable_state(model)["blocks.0.attn.qkv.weight"],
                           loaded["blocks.0.attn.qkv.weight"])  # fine-tuned  # fmt: skip
    load_block_only: dict = {}
    exec(compile(load_block, str(DOC), "exec"), load_block_only)
    model = load_block_only["model"]
    # The loaded encoder gives the checkpoint's features: the same as the source model's.
    source = build_model("tiny", seed=1)
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(
            extract_features(model, images), extract_features(source, images), atol=1e-6
        )


@pytest.mark.parametrize("kind", ["cls", "mean"])
def test_features_do_not_depend_on_token_order(kind):
    """forward_features (patch order) agrees with the model's own encoder at mask ratio 0
    (shuffled order): attention is permutation-equivariant once positions are added."""
    model = build_model("tiny", seed=2).eval()
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(images, 0.0, torch.Generator().manual_seed(0))
        ref = latent[:, 0] if kind == "cls" else latent[:, 1:].mean(dim=1)
    assert torch.allclose(extract_features(model, images, kind), ref, atol=1e-5)
