"""Official Cityscapes numbers for a trained model: full-resolution scoring, official-format PNGs, pictures.

    model at input_hw (e.g. 256x512, eval mode: BN running statistics)
      -> logits (N, 19, h, w) -> back to the ground truth's size (H, W), two ways, and the report says which:
           "nearest":  argmax at input scale, then nearest upsampling of the label map (what the seed did)
           "bilinear": bilinear upsampling of the logits, then argmax (smoother borders, usually a bit higher)
      -> CityscapesMetrics over the whole split, all-reduced over ranks (every sample exactly once)
      -> rank 0: tables, metrics.json, confusion.png, class_iou.png; every rank: its own <key>_pred.png files

Data comes from the shards (the loaders' "eval" recipe) or straight from a Cityscapes folder (leftImg8bit and
gtFine labelIds + instanceIds), downscaled the same way: Lanczos for the image, majority vote for the labels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from frrn_dist import distributed as dist
from frrn_dist.data.labels import ID_TO_TRAIN, TRAIN_TO_ID
from frrn_dist.data.recipes import Batch, finish_batch
from frrn_dist.export import load_model, resolve_checkpoint
from frrn_dist.metrics import CityscapesMetrics, format_table
from frrn_dist.visualize import plot_class_iou, plot_confusion

log = logging.getLogger("frrn_dist")
RESIZE_MODES = ("nearest", "bilinear")
RESIZE_NOTES = {
    "nearest": "argmax at input scale, label map upsampled to ground-truth size by nearest neighbour",
    "bilinear": "logits upsampled to ground-truth size bilinearly (align_corners=False), then argmax",
}


class InputError(ValueError):
    """An input file or folder that cannot be used (missing, empty, undecodable, too large); names the path."""


# ---------------------------------------------------------------------------------------------------------------
# reading and writing images


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


def write_png(array: np.ndarray, path: str | Path) -> Path:
    """Save a uint8 (H, W) or (H, W, 3) array (or uint16 (H, W)) as PNG, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def write_label_ids(train_ids: np.ndarray, path: str | Path) -> Path:
    """The official prediction format: 8-bit 'L' PNG of label ids (7 road ... 33 bicycle), via TRAIN_TO_ID."""
    return write_png(TRAIN_TO_ID[np.asarray(train_ids, np.int64)], path)


