"""Test-time augmentation: several views of each image, their class probabilities averaged, then argmax.

    image at input_hw (the network's input at scale 1.0: the loader's batch, or predict's Lanczos resize)
      -> per scale s: resampled to (round(s*h/m)*m, round(s*w/m)*m), m = model.size_multiple (16 A, 32 B);
         bilinear, antialiased when shrinking; with flip, also mirrored left-right
      -> model -> logits (a mirrored view's logits mirrored back, at the view's size)
      -> every view's logits bilinearly (align_corners=False) to one common size: the ground truth's (evaluate)
         or the image's (predict)
      -> softmax -> mean over the views -> argmax

Views are resampled from the scale-1.0 input, not from the full-resolution frame: the shard loaders hand over the
image at input size only, and resampling that one tensor keeps shards, a Cityscapes folder and predict giving the
network the same pixels. The cost: a view above 1.0 holds no detail the 1.0 input lacks; it changes how large
objects are relative to the receptive field, not what the network sees.

One view (one scale, no flip) is exactly the single-scale path, `to_full_resolution(logits, hw, resize)`: no
resampling at scale 1.0 and no softmax (argmax of softmax = argmax of logits), so `--scales 1.0` without
`--flip` gives today's numbers bit for bit.

May import: torch only (the model is passed in).

Imports: torch.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESIZE_MODES = ("nearest", "bilinear")
RESIZE_NOTES = {
    "nearest": "argmax at input scale, label map upsampled to ground-truth size by nearest neighbour",
    "bilinear": "logits upsampled to ground-truth size bilinearly (align_corners=False), then argmax",
    "tta": "each view's logits upsampled to ground-truth size bilinearly (align_corners=False), softmax, "
    "mean over views, argmax",
}


def to_full_resolution(logits: torch.Tensor, full_hw: tuple[int, int], resize: str) -> torch.Tensor:
    """(N, C, h, w) logits -> (N, H, W) int64 train ids at the ground truth's size."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
    if tuple(logits.shape[-2:]) == tuple(full_hw):
        return logits.argmax(1)
    if resize == "nearest":
        # "nearest-exact" samples at pixel centres; for an integer factor f it maps output o to input o // f, the
        # cell the loader shrank (plain "nearest" drifts by half a pixel for non-integer factors)
        pred = logits.argmax(1, keepdim=True).to(torch.uint8)
        return F.interpolate(pred, size=tuple(full_hw), mode="nearest-exact")[:, 0].long()
    # one image at a time: 19 x 1024 x 2048 float32 logits are 160 MB each
    return torch.cat([upsample(x[None], full_hw).argmax(1) for x in logits])


def upsample(logits: torch.Tensor, full_hw: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W) float32, bilinear, align_corners=False (the "bilinear" resize)."""
    return F.interpolate(logits.float(), size=tuple(full_hw), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------
# the views


def parse_scales(text: str) -> tuple[float, ...]:
    """'0.75,1.0,1.25' -> (0.75, 1.0, 1.25); ValueError naming the first value that is not a positive number."""
    out = []
    for item in text.split(","):
        try:
            scale = float(item)
        except ValueError:
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale {item.strip()!r} (in --scales {text!r}): expected a positive number like 0.75")
        out.append(scale)
    return tuple(out)


def view_hw(scale: float, input_hw: tuple[int, int], multiple: int) -> tuple[int, int]:
    """scale x input_hw, each side rounded to the nearest multiple (halves up); ValueError naming the scale when
    a side would be under one multiple (the network pools by `multiple`, so nothing smaller is usable)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale {scale!r}: expected a positive number like 0.75")
    h, w = (int(math.floor(scale * side / multiple + 0.5)) * multiple for side in input_hw)
    if h < multiple or w < multiple:
        raise ValueError(
            f"scale {scale:g}: {input_hw[0]}x{input_hw[1]} x {scale:g} rounds to {h}x{w}, but the network needs "
            f"sides of at least {multiple} (multiples of {multiple})"
        )
    return h, w


