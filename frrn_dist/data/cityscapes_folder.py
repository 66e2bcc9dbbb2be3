"""A Cityscapes folder (leftImg8bit + gtFine) as a source of evaluation batches, and safe image reading.

No shards needed: frames are read with PIL, shrunk exactly as the loaders shrink them (Lanczos for the image,
majority vote for the training-scale label) and yielded as the loaders' `Batch`, with the full-resolution train
ids and instance ids the official protocol scores against. Each rank takes a contiguous slice, like DALI.

May import: frrn_dist.data.{labels, recipes, fallback}; nothing above the data package.

Imports: PIL, numpy, torch, frrn_dist.{data.fallback, data.labels, data.recipes}.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from frrn_dist.data.labels import ID_TO_TRAIN
from frrn_dist.data.recipes import Batch, finish_batch


class InputError(ValueError):
    """An input file or folder that cannot be used (missing, empty, undecodable, too large); names the path."""


# ---------------------------------------------------------------------------------------------------------------
# reading images


def open_image(path: str | Path, *, max_pixels: int | None = None) -> Image.Image:
    """Open an image safely: refuses files over `max_pixels` (default Pillow's MAX_IMAGE_PIXELS, a guard against
    decompression bombs: a few-KB PNG can claim 100k x 100k pixels) before decoding a single pixel."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit and raises above; we refuse both, with our own message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: too large to decode safely ({e}); raise the limit only for trusted files") from e
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from e
    if limit is not None and im.width * im.height > limit:
        raise InputError(
            f"{path}: {im.width}x{im.height} = {im.width * im.height} pixels is over the limit of {limit} "
            "(decompression-bomb guard); raise it with --max-image-pixels only for trusted files"
        )
    return im


def read_array(path: str | Path, *, mode: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode fully (catching truncated files here, not in the middle of a batch); optionally convert the mode."""
    im = open_image(path, max_pixels=max_pixels)
    try:
        im.load()
        if mode is not None and im.mode != mode:
            im = im.convert(mode)
        return np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from e


def downscale_image(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, exactly as the loaders shrink frames (anti-aliased Lanczos, edges
    replicated like DALI), so a Cityscapes folder and its shards give the network the same pixels."""
    from frrn_dist.data.fallback import lanczos_downscale

    if rgb.shape[:2] == tuple(hw):
        return rgb
    return np.array(lanczos_downscale(rgb, tuple(hw)))  # a writable copy: torch.from_numpy warns on read-only


# ---------------------------------------------------------------------------------------------------------------
# the folder


def cityscapes_files(root: str | Path, split: str) -> list[tuple[str, Path, Path, Path | None]]:
    """(key, leftImg8bit, gtFine labelIds, gtFine instanceIds or None) for every frame of a split, sorted."""
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise InputError(f"{image_dir}: missing (a Cityscapes folder has leftImg8bit/{split}/<city>/)")
    out = []
    for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
        key = image.name[: -len("_leftImg8bit.png")]
        gt = root / "gtFine" / split / image.parent.name / f"{key}_gtFine_labelIds.png"
        if not gt.is_file():
            raise InputError(f"{gt}: missing, the ground truth of {image}")
        inst = gt.with_name(f"{key}_gtFine_instanceIds.png")
        out.append((key, image, gt, inst if inst.is_file() else None))
    if not out:
        raise InputError(f"{image_dir}: no *_leftImg8bit.png files")
    with_instances = sum(f[3] is not None for f in out)
    if 0 < with_instances < len(out):
        missing = next(f[2] for f in out if f[3] is None)
        raise InputError(
            f"{missing}: has no *_gtFine_instanceIds.png beside it, while other frames do (iIoU needs all)"
        )
    return out


class _CityscapesFrames(torch.utils.data.Dataset):
    def __init__(self, files, input_hw: tuple[int, int]):
        self.files, self.input_hw = files, input_hw

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        # a worker's exception reaches the main process wrapped in a multi-line traceback; hand the one-line
        # message over as data instead and raise it there
        try:
            return self._read(i)
        except InputError as e:
            return str(e)

    def _read(self, i: int):
        key, image_path, gt_path, inst_path = self.files[i]
        rgb = read_array(image_path, mode="RGB")
        label_ids = read_array(gt_path)
        if label_ids.ndim != 2 or label_ids.shape != rgb.shape[:2]:
            raise InputError(f"{gt_path}: {label_ids.shape} label map does not match its image {rgb.shape[:2]}")
        h, w = self.input_hw
        H, W = label_ids.shape
        if H % h or W % w or H // h != W // w:
            raise InputError(f"{image_path}: {H}x{W} is not an integer multiple of input_hw {h}x{w}")
        train_ids = ID_TO_TRAIN[label_ids]
        inst = None
        if inst_path is not None:
            inst = read_array(inst_path).astype(np.int32)
            if inst.shape != label_ids.shape:
                raise InputError(f"{inst_path}: {inst.shape} does not match {gt_path} {label_ids.shape}")
        return key, downscale_image(rgb, (h, w)), train_ids, inst


def _collate(samples):
    errors = [s for s in samples if isinstance(s, str)]
    if errors:
        return errors[0]
    keys = [s[0] for s in samples]
    images = torch.from_numpy(np.stack([s[1] for s in samples]))
    full_labels = torch.from_numpy(np.stack([s[2] for s in samples]))
    instances = None if samples[0][3] is None else torch.from_numpy(np.stack([s[3] for s in samples]))
    return keys, images, full_labels, instances


def cityscapes_batches(
    files: list, *, input_hw: tuple[int, int], micro_batch_size: int, rank: int, world_size: int, num_workers: int = 2
) -> tuple[Iterator[Batch], int]:
    """(batches, number of batches) of this rank's contiguous slice [r*N/S, (r+1)*N/S) (like DALI's sharding):
    every frame exactly once over all ranks, nothing padded."""
    n = len(files)
    mine = files[rank * n // world_size : (rank + 1) * n // world_size]
    loader = torch.utils.data.DataLoader(
        _CityscapesFrames(mine, tuple(input_hw)), batch_size=micro_batch_size, collate_fn=_collate,
        num_workers=min(num_workers, len(mine)),
    )  # fmt: skip
    h, w = input_hw

    def batches() -> Iterator[Batch]:
        for item in loader:
            if isinstance(item, str):
                raise InputError(item)
            keys, images, full_labels, instances = item
            factor = full_labels.shape[-2] // h
            # finish_batch: the loaders' own majority-vote label at input scale (only used for a training-scale check)
            x, y = finish_batch(images, full_labels.to(torch.uint8), None, factor=factor)
            yield Batch(x, y, keys, full_labels.long(), instances)

    return batches(), len(loader)
