"""Tests for fedmae.ml.mae: the Masked Autoencoder model and its helpers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedmae.ml.mae import (
    MODEL_CONFIGS,
    MAEConfig,
    MaskedAutoencoderViT,
    build_model,
    count_trainable_parameters,
    get_2d_sincos_pos_embed,
    get_config,
    load_trainable_state,
    make_optimizer,
    trainable_state,
)

TINY_PARAMS = 1_301_648

# A very small config for fast structural tests (3 channels, 4x4 grid of patches).
SMALL_RGB = MAEConfig(
    img_size=16,
    patch_size=4,
    in_chans=3,
    embed_dim=32,
    depth=1,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)


@pytest.fixture(scope="module")
def tiny() -> MaskedAutoencoderViT:
    return build_model("tiny", seed=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- patchify / unpatchify


@pytest.mark.parametrize("cfg", [get_config("tiny"), SMALL_RGB], ids=["c1", "c3"])
def test_patchify_roundtrip_and_shape(cfg: MAEConfig) -> None:
    model = build_model(cfg, seed=0)
    imgs = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=_gen(1))
    patches = model.patchify(imgs)
    assert patches.shape == (2, cfg.num_patches, cfg.patch_size**2 * cfg.in_chans)
    assert torch.equal(model.unpatchify(patches), imgs)
    # And the other direction.
    assert torch.equal(model.patchify(model.unpatchify(patches)), patches)


def test_patchify_patch_content() -> None:
    """Patch (i, j) holds the pixels of block (i, j), channel-last inside the patch."""
    model = build_model(SMALL_RGB, seed=0)
    p, grid = SMALL_RGB.patch_size, SMALL_RGB.grid_size
    imgs = torch.randn(1, 3, 16, 16, generator=_gen(2))
    patches = model.patchify(imgs)
    i, j = 2, 1
    block = imgs[0, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # [C, p, p]
    assert torch.equal(patches[0, i * grid + j], block.permute(1, 2, 0).reshape(-1))


def test_patchify_rejects_wrong_channels(tiny: MaskedAutoencoderViT) -> None:
    with pytest.raises(ValueError):
        tiny.patchify(torch.zeros(1, 3, 28, 28))


# ---------------------------------------------------------------- random masking


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_random_masking_counts(tiny: MaskedAutoencoderViT, ratio: float) -> None:
    n, length, d = 8, 49, 5
    x = torch.randn(n, length, d, generator=_gen(3))
    x_masked, mask, ids_restore = tiny.random_masking(x, ratio, generator=_gen(4))
    len_keep = int(length * (1 - ratio))
    assert x_masked.shape == (n, len_keep, d)
    assert mask.shape == (n, length)
    assert ids_restore.shape == (n, length)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.sum(dim=1), torch.full((n,), float(length - len_keep)))
    assert torch.equal((mask == 0).sum(dim=1), torch.full((n,), len_keep))
    # ids_restore is a permutation per row.
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(length).expand(n, -1))


def test_random_masking_gathers_visible_patches(tiny: MaskedAutoencoderViT) -> None:
    n, length, d = 4, 49, 6
    x = torch.randn(n, length, d, generator=_gen(5))
    x_masked, mask, ids_restore = tiny.random_masking(x, 0.75, generator=_gen(6))
    for i in range(n):
        visible = x[i][mask[i] == 0]  # original order
        # x_masked is in shuffled order: compare as sets of rows via sorting by first column.
        a = visible[visible[:, 0].argsort()]
        b = x_masked[i][x_masked[i][:, 0].argsort()]
        assert torch.equal(a, b)
        # The kept tokens are the first len_keep positions of the shuffle.
        ids_shuffle = ids_restore[i].argsort()
        assert torch.equal(x_masked[i], x[i][ids_shuffle[: x_masked.shape[1]]])


def test_random_masking_per_sample_and_seeded(tiny: MaskedAutoencoderViT) -> None:
    x = torch.randn(6, 49, 4, generator=_gen(7))
    _, mask_a, ids_a = tiny.random_masking(x, 0.75, generator=_gen(123))
    _, mask_b, ids_b = tiny.random_masking(x, 0.75, generator=_gen(123))
    _, mask_c, _ = tiny.random_masking(x, 0.75, generator=_gen(124))
    assert torch.equal(mask_a, mask_b) and torch.equal(ids_a, ids_b)
    assert not torch.equal(mask_a, mask_c)
    # Each sample gets its own mask.
    rows = {tuple(r.tolist()) for r in mask_a}
    assert len(rows) == mask_a.shape[0]


# ---------------------------------------------------------------- encoder / decoder / forward


def test_encoder_sees_only_visible_tokens(tiny: MaskedAutoencoderViT) -> None:
    imgs = torch.randn(3, 1, 28, 28, generator=_gen(8))
    for ratio in (0.75, 0.5):
        latent, mask, ids_restore = tiny.forward_encoder(imgs, ratio, generator=_gen(9))
        len_keep = int(49 * (1 - ratio))
        assert latent.shape == (3, 1 + len_keep, 128)
        assert mask.shape == (3, 49) and ids_restore.shape == (3, 49)
        pred = tiny.forward_decoder(latent, ids_restore)
        assert pred.shape == (3, 49, 16)


def test_forward_outputs_and_default_ratio(tiny: MaskedAutoencoderViT) -> None:
    imgs = torch.randn(2, 1, 28, 28, generator=_gen(10))
    loss, pred, mask = tiny(imgs, generator=_gen(11))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, 49, 16)
    assert mask.sum(dim=1).tolist() == [49 - 12, 49 - 12]  # default ratio 0.75 keeps 12
    loss2, pred2, mask2 = tiny(imgs, generator=_gen(11))
    assert torch.equal(mask, mask2) and torch.equal(pred, pred2) and torch.equal(loss, loss2)


def test_encoder_ignores_masked_pixels(tiny: MaskedAutoencoderViT) -> None:
    """Changing pixels of a removed patch must not change the encoder output."""
    imgs = torch.randn(1, 1, 28, 28, generator=_gen(12))
    latent, mask, _ = tiny.forward_encoder(imgs, 0.75, generator=_gen(13))
    masked_idx = int(mask[0].nonzero()[0])
    r, c = divmod(masked_idx, 7)
    imgs2 = imgs.clone()
    imgs2[0, 0, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] += 5.0
    latent2, mask2, _ = tiny.forward_encoder(imgs2, 0.75, generator=_gen(13))
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent, latent2)


def _capture_block_input(block: torch.nn.Module) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    return seen, handle


def test_encoder_tokens_are_visible_patches_plus_pos(tiny: MaskedAutoencoderViT) -> None:
    """The first encoder block gets [cls + pos0, embed(patch_k) + pos_k for kept k]."""
    imgs = torch.randn(2, 1, 28, 28, generator=_gen(20))
    seen, handle = _capture_block_input(tiny.blocks[0])
    try:
        with torch.no_grad():
            _, mask, ids_restore = tiny.forward_encoder(imgs, 0.75, generator=_gen(21))
            emb = tiny.patch_embed(imgs).flatten(2).transpose(1, 2)  # [N, L, D]
    finally:
        handle.remove()
    tokens = seen[0]  # [N, 1+keep, D]
    pos = tiny.pos_embed[0]
    for n in range(2):
        torch.testing.assert_close(tokens[n, 0], tiny.cls_token[0, 0] + pos[0])
        kept = ids_restore[n].argsort()[:12]
        assert torch.equal(mask[n, kept], torch.zeros(12))
        torch.testing.assert_close(tokens[n, 1:], emb[n, kept] + pos[1 + kept])


def test_decoder_unshuffles_tokens(tiny: MaskedAutoencoderViT) -> None:
    """Decoder input: mask token at removed positions, projected latent at kept ones."""
    imgs = torch.randn(2, 1, 28, 28, generator=_gen(22))
    seen, handle = _capture_block_input(tiny.decoder_blocks[0])
    try:
        with torch.no_grad():
            latent, mask, ids_restore = tiny.forward_encoder(imgs, 0.75, generator=_gen(23))
            tiny.forward_decoder(latent, ids_restore)
            projected = tiny.decoder_embed(latent)  # [N, 1+keep, D_dec]
    finally:
        handle.remove()
    tokens = seen[0] - tiny.decoder_pos_embed  # [N, 1+L, D_dec]
    assert tokens.shape == (2, 50, 64)
    for n in range(2):
        torch.testing.assert_close(tokens[n, 0], projected[n, 0])  # cls
        kept = ids_restore[n].argsort()[:12]  # patch index of the k-th latent token
        torch.testing.assert_close(tokens[n, 1 + kept], projected[n, 1:])
        removed = mask[n].nonzero().squeeze(1)
        torch.testing.assert_close(
            tokens[n, 1 + removed], tiny.mask_token[0].expand(len(removed), -1)
        )


# ---------------------------------------------------------------- loss


def test_loss_only_on_masked_patches(tiny: MaskedAutoencoderViT) -> None:
    imgs = torch.randn(2, 1, 28, 28, generator=_gen(14))
    with torch.no_grad():
        loss, pred, mask = tiny(imgs, generator=_gen(15))
        assert torch.allclose(tiny.forward_loss(imgs, pred, mask), loss)

        visible = mask == 0
        pred_vis = pred.clone()
        pred_vis[visible] += 10.0
        assert torch.equal(tiny.forward_loss(imgs, pred_vis, mask), loss)

        pred_masked = pred.clone()
        n, idx = mask.nonzero()[0].tolist()
        pred_masked[n, idx] += 10.0
        assert not torch.allclose(tiny.forward_loss(imgs, pred_masked, mask), loss)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_numpy(norm_pix: bool) -> None:
    cfg = dataclasses.replace(
        SMALL_RGB, img_size=8, in_chans=1, patch_size=4, norm_pix_loss=norm_pix
    )
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    imgs_np = rng.normal(size=(2, 1, 8, 8))
    pred_np = rng.normal(size=(2, 4, 16))
    mask_np = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=np.float64)

    # Hand patchify: patch (i, j) of image n is imgs[n, 0, 4i:4i+4, 4j:4j+4], row-major.
    target = np.zeros((2, 4, 16))
    for n in range(2):
        for i in range(2):
            for j in range(2):
                target[n, 2 * i + j] = imgs_np[n, 0, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].ravel()
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, ddof=1, keepdims=True)
        target = (target - mean) / np.sqrt(var + 1e-6)
    per_patch = ((pred_np - target) ** 2).mean(axis=-1)
    expected = (per_patch * mask_np).sum() / mask_np.sum()

    got = model.forward_loss(
        torch.from_numpy(imgs_np).float(),
        torch.from_numpy(pred_np).float(),
        torch.from_numpy(mask_np).float(),
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


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
    loss, _, _ = model(torch.randn(2, 1, 28, 28, generator=_gen(16)))
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
    x = torch.randn(2, 1, 28, 28, generator=_gen(17))
    with torch.no_grad():
        assert torch.equal(src(x, generator=_gen(1))[0], dst(x, generator=_gen(1))[0])


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
    g = _gen(18)
    # Smooth-ish images are learnable; a fixed mask makes the loss comparable across steps.
    imgs = torch.rand(8, 1, 7, 7, generator=g).repeat_interleave(4, -1).repeat_interleave(4, -2)
    opt = make_optimizer(model, lr=1e-3)

    def loss_now() -> float:
        with torch.no_grad():
            return model(imgs, generator=_gen(19))[0].item()

    initial = loss_now()
    model.train()
    for step in range(15):
        opt.zero_grad()
        loss, _, _ = model(imgs, generator=_gen(100 + step))
        loss.backward()
        opt.step()
    final = loss_now()
    assert final < 0.7 * initial, (initial, final)
