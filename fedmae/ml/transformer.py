"""Transformer building blocks (pre-norm ViT block, 12*d^2 + 13*d parameters).

Shapes: N batch, T tokens, D width, H heads, Dh = D / H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
