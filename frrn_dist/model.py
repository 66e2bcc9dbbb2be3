"""FRRN-A and FRRN-B (Pohlen et al., CVPR 2017) exactly as the authors' Theano/Lasagne code builds them.

Every rule here is in ../shared/docs/frrn-spec.md §1 (conv/bias/BN order, RU and FRRU, stage tables, head, init,
the bilinear grid); the parameter counts (§3) are the check: 17,746,803 (A) and 24,755,699 (B) for 19 classes.

Two streams: the pooling stream y (48..384 channels, pooled by 2 per encoder stage) and the residual stream z
(32 channels, always at full resolution). Every FRRU max-pools z by its stage's total factor s, runs two
conv3x3+BN+ReLU on [y, pool_s(z)], and adds a 1x1 conv (with bias) of the result back into z, nearest-upsampled xs.

Memory (what makes large micro-batches fit; numbers from `python benchmarks/bench_model.py`):
- Max pools keep, for backward, only the argmax offset inside each window (1 byte per pooled value) instead of their
  full-resolution input: without that, the 17 FRRUs of FRRN-A would keep 17 full-resolution copies of z alive.
- Activation checkpointing ("unit": each RU and FRRU, "stage": each stage) keeps only segment inputs and recomputes
  the rest during backward. FRRU segments take the pooled z, not z itself, so no full-resolution z is kept at all.
- BatchNorm inside a recomputed segment would update its running statistics twice (pytorch#96136); the recompute
  guard below normalises with the batch statistics but leaves the buffers alone (stack-notes §2.4).

Imports: torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

UPSAMPLE_MODES = ("theano", "align_corners", "half_pixel")
CHECKPOINTING_MODES = ("off", "unit", "stage")
BN_EPS = 1e-4  # Lasagne BatchNormLayer defaults (epsilon, alpha = PyTorch momentum)
BN_MOMENTUM = 0.1

# (total pooling factor s, number of FRRUs, pooling-stream channels) per stage, frrn-spec §1.5
ENCODER = {
    "A": ((2, 3, 96), (4, 4, 192), (8, 2, 384), (16, 2, 384)),
    "B": ((2, 3, 96), (4, 4, 192), (8, 2, 384), (16, 2, 384), (32, 2, 384)),
}
DECODER = {
    "A": ((8, 2, 192), (4, 2, 192), (2, 2, 96)),
    "B": ((16, 2, 192), (8, 2, 192), (4, 2, 192), (2, 2, 96)),
}


# ---------------------------------------------------------------------------------------------------------------
# Sampling ops


def theano_upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Theano's `bilinear_upsampling(x, 2)`: out[2i] = x[i], out[2i+1] = (x[i] + x[i+1]) / 2, last row/col repeated.

    Output coordinate o samples input coordinate o/2 (TF1 resize_bilinear's grid too). Theano pads by replication
    and runs a [0.5, 1, 0.5] transposed conv; writing the even and odd rows/columns gives the same numbers, keeps
    nothing for backward, keeps NHWC inputs NHWC, and compiles (a replicate-pad emulation broke torch.compile's CPU
    backend, design.md).
    """
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    for dim in (2, 3):
        n = x.shape[dim]
        nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)  # x[i+1], edge repeated
        shape = list(x.shape)
        shape[dim] = 2 * n
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        even = [slice(None)] * 4
        even[dim] = slice(0, None, 2)
        odd = [slice(None)] * 4
        odd[dim] = slice(1, None, 2)
        out[tuple(even)] = x
        out[tuple(odd)] = (x + nxt) * 0.5
        x = out
    return x


