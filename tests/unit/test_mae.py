"""Tests for fedmae.ml.mae: the Masked Autoencoder model, step by step (patchify, masking,
encoder, decoder, loss)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from mae_cases import SMALL_RGB, gen

from fedmae.ml.mae import MaskedAutoencoderViT
from fedmae.ml.mae_config import MAEConfig, get_config
from fedmae.ml.model_zoo import build_model

# The ``tiny`` model fixture is in conftest.py.


# ---------------------------------------------------------------- patchify / unpatchify


@pytest.mark.parametrize("cfg", [get_config("tiny"), SMALL_RGB], ids=["c1", "c3"])
def test_patchify_roundtrip_and_shape(cfg: MAEConfig) -> None:
    model = build_model(cfg, seed=0)
    imgs = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen(1))
    patches = model.patchify(imgs)
    assert patches.shape == (2, cfg.num_patches, cfg.patch_size**2 * cfg.in_chans)
    assert torch.equal(model.unpatchify(patches), imgs)
    # And the other direction.
    assert torch.equal(model.patchify(model.unpatchify(patches)), patches)


def test_patchify_patch_content() -> None:
    """Patch (i, j) holds the pixels of block (i, j), channel-last inside the patch."""
    model = build_model(SMALL_RGB, seed=0)
    p, grid = SMALL_RGB.patch_size, SMALL_RGB.grid_size
    imgs = torch.randn(1, 3, 16, 16, generator=gen(2))
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
    x = torch.randn(n, length, d, generator=gen(3))
    x_masked, mask, ids_restore = tiny.random_masking(x, ratio, generator=gen(4))
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
    x = torch.randn(n, length, d, generator=gen(5))
    x_masked, mask, ids_restore = tiny.random_masking(x, 0.75, generator=gen(6))
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
    x = torch.randn(6, 49, 4, generator=gen(7))
    _, mask_a, ids_a = tiny.random_masking(x, 0.75, generator=gen(123))
    _, mask_b, ids_b = tiny.random_masking(x, 0.75, generator=gen(123))
    _, mask_c, _ = tiny.random_masking(x, 0.75, generator=gen(124))
    assert torch.equal(mask_a, mask_b) and torch.equal(ids_a, ids_b)
    assert not torch.equal(mask_a, mask_c)
    # Each sample gets its own mask.
    rows = {tuple(r.tolist()) for r in mask_a}
    assert len(rows) == mask_a.shape[0]


# ---------------------------------------------------------------- encoder / decoder / forward


def test_encoder_sees_only_visible_tokens(tiny: MaskedAutoencoderViT) -> None:
    imgs = torch.randn(3, 1, 28, 28, generator=gen(8))
    for ratio in (0.75, 0.5):
        latent, mask, ids_restore = tiny.forward_encoder(imgs, ratio, generator=gen(9))
        len_keep = int(49 * (1 - ratio))
        assert latent.shape == (3, 1 + len_keep, 128)
        assert mask.shape == (3, 49) and ids_restore.shape == (3, 49)
        pred = tiny.forward_decoder(latent, ids_restore)
        assert pred.shape == (3, 49, 16)


def test_forward_outputs_and_default_ratio(tiny: MaskedAutoencoderViT) -> None:
    imgs = torch.randn(2, 1, 28, 28, generator=gen(10))
    loss, pred, mask = tiny(imgs, generator=gen(11))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, 49, 16)
    assert mask.sum(dim=1).tolist() == [49 - 12, 49 - 12]  # default ratio 0.75 keeps 12
    loss2, pred2, mask2 = tiny(imgs, generator=gen(11))
    assert torch.equal(mask, mask2) and torch.equal(pred, pred2) and torch.equal(loss, loss2)


def test_encoder_ignores_masked_pixels(tiny: MaskedAutoencoderViT) -> None:
    """Changing pixels of a removed patch must not change the encoder output."""
    imgs = torch.randn(1, 1, 28, 28, generator=gen(12))
    latent, mask, _ = tiny.forward_encoder(imgs, 0.75, generator=gen(13))
    masked_idx = int(mask[0].nonzero()[0])
    r, c = divmod(masked_idx, 7)
    imgs2 = imgs.clone()
    imgs2[0, 0, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] += 5.0
    latent2, mask2, _ = tiny.forward_encoder(imgs2, 0.75, generator=gen(13))
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(latent, latent2)


@contextmanager
def _block_inputs(block: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The inputs ``block`` receives inside the ``with`` (run without gradients)."""
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            yield seen
    finally:
        handle.remove()


def test_encoder_tokens_are_visible_patches_plus_pos(tiny: MaskedAutoencoderViT) -> None:
    """The first encoder block gets [cls + pos0, embed(patch_k) + pos_k for kept k]."""
    imgs = torch.randn(2, 1, 28, 28, generator=gen(20))
    with _block_inputs(tiny.blocks[0]) as seen:
        _, mask, ids_restore = tiny.forward_encoder(imgs, 0.75, generator=gen(21))
        emb = tiny.patch_embed(imgs).flatten(2).transpose(1, 2)  # [N, L, D]
    tokens = seen[0]  # [N, 1+keep, D]
    pos = tiny.pos_embed[0]
    for n in range(2):
        torch.testing.assert_close(tokens[n, 0], tiny.cls_token[0, 0] + pos[0])
        kept = ids_restore[n].argsort()[:12]
        assert torch.equal(mask[n, kept], torch.zeros(12))
        torch.testing.assert_close(tokens[n, 1:], emb[n, kept] + pos[1 + kept])


def test_decoder_unshuffles_tokens(tiny: MaskedAutoencoderViT) -> None:
    """Decoder input: mask token at removed positions, projected latent at kept ones."""
    imgs = torch.randn(2, 1, 28, 28, generator=gen(22))
    with _block_inputs(tiny.decoder_blocks[0]) as seen:
        latent, mask, ids_restore = tiny.forward_encoder(imgs, 0.75, generator=gen(23))
        tiny.forward_decoder(latent, ids_restore)
        projected = tiny.decoder_embed(latent)  # [N, 1+keep, D_dec]
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
    imgs = torch.randn(2, 1, 28, 28, generator=gen(14))
    with torch.no_grad():
        loss, pred, mask = tiny(imgs, generator=gen(15))
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
