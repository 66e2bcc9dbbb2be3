"""Segment any RGB images (any size) with a trained model: label-id PNGs, colour masks and overlays.

An image of any size meets a network that takes H, W multiples of 16 (A) or 32 (B), trained at one scale:
  fit="resize" (default): Lanczos-resize to the model's input_hw (the scale it was trained at), predict, bring the
                          prediction back to the original size (bilinear on logits, or nearest on labels);
  fit="pad":              keep the image's own scale, reflect-pad to the next multiple, predict, crop the pad off.
With fit="resize", --scales and --flip add test-time augmentation views (frrn_dist.tta): each view's logits go
bilinearly to the image's own size, softmax, mean over the views, argmax.
Outputs per image, in the original size: <stem>_labelIds.png (8-bit label ids, the official format),
<stem>_color.png (Cityscapes palette) and <stem>_overlay.png (the palette blended over the image).

Imports: PIL, numpy, torch, tqdm, frrn_dist.{data.cityscapes_folder, data.labels, evaluate, export, tta, visualize}.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from frrn_dist.data.cityscapes_folder import InputError, downscale_image, read_array
from frrn_dist.data.labels import colorize_train_ids
from frrn_dist.evaluate import write_label_ids, write_png
from frrn_dist.tta import Views, choose_resize, make_views, peak_memory, reset_peak_memory
from frrn_dist.tta import predict as predict_views
from frrn_dist.visualize import overlay

log = logging.getLogger("frrn_dist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
FIT_MODES = ("resize", "pad")
OUTPUT_SUFFIXES = ("_labelIds.png", "_color.png", "_overlay.png")


def list_images(path: str | Path) -> list[Path]:
    """One image file, or every image file below a folder (sorted); InputError if there are none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{path}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


@torch.no_grad()
def segment(
    model: torch.nn.Module,
    rgb: np.ndarray,
    *,
    input_hw: tuple[int, int],
    fit: str = "resize",
    resize: str = "bilinear",
    views: Views | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 train ids at the image's own size; `views` (fit="resize" only; None =
    input_hw alone) are averaged at that size."""
    if fit not in FIT_MODES:
        raise ValueError(f"fit={fit!r}: expected one of {FIT_MODES}")
    device = next(model.parameters()).device
    model.eval()
    H, W = rgb.shape[:2]
    if fit == "resize":
        x = torch.from_numpy(downscale_image(rgb, input_hw)).permute(2, 0, 1)[None].float().div(255)
        views = views or make_views(None, False, input_hw, model.size_multiple)
        return predict_views(model, x.to(device), views, (H, W), resize)[0].to(torch.uint8).cpu().numpy()
    if views is not None and (len(views) > 1 or views.scales != (1.0,)):
        raise ValueError("fit=pad predicts at the image's own scale: --scales and --flip need --fit resize")
    m = model.size_multiple
    pad_h, pad_w = -H % m, -W % m
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255).to(device)
    # reflect needs pad < size; tiny images fall back to repeating the edge
    mode = "reflect" if pad_h < H and pad_w < W else "replicate"
    x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return model(x)[0, :, :H, :W].argmax(0).to(torch.uint8).cpu().numpy()


def predict_files(
    model: torch.nn.Module,
    files: list[Path],
    out: str | Path,
    *,
    input_hw: tuple[int, int],
    root: str | Path | None = None,
    fit: str = "resize",
    resize: str = "bilinear",
    views: Views | None = None,
    alpha: float = 0.5,
    max_pixels: int | None = None,
    progress: bool = True,
) -> tuple[list[Path], list[str]]:
    """Segment every file and write its three PNGs under `out` (mirroring sub-folders of `root`).

    Returns (label-id PNGs written, one error line per image that could not be read). One bad image does not stop
    the others; the caller decides what a failure means (the CLI exits non-zero).
    """
    from tqdm import tqdm

    out = Path(out)
    stems = {}
    for f in files:  # two inputs that would write the same outputs (a.png and a.jpg) are refused up front
        rel = f.relative_to(root).with_suffix("") if root is not None else Path(f.stem)
        if rel in stems:
            raise InputError(f"{f}: same output name as {stems[rel]} (rename one of them)")
        stems[rel] = f
    written, failures = [], []
    for rel, f in tqdm(stems.items(), desc="predict", unit="image", disable=not progress):
        try:
            rgb = read_array(f, mode="RGB", max_pixels=max_pixels)
        except InputError as e:
            log.warning(str(e))
            failures.append(str(e))
            continue
        train_ids = segment(model, rgb, input_hw=input_hw, fit=fit, resize=resize, views=views)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_label_ids(train_ids, f"{target}_labelIds.png"))
        write_png(colorize_train_ids(train_ids), f"{target}_color.png")
        write_png(overlay(rgb, train_ids, alpha), f"{target}_overlay.png")
    return written, failures


def main(
    checkpoint: str,
    input_path: str,
    out: str,
    *,
    fit: str = "resize",
    resize: str | None = None,
    scales: str | tuple[float, ...] | None = None,
    flip: bool = False,
    input_hw: tuple[int, int] | None = None,
    alpha: float = 0.5,
    device: str = "auto",
    max_image_pixels: int | None = None,
) -> list[Path]:
    """The predict command. Raises InputError (a ValueError) if any image could not be read, after the rest."""
    from frrn_dist.export import load_model

    if fit == "pad" and (scales or flip):
        raise ValueError("--fit pad predicts at the image's own scale: --scales and --flip need --fit resize")
    files = list_images(input_path)
    if max_image_pixels is not None:
        # Pillow raises on its own beyond 2x its limit, so a higher limit has to be Pillow's too (this process only)
        Image.MAX_IMAGE_PIXELS = max_image_pixels
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, meta = load_model(checkpoint, device)
    input_hw = tuple(input_hw or meta["input_hw"])
    if fit == "resize" and (input_hw[0] % model.size_multiple or input_hw[1] % model.size_multiple):
        raise ValueError(
            f"input_hw {input_hw[0]}x{input_hw[1]}: FRRN-{meta['arch']} needs multiples of {model.size_multiple}"
        )
    views = make_views(scales, flip, input_hw, model.size_multiple) if fit == "resize" else None
    resize = choose_resize(resize, views, "bilinear") if views is not None else "bilinear"
    if views is not None:
        print(f"predict: {views.describe()}")
    root = Path(input_path) if Path(input_path).is_dir() else None
    reset_peak_memory(torch.device(device))
    start = time.perf_counter()
    written, failures = predict_files(
        model, files, out, input_hw=input_hw, root=root, fit=fit, resize=resize, views=views, alpha=alpha
    )
    seconds = time.perf_counter() - start
    memory_bytes, memory_kind = peak_memory(torch.device(device))
    if fit == "pad":
        how = "padded, then cropped"
    elif len(views) > 1:
        how = f"{len(views)} views' probabilities averaged at each image's size"
    else:
        how = f"resized to {input_hw[0]}x{input_hw[1]} and back ({resize})"
    print(f"wrote {len(written)} x {{{', '.join(OUTPUT_SUFFIXES)}}} into {out} ({how})")
    print(
        f"{seconds / max(1, len(written)):.3f} s/image (read, predict, write), peak memory "
        f"{memory_bytes / 2**20:.0f} MiB; {memory_kind}"
    )
    if failures:
        more = f" (and {len(failures) - 1} more, listed above)" if len(failures) > 1 else ""
        raise InputError(f"{failures[0]}{more}; {len(written)} of {len(files)} images written")
    return written
