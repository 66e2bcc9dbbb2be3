"""Official Cityscapes numbers for a trained model: full-resolution scoring, official-format PNGs, pictures.

    model at input_hw (e.g. 256x512, eval mode: BN running statistics)
      -> logits (N, 19, h, w) -> back to the ground truth's size (H, W), and the report says how:
           "nearest":  argmax at input scale, then nearest upsampling of the label map (what the seed did)
           "bilinear": bilinear upsampling of the logits, then argmax (smoother borders, usually a bit higher)
           views (--scales, --flip; frrn_dist.tta): every view's logits bilinearly to (H, W), softmax, mean, argmax
      -> CityscapesMetrics over the whole split, all-reduced over ranks (every sample exactly once)
      -> rank 0: tables, metrics.json (with the views, seconds per image, peak memory), confusion.png,
         class_iou.png; every rank: its own <key>_pred.png files (from the averaged result)

Data comes from the shards (the loaders' "eval" recipe) or straight from a Cityscapes folder
(frrn_dist.data.cityscapes_folder), downscaled the same way: Lanczos for the image, majority vote for the labels.

May import: distributed, data, export, metrics, tta, visualize; never train or the launchers.

Imports: PIL, numpy, omegaconf, torch, tqdm, frrn_dist.{data.cityscapes_folder, data.labels, data.loaders,
data.manifest, distributed, export, metrics, tta, visualize}.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from frrn_dist import distributed as dist
from frrn_dist.data.cityscapes_folder import cityscapes_batches, cityscapes_files
from frrn_dist.data.labels import TRAIN_TO_ID
from frrn_dist.export import load_model, resolve_checkpoint
from frrn_dist.metrics import CityscapesMetrics, format_table
from frrn_dist.tta import Views, choose_resize, make_views, peak_memory, reset_peak_memory, resize_note, synchronize
from frrn_dist.tta import predict as predict_views
from frrn_dist.visualize import plot_class_iou, plot_confusion

log = logging.getLogger("frrn_dist")


# ---------------------------------------------------------------------------------------------------------------
# writing predictions


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


# ---------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches,
    *,
    views: Views | None = None,
    resize: str = "nearest",
    write_predictions: str | Path | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> tuple[CityscapesMetrics, dict[str, Any]]:
    """Collective: run `model` (eval mode) over this rank's batches, score at full resolution, all-reduce.

    Batches need .images (N, 3, h, w), .keys, .full_labels (N, H, W) and, for iIoU, .full_instances. `views`
    (frrn_dist.tta; None = the batch as it is, one view) are averaged at the ground truth's size. With
    `write_predictions`, each rank writes `<key>_pred.png` (label ids at ground-truth size) for its own samples.
    Returns the all-reduced metrics and what scoring cost, over all ranks (cost_summary).
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
    reset_peak_memory(device)
    loop_start, model_seconds, num_images = time.perf_counter(), 0.0, 0
    for batch in bar:
        if len(batch.images) == 0:  # a rank's last eval batch may be empty: padding never repeats a sample
            continue
        if batch.full_labels is None:
            raise ValueError(
                "evaluate: batches carry no full-resolution labels (build the loader with full_res_targets)"
            )
        images = batch.images.to(device)
        full = batch.full_labels.to(device)
        if views is None:
            views = make_views(None, False, tuple(images.shape[-2:]), model.size_multiple)
        synchronize(device)
        t = time.perf_counter()
        pred = predict_views(model, images, views, tuple(full.shape[-2:]), resize)
        synchronize(device)
        model_seconds += time.perf_counter() - t
        num_images += len(images)
        inst = None if batch.full_instances is None else batch.full_instances.to(device)
        metrics.update(pred, full, inst)
        if out_dir is not None:
            for key, p in zip(batch.keys, pred.to(torch.uint8).cpu().numpy()):
                write_label_ids(p, out_dir / f"{key}_pred.png")
    loop_seconds = time.perf_counter() - loop_start
    # collective: every rank, also one whose slice was empty
    metrics.all_reduce()
    memory_bytes, memory_kind = peak_memory(device)
    return metrics, cost_summary(
        dist.all_gather_object((num_images, loop_seconds, model_seconds, memory_bytes)), memory_kind
    )


