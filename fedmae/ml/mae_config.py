"""MAE architectures: ``MAEConfig`` and the registry of named configs."""

from __future__ import annotations

from dataclasses import dataclass


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


def _paper_vit(patch_size: int, embed_dim: int, depth: int, num_heads: int) -> MAEConfig:
    """One of the paper's models: 224x224 RGB, decoder 512 wide, 8 blocks, 16 heads."""
    return MAEConfig(
        img_size=224,
        patch_size=patch_size,
        in_chans=3,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    )


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
    "vit_base": _paper_vit(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large": _paper_vit(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": _paper_vit(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def get_config(name: str) -> MAEConfig:
    """Return the registered :class:`MAEConfig` called ``name``."""
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        valid = ", ".join(sorted(MODEL_CONFIGS))
        raise ValueError(f"unknown MAE model {name!r}; valid names: {valid}") from None
