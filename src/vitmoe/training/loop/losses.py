"""Training losses beyond the cross-entropy with hard labels: the cross-entropy with soft targets
(mixup / CutMix, see vitmoe.data.mix) and the consistency regulariser of randomly routed models.

AdaMix (Wang et al. 2022) / THOR (Zuo et al. 2022): the same batch goes through the model twice,
each pass drawing its own random routes; the two predictions are pulled together by a symmetric
KL divergence

    0.5 * (KL(p1 || p2) + KL(p2 || p1)),   KL(p || q) = sum_c p_c (log p_c - log q_c),

on the softmax outputs, computed in fp32. With `stopgrad` (AdaMix) the target side of each
direction is detached: KL(p1 || p2) only moves pass 2 and KL(p2 || p1) only moves pass 1, so the
gradient with respect to pass 1's logits is 0.5 * (p1 - p2) per image.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """-sum_c t_c log softmax(logits)_c per row, in fp32 (what F.cross_entropy with label smoothing
    computes for the targets (1 - eps) onehot + eps / C, which mixing blends). `reduction`: "mean"
    over rows, "sum" or "none"."""
    per_row = -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return _reduce(per_row, reduction, "soft_cross_entropy")


def _reduce(per_row: Tensor, reduction: str, name: str) -> Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.mean()
    raise ValueError(f"{name}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def symmetric_kl(logits_a: Tensor, logits_b: Tensor, stopgrad: bool = True, reduction: str = "mean") -> Tensor:
    """0.5 * (KL(p_a || p_b) + KL(p_b || p_a)) of softmax(logits) over the last dimension, in fp32.

    `reduction`: "mean" (over the leading dimensions, e.g. images), "sum", or "none" (one value per row).
    Exactly zero when the logits are identical.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"symmetric_kl: logits of different shapes {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    target_a, target_b = (log_a.detach(), log_b.detach()) if stopgrad else (log_a, log_b)
    # F.kl_div(input=log q, target=log p, log_target=True) = p * (log p - log q) = KL(p || q) terms.
    kl_ab = F.kl_div(log_b, target_a, reduction="none", log_target=True).sum(-1)  # KL(p_a || p_b)
    kl_ba = F.kl_div(log_a, target_b, reduction="none", log_target=True).sum(-1)  # KL(p_b || p_a)
    return _reduce(0.5 * (kl_ab + kl_ba), reduction, "symmetric_kl")


__all__ = ["soft_cross_entropy", "symmetric_kl"]
