"""The MAE's encoder on its own: its tensors, loading them, and features of whole images.

After pre-training only the encoder is kept (He et al. 2022, section 4): the decoder and
the mask token exist to reconstruct pixels. The encoder's trainable tensors are those
named ``patch_embed.*``, ``cls_token``, ``blocks.*`` and ``norm.*`` in
:class:`~fedmae.ml.mae.MaskedAutoencoderViT`; the fixed sin-cos ``pos_embed`` is a
buffer that the model rebuilds from its config, so it is never stored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedmae.ml.mae import MaskedAutoencoderViT
from fedmae.ml.model_state import trainable_state

ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")
ENCODER_NAMES = ("cls_token",)
FEATURE_KINDS = ("cls", "mean")


def is_encoder_tensor(name: str) -> bool:
    return name in ENCODER_NAMES or name.startswith(ENCODER_PREFIXES)


def encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a model's trainable state, in sorted-name order."""
    return {n: state[n] for n in sorted(state) if is_encoder_tensor(n)}


def load_encoder_state(model: MaskedAutoencoderViT, state: Mapping[str, torch.Tensor]) -> None:
    """Copy an encoder's tensors into ``model`` (strict: every encoder tensor, no others).

    The decoder keeps whatever it had: a model built for fine-tuning has no use for it.
    """
    want = encoder_state(trainable_state(model))
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    mismatched = [
        f"{n}: expected {tuple(want[n].shape)}, got {tuple(state[n].shape)}"
        for n in sorted(set(want) & set(state))
        if tuple(want[n].shape) != tuple(state[n].shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            "the encoder tensors do not fit this model: "
            f"missing {missing}, unexpected {unexpected}, shape mismatches {mismatched}"
        )
    with torch.no_grad():
        for name, param in want.items():
            param.copy_(state[name].to(dtype=param.dtype))


def forward_features(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> torch.Tensor:
    """The encoder on every patch, no masking: [N, C, H, W] -> [N, 1+L, D] (cls first).

    ``forward_encoder`` with ratio 0 would give the same tokens in shuffled order; this
    keeps them in patch order, as a downstream model expects.
    """
    x = model.patch_embed(imgs)  # [N, D, h, w]
    x = x.flatten(2).transpose(1, 2)  # [N, L, D]
    x = x + model.pos_embed[:, 1:, :]  # [N, L, D]
    cls = model.cls_token + model.pos_embed[:, :1, :]  # [1, 1, D]
    x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1+L, D]
    for blk in model.blocks:
        x = blk(x)
    return model.norm(x)  # [N, 1+L, D]


@torch.no_grad()
def extract_features(
    model: MaskedAutoencoderViT, images: torch.Tensor, kind: str = "cls", batch_size: int = 256
) -> torch.Tensor:
    """Frozen features of ``images`` ([N, C, H, W], normalised): [N, D] float32.

    ``kind`` is ``"cls"`` (the class token, as the MAE paper's linear probe) or ``"mean"``
    (the mean of the patch tokens). Batched under ``no_grad`` so memory stays flat.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; use one of {', '.join(FEATURE_KINDS)}")
    model.eval()
    out = torch.empty(images.shape[0], model.config.embed_dim, dtype=torch.float32)
    for start in range(0, images.shape[0], batch_size):
        tokens = forward_features(model, images[start : start + batch_size])  # [B, 1+L, D]
        pooled = tokens[:, 0] if kind == "cls" else tokens[:, 1:].mean(dim=1)  # [B, D]
        out[start : start + pooled.shape[0]] = pooled
    return out
