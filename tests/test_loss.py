"""Bootstrapped cross-entropy against a brute-force per-pixel reference (frrn-spec §2.1)."""

from __future__ import annotations

import math

import pytest
import torch

from frrn_dist.loss import BootstrappedCrossEntropy, LossInputError, bootstrapped_cross_entropy

VOID = 255


def brute_force(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Pixel by pixel in Python floats: -log softmax of the true class, void dropped, top K averaged, batch mean."""
    per_image = []
    for img, lab in zip(logits.tolist(), labels.tolist()):
        losses = []
        for i, row in enumerate(lab):
            for j, t in enumerate(row):
                if t == VOID:
                    continue
                scores = [img[c][i][j] for c in range(len(img))]
                log_z = math.log(sum(math.exp(s) for s in scores))
                losses.append(log_z - scores[t])
        losses.sort(reverse=True)
        kept = losses[:k]
        per_image.append(sum(kept) / len(kept) if kept else 0.0)
    return sum(per_image) / len(per_image)


@pytest.fixture
def batch():
    """4 images of 6x7 with 5 classes: some void; fewer valid pixels than K; all void; no void."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 7, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (4, 6, 7), generator=g)
    labels[0][torch.rand(6, 7, generator=g) < 0.3] = VOID
    labels[1].fill_(VOID)
    labels[1, 2, :5] = torch.tensor([0, 1, 2, 3, 4])  # 5 valid pixels
    labels[2].fill_(VOID)
    return logits, labels


@pytest.mark.parametrize("k", [1, 3, 10, 20, 42, 100])
def test_matches_brute_force(batch, k):
    logits, labels = batch
    got = bootstrapped_cross_entropy(logits, labels, k=k)
    assert got.dtype == torch.float32  # computed in float32 whatever the input
    assert got.item() == pytest.approx(brute_force(logits, labels, k), rel=1e-5)


def test_k_from_fraction(batch):
    logits, labels = batch
    # 42 pixels / 16 -> round(2.625) = 3; a quarter -> round(10.5) = 10 (banker's rounding, as Python's round)
    for fraction, k in [(1 / 16, 3), (0.25, 10), (1.0, 42)]:
        assert bootstrapped_cross_entropy(logits, labels, k_fraction=fraction).item() == pytest.approx(
            brute_force(logits, labels, k), rel=1e-5
        )
    # the paper's K: 1/16 of the pixels is 8,192 for FRRN-A at 256x512; a bigger K would change this loss
    logits = torch.randn(1, 3, 256, 512)
    labels = torch.randint(0, 3, (1, 256, 512))
    default = bootstrapped_cross_entropy(logits, labels)
    assert default.item() == pytest.approx(bootstrapped_cross_entropy(logits, labels, k=8192).item(), rel=1e-6)
    assert default.item() != pytest.approx(bootstrapped_cross_entropy(logits, labels, k=8193).item(), rel=1e-7)


def test_all_void_is_zero_without_nan():
    logits = torch.randn(2, 19, 8, 8, requires_grad=True)
    labels = torch.full((2, 8, 8), VOID)
    loss = bootstrapped_cross_entropy(logits, labels, k=16)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)


def test_gradient_only_on_the_chosen_valid_pixels(batch):
    logits, labels = batch
    logits = logits.float().requires_grad_()
    bootstrapped_cross_entropy(logits, labels, k=10).backward()
    touched = logits.grad.abs().sum(1) > 0  # (N, H, W)
    assert not touched[labels == VOID].any()
    assert touched[0].sum() == 10  # image 0 has more than 10 valid pixels
    assert touched[1].sum() == 5  # image 1 has only 5: all of them
    assert touched[3].sum() == 10
    assert torch.isfinite(logits.grad).all()


def test_bf16_logits_are_upcast(batch):
    logits, labels = batch
    low = logits.to(torch.bfloat16)
    got = bootstrapped_cross_entropy(low, labels, k=10)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(brute_force(low.double(), labels, 10), rel=1e-5)


def test_module_form(batch):
    logits, labels = batch
    module = BootstrappedCrossEntropy(k=7)
    assert module(logits, labels).item() == bootstrapped_cross_entropy(logits, labels, k=7).item()
    assert "k=7" in repr(module)


def test_bad_input_is_a_clear_error(batch):
    logits, labels = batch
    with pytest.raises(LossInputError, match=r"labels \(N, H, W\)"):
        bootstrapped_cross_entropy(logits, labels[:, :5])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        bootstrapped_cross_entropy(logits, labels, k=0)
    with pytest.raises(ValueError, match="k_fraction"):
        BootstrappedCrossEntropy(k_fraction=1.5)
