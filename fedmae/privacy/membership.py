"""Membership inference by loss threshold (Yeom, Giacomelli, Fredrikson, Jha 2018).

What differential privacy promises, measured from the outside: given the published
model and an image, can an attacker tell whether the image was in a site's training
data? Yeom et al.'s attack guesses "member" when the model's loss on the image is
below a threshold τ, since a model fits the images it was trained on better than
others. Its power over all τ is the ROC curve of the losses of members (lower) against
non-members; we report the ROC AUC (0.5 = a coin flip) and the membership advantage
max_τ (TPR − FPR) (Yeom et al.'s measure; under (ε, δ)-DP it is at most
e^ε − 1 + δ, a loose bound for the ε used in practice).

The loss is the MAE's masked-reconstruction loss with the fixed, seeded masks of
``fedmae.ml.training.evaluate`` (``EVAL_MASK_SEED``), per image: an attacker who
could draw masks freely would do at least as well, so this is one attack, not a bound.
Numpy and torch only: the AUC is computed exactly from midranks (the Mann-Whitney U
statistic), ties counting one half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmae.ml.mae import MaskedAutoencoderViT
from fedmae.ml.training import EVAL_MASK_SEED, batches


@torch.no_grad()
def per_image_losses(
    model: MaskedAutoencoderViT,
    images: torch.Tensor,  # [N, C, H, W], normalised
    mask_ratio: float,
    batch_size: int = 256,
    seed: int = EVAL_MASK_SEED,
) -> np.ndarray:
    """Each image's masked-patch MSE, [N] float64, with ``evaluate``'s masks: the same
    batches draw the same masks from the same generator, so the mean of these is
    ``evaluate(model, images, mask_ratio, batch_size, seed)``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches(images, batch_size, shuffle=False):
        _, pred, mask = model(batch, mask_ratio=mask_ratio, generator=gen)  # [B, L, .], [B, L]
        loss = model.patch_loss(batch, pred)  # [B, L]
        out.append(((loss * mask).sum(dim=1) / mask.sum(dim=1)).double())  # [B]
    return torch.cat(out).numpy() if out else np.zeros(0)


def midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of each distinct value's last copy
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def roc_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """P(a non-member's loss > a member's) + ½ P(equal): the attack's ROC AUC, exact."""
    m, n = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    if m.size == 0 or n.size == 0:
        raise ValueError("membership AUC needs at least one member and one non-member")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("membership AUC of a NaN or infinite loss")
    ranks = midranks(np.concatenate([m, n]))
    u = ranks[m.size :].sum() - n.size * (n.size + 1) / 2.0  # Mann-Whitney U of non-members
    return float(u / (m.size * n.size))


def roc_curve(member_losses, nonmember_losses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, TPR, FPR) of "member if loss <= τ", for τ = -inf and every loss."""
    m = np.sort(np.asarray(member_losses, float))
    n = np.sort(np.asarray(nonmember_losses, float))
    thresholds = np.concatenate([[-np.inf], np.unique(np.concatenate([m, n]))])
    tpr = np.searchsorted(m, thresholds, side="right") / m.size
    fpr = np.searchsorted(n, thresholds, side="right") / n.size
    return thresholds, tpr, fpr


@dataclass(frozen=True)
class MembershipResult:
    auc: float  # ROC AUC, members = lower loss; 0.5 = no better than chance
    advantage: float  # max over τ of TPR - FPR (Yeom et al.'s membership advantage)
    threshold: float  # the τ that achieves it
    members: int
    nonmembers: int
    member_loss: float  # mean, for the report
    nonmember_loss: float


def loss_threshold_attack(member_losses, nonmember_losses) -> MembershipResult:
    """Yeom et al.'s attack on two sets of per-image losses."""
    m, n = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    auc = roc_auc(m, n)
    thresholds, tpr, fpr = roc_curve(m, n)
    best = int(np.argmax(tpr - fpr))
    return MembershipResult(
        auc=auc,
        advantage=float(tpr[best] - fpr[best]),
        threshold=float(thresholds[best]),
        members=int(m.size),
        nonmembers=int(n.size),
        member_loss=float(m.mean()),
        nonmember_loss=float(n.mean()),
    )


def attack_model(
    model: MaskedAutoencoderViT,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    mask_ratio: float = 0.75,
) -> MembershipResult:
    """The attack on ``model``: ``members`` (training images) against ``nonmembers``."""
    return loss_threshold_attack(
        per_image_losses(model, members, mask_ratio),
        per_image_losses(model, nonmembers, mask_ratio),
    )
