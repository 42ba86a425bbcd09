"""Masked Autoencoder with a Vision Transformer backbone (He et al., 2022).

A self-contained re-implementation of the MAE model described in "Masked Autoencoders Are
Scalable Vision Learners" (facebookresearch/mae ``models_mae.py``), without a timm dependency.

The model reads top to bottom in data-flow order:

    patchify -> random_masking -> forward_encoder -> forward_decoder -> forward_loss

Shape legend used in comments:
    N  batch size            C  input channels        H, W  image height / width
    p  patch size            h, w  patches per side   L  = h * w patches per image
    D  encoder width         D_dec  decoder width     len_keep  visible patches per image

Around it: ``mae_config`` (``MAEConfig`` and the registry of named configs),
``transformer`` (the ViT block), ``pos_embed`` (fixed sin-cos embeddings), ``model_zoo``
(``build_model``), ``model_state`` (the trainable tensors clients exchange) and
``training`` (optimizer and the local loop).

Differences from the reference that are deliberate:
    * ``patchify``/``unpatchify`` honour ``in_chans`` (the reference hard-codes 3 channels).
    * positional embeddings are persistent *buffers*, so ``model.parameters()`` (and therefore
      what federated clients exchange) contains trainable tensors only.
    * ``random_masking`` accepts a ``torch.Generator`` so evaluation can use fixed masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmae.ml.mae_config import DEFAULT_MODEL, MODEL_CONFIGS, MAEConfig
from fedmae.ml.pos_embed import get_2d_sincos_pos_embed
from fedmae.ml.transformer import Block


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a ViT encoder and a lightweight ViT decoder.

    The encoder only ever sees the visible (unmasked) patches plus a cls token; the decoder
    receives the encoded visible tokens, re-inserts a shared learned mask token at every
    removed position and predicts the pixels of all patches. The loss is computed on the
    removed patches only.

    Trainable parameters for the registry configs: tiny 1,301,648; vit_base 111,655,680;
    vit_large 329,239,296; vit_huge 656,613,964.
    """

    def __init__(self, config: MAEConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else MODEL_CONFIGS[DEFAULT_MODEL]
        self.config = cfg
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.norm_pix_loss = cfg.norm_pix_loss
        num_patches = cfg.num_patches

        # ---- encoder ----
        # A conv with kernel == stride == p is a per-patch linear projection.
        self.patch_embed = nn.Conv2d(
            cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed sin-cos embeddings: buffers (saved in state_dict, never trained or exchanged).
        self.register_buffer(
            "pos_embed", torch.zeros(1, num_patches + 1, cfg.embed_dim), persistent=True
        )
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

        # ---- decoder ----
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed",
            torch.zeros(1, num_patches + 1, cfg.decoder_embed_dim),
            persistent=True,
        )
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(
            cfg.decoder_embed_dim, cfg.patch_size**2 * cfg.in_chans
        )  # predicts raw pixels of each patch

        self.initialize_weights()

    # ---- initialisation ----

    def initialize_weights(self) -> None:
        """Initialise as the reference MAE (sin-cos pos embeds, xavier Linear, N(0, .02) tokens).

        On the meta device there is no data to fill, so only shapes are created; this lets
        callers count ViT-H parameters without allocating memory.
        """
        if self.cls_token.is_meta:
            return
        grid = self.config.grid_size
        pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.copy_(torch.from_numpy(pe).float().unsqueeze(0))  # [1, 1+L, D]
        dpe = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.copy_(torch.from_numpy(dpe).float().unsqueeze(0))

        # Treat the patch-embed conv like a Linear on flattened patches (as the reference).
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

        # std .02 normal for tokens: truncation at 2 std is nearly a no-op, as in the reference.
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- patches <-> images ----

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Split images into flattened patches: [N, C, H, W] -> [N, L, p*p*C]."""
        p, c = self.patch_size, self.in_chans
        n, ci, hh, ww = imgs.shape
        if ci != c or hh != ww or hh % p != 0:
            raise ValueError(f"expected [N, {c}, H, H] images with H % {p} == 0, got {imgs.shape}")
        h = w = hh // p
        x = imgs.reshape(n, c, h, p, w, p)  # [N, C, h, p, w, p]
        x = torch.einsum("nchpwq->nhwpqc", x)  # [N, h, w, p, p, C]
        return x.reshape(n, h * w, p * p * c)  # [N, L, p*p*C]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`: [N, L, p*p*C] -> [N, C, H, W]."""
        p, c = self.patch_size, self.in_chans
        n, length, dim = x.shape
        h = w = math.isqrt(length)
        if h * w != length or dim != p * p * c:
            raise ValueError(f"expected [N, h*h, {p * p * c}] patches, got {tuple(x.shape)}")
        x = x.reshape(n, h, w, p, p, c)  # [N, h, w, p, p, C]
        x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C, h, p, w, p]
        return x.reshape(n, c, h * p, w * p)  # [N, C, H, W]

    # ---- masking ----

    def random_masking(
        self,
        x: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of ``int(L * (1 - mask_ratio))`` tokens per sample.

        Sorting i.i.d. uniform noise gives an independent random permutation per sample.

        Returns:
            x_masked: [N, len_keep, D] visible tokens (in shuffled order).
            mask: [N, L] with 1 for removed and 0 for kept tokens, in original patch order.
            ids_restore: [N, L] indices that undo the shuffle.
        """
        n, length, d = x.shape  # [N, L, D]
        len_keep = int(length * (1 - mask_ratio))

        # Draw on the generator's device (CPU by default) then move, so seeded masks are
        # identical regardless of where the model runs.
        gen_device = generator.device if generator is not None else x.device
        noise = torch.rand(n, length, generator=generator, device=gen_device).to(x.device)

        ids_shuffle = torch.argsort(noise, dim=1)  # [N, L], ascending: smallest noise kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L], inverse permutation

        ids_keep = ids_shuffle[:, :len_keep]  # [N, len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, keep, D]

        # Build the mask in shuffled order (first len_keep kept), then unshuffle it.
        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)  # [N, L]
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [N, L], original order
        return x_masked, mask, ids_restore

    # ---- encoder / decoder ----

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches of ``imgs``.

        Returns (latent [N, 1+len_keep, D], mask [N, L], ids_restore [N, L]).
        """
        x = self.patch_embed(imgs)  # [N, D, h, w]
        x = x.flatten(2).transpose(1, 2)  # [N, L, D]
        # Add position before masking so each kept token still knows where it came from.
        x = x + self.pos_embed[:, 1:, :]  # [N, L, D]

        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)  # [N, keep, D]

        cls = self.cls_token + self.pos_embed[:, :1, :]  # [1, 1, D]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1+keep, D]

        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)  # [N, 1+keep, D]
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Reconstruct every patch from the latent: [N, 1+len_keep, D] -> [N, L, p*p*C]."""
        x = self.decoder_embed(x)  # [N, 1+keep, D_dec]
        n, t, d = x.shape
        num_masked = ids_restore.shape[1] + 1 - t  # L - keep

        # Put a mask token at each removed position, then undo the shuffle.
        mask_tokens = self.mask_token.expand(n, num_masked, -1)  # [N, L-keep, D_dec]
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, D_dec], shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # [N, L, D_dec]
        x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1+L, D_dec], cls first again

        x = x + self.decoder_pos_embed  # [N, 1+L, D_dec]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [N, 1+L, p*p*C]
        return x[:, 1:, :]  # [N, L, p*p*C], the cls output has no pixels to predict

    # ---- loss ----

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared pixel error over the *removed* patches only.

        Args:
            imgs: [N, C, H, W] targets.
            pred: [N, L, p*p*C] predicted patches.
            mask: [N, L], 1 where a patch was removed.
        """
        loss = self.patch_loss(imgs, pred)  # [N, L]
        return (loss * mask).sum() / mask.sum()  # visible patches are trivially copyable

    def patch_loss(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared pixel error of every patch, [N, L] (per-image losses need it)."""
        target = self.patchify(imgs)  # [N, L, p*p*C]
        if self.norm_pix_loss:
            # Per-patch normalisation: the paper reports sharper features with this target.
            mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
            var = target.var(dim=-1, keepdim=True)  # [N, L, 1], unbiased as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        return loss.mean(dim=-1)  # [N, L], mean loss per patch

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode and score a batch.

        Returns (loss scalar, pred [N, L, p*p*C], mask [N, L]).
        """
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask
