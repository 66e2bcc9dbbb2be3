"""The synthetic dataset on disk: frames drawn by layout.draw_scene, written in the official Cityscapes layout
(leftImg8bit/, gtFine/ with labelIds, instanceIds and color PNGs) with a synthetic.json marker, plus the CLI.

Imports: numpy, PIL, tqdm, frrn_dist.data.labels, frrn_dist.synthetic.layout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from frrn_dist.data.labels import ID_COLORS
from frrn_dist.synthetic.layout import draw_scene

TRAIN_CITIES = (
    "aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg", "hanover",
    "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen", "ulm", "weimar", "zurich",
)  # fmt: skip
VAL_CITIES = ("frankfurt", "lindau", "munster")
MARKER_NAME = "synthetic.json"  # parameters, and "complete": true once every frame is written
GENERATOR = "frrn_dist.synthetic/1"  # bump when the drawing changes, so old datasets are redrawn, not reused
FRAME_ID = 19  # Cityscapes annotates the 20th frame of every 30-frame snippet: <city>_<seq>_000019


def _frame_seed(seed: int, split: str, index: int) -> int:
    """A scene seed from (seed, split, index): independent of worker count and of the other frames."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]).generate_state(1)[0])


def _frames(split: str, num: int, cities: Sequence[str]) -> list[tuple[str, str, int]]:
    """(split, city, seq) for every frame: round-robin over the cities, seq counting per city."""
    return [(split, cities[i % len(cities)], i // len(cities)) for i in range(num)]


def _save_png(img: Image.Image, path: Path, compress_level: int) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    img.save(tmp, format="PNG", compress_level=compress_level)
    os.replace(tmp, path)  # a file either is whole or is not there


def _write_frame(job: tuple) -> None:
    out, split, city, seq, index, seed, hw = job
    rgb, label_ids, instance_ids = draw_scene(_frame_seed(seed, split, index), hw)
    stem = f"{city}_{seq:06d}_{FRAME_ID:06d}"
    img_dir, gt_dir = out / "leftImg8bit" / split / city, out / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    # compress_level 1: zlib at level 6 costs ~3x the drawing time on a noisy 2048x1024 frame for ~15% smaller files
    _save_png(Image.fromarray(rgb, "RGB"), img_dir / f"{stem}_leftImg8bit.png", 1)
    _save_png(Image.fromarray(label_ids, "L"), gt_dir / f"{stem}_gtFine_labelIds.png", 6)
    _save_png(Image.fromarray(instance_ids), gt_dir / f"{stem}_gtFine_instanceIds.png", 6)  # uint16 -> 'I;16'
    color = np.concatenate([ID_COLORS[label_ids], np.full(label_ids.shape + (1,), 255, np.uint8)], axis=2)
    _save_png(Image.fromarray(color, "RGBA"), gt_dir / f"{stem}_gtFine_color.png", 6)  # RGBA like json2labelImg


def make_dataset(
    out: str | Path,
    *,
    hw: tuple[int, int] = (1024, 2048),
    num_train: int = 30,
    num_val: int = 10,
    num_train_cities: int = 3,
    num_val_cities: int = 1,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write a synthetic Cityscapes-layout dataset under `out` and return its path.

    Deterministic for (seed, split, index) whatever the worker count. A folder already holding the same dataset
    (its synthetic.json matches) is left as is; one holding a different synthetic dataset is redrawn; any other
    non-empty folder is refused, so this never writes into a real Cityscapes download.
    """
    out = Path(out)
    height, width = hw
    if height < 16 or width < 16:
        raise ValueError(f"hw={hw}: frames must be at least 16x16")
    if not 1 <= num_train_cities <= len(TRAIN_CITIES):
        raise ValueError(f"num_train_cities={num_train_cities}: must be 1..{len(TRAIN_CITIES)}")
    if not 1 <= num_val_cities <= len(VAL_CITIES):
        raise ValueError(f"num_val_cities={num_val_cities}: must be 1..{len(VAL_CITIES)}")
    if num_train < 0 or num_val < 0 or num_train + num_val == 0:
        raise ValueError(f"num_train={num_train}, num_val={num_val}: need at least one frame")
    params = {
        "generator": GENERATOR,
        "hw": [height, width],
        "num_train": num_train,
        "num_val": num_val,
        "train_cities": list(TRAIN_CITIES[:num_train_cities]),
        "val_cities": list(VAL_CITIES[:num_val_cities]),
        "seed": seed,
    }
    marker = out / MARKER_NAME
    if marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("params") == params and old.get("complete"):
            print(f"{out}: synthetic dataset already there with these parameters, nothing to do")
            return out
        # other parameters, or a run that was interrupted: redraw from scratch
        for sub in ("leftImg8bit", "gtFine"):
            shutil.rmtree(out / sub, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists, is not empty and is not a synthetic dataset (no {MARKER_NAME}); refusing")
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, params, complete=False)  # claims the folder first, so an interrupted run is redrawn

    jobs = [
        (out, split, city, seq, i, seed, (height, width))
        for split, n, cities in (("train", num_train, params["train_cities"]), ("val", num_val, params["val_cities"]))
        for i, (split, city, seq) in enumerate(_frames(split, n, cities))
    ]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=len(jobs), desc=f"synthetic {height}x{width}", unit="frame")
    if workers == 1:
        for job in jobs:
            _write_frame(job)
            bar.update()
    else:
        # fork, not spawn: an unguarded calling script is not re-run in every worker. An executor, not mp.Pool,
        # whose exit after an error (terminate) can hang for good on a lock a killed worker held.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for _ in pool.map(_write_frame, jobs):
                bar.update()
    bar.close()
    _write_marker(marker, params, complete=True)
    return out


def _write_marker(marker: Path, params: dict, *, complete: bool) -> None:
    tmp = marker.with_name(MARKER_NAME + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"complete": complete, "params": params}, indent=2) + "\n")
    os.replace(tmp, marker)


def parse_hw(text: str) -> tuple[int, int]:
    """'1024x2048' -> (1024, 2048); raises ValueError naming the text otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m[1]) < 16 or int(m[2]) < 16:
        raise ValueError(f"--hw: {text!r} is not HxW (e.g. 1024x2048, each side >= 16)")
    return int(m[1]), int(m[2])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m frrn_dist.synthetic",
        description="Write a synthetic Cityscapes dataset (leftImg8bit/, gtFine/ with labelIds, instanceIds and "
        "color PNGs, official names) of procedurally drawn street scenes containing all 19 evaluated classes. "
        "Deterministic for --seed; re-running with the same arguments does nothing.",
    )
    ap.add_argument("--out", required=True, help="output folder (created; must be empty or a synthetic dataset)")
    ap.add_argument("--hw", default="1024x2048", help="frame size HxW (default: 1024x2048, Cityscapes' own)")
    ap.add_argument("--train", type=int, default=30, help="number of train frames (default: 30)")
    ap.add_argument("--val", type=int, default=10, help="number of val frames (default: 10)")
    ap.add_argument("--train-cities", type=int, default=3, help=f"train cities, 1..{len(TRAIN_CITIES)} (default: 3)")
    ap.add_argument("--val-cities", type=int, default=1, help=f"val cities, 1..{len(VAL_CITIES)} (default: 1)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    args = ap.parse_args(argv)
    try:
        hw = parse_hw(args.hw)
        t0 = time.perf_counter()
        out = make_dataset(args.out, hw=hw, num_train=args.train, num_val=args.val,
                           num_train_cities=args.train_cities, num_val_cities=args.val_cities, seed=args.seed,
                           workers=args.workers)  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{out}: {args.train} train + {args.val} val frames at {hw[0]}x{hw[1]} ({time.perf_counter() - t0:.1f} s)")