def cost_summary(per_rank: list[tuple[int, float, float, int]], memory_kind: str) -> dict[str, Any]:
    """Every rank's (images, loop seconds, model seconds, peak bytes) -> seconds per image on one rank (rank
    seconds summed over ranks / images: comparable across rank counts) and the largest peak of any rank."""
    images = max(1, sum(r[0] for r in per_rank))
    peak = max(r[3] for r in per_rank)
    return {
        "seconds_per_image": round(sum(r[1] for r in per_rank) / images, 4),  # decode, views, scoring, writing
        "model_seconds_per_image": round(sum(r[2] for r in per_rank) / images, 4),  # views and their average
        "peak_memory_bytes": peak,
        "peak_memory_mib": round(peak / 2**20, 1),
        "peak_memory": memory_kind + ", the largest rank's",
    }


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
    resize: str | None = None,
    scales: str | tuple[float, ...] | None = None,
    flip: bool = False,
    write_predictions: str | Path | None = None,
    out: str | Path | None = None,
    micro_batch_size: int = 1,
    backend: str = "dali",
    device: str = "cpu",
    num_workers: int = 2,
) -> dict[str, Any]:
    """Collective when distributed: evaluate a checkpoint on a split of shards or of a Cityscapes folder.

    `scales` (factors of input_hw, or their text "0.75,1.0") and `flip` make test-time augmentation views
    (frrn_dist.tta); resize None is "bilinear" when views are asked for, else "nearest". Every rank returns the
    same results dict; rank 0 prints the tables and writes the report into `out`.
    """
    if (shards is None) == (cityscapes is None):
        raise ValueError("evaluate: give exactly one data source, shards or cityscapes")
    torch_device = torch.device("cuda", dist.get_local_rank()) if device == "cuda" else torch.device("cpu")
    weights = resolve_checkpoint(checkpoint)
    model, meta = load_model(weights, torch_device)
    input_hw = tuple(int(v) for v in (input_hw or meta["input_hw"]))
    if input_hw[0] % model.size_multiple or input_hw[1] % model.size_multiple:
        raise ValueError(
            f"input_hw {input_hw[0]}x{input_hw[1]}: FRRN-{meta['arch']} needs multiples of {model.size_multiple}"
        )
    views = make_views(scales, flip, input_hw, model.size_multiple)
    # asking for views (even --scales 1.0) means their bilinear average; without, the seed's nearest stays default
    resize = choose_resize(resize, views, "bilinear" if scales or flip else "nearest")
    if dist.is_main_process():
        print(f"evaluate: {views.describe()}; {resize_note(resize, views)}")

    start = time.time()
    batches, num_batches, expected, source = _open_split(
        shards, cityscapes, split, input_hw=input_hw, micro_batch_size=micro_batch_size, backend=backend,
        device=device, num_workers=num_workers,
    )  # fmt: skip
    metrics, cost = evaluate_batches(
        model, batches, views=views, resize=resize, write_predictions=write_predictions, num_batches=num_batches
    )
    results = metrics.compute()
    if results["images"] != expected:
        # torchvision's check: padded or duplicated samples would bias every score
        raise ValueError(
            f"evaluate: {results['images']} images scored over {dist.get_world_size()} rank(s), but {source} split "
            f"{split!r} has {expected}: samples were padded, repeated or dropped"
        )
    results = {
        "checkpoint": str(weights),
        "arch": meta["arch"],
        "step": meta.get("step"),
        "source": source,
        "split": split,
        "input_hw": list(input_hw),
        "resize": resize,
        "resize_note": resize_note(resize, views),
        "views": views.as_dict(),
        "ranks": dist.get_world_size(),
        "seconds": round(time.time() - start, 2),
        **cost,
        **results,
    }
    if dist.is_main_process():
        out_dir = Path(out) if out is not None else default_out_dir(weights, split)
        name = f"FRRN-{meta['arch']}" + (f" step {meta['step']}" if meta.get("step") is not None else "")
        paths = write_report(results, out_dir, title=f"{name}, {split}")
        _print_report(results, views, paths, write_predictions, cityscapes)
    dist.barrier()
    return results


def _open_split(
    shards, cityscapes, split: str, *, input_hw, micro_batch_size: int, backend: str, device: str, num_workers: int
) -> tuple[Any, int, int, str]:
    """(batches, number of this rank's batches, frames in the split, source) from shards or a Cityscapes folder."""
    rank, world_size = dist.get_global_rank(), dist.get_world_size()
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
        return loader, len(loader), expected, str(shards)
    files = cityscapes_files(cityscapes, split)
    batches, num_batches = cityscapes_batches(
        files, input_hw=input_hw, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
        num_workers=num_workers,
    )  # fmt: skip
    return batches, num_batches, len(files), str(cityscapes)


def _print_report(results: dict, views: Views, paths: dict, write_predictions, cityscapes) -> None:
    split, (h, w) = results["split"], results["input_hw"]
    print(format_table(results))
    iiou = f", iIoU {results['iiou']:.3f}" if "iiou" in results else " (no instance maps: no iIoU)"
    print(
        f"{split}: mIoU {results['miou']:.3f}{iiou}, category mIoU {results['category_miou']:.3f} over "
        f"{results['images']} images; model input {h}x{w}, {results['resize_note']}"
    )
    print(
        f"{views.describe()}; {results['seconds_per_image']:.3f} s/image on one rank "
        f"({results['model_seconds_per_image']:.3f} s in the model and averaging), peak memory "
        f"{results['peak_memory_mib']:.0f} MiB; {results['peak_memory']}"
    )
    print(f"wrote {paths['metrics']}, {paths['confusion'].name}, {paths['class_iou'].name}")
    if write_predictions is not None:
        gt = cityscapes or "CITYSCAPES_ROOT"
        command = f"python -m frrn_dist.metrics --predictions {write_predictions} --cityscapes {gt} --split {split}"
        print(f"official-format predictions in {write_predictions}; cityscapesScripts scores them: `{command}`")


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
    resize: str | None = None,
    scales: str | tuple[float, ...] | None = None,
    flip: bool = False,
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
        scales=scales, flip=flip, write_predictions=write_predictions, out=out, micro_batch_size=micro_batch_size,
        backend=backend or "dali", device=device, num_workers=num_workers,
    )  # fmt: skip
