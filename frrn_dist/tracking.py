"""What a run leaves for people to look at: wandb (rank 0) and plain files in the run folder.

Files (always, rank 0): metrics.jsonl (one JSON per log line), samples/*.png (image | ground truth | prediction),
curves.png (loss and mIoU). wandb: online when logged in, else offline (`wandb sync` later); any wandb failure
turns it off with a warning, never the training. Other ranks get a Tracker whose methods do nothing, so the loop
has no rank checks.

Imports: PIL, numpy, torch, wandb, frrn_dist.{data.labels, visualize}.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from frrn_dist.data.labels import CLASS_NAMES, IGNORE_INDEX
from frrn_dist.visualize import overlay, plot_run_curves

log = logging.getLogger("frrn_dist")
CLASS_LABELS = {**dict(enumerate(CLASS_NAMES)), IGNORE_INDEX: "ignore"}


def _to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl (a resumed run appends; later records of a step win when plotting)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Tracker:
    """Rank 0's record of a run; inactive (every method a no-op) on other ranks."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        active: bool,
        use_wandb: bool,
        mode: str,
        project: str,
        entity: str | None,
        group: str | None,
        tags: list[str],
        name: str,
        config: dict[str, Any],
        run_id: str | None,
    ) -> None:
        self.active = active
        self.run_dir = Path(run_dir)
        self.run = None
        self.run_id = run_id or uuid.uuid4().hex[:8]
        if not active:
            return
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        if use_wandb:
            self.run = self._start_wandb(mode, project, entity, group, tags, name, config)

    def _start_wandb(self, mode, project, entity, group, tags, name, config):
        try:
            import wandb

            if mode == "auto":
                mode = "online" if wandb.login(prompt=False, verify=False) else "offline"
            # A resumed run keeps its id: online it continues the same run; offline wandb writes a second
            # offline-run-*-<id> folder that `wandb sync` uploads into the same run.
            run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                tags=tags or None,
                name=name,
                id=self.run_id,
                resume="allow",
                config=config,
                dir=str(self.run_dir),
                mode=mode,
            )
            run.define_metric("train/step")
            run.define_metric("train/*", step_metric="train/step")
            run.define_metric("perf/*", step_metric="train/step")
            run.define_metric("val/epoch")
            run.define_metric("val/*", step_metric="val/epoch")
            where = (
                f"offline in {run.dir}, upload with `wandb sync {Path(run.dir).parent}`"
                if mode == "offline"
                else run.url
            )
            log.info(f"wandb run {self.run_id} ({mode}): {where}")
            return run
        except Exception as e:  # noqa: BLE001 - wandb must never stop training
            log.warning(f"wandb disabled ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return None

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _wandb_log(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(values)
        except Exception as e:  # noqa: BLE001
            log.warning(f"wandb logging failed, turning wandb off: {e}")
            self.run = None

    def log_train(self, step: int, values: dict[str, float]) -> None:
        """Scalars at an optimizer step: loss, lr, epoch (as train/<key>) and perf/<key> as they are."""
        if not self.active:
            return
        self._append({"kind": "train", "step": step, **values})
        named = {k if k.startswith("perf/") else f"train/{k}": v for k, v in values.items()}
        self._wandb_log({"train/step": step, **named})

    def log_val(self, step: int, epoch: int, results: dict[str, Any], samples: list) -> None:
        """Validation scores and sample predictions (image, prediction, label, key)."""
        if not self.active:
            return
        class_iou = {k: (None if v is None or math.isnan(v) else v) for k, v in results["class_iou"].items()}
        self._append(
            {
                "kind": "val",
                "step": step,
                "epoch": epoch,
                "miou": results["miou"],
                "loss": results["loss"],
                "class_iou": class_iou,
            }
        )
        pictures = []
        for i, (image, pred, label, key) in enumerate(samples):
            rgb, pred_np, label_np = _to_uint8_image(image), pred.byte().numpy(), label.byte().numpy()
            strip = np.concatenate([rgb, overlay(rgb, label_np), overlay(rgb, pred_np)], axis=1)
            Image.fromarray(strip).save(self.run_dir / "samples" / f"step{step:08d}_{i}_{key}.png")
            pictures.append((key, rgb, pred_np, label_np))
        plot_run_curves(read_metrics(self.run_dir), self.run_dir / "curves.png", title=self.run_dir.name)
        if self.run is None:
            return
        import wandb

        images = [
            wandb.Image(
                rgb,
                caption=key,
                masks={
                    "predictions": {"mask_data": pred_np, "class_labels": CLASS_LABELS},
                    "ground_truth": {"mask_data": label_np, "class_labels": CLASS_LABELS},
                },
            )
            for key, rgb, pred_np, label_np in pictures
        ]
        values = {"val/epoch": epoch, "val/step": step, "val/miou": results["miou"], "val/loss": results["loss"]}
        values.update({f"val/iou/{k}": v for k, v in class_iou.items() if v is not None})
        if images:
            values["val/samples"] = images
        self._wandb_log(values)

    def close(self) -> None:
        """Flush wandb (offline runs are complete on disk after this)."""
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning(f"wandb finish failed: {e}")
            self.run = None
