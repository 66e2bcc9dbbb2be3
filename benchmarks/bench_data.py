"""Decode + augment throughput of the data loaders on full-resolution frames, per CPU core, for both recipes.

    python benchmarks/bench_data.py [--frames 16] [--hw 1024x2048] [--epochs 2] [--recipes paper,seed] [--keep DIR]

Makes full-resolution synthetic Cityscapes frames (frrn_dist.synthetic), packs them as JPEG q95 shards (with the
packed label votes, the default; once more without them) and as lossless-PNG shards (frrn_dist.shards), then, in
this one process and one after the other, runs each recipe at a quarter of the frame size per axis:

  paper  whole frame, anti-aliased Lanczos /4, majority-vote labels, translation +-30 px, gamma
  seed   a random half-height, half-width crop (a quarter of the frame), Lanczos /2, vote /2, flip, gamma

with:

  dali-cpu            build_loader(backend="dali") over the JPEG shards, DALI CPU decoder, num_threads=1
  dali-cpu (no vote)  the same over shards packed without label votes (the full label map decoded and voted)
  dali-cpu (png)      the same over the PNG shards (what the JPEG transcode buys)
  fallback            build_loader(backend="torch") over the JPEG shards, in-process (PIL + the same torch recipe)
  stream (files)      build_loader(backend="stream") over the JPEG shard folder: tars read as streams, in-process
  stream (http)       the same through http://127.0.0.1 (http.server in a thread of this process: its CPU counts)
  png-baseline        what existing FRRN ports do: PIL reads the leftImg8bit / gtFine PNG folders, labelIds ->
                      trainIds by a LUT, PIL Lanczos, the authors' numpy histogram vote, np.pad reflect (paper) or
                      a crop and np flip (seed), np.power gamma

then breaks the DALI CPU path down per stage (benchmarks/data_stages.py): read, image decode, downscale, label
decode, finish_batch, before and after the region-of-interest decode and the packed votes.

Every backend runs on one core (DALI with one worker thread, torch and BLAS with one thread), so images per
CPU-second (user + system time of this process, all its threads) is the per-core figure; wall-clock images/s is
printed beside it (other users of the machine show up there, and in the load average). The GPU-decode path
(device="mixed", nvJPEG) cannot run here and is printed as not measured.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_seconds, machine_line
from data_stages import print_stages
from PIL import Image

from frrn_dist.data.labels import ID_TO_TRAIN, IGNORE_INDEX
from frrn_dist.data.loaders import build_loader
from frrn_dist.data.recipes import gamma_exponent, majority_vote, make_recipe
from frrn_dist.shards import pack
from frrn_dist.synthetic import make_dataset, parse_hw

TARGET_RATIO = 3.0  # issue 11: DALI CPU per core >= 3x the plain PIL loader, both recipes


# ---------------------------------------------------------------------------------------------------------------
# the PNG-folder baseline: one frame at a time, PIL + numpy


def baseline_vote(label: np.ndarray, f: int) -> np.ndarray:
    """Majority vote the way the authors' Python port did it (ORIG-2016 cityscapesutil.downscale_labels: a
    per-cell class histogram filled by fancy indexing, one pass per cell offset), with CHIANTI's threshold."""
    h, w = label.shape[0] // f, label.shape[1] // f
    bins = np.where(label == IGNORE_INDEX, 19, label)  # void is bin 19 and counts like a class
    counts = np.zeros((h, w, 20), np.int32)
    my, mx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for dy in range(f):
        for dx in range(f):
            counts[my, mx, bins[dy::f, dx::f]] += 1
    best = counts.argmax(2)
    out = np.where(best == 19, IGNORE_INDEX, best).astype(np.uint8)
    out[2 * np.take_along_axis(counts, best[..., None], 2)[..., 0] <= f * f] = IGNORE_INDEX
    return out


def baseline_sample(image_path: Path, label_path: Path, rng: np.random.Generator, *, input_hw, translate_px, gamma_z):
    h, w = input_hw
    image = Image.open(image_path).convert("RGB")
    label = ID_TO_TRAIN[np.asarray(Image.open(label_path))]
    f = label.shape[0] // h
    x = np.asarray(image.resize((w, h), Image.LANCZOS), np.float32) / 255.0
    y = baseline_vote(label, f)
    dy, dx = rng.integers(-translate_px, translate_px + 1, 2)
    pad = ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)))
    x = np.pad(x, pad + ((0, 0),), mode="reflect")[max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]
    y = np.pad(y, pad, constant_values=IGNORE_INDEX)[max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]
    x = np.power(x, np.float32(gamma_exponent(rng.uniform(-gamma_z, gamma_z))))
    return x.transpose(2, 0, 1), y.astype(np.int64)


