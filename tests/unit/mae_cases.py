"""Model configs and seeds shared by the MAE tests (test_mae.py, test_mae_helpers.py)."""

from __future__ import annotations

from dataclasses import replace

import torch

from fedmae.ml.mae_config import get_config

TINY_PARAMS = 1_301_648

# A very small config for fast structural tests: tiny's 4x4 patches on a 16x16 RGB image
# (a 4x4 grid of patches), one narrow block each side.
SMALL_RGB = replace(
    get_config("tiny"), img_size=16, in_chans=3, embed_dim=32, depth=1, num_heads=2,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
)  # fmt: skip


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
