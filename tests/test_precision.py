"""bf16 autocast trains FRRN as fp32 does (convergence checked, not assumed), and `auto` is recorded.

The model, the loss and the autocast context are the training loop's own (frrn_dist.train); only the optimizer is
a plain torch Adam here, so the comparison needs no process group.
"""

from __future__ import annotations

import torch

from frrn_dist.config import load_config
from frrn_dist.loss import BootstrappedCrossEntropy
from frrn_dist.train import autocast_context, build_model


def _losses(precision: str, steps: int = 12) -> list[float]:
    cfg = load_config(None, ["data.shard_dir=unused", "data.input_hw=[32,64]"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    criterion = BootstrappedCrossEntropy(k_fraction=0.25)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 64, generator=g)
    # a learnable target: the class follows the image's brightest channel, void on a border
    labels = images.argmax(1) * 3
    labels[:, :2] = 255
    losses = []
    for _ in range(steps):
        with autocast_context(precision, images.device):
            logits = model(images)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bf16_training_lowers_the_loss_like_fp32():
    fp32, bf16 = _losses("fp32"), _losses("bf16")
    assert fp32[0] == torch.tensor(fp32[0]).item() and abs(bf16[0] - fp32[0]) < 0.05 * fp32[0]  # same start
    assert fp32[-1] < 0.6 * fp32[0], fp32  # the task is learnable in a dozen steps
    assert bf16[-1] < 0.6 * bf16[0], bf16  # and bf16 learns it too
    assert abs(bf16[-1] - fp32[-1]) < 0.25 * fp32[0], (fp32[-1], bf16[-1])
