"""The trainable tensors of a model: what federated clients exchange."""

from __future__ import annotations

import torch
from torch import nn


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
