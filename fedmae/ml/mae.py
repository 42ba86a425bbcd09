"""Masked Autoencoder with a Vision Transformer backbone (He et al., 2022).

A self-contained re-implementation of the MAE model described in "Masked Autoencoders Are
Scalable Vision Learners" (facebookresearch/mae ``models_mae.py``), without a timm dependency.

The model reads top to bottom in data-flow order:

    patchify -> random_masking -> forward_encoder -> forward_decoder -> forward_loss

Shape legend used in comments:
    N  batch size            C  input channels        H, W  image height / width
    p  patch size            h, w  patches per side   L  = h * w patches per image
    D  encoder width         D_dec  decoder width     len_keep  visible patches per image

Differences from the reference that are deliberate:
    * ``patchify``/``unpatchify`` honour ``in_chans`` (the reference hard-codes 3 channels).
    * positional embeddings are persistent *buffers*, so ``model.parameters()`` (and therefore
      what federated clients exchange) contains trainable tensors only.
    * ``random_masking`` accepts a ``torch.Generator`` so evaluation can use fixed masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MAEConfig",
    "MODEL_CONFIGS",
    "DEFAULT_MODEL",
    "get_config",
    "build_model",
    "get_2d_sincos_pos_embed",
    "Attention",
    "Mlp",
    "Block",
    "MaskedAutoencoderViT",
    "make_optimizer",
    "trainable_state",
    "load_trainable_state",
    "count_trainable_parameters",
]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MAEConfig:
    """Architecture hyper-parameters of a :class:`MaskedAutoencoderViT`."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    mask_ratio: float = 0.75

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by {self.num_heads} heads")
        if self.decoder_embed_dim % self.decoder_num_heads != 0:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} not divisible by "
                f"{self.decoder_num_heads} heads"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def grid_size(self) -> int:
        """Patches per image side (h == w)."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per image, L."""
        return self.grid_size**2


DEFAULT_MODEL = "tiny"

# The ViT-B/L/H entries are the paper's mae_vit_{base,large,huge}_patch{16,16,14} models
# (decoder 512 wide, 8 blocks, 16 heads). Trainable parameter counts:
#   tiny 1,301,648 | vit_base 111,655,680 | vit_large 329,239,296 | vit_huge 656,613,964
MODEL_CONFIGS: dict[str, MAEConfig] = {
    # Small enough to train on CPU on 28x28 grey-scale images (MNIST / Fashion-MNIST):
    # 7x7 = 49 patches of 4x4 pixels, 12 of them visible at mask ratio 0.75.
    "tiny": MAEConfig(
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=128,
        depth=6,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    "vit_base": MAEConfig(
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    "vit_large": MAEConfig(
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    "vit_huge": MAEConfig(
        img_size=224,
        patch_size=14,
        in_chans=3,
        embed_dim=1280,
        depth=32,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
}


def get_config(name: str) -> MAEConfig:
    """Return the registered :class:`MAEConfig` called ``name``."""
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        valid = ", ".join(sorted(MODEL_CONFIGS))
        raise ValueError(f"unknown MAE model {name!r}; valid names: {valid}") from None


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


# --------------------------------------------------------------------------------------------
# Fixed 2-D sine-cosine positional embeddings
# --------------------------------------------------------------------------------------------


def _1d_sincos_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Sin-cos embedding of positions ``pos`` (any shape, M values) -> [M, embed_dim]."""
    if embed_dim % 2 != 0:
        raise ValueError(f"1-D sin-cos embedding needs an even dim, got {embed_dim}")
    # Geometric frequencies 1 / 10000^(2i/d), as in "Attention Is All You Need".
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    pos = pos.reshape(-1).astype(np.float64)  # [M]
    out = np.einsum("m,d->md", pos, omega)  # [M, D/2], outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos positional embedding for a ``grid_size`` x ``grid_size`` patch grid.

    Half the channels encode the row index and half the column index. Returns a float64
    array of shape [grid_size**2, embed_dim], or [1 + grid_size**2, embed_dim] with a leading
    all-zero row for the cls token when ``cls_token`` is true.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    # Same ordering as the reference: first coordinate from w, second from h (meshgrid 'xy').
    grid = np.meshgrid(grid_w, grid_h)  # 2 x [h, w]
    emb_h = _1d_sincos_from_grid(embed_dim // 2, grid[0])  # [L, D/2]
    emb_w = _1d_sincos_from_grid(embed_dim // 2, grid[1])  # [L, D/2]
    pos_embed = np.concatenate([emb_h, emb_w], axis=1)  # [L, D]
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)  # [1+L, D]
    return pos_embed


# --------------------------------------------------------------------------------------------
# Transformer building blocks (pre-norm ViT block, 12*d^2 + 13*d parameters)
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # 3d^2 + 3d
        self.proj = nn.Linear(dim, dim)  # d^2 + d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape  # [N, T, D]
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # [N, T, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [N, H, T, Dh]
        x = F.scaled_dot_product_attention(q, k, v)  # [N, H, T, Dh], scale 1/sqrt(Dh)
        x = x.transpose(1, 2).reshape(n, t, d)  # [N, T, D]
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [N, T, hidden] -> [N, T, D]


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


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
        target = self.patchify(imgs)  # [N, L, p*p*C]
        if self.norm_pix_loss:
            # Per-patch normalisation: the paper reports sharper features with this target.
            mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
            var = target.var(dim=-1, keepdim=True)  # [N, L, 1], unbiased as the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
        return (loss * mask).sum() / mask.sum()  # visible patches are trivially copyable

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


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------

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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached trainable parameters, keyed by name in sorted order.

    This is the state federated clients exchange; buffers (fixed pos embeds) are excluded.
    The tensors share storage with the model; clone them before mutating.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {n: params[n] for n in sorted(params)}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters (strict on keys and shapes)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    mismatched = [
        f"{n}: expected {tuple(params[n].shape)}, got {tuple(state[n].shape)}"
        for n in sorted(set(params) & set(state))
        if tuple(params[n].shape) != tuple(state[n].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches: {mismatched}")
        raise ValueError("cannot load trainable state; " + "; ".join(parts))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(device=p.device, dtype=p.dtype))


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of scalar values in parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