@dataclass(frozen=True)
class Views:
    """The views of every image: one per scale, two with flip (plain first, then mirrored)."""

    scales: tuple[float, ...]
    input_hws: tuple[tuple[int, int], ...]
    flip: bool

    def __len__(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def describe(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.input_hws)
        flip = " and each mirrored" if self.flip else ""
        return f"{len(self)} view(s): scales {', '.join(f'{s:g}' for s in self.scales)} -> inputs {sizes}{flip}"

    def as_dict(self) -> dict:
        return {
            "scales": list(self.scales),
            "input_hws": [list(hw) for hw in self.input_hws],
            "flip": self.flip,
            "num_views": len(self),
        }


def make_views(scales: str | tuple[float, ...] | None, flip: bool, input_hw: tuple[int, int], multiple: int) -> Views:
    """Views for scales of `input_hw` (None = (1.0,); text as --scales takes it), each size rounded to `multiple`."""
    if isinstance(scales, str):
        scales = parse_scales(scales)
    scales = tuple(scales) if scales else (1.0,)
    return Views(scales, tuple(view_hw(s, tuple(input_hw), multiple) for s in scales), bool(flip))


def choose_resize(resize: str | None, views: Views, default: str) -> str:
    """The way back to full size: `resize`, else `default`; ValueError for "nearest" with several views (their
    probabilities are averaged, not their labels)."""
    resize = resize or default
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
    if resize == "nearest" and len(views) > 1:
        raise ValueError(
            f"--resize nearest with {len(views)} views (--scales/--flip): views are averaged as probabilities "
            "upsampled bilinearly; leave --resize out or say bilinear"
        )
    return resize


def resize_note(resize: str, views: Views) -> str:
    """One line for reports: how predictions reached full size."""
    return RESIZE_NOTES["tta"] if len(views) > 1 else RESIZE_NOTES[resize]


def resample(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, 3, h, w) -> (N, 3, *hw): the same tensor at its own size, else bilinear (align_corners=False),
    antialiased when either side shrinks (plain bilinear would alias: it reads only 2 of every f pixels)."""
    if tuple(images.shape[-2:]) == tuple(hw):
        return images
    shrink = hw[0] < images.shape[-2] or hw[1] < images.shape[-1]
    return F.interpolate(images, size=tuple(hw), mode="bilinear", align_corners=False, antialias=shrink)


def view_logits(model: torch.nn.Module, images: torch.Tensor, views: Views) -> list[torch.Tensor]:
    """Every view's float32 logits (N, C, h_v, w_v), mirrored views mirrored back, in Views order."""
    out = []
    for hw in views.input_hws:
        x = resample(images, hw)
        out.append(model(x).float())
        if views.flip:
            out.append(model(x.flip(-1)).float().flip(-1))
    return out


def mean_probabilities(logits: list[torch.Tensor], full_hw: tuple[int, int]) -> torch.Tensor:
    """Views' logits (each (N, C, h_v, w_v)) -> (N, C, H, W) class probabilities averaged over the views."""
    total = None
    for x in logits:
        p = upsample(x, full_hw).softmax(1)
        total = p if total is None else total + p
    return total / len(logits)


@torch.no_grad()
def predict(
    model: torch.nn.Module, images: torch.Tensor, views: Views, full_hw: tuple[int, int], resize: str = "bilinear"
) -> torch.Tensor:
    """(N, 3, h, w) images at input size -> (N, H, W) int64 train ids at `full_hw`, from the views' mean.

    A single view goes through to_full_resolution (either resize mode); several need resize="bilinear"."""
    logits = view_logits(model, images, views)
    if len(logits) == 1:
        return to_full_resolution(logits[0], full_hw, resize)
    if resize != "bilinear":
        raise ValueError(f"resize={resize!r}: {len(logits)} views are averaged as bilinear probabilities")
    # one image at a time: the (C, H, W) float32 sum at 1024x2048 is 160 MB, and a view adds as much again
    per_image = ([x[i : i + 1] for x in logits] for i in range(len(images)))
    return torch.cat([mean_probabilities(one, full_hw).argmax(1) for one in per_image])


# ---------------------------------------------------------------------------------------------------------------
# what the views cost


def reset_peak_memory(device: torch.device) -> None:
    """Start CUDA's peak counter afresh (CPU RSS has no reset: its peak is the process's whole life)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's max_memory_allocated since reset_peak_memory, or on CPU this process's
    peak resident set size (getrusage ru_maxrss; DataLoader worker processes not included)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda: torch.cuda.max_memory_allocated while scoring"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(rss * scale), "cpu: peak RSS of the process since it started (getrusage ru_maxrss)"


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall-clock reading includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
