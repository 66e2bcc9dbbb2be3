"""The FRRN data recipes, shared by the DALI loader and the PyTorch fallback.

Both loaders decode a frame, cut the recipe's region out of it (the whole frame, or the `seed` recipe's random
crop) and downscale the image to `input_hw` with an anti-aliased Lanczos filter. Everything after that happens
here, in torch, on the loader's device:

    label (N, f*h, f*w) uint8 --majority vote--> (N, h, w)            CHIANTI's rule, frrn-spec §2.3
    translate by (dy, dx): image reflect-padded, label 255 shifted in  paper recipe, |d| <= translate_px
    horizontal flip                                                   seed recipe (or flip=True)
    x <- x ** g, g = ln(0.5 + z/sqrt2) / ln(0.5 - z/sqrt2)             gamma, Eq. 14, x RGB in [0, 1]

DALI has neither a majority vote nor reflection padding, so its pipeline draws the random numbers (as outputs,
which puts them in its checkpointed random stream) and `finish_batch` applies them; the fallback draws the same
distributions with numpy (`draw_params`) and calls the same function. One random row per sample drives image and
label together, so their geometry cannot drift apart.

Imports: numpy, torch, frrn_dist.data.labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from frrn_dist.data.labels import IGNORE_INDEX

RECIPES = ("paper", "seed", "eval")

# Columns of the per-sample parameter rows: translation (rows, cols) at input scale, flip (0/1), gamma strength z.
# The seed recipe's crop corner is drawn by the loaders themselves (it is applied before the downscale).
PARAM_DY, PARAM_DX, PARAM_FLIP, PARAM_Z = range(4)
NUM_PARAMS = 4


class RecipeError(ValueError):
    """Recipe arguments that do not fit the frames (sizes, factors, offsets); the message names both."""


@dataclass
class Batch:
    """One micro-batch on the loader's device.

    images: float32 (N, 3, h, w), RGB in [0, 1]; labels: int64 (N, h, w), train ids, 255 = ignore;
    keys: sample keys `<city>_<seq>_<frame>`; full_labels: uint8 (N, H, W) and full_instances: int32 (N, H, W)
    at source resolution, only when the loader was built with `full_res_targets=True`.
    In evaluation the last batch of a rank can be short, even empty (N = 0): padding never repeats a sample.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str] | None = None
    full_labels: torch.Tensor | None = None
    full_instances: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class Recipe:
    """A recipe resolved against the frame size: what to cut, by how much to shrink it, what to draw."""

    name: str
    source_hw: tuple[int, int]  # frame size in the shards
    input_hw: tuple[int, int]  # network input size
    region_hw: tuple[int, int]  # region cut from the frame and downscaled (whole frame or the seed crop)
    factor: int  # region_hw = factor * input_hw
    translate_px: int  # max |offset| per axis at input scale (0 = none)
    gamma_z: float  # z ~ U(-gamma_z, gamma_z) (0 = none)
    flip: bool  # horizontal flip with p = 0.5

    @property
    def random(self) -> bool:
        return self.translate_px > 0 or self.gamma_z > 0 or self.flip or self.region_hw != self.source_hw


def make_recipe(
    name: str,
    *,
    source_hw: tuple[int, int],
    input_hw: tuple[int, int],
    translate_px: int = 30,
    gamma_z: float = 0.05,
    flip: bool | None = None,
) -> Recipe:
    """Check the recipe against the frame size and fix its parameters; RecipeError names the sizes."""
    if name not in RECIPES:
        raise RecipeError(f"recipe={name!r}: expected one of {', '.join(RECIPES)}")
    source_hw, input_hw = _hw(source_hw, "source_hw"), _hw(input_hw, "input_hw")
    (H, W), (h, w) = source_hw, input_hw
    if name == "seed":
        # The TF port: a crop of (2h, 2w) (a quarter of a 1024x2048 frame at 256x512), halved.
        factor, region_hw = 2, (2 * h, 2 * w)
        if 2 * h > H or 2 * w > W:
            raise RecipeError(
                f"recipe 'seed' crops 2 x input_hw = {2 * h}x{2 * w} from each frame, "
                f"but the frames are only {H}x{W}: use a smaller input_hw"
            )
    else:
        # Whole frames, shrunk by one integer factor f in both axes (4 for FRRN-A, 2 for FRRN-B on 1024x2048).
        if H % h or W % w or H // h != W // w:
            raise RecipeError(
                f"recipe {name!r} downscales whole {H}x{W} frames by one integer factor, which input_hw={h}x{w} "
                f"is not (try {H // 4}x{W // 4} or {H // 2}x{W // 2})"
            )
        factor, region_hw = H // h, source_hw
    if name == "eval":
        translate_px, gamma_z, flip = 0, 0.0, False
    if flip is None:
        flip = name == "seed"
    if name != "paper":
        translate_px = 0  # translation is the paper recipe's (frrn-spec §2.3); seed crops instead
    if not 0 <= translate_px < min(h, w):
        raise RecipeError(f"translate_px={translate_px}: must be in [0, {min(h, w)}) for input_hw={h}x{w}")
    if not 0 <= gamma_z < 0.5 * math.sqrt(2):
        raise RecipeError(f"gamma_z={gamma_z}: must be in [0, {0.5 * math.sqrt(2):.4f}) (Eq. 14 needs |z| < 1/sqrt2)")
    return Recipe(name, source_hw, input_hw, region_hw, factor, int(translate_px), float(gamma_z), bool(flip))


