"""Bootstrapped cross-entropy as in the paper-era FRRN code (frrn-spec §2.1, ORIG-CVPR `dltools/utility.py`).

Per image: per-pixel cross-entropy on the classes, void pixels removed first, mean of the K largest values; then the
mean over the batch. K = H*W/16 by default: 8,192 for FRRN-A at 256x512, 32,768 for FRRN-B at 512x1024. An image
with fewer than K valid pixels averages all of them; an image with none contributes 0 (and no NaN).

Imports: torch, frrn_dist.data.labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frrn_dist.data.labels import IGNORE_INDEX


class LossInputError(ValueError):
    """Logits and labels that do not fit together, or a bad K."""


def bootstrap_k(hw: tuple[int, int], *, k: int | None = None, k_fraction: float = 1 / 16) -> int:
    """Pixels kept per image: `k` if given, else round(k_fraction * H * W) (at least 1)."""
    if k is not None:
        if int(k) != k or k < 1:
            raise LossInputError(f"bootstrapped loss: k must be a positive integer, got {k!r}")
        return int(k)
    if not 0 < k_fraction <= 1:
        raise LossInputError(f"bootstrapped loss: k_fraction must be in (0, 1], got {k_fraction!r}")
    return max(1, round(k_fraction * hw[0] * hw[1]))


def bootstrapped_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int | None = None,
    k_fraction: float = 1 / 16,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean over the batch of each image's mean top-K per-pixel cross-entropy, void excluded before the top-K.

    logits (N, C, H, W) float (bf16 is fine: the loss is computed in float32); labels (N, H, W) integer train ids,
    `ignore_index` for void. Returns a float32 scalar.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise LossInputError(
            f"bootstrapped loss: logits {tuple(logits.shape)} need labels (N, H, W) = "
            f"{(logits.shape[0], *logits.shape[2:])}, got {tuple(labels.shape)}"
        )
    n, _, h, w = logits.shape
    k = min(bootstrap_k((h, w), k=k, k_fraction=k_fraction), h * w)
    labels = labels.long()
    # (N, H*W); void pixels get 0 here and are then pushed below every real loss, so they are never picked
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none").flatten(1)
    valid = labels.flatten(1) != ignore_index
    top = ce.masked_fill(~valid, float("-inf")).topk(k, dim=1, sorted=True).values  # (N, K), valid ones first
    kept = valid.sum(1, keepdim=True).clamp(max=k)  # min(K, valid pixels) per image
    top = torch.where(torch.arange(k, device=top.device) < kept, top, 0.0)  # drop the -inf fillers
    return (top.sum(1) / kept.squeeze(1).clamp(min=1)).mean()  # an all-void image: 0 / 1


class BootstrappedCrossEntropy(nn.Module):
    """Module form of `bootstrapped_cross_entropy` with K fixed at construction (k, or k_fraction of H*W)."""

    def __init__(self, k: int | None = None, k_fraction: float = 1 / 16, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        bootstrap_k((1, 1), k=k, k_fraction=k_fraction)  # fail at construction, not at the first step
        self.k, self.k_fraction, self.ignore_index = k, k_fraction, ignore_index

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bootstrapped_cross_entropy(
            logits, labels, k=self.k, k_fraction=self.k_fraction, ignore_index=self.ignore_index
        )

    def extra_repr(self) -> str:
        return f"k={self.k}, k_fraction={self.k_fraction}, ignore_index={self.ignore_index}"