def baseline_seed_sample(image_path: Path, label_path: Path, rng: np.random.Generator, *, input_hw, gamma_z, **_):
    """The seed recipe as a plain loader does it: crop a (2h, 2w) region at a random corner, halve, flip, gamma."""
    h, w = input_hw
    image = Image.open(image_path).convert("RGB")
    label = ID_TO_TRAIN[np.asarray(Image.open(label_path))]
    y0, x0 = rng.integers(0, label.shape[0] - 2 * h + 1), rng.integers(0, label.shape[1] - 2 * w + 1)
    x = np.asarray(image.crop((x0, y0, x0 + 2 * w, y0 + 2 * h)).resize((w, h), Image.LANCZOS), np.float32) / 255.0
    y = baseline_vote(np.ascontiguousarray(label[y0 : y0 + 2 * h, x0 : x0 + 2 * w]), 2)
    if rng.integers(0, 2):
        x, y = x[:, ::-1], y[:, ::-1]
    x = np.power(x, np.float32(gamma_exponent(rng.uniform(-gamma_z, gamma_z))))
    return x.transpose(2, 0, 1), y.astype(np.int64)


def run_baseline(root: Path, epochs: int, recipe_name: str, **recipe) -> tuple[int, float, float]:
    images = sorted((root / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
    pairs = [
        (p, root / "gtFine" / "train" / p.parent.name / p.name.replace("_leftImg8bit", "_gtFine_labelIds"))
        for p in images
    ]
    rng = np.random.default_rng(0)
    sample = baseline_seed_sample if recipe_name == "seed" else baseline_sample
    sample(*pairs[0], rng, **recipe)  # warm-up (imports, first allocations)
    n, wall, cpu = 0, time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        for order in rng.permutation(len(pairs)):
            sample(*pairs[order], rng, **recipe)
            n += 1
    return n, time.perf_counter() - wall, cpu_seconds() - cpu


def run_loader(shards, backend: str, epochs: int, recipe_name: str, **recipe) -> tuple[int, float, float]:
    loader = build_loader(
        shards, "train", backend=backend, recipe=recipe_name, micro_batch_size=1,
        num_threads=1 if backend == "dali" else 0, **recipe,
    )  # fmt: skip
    for _ in loader:  # warm-up epoch: pipeline construction, first allocations, page cache
        pass
    n, wall, cpu = 0, time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        for batch in loader:
            n += len(batch)
    return n, time.perf_counter() - wall, cpu_seconds() - cpu


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(folder: Path) -> http.server.ThreadingHTTPServer:
    """`folder` over HTTP on a free loopback port, from a thread of this process (plain GETs, no Range)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_shards(work: Path, frames: int, hw: tuple[int, int]) -> tuple[Path, dict[str, Path]]:
    t = time.perf_counter()
    root = make_dataset(work / "synthetic", hw=hw, num_train=frames, num_val=0, num_train_cities=2, seed=0)
    shards = {"jpg": work / "shards-jpg", "jpg (no vote)": work / "shards-jpg-novote", "png": work / "shards-png"}
    pack(root, shards["jpg"], splits=("train",), image_format="jpg", jpeg_quality=95, seed=0)
    pack(
        root, shards["jpg (no vote)"], splits=("train",), image_format="jpg", jpeg_quality=95, seed=0, label_factors=()
    )
    pack(root, shards["png"], splits=("train",), image_format="png", seed=0)
    print(f"data: {frames} synthetic {hw[0]}x{hw[1]} frames ({time.perf_counter() - t:.0f} s to make and pack)")
    mb = lambda paths: sum(p.stat().st_size for p in paths) / 1e6 / frames
    print(f"  source PNG {mb((root / 'leftImg8bit' / 'train').rglob('*.png')):.1f} MB/frame; shards, MB/frame: "
          + ", ".join(f"{name} {mb(d.glob('*.tar')):.2f}" for name, d in shards.items()))  # fmt: skip
    # Same work on both sides: the baseline's vote gives the loaders' labels (checked on one frame).
    label = ID_TO_TRAIN[np.asarray(Image.open(next((root / "gtFine" / "train").rglob("*_labelIds.png"))))]
    assert np.array_equal(baseline_vote(label, 4), majority_vote(torch.from_numpy(label)[None], 4)[0].numpy())
    return root, shards


def bench_recipe(name: str, root: Path, shards: dict[str, Path], url: str, hw, epochs: int, frames: int, rounds: int):
    """Print the backend table, the ratios and the stage table of one recipe; return dali-cpu / png-baseline."""
    input_hw = (hw[0] // 4, hw[1] // 4)
    recipe = dict(recipe_name=name, input_hw=input_hw, translate_px=30, gamma_z=0.05)
    plan = make_recipe(name, source_hw=hw, input_hw=input_hw, translate_px=30, gamma_z=0.05)
    what = "Lanczos /4, majority vote, translate +-30, gamma 0.05" if name == "paper" else (
        f"{plan.region_hw[0]}x{plan.region_hw[1]} crop, Lanczos /2, vote /2, flip, gamma 0.05")  # fmt: skip
    print(f"\nrecipe: {name} at {input_hw[0]}x{input_hw[1]} ({what}), {epochs} timed epochs after one warm-up, "
          "micro-batch 1, one core each")  # fmt: skip
    rows = [
        ("dali-cpu", lambda: run_loader(shards["jpg"], "dali", epochs, **recipe)),
        ("dali-cpu (no vote)", lambda: run_loader(shards["jpg (no vote)"], "dali", epochs, **recipe)),
        ("dali-cpu (png)", lambda: run_loader(shards["png"], "dali", epochs, **recipe)),
        ("fallback", lambda: run_loader(shards["jpg"], "torch", epochs, **recipe)),
        ("stream (files)", lambda: run_loader(shards["jpg"], "stream", epochs, **recipe)),
        ("stream (http)", lambda: run_loader(url, "stream", epochs, **recipe)),
        ("png-baseline", lambda: run_baseline(root, epochs, **recipe)),
    ]
    results = {}
    print(f"{'backend':<20}{'images':>8}{'img/s wall':>12}{'img/CPU-s':>12}{'ms CPU/img':>12}")
    for row, run in rows:
        n, wall, cpu = run()
        results[row] = n / cpu
        print(f"{row:<20}{n:>8}{n / wall:>12.2f}{n / cpu:>12.2f}{1e3 * cpu / n:>12.1f}")
    print(f"{'dali-gpu':<20}    not measured here (no GPU here; device='cuda' decodes the JPEGs with nvJPEG)")

    # The headline pair again, alternated, medians: on a shared machine one pass of each drifts by +-10%.
    ms = {"dali-cpu": [1e3 / results["dali-cpu"]], "png-baseline": [1e3 / results["png-baseline"]]}
    for _ in range(rounds - 1):
        for row in ms:
            n, _, cpu = dict(rows)[row]()
            ms[row].append(1e3 * cpu / n)
    dali_ms, base_ms = (statistics.median(v) for v in ms.values())
    ratio = base_ms / dali_ms
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    spread = lambda v: f"{min(v):.1f}-{max(v):.1f}"
    print(f"per core ({name}), median of {rounds} alternated rounds: dali-cpu {dali_ms:.1f} ms CPU/img "
          f"({spread(ms['dali-cpu'])}), png-baseline {base_ms:.1f} ({spread(ms['png-baseline'])}): "
          f"{ratio:.2f}x (target >= {TARGET_RATIO:.1f}x: {verdict})")  # fmt: skip
    print(f"per core ({name}): fallback / png-baseline = {results['fallback'] / results['png-baseline']:.2f}x; "
          f"dali-cpu jpg / png shards = {results['dali-cpu'] / results['dali-cpu (png)']:.2f}x")  # fmt: skip
    print(f"per core ({name}): packed votes / voting every step = "
          f"{results['dali-cpu'] / results['dali-cpu (no vote)']:.2f}x")  # fmt: skip
    files, http_ = results["stream (files)"], results["stream (http)"]
    print(f"per core ({name}): stream (files) / fallback = {files / results['fallback']:.2f}x; "
          f"stream (http) / stream (files) = {http_ / files:.2f}x")  # fmt: skip
    print_stages(shards["jpg"], "jpg", plan, f"label.x{plan.factor}.png", frames, epochs)
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16, help="full-resolution train frames to make")
    ap.add_argument("--hw", default="1024x2048", help="frame size HxW (the input is a quarter of it per axis)")
    ap.add_argument("--epochs", type=int, default=2, help="timed passes over the frames per backend")
    ap.add_argument("--recipes", default="paper,seed", help="comma-separated recipes to run (paper, seed)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of dali-cpu vs png-baseline (median)")
    ap.add_argument("--keep", default=None, help="make (or reuse) the dataset and shards in this folder")
    args = ap.parse_args()
    hw = parse_hw(args.hw)
    recipes = [r for r in args.recipes.split(",") if r]
    if bad := [r for r in recipes if r not in ("paper", "seed")]:
        raise SystemExit(f"error: --recipes {bad[0]!r}: expected paper or seed")
    torch.set_num_threads(1)  # one core per backend

    print(machine_line() + " (shared machines: wall figures include other users)")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        root, shards = make_shards(work, args.frames, hw)
        server = serve(shards["jpg"])
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        ratios = {r: bench_recipe(r, root, shards, url, hw, args.epochs, args.frames, args.rounds) for r in recipes}
        server.shutdown()
        print("\nper core, dali-cpu / png-baseline: " + ", ".join(f"{r} {v:.2f}x" for r, v in ratios.items())
              + f" (target >= {TARGET_RATIO:.1f}x on both)")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
