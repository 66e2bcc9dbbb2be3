"""A plain transcription of FRRN (../shared/docs/frrn-spec.md §1), the yardstick bench_model.py times ours against.

What an engineer would write straight from the spec with stock PyTorch ops, and nothing of frrn_dist.model's
memory work: `nn.BatchNorm2d`, `F.max_pool2d` (which keeps its whole input and int64 indices for backward),
`F.interpolate(mode="nearest")` for the residual stream, and the pooling stream's x2 bilinear on the authors' grid
(out[2i] = x[i], out[2i+1] = (x[i] + x[i+1]) / 2, last row/column repeated) written with stock ops: replicate-pad
one row and column at the end, `F.interpolate(align_corners=True)` to 2n+1 samples (sample o lands on input o/2),
crop to 2n. No checkpointing. Parameter and buffer names are frrn_dist.model.FRRN's, so its state_dict loads
unchanged (`PlainFRRN.from_ours`); `max_logit_difference` checks the two give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frrn_dist.model import BN_EPS, BN_MOMENTUM, DECODER, ENCODER


def bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv(c_in: int, c_out: int, k: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias)


def bilinear2x(x: torch.Tensor) -> torch.Tensor:
    """Theano's bilinear_upsampling(x, 2) grid from stock ops (see the module docstring)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    return F.interpolate(x, size=(2 * h + 1, 2 * w + 1), mode="bilinear", align_corners=True)[..., : 2 * h, : 2 * w]


class RU(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.bn1 = conv(c_in, c_out, 3), bn(c_out)
        self.conv2, self.bn2 = conv(c_out, c_out, 3), bn(c_out)
        self.proj = conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut


class FRRU(nn.Module):
    def __init__(self, c_in: int, c_out: int, scale: int, lanes: int):
        super().__init__()
        self.scale = scale
        self.conv1, self.bn1 = conv(c_in + lanes, c_out, 3), bn(c_out)
        self.conv2, self.bn2 = conv(c_out, c_out, 3), bn(c_out)
        self.to_residual = conv(c_out, lanes, 1, bias=True)

    def forward(self, y, z):
        y = F.relu(self.bn1(self.conv1(torch.cat([y, F.max_pool2d(z, self.scale, self.scale)], 1))))
        y = F.relu(self.bn2(self.conv2(y)))
        return y, z + F.interpolate(self.to_residual(y), scale_factor=self.scale, mode="nearest")


class Stem(nn.Module):
    def __init__(self, base: int, lanes: int):
        super().__init__()
        self.conv, self.bn = conv(3, base, 5), bn(base)
        self.units = nn.ModuleList(RU(base, base) for _ in range(3))
        self.split = nn.Sequential(conv(base, lanes, 1), bn(lanes))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        for ru in self.units:
            y = ru(y)
        return y, self.split(y)


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, scale: int, units: int, lanes: int, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.units = nn.ModuleList(FRRU(c_in if i == 0 else c_out, c_out, scale, lanes) for i in range(units))

    def forward(self, y, z):
        y = bilinear2x(y) if self.decoder else F.max_pool2d(y, 2, 2)
        for unit in self.units:
            y, z = unit(y, z)
        return y, z


class Head(nn.Module):
    def __init__(self, c_in: int, num_classes: int, base: int, lanes: int):
        super().__init__()
        self.units = nn.ModuleList([RU(c_in + lanes, base), RU(base, base), RU(base, base)])
        self.classifier = conv(base, num_classes, 1, bias=True)

    def forward(self, y, z):
        x = torch.cat([bilinear2x(y), z], 1)
        for ru in self.units:
            x = ru(x)
        return self.classifier(x)


class PlainFRRN(nn.Module):
    """FRRN-A or -B from the spec with stock ops. forward: (N, 3, H, W) -> logits (N, num_classes, H, W)."""

    def __init__(self, arch: str = "A", num_classes: int = 19, *, channels_last: bool = False, base: int = 48):
        super().__init__()
        lanes, self.channels_last = 32, channels_last
        self.stem = Stem(base, lanes)
        stages, c = [], base
        for s, units, c_out in ENCODER[arch]:
            stages.append(Stage(c, c_out, s, units, lanes, decoder=False))
            c = c_out
        for s, units, c_out in DECODER[arch]:
            stages.append(Stage(c, c_out, s, units, lanes, decoder=True))
            c = c_out
        self.stages = nn.ModuleList(stages)
        self.head = Head(c, num_classes, base, lanes)

    @classmethod
    def from_ours(cls, model: nn.Module, *, channels_last: bool = False) -> PlainFRRN:
        """The same network with `model`'s (a frrn_dist.model.FRRN) weights and BN statistics, strictly loaded."""
        plain = cls(model.arch, model.num_classes, channels_last=channels_last)
        plain.load_state_dict(model.state_dict(), strict=True)
        return plain.train(model.training)

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y, z = self.stem(x)
        for stage in self.stages:
            y, z = stage(y, z)
        return self.head(y, z)


@torch.no_grad()
def max_logit_difference(ours: nn.Module, plain: nn.Module, x: torch.Tensor) -> float:
    """max |ours(x) - plain(x)| / max |ours(x)|, each in the mode it is in (in train mode both normalise with the
    batch statistics and update their running statistics alike)."""
    a, b = ours(x), plain(x)
    return ((a - b).abs().max() / a.abs().max()).item()
