"""Tests for the MAE's helpers: positional embeddings, parameter counts, build and config,
state exchange, optimisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mae_cases import SMALL_RGB, TINY_PARAMS, gen

from fedmae.ml.mae import MaskedAutoencoderViT
from fedmae.ml.mae_config import MODEL_CONFIGS, get_config
from fedmae.ml.model_state import count_trainable_parameters, load_trainable_state, trainable_state
from fedmae.ml.model_zoo import build_model
from fedmae.ml.pos_embed import get_2d_sincos_pos_embed
from fedmae.ml.training import make_optimizer

# The ``tiny`` model fixture is in conftest.py.


# ---------------------------------------------------------------- positional embeddings


def test_pos_embeds_are_fixed_sincos_buffers(tiny: MaskedAutoencoderViT) -> None:
    param_names = {n for n, _ in tiny.named_parameters()}
    buffer_names = {n for n, _ in tiny.named_buffers()}
    assert {"pos_embed", "decoder_pos_embed"} <= buffer_names
    assert not {"pos_embed", "decoder_pos_embed"} & param_names
    sd = tiny.state_dict()
    assert "pos_embed" in sd and "decoder_pos_embed" in sd  # persistent
    assert "pos_embed" not in trainable_state(tiny)

    for buf, dim in ((tiny.pos_embed, 128), (tiny.decoder_pos_embed, 64)):
        assert buf.shape == (1, 50, dim)
        assert not buf.requires_grad
        assert torch.equal(buf[0, 0], torch.zeros(dim))  # cls row
        assert buf.abs().max() <= 1.0
        expected = get_2d_sincos_pos_embed(dim, 7, cls_token=True)
        torch.testing.assert_close(buf[0], torch.from_numpy(expected).float())
        # Every patch position gets a distinct embedding.
        assert torch.unique(buf[0, 1:], dim=0).shape[0] == 49


def test_sincos_first_position_is_sin0_cos0() -> None:
    pe = get_2d_sincos_pos_embed(8, 3, cls_token=False)
    assert pe.shape == (9, 8) and pe.dtype == np.float64
    # Position (0, 0): sin(0)=0 in sin halves, cos(0)=1 in cos halves.
    np.testing.assert_allclose(pe[0], [0, 0, 1, 1, 0, 0, 1, 1])


def test_pos_embed_survives_training_step() -> None:
    model = build_model("tiny", seed=0)
    before = model.pos_embed.clone()
    opt = make_optimizer(model, lr=1e-2)
    loss, _, _ = model(torch.randn(2, 1, 28, 28, generator=gen(16)))
    loss.backward()
    opt.step()
    assert torch.equal(model.pos_embed, before)


# ---------------------------------------------------------------- parameter counts


def test_tiny_param_count(tiny: MaskedAutoencoderViT) -> None:
    assert count_trainable_parameters(tiny) == TINY_PARAMS
    assert sum(p.numel() for p in tiny.parameters()) == TINY_PARAMS


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tiny", TINY_PARAMS),
        ("vit_base", 111_655_680),
        ("vit_large", 329_239_296),
        ("vit_huge", 656_613_964),
    ],
)
def test_param_counts_on_meta(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = MaskedAutoencoderViT(get_config(name))
    assert model.cls_token.is_meta
    assert count_trainable_parameters(model) == expected


def test_block_param_formula() -> None:
    cfg = get_config("tiny")
    d = cfg.embed_dim
    model = build_model(cfg, seed=0)
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 12 * d * d + 13 * d


# ---------------------------------------------------------------- build / config


def test_build_model_seeded() -> None:
    a = trainable_state(build_model("tiny", seed=1))
    b = trainable_state(build_model("tiny", seed=1))
    c = trainable_state(build_model("tiny", seed=2))
    assert list(a) == sorted(a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    assert not torch.equal(a["cls_token"], c["cls_token"])


def test_build_model_does_not_touch_global_rng() -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    build_model(SMALL_RGB, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_init_matches_reference() -> None:
    model = build_model("tiny", seed=0)
    qkv_bias = model.blocks[0].attn.qkv.bias
    assert torch.equal(qkv_bias, torch.zeros_like(qkv_bias))
    assert torch.equal(model.norm.weight, torch.ones(128))
    assert torch.equal(model.norm.bias, torch.zeros(128))
    w = model.blocks[0].mlp.fc1.weight  # xavier uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / (128 + 512)) ** 0.5
    assert 0.005 < model.cls_token.std() < 0.05


def test_get_config_unknown_name() -> None:
    with pytest.raises(ValueError) as exc:
        get_config("vit_gigantic")
    for name in MODEL_CONFIGS:
        assert name in str(exc.value)
    assert {"tiny", "vit_base", "vit_large", "vit_huge"} <= set(MODEL_CONFIGS)
    assert get_config("vit_base").patch_size == 16
    with pytest.raises(ValueError):
        build_model("nope")


# ---------------------------------------------------------------- state exchange


def test_trainable_state_roundtrip() -> None:
    src = build_model("tiny", seed=3)
    dst = build_model("tiny", seed=4)
    state = {k: v.clone() for k, v in trainable_state(src).items()}
    assert len(state) == len(list(src.parameters()))
    load_trainable_state(dst, state)
    assert all(torch.equal(dst.get_parameter(k), v) for k, v in state.items())
    x = torch.randn(2, 1, 28, 28, generator=gen(17))
    with torch.no_grad():
        assert torch.equal(src(x, generator=gen(1))[0], dst(x, generator=gen(1))[0])


def test_load_trainable_state_strict() -> None:
    model = build_model("tiny", seed=0)
    state = dict(trainable_state(model))
    missing = dict(state)
    del missing["cls_token"]
    with pytest.raises(ValueError, match="cls_token"):
        load_trainable_state(model, missing)
    with pytest.raises(ValueError, match="bogus"):
        load_trainable_state(model, {**state, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="norm.weight"):
        load_trainable_state(model, {**state, "norm.weight": torch.zeros(3)})


# ---------------------------------------------------------------- optimisation


def test_make_optimizer_groups(tiny: MaskedAutoencoderViT) -> None:
    opt = make_optimizer(tiny, lr=1e-3, weight_decay=0.05)
    assert opt.defaults["betas"] == (0.9, 0.95)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    decay_ids = {id(p) for p in decay["params"]}
    for name, p in tiny.named_parameters():
        if p.ndim < 2 or name in ("cls_token", "mask_token"):
            assert id(p) in no_decay_ids, name
        else:
            assert id(p) in decay_ids, name
    assert len(no_decay_ids) + len(decay_ids) == len(list(tiny.parameters()))


def test_training_reduces_loss() -> None:
    model = build_model("tiny", seed=0)
    g = gen(18)
    # Smooth-ish images are learnable; a fixed mask makes the loss comparable across steps.
    imgs = torch.rand(8, 1, 7, 7, generator=g).repeat_interleave(4, -1).repeat_interleave(4, -2)
    opt = make_optimizer(model, lr=1e-3)

    def loss_now() -> float:
        with torch.no_grad():
            return model(imgs, generator=gen(19))[0].item()

    initial = loss_now()
    model.train()
    for step in range(15):
        opt.zero_grad()
        loss, _, _ = model(imgs, generator=gen(100 + step))
        loss.backward()
        opt.step()
    final = loss_now()
    assert final < 0.7 * initial, (initial, final)
