"""Cityscapes scores exactly as cityscapesScripts' evalPixelLevelSemanticLabeling computes them, in train-id space.

The official evaluator keeps a 34x34 label-id confusion matrix. For predictions in 0..18 a 19-class train-id
matrix holds the same information: ignored ground truth (train id 255) never counts as a false positive there, and
rows of ignored ids are never read. What it needs beyond torchvision's ConfusionMatrix (cityscapes.md §4.2):
  - classes absent from both ground truth and prediction are NaN and left out of the mean;
  - a prediction outside 0..18 (e.g. 255) on an evaluated pixel is a miss of the true class and nobody's false
    positive, as a prediction of an ignored label id is officially; it goes to a 20th "void" column;
  - iIoU: per ground-truth instance (instanceIds > 1000 of the 8 evaluated instance classes) TP and FN are weighted
    by avg_size[class] / instance_size; FP stays the unweighted pixel count;
  - category IoU sums whole blocks (car predicted as truck is a TP of vehicle); category iIoU for human and vehicle.
Everything is summed over the whole set first (no per-image averaging), then all-reduced over ranks.

Imports: cityscapesscripts, numpy, torch, frrn_dist.{data.labels, distributed}.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import args as _official_args

from frrn_dist.data.labels import (
    CATEGORY_NAMES,
    CLASS_NAMES,
    ID_TO_TRAIN,
    INSTANCE_CATEGORY_NAMES,
    INSTANCE_TRAIN_IDS,
    NUM_CLASSES,
    TRAIN_TO_CATEGORY,
)
from frrn_dist.distributed import all_reduce_sum, compute_device

NUM_CATEGORIES = len(CATEGORY_NAMES)
VOID_COLUMN = NUM_CLASSES  # predictions outside 0..18 land here: a miss for the true class, no FP for anyone
ID_SPAN = 1 << 16  # instanceIds are 16-bit PNG values: label_id * 1000 + k < 65536

# The official average instance size (pixels at 2048x1024) per evaluated instance class, by train id; 0 elsewhere.
AVG_INSTANCE_PIXELS = np.zeros(NUM_CLASSES, np.float64)
for _t in INSTANCE_TRAIN_IDS:
    AVG_INSTANCE_PIXELS[_t] = _official_args.avgClassSize[CLASS_NAMES[_t]]


def _nan_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


class CityscapesMetrics:
    """Confusion matrix plus instance-weighted sums; update per batch, all_reduce once, compute once."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.confusion: torch.Tensor | None = None  # int64 (19, 20): rows GT train id, cols prediction (+ void)
        self.counts: torch.Tensor | None = None  # int64 [images, images with instance maps]
        # float64 (4, 19): rows class tpW, class fnW (by train id), category tpW, category fnW (first 7 entries)
        self.instance_sums: torch.Tensor | None = None

    def _state_on(self, device: torch.device) -> None:
        if self.confusion is None:
            self.confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES + 1, dtype=torch.int64, device=device)
            self.counts = torch.zeros(2, dtype=torch.int64, device=device)
            self.instance_sums = torch.zeros(4, NUM_CLASSES, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, instances: torch.Tensor | None = None) -> None:
        """Add a batch. pred (N, H, W) train ids 0..18; target (N, H, W) train ids, 255 (anything else) ignored;
        instances (N, H, W) official instanceIds (label_id * 1000 + k) at the same size, or None."""
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(
                f"metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be (N, H, W)"
            )
        if instances is not None and instances.shape != target.shape:
            raise ValueError(f"metrics: instances {tuple(instances.shape)} must match target {tuple(target.shape)}")
        device = self.confusion.device if self.confusion is not None else target.device
        self._state_on(device)
        if target.numel() == 0:  # an empty last batch of a rank
            return
        pred = pred.to(device, torch.int64)
        target = target.to(device, torch.int64)
        pred = torch.where((pred >= 0) & (pred < NUM_CLASSES), pred, VOID_COLUMN)

        n_cells = self.confusion.numel()
        valid = (target >= 0) & (target < NUM_CLASSES)
        # ignored pixels go to one extra bin that is dropped: cheaper than compacting with a boolean mask
        cells = torch.where(valid, target * (NUM_CLASSES + 1) + pred, n_cells)
        self.confusion += torch.bincount(cells.flatten(), minlength=n_cells + 1)[:n_cells].view_as(self.confusion)
        self.counts[0] += pred.shape[0]
        if instances is not None:
            self.counts[1] += pred.shape[0]
            self._update_instances(pred, instances.to(device, torch.int64))

    def _update_instances(self, pred: torch.Tensor, instances: torch.Tensor) -> None:
        device = pred.device
        id_to_train = torch.as_tensor(ID_TO_TRAIN, dtype=torch.int64, device=device)
        is_instance_class = torch.zeros(256, dtype=torch.bool, device=device)
        is_instance_class[INSTANCE_TRAIN_IDS] = True
        train_to_cat = torch.as_tensor(TRAIN_TO_CATEGORY, device=device)
        avg_pixels = torch.as_tensor(AVG_INSTANCE_PIXELS, device=device)
        if int(instances.max()) >= ID_SPAN or int(instances.min()) < 0:  # a sync, paid on the eval path only
            raise ValueError(f"metrics: instance ids must lie in 0..{ID_SPAN - 1} (16-bit *_instanceIds.png)")

        # the evaluator takes every value > 1000 as an instance of class value // 1000 (caravan/trailer skipped)
        cls = id_to_train[instances // 1000]
        inside = (instances > 1000) & is_instance_class[cls]
        n = pred.shape[0]
        # an instance is (image, instance id): the same id in two images is two instances. Keys index a dense
        # (N * 65536) table, so per-instance sums are bincounts, no sort; pixels outside instances hit a dump bin.
        image_index = torch.arange(n, device=device).view(-1, 1, 1)
        key = torch.where(inside, image_index * ID_SPAN + instances, n * ID_SPAN).flatten()
        count = lambda weights=None: torch.bincount(key, weights=weights, minlength=n * ID_SPAN + 1)[:-1]
        size = count().double()
        hit = count((pred == cls).flatten().double())
        pred_cat = train_to_cat[pred.clamp(max=NUM_CLASSES - 1)]
        cls_cat = train_to_cat[cls.clamp(max=NUM_CLASSES - 1)]  # clamped pixels are outside instances: dumped
        cat_hit = count(((pred < NUM_CLASSES) & (pred_cat == cls_cat)).flatten().double())
        found = size.nonzero().squeeze(1)
        size, hit, cat_hit = size[found], hit[found], cat_hit[found]
        instance_cls = id_to_train[found % ID_SPAN // 1000]
        weight = avg_pixels[instance_cls] / size  # big instances count less, small ones more
        sums = self.instance_sums
        sums[0].index_add_(0, instance_cls, hit * weight)
        sums[1].index_add_(0, instance_cls, (size - hit) * weight)
        instance_cat = train_to_cat[instance_cls]
        sums[2].index_add_(0, instance_cat, cat_hit * weight)
        sums[3].index_add_(0, instance_cat, (size - cat_hit) * weight)

    def all_reduce(self) -> None:
        """Collective: sum the state over ranks. Call on every rank (also one that saw no batch) before compute()."""
        if self.confusion is None:  # this rank saw no data: contribute zeros on the collectives' device
            self._state_on(compute_device())
        all_reduce_sum(self.confusion)
        all_reduce_sum(self.counts)
        all_reduce_sum(self.instance_sums)

    def compute(self) -> dict:
        """Scores as plain Python values (NaN where the official evaluator gives NaN). iIoU keys only when every
        image came with an instance map."""
        self._state_on(torch.device("cpu"))
        cm = self.confusion.cpu().double().numpy()  # (19, 20)
        images, images_with_instances = (int(v) for v in self.counts.cpu())
        tp = np.diag(cm[:, :NUM_CLASSES])
        fn = cm.sum(1) - tp  # includes void predictions
        fp = cm[:, :NUM_CLASSES].sum(0) - tp  # only evaluated GT rows exist, so void GT never makes an FP
        class_iou = _ratio(tp, tp + fp + fn)

        one_hot = np.eye(NUM_CATEGORIES)[TRAIN_TO_CATEGORY]  # (19, 7)
        cat_cm = one_hot.T @ cm[:, :NUM_CLASSES] @ one_hot  # (7, 7): whole category blocks
        cat_tp = np.diag(cat_cm)
        cat_fn = one_hot.T @ cm.sum(1) - cat_tp
        cat_fp = cat_cm.sum(0) - cat_tp
        category_iou = _ratio(cat_tp, cat_tp + cat_fp + cat_fn)

        result = {
            "miou": _nan_mean(list(class_iou)),
            "class_iou": {CLASS_NAMES[c]: float(class_iou[c]) for c in range(NUM_CLASSES)},
            "category_miou": _nan_mean(list(category_iou)),
            "category_iou": {CATEGORY_NAMES[k]: float(category_iou[k]) for k in range(NUM_CATEGORIES)},
        }
        if images and images_with_instances == images:
            sums = self.instance_sums.cpu().numpy()
            class_iiou = _ratio(sums[0], sums[0] + fp + sums[1])
            cat_iiou = _ratio(sums[2, :NUM_CATEGORIES], sums[2, :NUM_CATEGORIES] + cat_fp + sums[3, :NUM_CATEGORIES])
            result["class_iiou"] = {CLASS_NAMES[c]: float(class_iiou[c]) for c in INSTANCE_TRAIN_IDS}
            result["iiou"] = _nan_mean(list(result["class_iiou"].values()))
            result["category_iiou"] = {c: float(cat_iiou[CATEGORY_NAMES.index(c)]) for c in INSTANCE_CATEGORY_NAMES}
            result["category_iiou_mean"] = _nan_mean(list(result["category_iiou"].values()))
        elif images_with_instances:
            raise ValueError(
                f"metrics: {images_with_instances} of {images} images came with instance maps; iIoU needs all or none"
            )
        result["confusion"] = cm[:, :NUM_CLASSES].astype(np.int64).tolist()
        result["pixels"] = int(cm.sum())
        result["images"] = images
        return result


def _cell(value: float | None) -> str:
    return "  nan" if value is None or math.isnan(value) else f"{value:5.3f}"


def format_table(result: dict) -> str:
    """The evaluator's two console tables (classes, then categories) with IoU and nIoU (= iIoU) columns."""
    lines = []
    for title, names, iou, iiou, avg, iavg in (
        ("classes", CLASS_NAMES, "class_iou", "class_iiou", "miou", "iiou"),
        ("categories", CATEGORY_NAMES, "category_iou", "category_iiou", "category_miou", "category_iiou_mean"),
    ):
        inst = result.get(iiou, {})
        lines += [f"{title:<14}   IoU    nIoU", "-" * 32]
        lines += [f"{name:<14}: {_cell(result[iou][name])}    {_cell(inst.get(name))}" for name in names]
        lines += ["-" * 32, f"{'Score Average':<14}: {_cell(result[avg])}    {_cell(result.get(iavg))}", "-" * 32, ""]
    return "\n".join(lines)


def _official_module():
    """cityscapesScripts' evaluator module, made to run on numpy >= 2.4 (it still calls the removed np.in1d)."""
    if not hasattr(np, "in1d"):  # cityscapes.md §4.3
        np.in1d = lambda a, b, assume_unique=False, invert=False: np.isin(  # noqa: E731
            np.ravel(a), b, assume_unique=assume_unique, invert=invert
        )
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    return ev


def official_evaluate(
    pred_files: list[str],
    gt_files: list[str],
    *,
    instances: bool = True,
    quiet: bool = True,
    json_out: str | None = None,
) -> dict:
    """Score label-id PNGs with cityscapesScripts' own evaluateImgLists (the reference our numbers must match).

    gt_files are *_gtFine_labelIds.png with *_gtFine_instanceIds.png beside them when `instances`. Returns the
    evaluator's dict (classScores, averageScoreClasses, ...). Its errors call sys.exit; they become ValueError.
    """
    ev = _official_module()
    ev.args.quiet = quiet
    ev.args.JSONOutput = json_out is not None
    ev.args.exportFile = json_out
    ev.args.evalInstLevelScore = instances
    try:
        return ev.evaluateImgLists(list(pred_files), list(gt_files), ev.args)
    except SystemExit as e:
        raise ValueError(f"official evaluator stopped (its message is printed above): exit {e.code}") from e


def official_main(argv: list[str] | None = None) -> dict:
    """`python -m frrn_dist.metrics`: csEvalPixelLevelSemanticLabeling on any split, runnable on numpy >= 2.4."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(
        prog="python -m frrn_dist.metrics",
        description="Run cityscapesScripts' pixel-level evaluator unchanged (its own file matching, tables and "
        "JSON) on a folder of <city>_<seq>_<frame>*.png label-id predictions, e.g. those written by "
        "`launch/evaluate.py --write-predictions DIR`. Only adds the np.in1d shim numpy >= 2.4 needs.",
    )
    p.add_argument("--predictions", required=True, help="folder searched recursively for the prediction PNGs")
    p.add_argument("--cityscapes", required=True, help="Cityscapes folder with gtFine/<split>/")
    p.add_argument("--split", default="val")
    p.add_argument("--out", help="also write the evaluator's JSON result here")
    p.add_argument("--no-instances", action="store_true", help="skip iIoU (no *_gtFine_instanceIds.png)")
    args = p.parse_args(argv)
    gt_files = sorted(str(f) for f in Path(args.cityscapes, "gtFine", args.split).glob("*/*_gtFine_labelIds.png"))
    if not gt_files:
        raise SystemExit(f"{Path(args.cityscapes, 'gtFine', args.split)}: no *_gtFine_labelIds.png files")
    if not Path(args.predictions).is_dir():
        raise SystemExit(f"{args.predictions}: no such folder")
    ev = _official_module()
    ev.args.predictionPath, ev.args.predictionWalk = str(Path(args.predictions).resolve()), None
    try:
        pred_files = [ev.getPrediction(ev.args, gt) for gt in gt_files]
    except SystemExit:  # it printed "ERROR: Found no prediction for ground truth ..."
        raise SystemExit(1) from None
    try:
        return official_evaluate(pred_files, gt_files, instances=not args.no_instances, quiet=False, json_out=args.out)
    except ValueError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    official_main()