def _hw(hw, what: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
    except (TypeError, ValueError):
        raise RecipeError(f"{what}={hw!r}: expected (height, width)") from None
    if h <= 0 or w <= 0:
        raise RecipeError(f"{what}={hw!r}: height and width must be positive")
    return h, w


def gamma_exponent(z):
    """Eq. 14: g = ln(0.5 + z/sqrt2) / ln(0.5 - z/sqrt2); z in [-0.05, 0.05] gives g in [0.815, 1.227]."""
    r = 1.0 / math.sqrt(2.0)
    if isinstance(z, torch.Tensor):
        return torch.log(0.5 + r * z) / torch.log(0.5 - r * z)
    return np.log(0.5 + r * np.asarray(z, np.float64)) / np.log(0.5 - r * np.asarray(z, np.float64))


def draw_params(rng: np.random.Generator, num_samples: int, recipe: Recipe) -> np.ndarray:
    """The fallback's random rows (num_samples, NUM_PARAMS), from the same distributions as the DALI graph."""
    params = np.zeros((num_samples, NUM_PARAMS), np.float32)
    t = recipe.translate_px
    params[:, PARAM_DY] = rng.integers(-t, t + 1, num_samples)
    params[:, PARAM_DX] = rng.integers(-t, t + 1, num_samples)
    if recipe.flip:
        params[:, PARAM_FLIP] = rng.integers(0, 2, num_samples)
    if recipe.gamma_z > 0:
        params[:, PARAM_Z] = rng.uniform(-recipe.gamma_z, recipe.gamma_z, num_samples)
    return params


def draw_crops(rng: np.random.Generator, num_samples: int, recipe: Recipe) -> np.ndarray:
    """Top-left corners (num_samples, 2) of the seed recipe's crop, uniform over the positions on the factor's
    grid (even rows and columns at f=2); zeros otherwise. On that grid the crop's f x f label cells are the frame's
    own, so the vote `make shards` packed (label.x2.png) cut at corner / f is the crop's vote: the loaders decode a
    quarter of the pixels and vote nothing. The TF port drew any pixel; a corner one pixel off is the same crop
    for training purposes."""
    (H, W), (ch, cw), f = recipe.source_hw, recipe.region_hw, recipe.factor
    cells = np.stack([rng.integers(0, (H - ch) // f + 1, num_samples), rng.integers(0, (W - cw) // f + 1, num_samples)])
    return f * cells.T


def majority_vote(labels: torch.Tensor, factor: int) -> torch.Tensor:
    """Downscale label maps (N, H, W) by `factor` with CHIANTI's rule: each f x f cell takes the value that fills
    more than half of it (void counted like any class), else 255. Exact, whatever the number of classes.

    A value held by more than half of a cell is necessarily the Boyer-Moore majority candidate, so one pass of
    f*f vectorised steps finds the candidate and a second pass counts it: 2 f^2 element-wise ops over the small
    map, a few ms for a 1024x2048 frame at f=4 on one CPU core, and no (cells x 256) histogram in memory.
    """
    if factor == 1:
        return labels
    n, H, W = labels.shape
    if H % factor or W % factor:
        raise RecipeError(f"label map {H}x{W} is not a multiple of the downscale factor {factor}")
    f = factor
    cells = [labels[:, i::f, j::f] for i in range(f) for j in range(f)]  # f*f strided views, (N, H/f, W/f) each
    if f == 2:
        # FRRN-B's and the seed recipe's factor: a value in 3 of the 4 pixels is a or b (only one pixel differs),
        # and if a != b it is the one c agrees with: 4 ops instead of Boyer-Moore's 21, half the vote's CPU time.
        a, b, c = cells[:3]
        candidate = torch.where((a == b) | (a == c), a, b)
    else:
        candidate = cells[0].clone()
        count = torch.ones_like(candidate, dtype=torch.int16)
        for x in cells[1:]:
            empty = count == 0
            candidate = torch.where(empty, x, candidate)
            count = torch.where(empty | (x == candidate), count + 1, count - 1)
    votes = sum((x == candidate).to(torch.int16) for x in cells)
    return torch.where(2 * votes > f * f, candidate, torch.full_like(candidate, IGNORE_INDEX))


def translate(
    images: torch.Tensor, labels: torch.Tensor, offsets: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each sample by (dy, dx) pixels: out[y, x] = in[y - dy, x - dx].

    images (N, C, h, w) float get reflection padding where content comes in, labels (N, h, w) get 255 there.
    (Reflection as torch's 'reflect', i.e. without repeating the edge pixel; CHIANTI mirrors that way at the
    top/left border and with the edge repeated at the bottom/right, a one-pixel difference.)
    """
    h, w = labels.shape[-2:]
    out_images, out_labels = images.clone(), torch.full_like(labels, IGNORE_INDEX)
    for i, (dy, dx) in enumerate(offsets):
        pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))  # left, right, top, bottom
        padded = F.pad(images[i : i + 1], pad, mode="reflect") if any(pad) else images[i : i + 1]
        y0, x0 = max(-dy, 0), max(-dx, 0)
        out_images[i] = padded[0, :, y0 : y0 + h, x0 : x0 + w]
        # Label: the part of the source that is still in view moves, the rest stays 255.
        ys, yd = slice(max(-dy, 0), h - max(dy, 0)), slice(max(dy, 0), h - max(-dy, 0))
        xs, xd = slice(max(-dx, 0), w - max(dx, 0)), slice(max(dx, 0), w - max(-dx, 0))
        out_labels[i, yd, xd] = labels[i, ys, xs]
    return out_images, out_labels


def finish_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    params: torch.Tensor | np.ndarray | None,
    *,
    factor: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything after the image downscale, on images' device, without waiting for it.

    images: uint8 (N, h, w, 3) RGB, already downscaled to the input size; labels: uint8 (N, f*h, f*w) train ids
    of the same region at source scale; params: (N, NUM_PARAMS) random rows in host memory (DALI returns its
    random numbers as a CPU output even when it decodes on the GPU; None = eval, no randomness).
    Returns images float32 (N, 3, h, w) in [0, 1] and labels int64 (N, h, w).

    Every decision (which samples move, flip, get a gamma) is taken on the host rows, so nothing here reads GPU
    memory back; the one small per-sample vector the GPU needs (gamma exponents) goes up from pinned memory
    without blocking.
    """
    n, h, w = images.shape[:3]
    if labels.shape[-2:] != (factor * h, factor * w):
        raise RecipeError(f"labels {tuple(labels.shape[-2:])} do not match images {h}x{w} at factor {factor}")
    p = None if params is None or n == 0 else np.asarray(params, np.float32)
    g = np.ones(n, np.float32) if p is None else gamma_exponent(p[:, PARAM_Z].astype(np.float64)).astype(np.float32)
    x = _to_unit_range(images, _upload(torch.from_numpy(g), images.device))  # (N, 3, h, w) float32, a new tensor
    y = majority_vote(labels, factor)
    if p is not None:
        offsets = [(int(dy), int(dx)) for dy, dx in np.rint(p[:, [PARAM_DY, PARAM_DX]])]
        if any(dy or dx for dy, dx in offsets):
            x, y = translate(x, y, offsets)
        # Only the flipped samples are touched, chosen on the host (a where() over the batch costs 30x a flip).
        flipped = np.flatnonzero(p[:, PARAM_FLIP] > 0.5).tolist()
        if flipped and y is labels:  # factor 1 (a packed vote): in place below must not touch the caller's tensor
            y = y.clone()
        for i in flipped:
            x[i], y[i] = x[i].flip(-1), y[i].flip(-1)
    return x.contiguous(), y.long()


def _to_unit_range(images: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """uint8 (N, h, w, 3) -> float32 (N, 3, h, w) = (v / 255) ** g, g per sample, through a 256-entry table per
    sample: one gather instead of a conversion, a division and a pow over every pixel (2-3x less CPU). g = 1 gives
    v / 255 exactly; x ** g commutes with the translation and flip, so applying it first changes nothing."""
    n = images.shape[0]
    levels = torch.arange(256, dtype=torch.float32, device=images.device) / 255.0
    tables = levels.pow(exponents[:, None])  # (N, 256)
    index = images.permute(0, 3, 1, 2).long() + 256 * torch.arange(n, device=images.device)[:, None, None, None]
    return tables.reshape(-1).take(index)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`: pinned + non_blocking on CUDA (a pageable copy would block the CPU)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