def upsample2x(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Pooling-stream x2 bilinear upsampling on the authors' grid ("theano") or PyTorch's two grids."""
    if mode == "theano":
        return theano_upsample2x(x)
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=mode == "align_corners")


class _MaxPoolKeepArgmax(torch.autograd.Function):
    """max_pool2d(kernel=stride=s) that keeps for backward only where each max was inside its s x s window.

    PyTorch's max pool saves its whole input (4 bytes a pixel for z, the 32-channel full-resolution stream) plus
    int64 indices; this keeps 1 byte per *pooled* value (2 for s=32). Same gradient: the max_pool2d indices decide.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: int) -> torch.Tensor:
        out, flat = F.max_pool2d(x, s, s, return_indices=True)  # flat: index into the H*W plane, (N, C, H/s, W/s)
        w = x.shape[-1]
        offset = (flat // w % s) * s + flat % w % s  # row, col inside the window -> 0..s*s-1
        ctx.save_for_backward(offset.to(torch.uint8 if s * s <= 256 else torch.int16))
        ctx.s, ctx.in_hw = s, x.shape[-2:]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (offset,) = ctx.saved_tensors
        s, (h, w) = ctx.s, ctx.in_hw
        if torch.compiler.is_compiling():
            return _unpool_by_select(grad, offset, s, (h, w)), None
        offset = offset.long()
        rows = torch.arange(0, h, s, device=grad.device).view(-1, 1) + offset // s
        cols = torch.arange(0, w, s, device=grad.device) + offset % s
        # windows do not overlap, so unpooling scatters each gradient to exactly one input pixel
        grad_in = F.max_unpool2d(grad, rows * w + cols, s, s, output_size=(h, w))
        return grad_in, None


def _unpool_by_select(grad: torch.Tensor, offset: torch.Tensor, s: int, in_hw: tuple[int, int]) -> torch.Tensor:
    """The backward above without max_unpool2d, for torch.compile: each window's gradient selected into place.

    Inductor (torch 2.13, CPU) miscompiled FRRN-A's backward built on max_unpool2d's scatter (gradients of every
    unit before the 1/16 stage 20-80% off; frrn_dist/hardware.py). This is pointwise, so inductor fuses it; in
    eager it is slower than the scatter (it writes every output element), so eager keeps max_unpool2d.
    """
    n, c, hp, wp = grad.shape
    window = torch.arange(s, device=grad.device)
    pos = (window.view(s, 1) * s + window).to(offset.dtype).view(s, 1, s)  # offset of each pixel in its window
    out = torch.where(offset[:, :, :, None, :, None] == pos, grad[:, :, :, None, :, None], 0)
    out = out.reshape(n, c, hp * s, wp * s)
    return F.pad(out, (0, in_hw[1] - wp * s, 0, in_hw[0] - hp * s))  # floored windows: the rest gets no gradient


def max_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """Max pool with kernel = stride = s (floors like Lasagne's ignore_border=True), backward-memory-light."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPoolKeepArgmax.apply(x, s)
    return F.max_pool2d(x, s, s)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm that checkpointing cannot update twice

_RECOMPUTING = False  # global, not thread-local: on GPU the recompute runs in autograd's device thread


@contextlib.contextmanager
def _recomputing():
    global _RECOMPUTING
    prev, _RECOMPUTING = _RECOMPUTING, True
    try:
        yield
    finally:
        _RECOMPUTING = prev


def _checkpoint_contexts():
    return contextlib.nullcontext(), _recomputing()  # (forward, recompute)


class CheckpointSafeBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics a checkpoint recompute leaves alone (same batch-stat output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _RECOMPUTING:
            # cloned buffers, not None: the recompute must save as many tensors as the first forward did
            return F.batch_norm(
                x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias, True, self.momentum,
                self.eps,
            )  # fmt: skip
        return super().forward(x)


class CheckpointSafeSyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm with the same guard: the recompute all-reduces the batch statistics again (every rank
    recomputes the same segments in the same order) but writes them into throw-away copies of the buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _RECOMPUTING):
            return super().forward(x)
        kept = self.running_mean, self.running_var, self.num_batches_tracked
        self.running_mean, self.running_var, self.num_batches_tracked = (t.clone() for t in kept)
        try:
            return super().forward(x)
        finally:
            self.running_mean, self.running_var, self.num_batches_tracked = kept


def _bn(channels: int) -> nn.BatchNorm2d:
    return CheckpointSafeBatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv(c_in: int, c_out: int, kernel: int, *, relu_follows: bool, bias: bool = False) -> nn.Conv2d:
    """'same' conv with Lasagne's HeUniform(gain): sqrt(2) before a ReLU, 1 otherwise; biases start at 0."""
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias)
    nn.init.kaiming_uniform_(conv.weight, nonlinearity="relu" if relu_follows else "linear")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def _run(fn: Callable, *args: torch.Tensor, checkpointed: bool):
    """fn(*args), recomputed in backward instead of kept when checkpointed (and only when grad is on)."""
    if not (checkpointed and torch.is_grad_enabled()):
        return fn(*args)
    # non-reentrant: works inside DeepSpeed and under autocast (replayed on recompute); the model draws no random
    # numbers, so skip saving RNG states
    if torch.compiler.is_compiling():
        # torch.compile recomputes inside its own backward graph and updates BN statistics once (tested), and it
        # accepts no context_fn but TorchDispatchModes: no recompute guard there
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_checkpoint_contexts, preserve_rng_state=False)


