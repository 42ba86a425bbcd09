"""Fixed 2-D sine-cosine positional embeddings (as the reference's util/pos_embed.py)."""

from __future__ import annotations

import numpy as np


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
