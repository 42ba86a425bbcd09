"""Model configs and seeds shared by the MAE tests (test_mae.py, test_mae_helpers.py)."""

from __future__ import annotations

import torch

from fedmae.ml.mae_config import MAEConfig

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


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