# ---------------------------------------------------------------------------------------------------------------
# Units. `checkpointing` on the containers (Stem, Stage, Head) is set by FRRN: "unit" wraps each RU/FRRU (and the
# small full-resolution pieces around them), "stage" wraps the whole container.


class RU(nn.Module):
    """Residual unit: BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut; no ReLU after the sum (frrn-spec §1.2).

    The shortcut is x, or a bare 1x1 conv (no bias, no BN) when the width changes (only the first head RU).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(c_in, c_out, 3, relu_follows=True), _bn(c_out)
        self.conv2, self.bn2 = _conv(c_out, c_out, 3, relu_follows=False), _bn(c_out)
        self.proj = _conv(c_in, c_out, 1, relu_follows=False) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut


class FRRU(nn.Module):
    """Full-resolution residual unit (frrn-spec §1.3) at total pooling factor `scale`.

    y' = ReLU(BN(conv3x3(ReLU(BN(conv3x3([y, maxpool_s(z)]))))));  z' = z + nearest_s(conv1x1(y') + bias)
    """

    def __init__(self, c_in: int, c_out: int, scale: int, lanes: int = 32):
        super().__init__()
        self.scale = scale
        self.conv1, self.bn1 = _conv(c_in + lanes, c_out, 3, relu_follows=True), _bn(c_out)
        self.conv2, self.bn2 = _conv(c_out, c_out, 3, relu_follows=True), _bn(c_out)
        self.to_residual = _conv(c_out, lanes, 1, relu_follows=False, bias=True)

    def core(self, y: torch.Tensor, pooled_z: torch.Tensor, upsample: str | None = None):
        """The part at 1/scale resolution: (y, maxpool_s(z)) -> (y', increment of z before the x`scale` upsample).

        upsample: a decoder stage's x2 bilinear entry for y, done here so that a checkpoint keeps y before it (4x
        smaller) rather than after.
        """
        if upsample:
            y = upsample2x(y, upsample)
        y = F.relu(self.bn1(self.conv1(torch.cat([y, pooled_z], 1))))  # pooling stream first, then residual
        y = F.relu(self.bn2(self.conv2(y)))
        return y, self.to_residual(y)

    def forward(self, y: torch.Tensor, z: torch.Tensor, *, checkpointed: bool = False, upsample: str | None = None):
        # The pool keeps argmax bytes and nearest-upsample + add keep nothing, so with the core checkpointed no
        # full-resolution tensor of this unit is held for backward.
        y, r = _run(partial(self.core, upsample=upsample), y, max_pool(z, self.scale), checkpointed=checkpointed)
        return y, z + F.interpolate(r, scale_factor=self.scale, mode="nearest")


class Stem(nn.Module):
    """The full-resolution start: conv5x5 3->48 + BN + ReLU, 3 RU(48), then the residual stream's split
    z = BN(conv1x1 48->32) with no bias and no ReLU (frrn-spec §1.4). Returns (y (N,48,H,W), z (N,32,H,W))."""

    def __init__(self, base_channels: int = 48, lanes: int = 32):
        super().__init__()
        self.conv, self.bn = _conv(3, base_channels, 5, relu_follows=True), _bn(base_channels)
        self.units = nn.ModuleList(RU(base_channels, base_channels) for _ in range(3))
        self.split = nn.Sequential(_conv(base_channels, lanes, 1, relu_follows=False), _bn(lanes))
        self.checkpointing = "off"

    def _conv_bn_relu(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = self.checkpointing == "unit"
        y = _run(self._conv_bn_relu, x, checkpointed=unit)
        for ru in self.units:
            y = _run(ru, y, checkpointed=unit)
        return y, _run(self.split, y, checkpointed=unit)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _run(self._forward, x, checkpointed=self.checkpointing == "stage")


class Stage(nn.Module):
    """FRRUs at one scale s, chained: each takes the previous one's y (frrn-spec §8 pitfall 1). An encoder stage
    starts with maxpool 2x2 of y, a decoder stage with bilinear x2 (on the grid `upsample`)."""

    def __init__(self, c_in: int, c_out: int, scale: int, units: int, *, upsample: str | None, lanes: int = 32):
        super().__init__()
        self.scale, self.upsample = scale, upsample
        self.units = nn.ModuleList(FRRU(c_in if i == 0 else c_out, c_out, scale, lanes) for i in range(units))
        self.checkpointing = "off"

    def _forward(self, y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for i, unit in enumerate(self.units):
            first_upsample = self.upsample if i == 0 else None
            y, z = unit(y, z, checkpointed=self.checkpointing == "unit", upsample=first_upsample)
        return y, z  # y: (N, c_out, H/s, W/s), z: (N, 32, H, W)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.upsample is None:
            y = max_pool(y, 2)  # outside any checkpoint: it keeps argmax bytes, its input would cost 4x the output
        return _run(self._forward, y, z, checkpointed=self.checkpointing == "stage")


class Head(nn.Module):
    """Bilinear x2 of y (96 ch) ++ z (32 ch) = 128 ch -> RU(128->48, 1x1 projection) + 2 RU(48) -> 1x1 conv + bias."""

    def __init__(self, c_in: int, num_classes: int, upsample: str, base_channels: int = 48, lanes: int = 32):
        super().__init__()
        self.upsample = upsample
        self.units = nn.ModuleList([RU(c_in + lanes, base_channels), RU(base_channels, base_channels)])
        self.units.append(RU(base_channels, base_channels))
        self.classifier = _conv(base_channels, num_classes, 1, relu_follows=False, bias=True)
        self.checkpointing = "off"

    def _entry(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # one segment, so the 128-channel full-resolution concat is never kept, only y (at H/2) and z
        return self.units[0](torch.cat([upsample2x(y, self.upsample), z], 1))

    def _exit(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.units[2](x))  # one segment: the classifier's input is not kept either

    def _forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        unit = self.checkpointing == "unit"
        x = _run(self._entry, y, z, checkpointed=unit)
        x = _run(self.units[1], x, checkpointed=unit)
        return _run(self._exit, x, checkpointed=unit)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return _run(self._forward, y, z, checkpointed=self.checkpointing == "stage")


# ---------------------------------------------------------------------------------------------------------------
# The network


class FRRN(nn.Module):
    """FRRN-A or FRRN-B. forward(x): RGB float (N, 3, H, W) in [0, 1] -> logits (N, num_classes, H, W), no softmax.

    upsample: the pooling stream's x2 bilinear grid, "theano" (the authors', default), "align_corners" or
    "half_pixel" (PyTorch align_corners=True / False). checkpointing: "off", "unit" (each RU and FRRU, plus the
    small full-resolution pieces around them) or "stage" (the stem, each FRRU stage, the head); it changes memory
    and time, never the result. channels_last: run activations in NHWC (every op here keeps the layout, and convs
    follow their input). The weights stay as they are: DeepSpeed's initial broadcast views each parameter as bytes,
    which fails for NHWC weights, so do not `model.to(memory_format=...)` before deepspeed.initialize.
    H and W must be multiples of `size_multiple` (16 for A, 32 for B).
    """

    def __init__(
        self,
        arch: str = "A",
        num_classes: int = 19,
        *,
        upsample: str = "theano",
        checkpointing: str = "off",
        channels_last: bool = False,
        base_channels: int = 48,
        lanes: int = 32,
    ):
        super().__init__()
        self.arch, self.num_classes = arch, num_classes
        self.channels_last = channels_last
        self.size_multiple = self.size_multiple_of(arch)

        self.stem = Stem(base_channels, lanes)
        stages, c = [], base_channels
        for s, units, c_out in ENCODER[arch]:
            stages.append(Stage(c, c_out, s, units, upsample=None, lanes=lanes))
            c = c_out
        for s, units, c_out in DECODER[arch]:
            stages.append(Stage(c, c_out, s, units, upsample="theano", lanes=lanes))
            c = c_out
        self.stages = nn.ModuleList(stages)
        self.head = Head(c, num_classes, "theano", base_channels, lanes)
        self.upsample = upsample
        self.checkpointing = checkpointing

    @staticmethod
    def size_multiple_of(arch: str) -> int:
        """Input sides must be multiples of the deepest pooling factor: 16 for A, 32 for B."""
        if arch not in ENCODER:
            raise ValueError(f"FRRN arch must be 'A' or 'B', got {arch!r}")
        return ENCODER[arch][-1][0]

    @property
    def upsample(self) -> str:
        return self._upsample

    @upsample.setter
    def upsample(self, mode: str) -> None:
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"FRRN upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self._upsample = mode
        for m in (*self.stages, self.head):
            if m.upsample is not None:  # encoder stages pool instead
                m.upsample = mode

    @property
    def checkpointing(self) -> str:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, mode: str) -> None:
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"FRRN checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
        self._checkpointing = mode
        for m in (self.stem, *self.stages, self.head):
            m.checkpointing = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"FRRN-{self.arch} input {h}x{w}: height and width must be multiples of {self.size_multiple}"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y, z = self.stem(x)  # (N, 48, H, W), residual stream (N, 32, H, W) at full resolution throughout
        for stage in self.stages:
            y, z = stage(y, z)
        return self.head(y, z)  # (N, num_classes, H, W)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BN running statistics are buffers and do not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _swap_batchnorm(module: nn.Module, cls: type[nn.Module], **kwargs) -> nn.Module:
    """Replace every BatchNorm2d below `module` with `cls`, carrying parameters, buffers and train/eval mode."""
    if isinstance(module, nn.BatchNorm2d):
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, **kwargs)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(device=module.weight.device, dtype=module.weight.dtype)
    for name, child in module.named_children():
        setattr(module, name, _swap_batchnorm(child, cls, **kwargs))
    return module


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """BatchNorm -> SyncBatchNorm with the checkpoint recompute guard. GPU only; call before deepspeed.initialize."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "SyncBatchNorm needs CUDA devices and none is visible; turn it off on CPU (model.sync_bn=false)"
        )
    return _swap_batchnorm(model, CheckpointSafeSyncBatchNorm, process_group=process_group)


__all__ = ["FRRN", "RU", "FRRU", "convert_sync_batchnorm", "count_parameters", "theano_upsample2x", "upsample2x"]