def downscale_image(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, exactly as the loaders shrink frames (anti-aliased Lanczos, edges
    replicated like DALI), so a Cityscapes folder and its shards give the network the same pixels."""
    from frrn_dist.data.fallback import lanczos_downscale

    if rgb.shape[:2] == tuple(hw):
        return rgb
    return np.array(lanczos_downscale(rgb, tuple(hw)))  # a writable copy: torch.from_numpy warns on read-only


# ---------------------------------------------------------------------------------------------------------------
# predictions at ground-truth resolution


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
    return torch.cat(
        [
            F.interpolate(x[None].float(), size=tuple(full_hw), mode="bilinear", align_corners=False).argmax(1)
            for x in logits
        ]
    )


# ---------------------------------------------------------------------------------------------------------------
# a Cityscapes folder as a source of evaluation batches (no shards needed)


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


# ---------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches,
    *,
    resize: str = "nearest",
    write_predictions: str | Path | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> CityscapesMetrics:
    """Collective: run `model` (eval mode) over this rank's batches, score at full resolution, all-reduce.

    Batches need .images (N, 3, h, w), .keys, .full_labels (N, H, W) and, for iIoU, .full_instances. With
    `write_predictions`, each rank writes `<key>_pred.png` (label ids at ground-truth size) for its own samples.
    """
    from tqdm import tqdm

    model.eval()
    device = next(model.parameters()).device
    metrics = CityscapesMetrics()
    out_dir = None if write_predictions is None else Path(write_predictions)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        batches, total=num_batches, desc="evaluate", unit="batch", disable=not (progress and dist.is_main_process())
    )
    for batch in bar:
        if len(batch.images) == 0:  # a rank's last eval batch may be empty: padding never repeats a sample
            continue
        if batch.full_labels is None:
            raise ValueError(
                "evaluate: batches carry no full-resolution labels (build the loader with full_res_targets)"
            )
        logits = model(batch.images.to(device)).float()
        full = batch.full_labels.to(device)
        pred = to_full_resolution(logits, tuple(full.shape[-2:]), resize)
        inst = None if batch.full_instances is None else batch.full_instances.to(device)
        metrics.update(pred, full, inst)
        if out_dir is not None:
            for key, p in zip(batch.keys, pred.to(torch.uint8).cpu().numpy()):
                write_label_ids(p, out_dir / f"{key}_pred.png")
    # collective: every rank, also one whose slice was empty
    metrics.all_reduce()
    return metrics


def _json_safe(value: Any) -> Any:
    """NaN -> null: Python's json would write bare NaN tokens (as the official evaluator does) that strict parsers
    reject."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(results: dict[str, Any], out_dir: str | Path, *, title: str = "") -> dict[str, Path]:
    """metrics.json (NaN as null), confusion.png and class_iou.png in out_dir; each file written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(results), indent=1) + "\n")
    os.replace(tmp, path)
    iou_title = f"{title}  mIoU {results['miou']:.3f}" if title else ""
    return {
        "metrics": path,
        "confusion": plot_confusion(results["confusion"], out_dir / "confusion.png", title=title),
        "class_iou": plot_class_iou(
            results["class_iou"], out_dir / "class_iou.png", title=iou_title, mean=results["miou"]
        ),
    }


def default_out_dir(weights: Path, split: str) -> Path:
    """runs/<name>/eval-<split> for a run's checkpoint, else eval-<split> beside the weights."""
    tag_dir = weights.parent
    if tag_dir.parent.name == "checkpoints":
        return tag_dir.parent.parent / f"eval-{split}"
    return tag_dir / f"eval-{split}"


def run_evaluation(
    checkpoint: str | Path,
    *,
    shards: str | Path | None = None,
    cityscapes: str | Path | None = None,
    split: str = "val",
    input_hw: tuple[int, int] | None = None,
    resize: str = "nearest",
    write_predictions: str | Path | None = None,
    out: str | Path | None = None,
    micro_batch_size: int = 1,
    backend: str = "dali",
    device: str = "cpu",
    num_workers: int = 2,
) -> dict[str, Any]:
    """Collective when distributed: evaluate a checkpoint on a split of shards or of a Cityscapes folder.

    Every rank returns the same results dict; rank 0 prints the tables and writes the report into `out`.
    """
    if (shards is None) == (cityscapes is None):
        raise ValueError("evaluate: give exactly one data source, shards or cityscapes")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
    rank, world_size = dist.get_global_rank(), dist.get_world_size()
    torch_device = torch.device("cuda", dist.get_local_rank()) if device == "cuda" else torch.device("cpu")
    weights = resolve_checkpoint(checkpoint)
    model, meta = load_model(weights, torch_device)
    input_hw = tuple(int(v) for v in (input_hw or meta["input_hw"]))
    if input_hw[0] % model.size_multiple or input_hw[1] % model.size_multiple:
        raise ValueError(
            f"input_hw {input_hw[0]}x{input_hw[1]}: FRRN-{meta['arch']} needs multiples of {model.size_multiple}"
        )

    start = time.time()
    if shards is not None:
        from frrn_dist.data.loaders import build_loader
        from frrn_dist.data.manifest import split_info

        expected = split_info(shards, split)["num_samples"]
        loader = build_loader(
            shards, split, backend=backend, recipe="eval", input_hw=input_hw, micro_batch_size=micro_batch_size,
            rank=rank, world_size=world_size, device=device,
            device_id=dist.get_local_rank() if device == "cuda" else None, full_res_targets=True,
            num_threads=max(1, num_workers) if backend == "dali" else num_workers,  # DALI threads | DataLoader workers
        )  # fmt: skip
        batches, num_batches, source = loader, len(loader), str(shards)
    else:
        files = cityscapes_files(cityscapes, split)
        expected = len(files)
        batches, num_batches = cityscapes_batches(
            files, input_hw=input_hw, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
            num_workers=num_workers,
        )  # fmt: skip
        source = str(cityscapes)
    metrics = evaluate_batches(
        model, batches, resize=resize, write_predictions=write_predictions, num_batches=num_batches
    )
    results = metrics.compute()
    if results["images"] != expected:
        # torchvision's check: padded or duplicated samples would bias every score
        raise ValueError(
            f"evaluate: {results['images']} images scored over {world_size} rank(s), but {source} split {split!r} "
            f"has {expected}: samples were padded, repeated or dropped"
        )
    results = {
        "checkpoint": str(weights),
        "arch": meta["arch"],
        "step": meta.get("step"),
        "source": source,
        "split": split,
        "input_hw": list(input_hw),
        "resize": resize,
        "resize_note": RESIZE_NOTES[resize],
        "ranks": world_size,
        "seconds": round(time.time() - start, 2),
        **results,
    }
    if dist.is_main_process():
        out_dir = Path(out) if out is not None else default_out_dir(weights, split)
        name = f"FRRN-{meta['arch']}" + (f" step {meta['step']}" if meta.get("step") is not None else "")
        paths = write_report(results, out_dir, title=f"{name}, {split}")
        print(format_table(results))
        iiou = f", iIoU {results['iiou']:.3f}" if "iiou" in results else " (no instance maps: no iIoU)"
        print(
            f"{split}: mIoU {results['miou']:.3f}{iiou}, category mIoU {results['category_miou']:.3f} over "
            f"{results['images']} images; model input {input_hw[0]}x{input_hw[1]}, {RESIZE_NOTES[resize]}"
        )
        print(f"wrote {paths['metrics']}, {paths['confusion'].name}, {paths['class_iou'].name}")
        if write_predictions is not None:
            gt = cityscapes or "CITYSCAPES_ROOT"
            command = f"python -m frrn_dist.metrics --predictions {write_predictions} --cityscapes {gt} --split {split}"
            print(f"official-format predictions in {write_predictions}; cityscapesScripts scores them: `{command}`")
    dist.barrier()
    return results


def parse_hw(text: str) -> tuple[int, int]:
    """'256x512' -> (256, 512), i.e. (height, width); ValueError naming the text otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not HxW (e.g. 256x512)")


def data_defaults(checkpoint: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    """shard_dir, val split and backend from a training config: `config`, else the run's config.yaml."""
    from omegaconf import OmegaConf

    if config is None:
        weights = resolve_checkpoint(checkpoint)
        run_dir = weights.parent.parent.parent if weights.parent.parent.name == "checkpoints" else None
        config = run_dir / "config.yaml" if run_dir is not None and (run_dir / "config.yaml").is_file() else None
    if config is None or not Path(config).is_file():
        where = f"{config}: no such config" if config is not None else f"{checkpoint}: no run config.yaml found"
        raise ValueError(f"{where}; say where the data is with --shards DIR or --cityscapes DIR")
    data = OmegaConf.to_container(OmegaConf.load(config)).get("data", {})
    if not data.get("shard_dir"):
        raise ValueError(f"{config}: no data.shard_dir; give --shards DIR or --cityscapes DIR")
    return {"shards": data["shard_dir"], "split": data.get("val_split", "val"), "backend": data.get("backend", "dali")}


def main(
    checkpoint: str,
    *,
    config: str | None = None,
    shards: str | None = None,
    cityscapes: str | None = None,
    split: str | None = None,
    input_hw: tuple[int, int] | None = None,
    resize: str = "nearest",
    write_predictions: str | None = None,
    out: str | None = None,
    micro_batch_size: int = 1,
    backend: str | None = None,
    device: str = "auto",
    num_workers: int = 2,
) -> dict[str, Any]:
    """The evaluate command: fill the data source from the run's config when not given, join the process group
    when launched with several ranks (deepspeed / torchrun), evaluate."""
    if shards is None and cityscapes is None:
        found = data_defaults(checkpoint, config)
        shards, split, backend = found["shards"], split or found["split"], backend or found["backend"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_distributed(device)  # collectives below (all-reduce, barrier) need every rank
    dist.setup_logging()
    return run_evaluation(
        checkpoint, shards=shards, cityscapes=cityscapes, split=split or "val", input_hw=input_hw, resize=resize,
        write_predictions=write_predictions, out=out, micro_batch_size=micro_batch_size, backend=backend or "dali",
        device=device, num_workers=num_workers,
    )  # fmt: skip
