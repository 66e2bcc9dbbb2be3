"""`make shards`: pack a Cityscapes-layout folder (real or synthetic) into WebDataset tars for DALI.

    python -m frrn_dist.shards --root /data/cityscapes --out shards/cityscapes [--image-format png] [--splits train,val]

One sample per frame, key `<city>_<seq>_<frame>`, members `key.jpg` (or `key.png`), `key.label.png` (8-bit 'L'
train ids = ID_TO_TRAIN[labelIds]), `key.label.x2.png` and `key.label.x4.png` (the same map majority-voted down by
2 and 4, see `vote_down`), `key.instance.png` (the source 16-bit instanceIds, evaluation splits only) and
`key.json`, written by webdataset's own TarWriter. Samples are shuffled with --seed before writing (DALI's shuffle
is a local buffer and Cityscapes is sorted by city), shards roll over at --shard-size-mb, each tar gets a DALI
index (`v1.2`, the format of DALI's `wds2idx`, written while the tar is written) and manifest.json comes last.
Everything is written into `<out>.tmp-<pid>` and renamed to `<out>` when whole, so an interrupted run leaves no
folder that frrn_dist.data.manifest.read_manifest accepts. Output bytes depend on the input and the settings only
(not on the worker count), and a re-run with the same input and settings is detected from a source fingerprint
and skipped. The folder can then be copied to object storage or an HTTP server and read from there by
data.backend=stream (README, "Shards in S3, GCS or behind HTTP").

Imports: PIL, numpy, tqdm, frrn_dist.{data.labels, data.manifest, data.shardwriter}.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from frrn_dist.data.labels import CLASS_NAMES, ID_TO_TRAIN, IGNORE_INDEX, NUM_CLASSES, VALID_LABEL_IDS
from frrn_dist.data.manifest import FORMAT, MANIFEST_NAME
from frrn_dist.data.shardwriter import ShardWriter

PACKER = "frrn_dist.shards/3"  # bump when the bytes written for the same input change
# Whole-frame recipes shrink labels by these factors (FRRN-B, FRRN-A on 1024x2048); packing their votes once
# saves every training step a 2-megapixel PNG decode and the vote, ~20 ms of CPU per frame (BENCHMARKS.md).
LABEL_FACTORS = (2, 4)
SPLITS_WITHOUT_INSTANCES = ("train", "train_extra")  # training splits; every other one carries instance.png (iIoU)
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.(tar|idx)$")
_VALID_LABEL = np.zeros(256, bool)
_VALID_LABEL[sorted(VALID_LABEL_IDS)] = True


class InputError(ValueError):
    """A source folder or file that cannot be packed; the message names it."""


@dataclass(frozen=True)
class Frame:
    key: str  # <city>_<seq>_<frame>
    city: str
    image: Path
    label: Path
    instance: Path | None


# --------------------------------------------------------------------------------------------------------------------
# Finding and checking the source frames (main process, headers only: cheap)


def find_frames(root: Path, split: str, *, with_instances: bool) -> list[Frame]:
    """All frames of one split, sorted by key; raises InputError for a missing/empty split or an unpaired file."""
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not img_dir.is_dir():
        raise InputError(f"{img_dir}: missing (expected leftImg8bit/{split}/<city>/*_leftImg8bit.png)")
    images = {p.name[: -len("_leftImg8bit.png")]: p for p in img_dir.glob("*/*_leftImg8bit.png")}
    if not images:
        raise InputError(f"{img_dir}: no *_leftImg8bit.png images in split {split!r}")
    labels = {p.name[: -len("_gtFine_labelIds.png")]: p for p in gt_dir.glob("*/*_gtFine_labelIds.png")}
    frames = []
    for key in sorted(images):
        img = images[key]
        city = img.parent.name
        if "." in key or not key.startswith(city + "_"):
            raise InputError(f"{img}: name must be <city>_<seq>_<frame>_leftImg8bit.png without dots, city {city!r}")
        label = gt_dir / city / f"{key}_gtFine_labelIds.png"
        if key not in labels or labels[key] != label:
            raise InputError(f"{label}: missing, the label of {img}")
        instance = None
        if with_instances:
            instance = gt_dir / city / f"{key}_gtFine_instanceIds.png"
            if not instance.is_file():
                raise InputError(f"{instance}: missing, the instance ids of {img} (needed for iIoU on {split!r})")
        frames.append(Frame(key, city, img, label, instance))
    for key in sorted(set(labels) - set(images)):
        lab = labels[key]
        raise InputError(f"{img_dir / lab.parent.name / (key + '_leftImg8bit.png')}: missing, the image of {lab}")
    return frames


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(height, width), PIL mode from the PNG header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise InputError(f"{path}: not a PNG ({im.format})")
            return (im.height, im.width), im.mode
    except (OSError, SyntaxError) as e:
        raise InputError(f"{path}: unreadable PNG ({e})") from None


def check_frames(frames: Sequence[Frame], split: str) -> tuple[int, int]:
    """Check modes and that every image, label and instance file of the split has one size; return it (H, W)."""
    hw0, first = None, None
    for fr in frames:
        for path, modes in ((fr.image, ("RGB", "RGBA", "L")), (fr.label, ("L",)), (fr.instance, ("I;16", "I"))):
            if path is None:
                continue
            hw, mode = _header(path)
            if mode not in modes:
                raise InputError(f"{path}: PIL mode {mode!r}, expected one of {modes}")
            if hw0 is None:
                hw0, first = hw, path
            elif hw != hw0:
                raise InputError(
                    f"{path}: {hw[0]}x{hw[1]} but {first.name} is {hw0[0]}x{hw0[1]}; a split must have one size"
                )
    return hw0


# --------------------------------------------------------------------------------------------------------------------
# Encoding one sample (worker processes: decode, check, convert, encode)


def _open(path: Path, *, decode: bool) -> Image.Image:
    """Open a PNG; `decode` loads the pixels, otherwise verify() checks every chunk's CRC (a truncated or corrupt
    file fails either way; verify costs ~3 ms where decoding a 2048x1024 RGB PNG costs ~50 ms)."""
    try:
        if not decode:
            with Image.open(path) as im:
                im.verify()
        im = Image.open(path)
        if decode:
            im.load()
        return im
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: unreadable PNG ({e})") from None


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # level 3: ~16 ms for a 2048x1024 label (level 6: ~22 ms, 40% smaller, but labels are ~2% of a shard anyway)
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def vote_down(train_ids: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) uint8 -> (H/f, W/f): each f x f cell takes the value filling more than half of it, else 255.

    CHIANTI's rule, the one recipes.majority_vote applies on the fly (tests/test_shards.py checks this one against a
    plain per-cell count, tests/test_loaders.py the loaders' batches with and without it). Numpy, not torch: pack's
    forked workers stay clear of OpenMP.
    """
    H, W = train_ids.shape
    f = factor
    cells = train_ids.reshape(H // f, f, W // f, f).transpose(1, 3, 0, 2).reshape(f * f, H // f, W // f)
    candidate, count = cells[0].copy(), np.ones(cells.shape[1:], np.int16)
    for x in cells[1:]:  # Boyer-Moore: a value held by more than half the cell is the surviving candidate
        empty = count == 0
        candidate = np.where(empty, x, candidate)
        count = np.where(empty | (x == candidate), count + 1, count - 1)
    votes = (cells == candidate).sum(0)
    return np.where(2 * votes > f * f, candidate, IGNORE_INDEX).astype(np.uint8)


def label_factors_for(hw: tuple[int, int], factors: Sequence[int]) -> list[int]:
    """The factors (> 1) that divide a frame of size hw in both axes."""
    return sorted({f for f in factors if f > 1 and hw[0] % f == 0 and hw[1] % f == 0})


def encode_frame(job: tuple) -> tuple[str, list[tuple[str, bytes]], np.ndarray]:
    """-> (key, [(ext, bytes)...] in tar order, (256,) int64 pixel counts per train id)."""
    fr, root, split, image_format, jpeg_quality, label_factors = job
    passthrough = image_format == "png"
    img = _open(fr.image, decode=not passthrough)
    lab = _open(fr.label, decode=True)
    if img.size != lab.size:
        raise InputError(
            f"{fr.label}: {lab.height}x{lab.width} but its image {fr.image.name} is {img.height}x{img.width}"
        )
    label_ids = np.asarray(lab)
    if label_ids.max() > max(VALID_LABEL_IDS):  # ids 0..33 are all valid, so the max tells
        value = int(label_ids[~_VALID_LABEL[label_ids]][0])
        raise InputError(f"{fr.label}: label id {value} is not in the Cityscapes table (0..33)")
    train_ids = ID_TO_TRAIN[label_ids]
    # pixels per train id, from PIL's C histogram of the label ids (np.bincount would widen 2M bytes to int64)
    counts = np.bincount(ID_TO_TRAIN, weights=lab.histogram(), minlength=256).astype(np.int64)

    if passthrough and img.mode == "RGB":
        image_bytes = fr.image.read_bytes()  # lossless already: pass the source through untouched
    else:
        if passthrough:
            img.load()
        buf = io.BytesIO()
        rgb = img.convert("RGB") if img.mode != "RGB" else img
        if image_format == "png":
            rgb.save(buf, format="PNG", compress_level=3)
        else:
            rgb.save(buf, format="JPEG", quality=jpeg_quality)
        image_bytes = buf.getvalue()
    members = [(image_format, image_bytes), ("label.png", _png(train_ids))]
    for f in label_factors_for((lab.height, lab.width), label_factors):
        members.append((f"label.x{f}.png", _png(vote_down(train_ids, f))))
    meta = {
        "key": fr.key,
        "city": fr.city,
        "split": split,
        "image": fr.image.relative_to(root).as_posix(),
        "label": fr.label.relative_to(root).as_posix(),
        "height": img.height,
        "width": img.width,
    }
    if fr.instance is not None:
        inst = _open(fr.instance, decode=False)
        if inst.size != img.size:
            raise InputError(
                f"{fr.instance}: {inst.height}x{inst.width} but {fr.image.name} is {img.height}x{img.width}"
            )
        members.append(("instance.png", fr.instance.read_bytes()))  # 16-bit ids as the evaluator reads them
        meta["instance"] = fr.instance.relative_to(root).as_posix()
    members.append(("json", json.dumps(meta, sort_keys=True).encode()))
    return fr.key, members, counts


# --------------------------------------------------------------------------------------------------------------------
# The whole pack


def _fingerprint(root: Path, frames: dict[str, list[Frame]], settings: dict[str, Any]) -> str:
    """Hash of every source file's path, size and mtime plus the settings: equal means the output would be."""
    h = hashlib.sha256(json.dumps({"packer": PACKER, "settings": settings}, sort_keys=True).encode())
    for split in sorted(frames):
        for fr in frames[split]:
            for p in (fr.image, fr.label, fr.instance):
                if p is not None:
                    st = p.stat()
                    h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("source_fingerprint") != fingerprint:
        return None
    for info in manifest.get("splits", {}).values():
        for sh in info["shards"]:
            tar, idx = out / sh["tar"], out / sh["idx"]
            if not idx.is_file() or not tar.is_file() or tar.stat().st_size != sh["bytes"]:
                return None
    return manifest


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that holds anything but shards (it may be the dataset itself)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    strangers = [p.name for p in out.iterdir() if p.name != MANIFEST_NAME and not _SHARD_FILE.match(p.name)]
    if strangers:
        raise InputError(
            f"{out}: exists and holds files that are not shards (e.g. {strangers[0]}); choose another --out"
        )


def _remove_stale_tmp(out: Path) -> None:
    """Drop `<out>.tmp-<pid>` folders of runs that died (their pid is gone)."""
    for p in out.parent.glob(f"{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # someone else's live process


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork: no re-import of the caller's __main__ (spawn/forkserver would re-run an unguarded script), and the
    # workers only touch numpy and PIL, which glibc's fork handlers keep safe even if the caller has threads.
    # An executor, not mp.Pool: after a bad frame, Pool.terminate() can hang for good (it kills a worker holding
    # the result queue's lock, then waits on that lock: seen in the suite); shutdown(cancel_futures=True) drops
    # the queued frames and waits for the few being encoded.
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))


def pack(
    root: str | Path,
    out: str | Path,
    *,
    splits: Sequence[str] = ("train", "val"),
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    shard_size_mb: float = 400,
    seed: int = 0,
    workers: int | None = None,
    force: bool = False,
    label_factors: Sequence[int] = LABEL_FACTORS,
) -> dict[str, Any]:
    """Pack `root` (leftImg8bit/, gtFine/) into WebDataset shards under `out`; return the manifest.

    label_factors: also store each frame's labels majority-voted down by these factors (those dividing the
    frame), which whole-frame recipes at that factor read instead of voting the full map every step.

    Raises InputError (a ValueError) naming the file for bad input, before anything is left in `out`.
    """
    root, out = Path(root), Path(out)
    _check_pack_args(root, out, splits, image_format, jpeg_quality, shard_size_mb)
    if any(int(f) < 1 for f in label_factors):
        raise InputError(f"label_factors={list(label_factors)}: factors must be >= 1")
    frames = {s: find_frames(root, s, with_instances=s not in SPLITS_WITHOUT_INSTANCES) for s in splits}
    settings = {
        "image_format": image_format,
        "jpeg_quality": jpeg_quality if image_format == "jpg" else None,
        "seed": seed,
        "shard_size_mb": shard_size_mb,
        "splits": list(splits),
        "label_factors": sorted(set(label_factors)),
    }
    fingerprint = _fingerprint(root, frames, settings)
    if not force and (manifest := _up_to_date(out, fingerprint)) is not None:
        print(f"{out}: up to date (same input and settings as its manifest.json), nothing to do")
        return manifest
    sizes = {s: check_frames(frames[s], s) for s in splits}

    _remove_stale_tmp(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = max(1, min(workers or os.cpu_count() or 1, max(len(f) for f in frames.values())))
    pool = _pool(workers) if workers > 1 else None
    writer = None
    try:
        split_entries = {}
        for split in splits:
            writer = ShardWriter(tmp, split, int(shard_size_mb * 1e6))
            split_entries[split] = _pack_split(
                writer, pool, root, split, frames[split], sizes[split], image_format, jpeg_quality, seed,
                settings["label_factors"],
            )  # fmt: skip
        manifest = {
            "format": FORMAT,
            "packer": PACKER,
            "settings": settings,
            "source_root": str(root.resolve()),
            "source_fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "num_classes": NUM_CLASSES,
            "ignore_index": IGNORE_INDEX,
            "class_names": CLASS_NAMES,
            "splits": split_entries,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")  # last: the folder is whole now
        _publish(tmp, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
    return manifest


def _check_pack_args(
    root: Path, out: Path, splits: Sequence[str], image_format: str, jpeg_quality: int, shard_size_mb: float
) -> None:
    """InputError for settings that cannot be packed, a missing root, or an `out` that is not a shard folder."""
    if image_format not in ("jpg", "png"):
        raise InputError(f"image_format={image_format!r}: must be 'jpg' or 'png'")
    if not 1 <= jpeg_quality <= 100:
        raise InputError(f"jpeg_quality={jpeg_quality}: must be 1..100")
    if shard_size_mb <= 0:
        raise InputError(f"shard_size_mb={shard_size_mb}: must be > 0")
    if not splits or len(set(splits)) != len(splits):
        raise InputError(f"splits={list(splits)}: need distinct split names")
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (the Cityscapes root with leftImg8bit/ and gtFine/)")
    _check_out(out)


def _pack_split(
    writer: ShardWriter,
    pool,
    root: Path,
    split: str,
    frames: list[Frame],
    hw: tuple[int, int],
    image_format: str,
    jpeg_quality: int,
    seed: int,
    label_factors: list[int],
) -> dict[str, Any]:
    """Encode one split's frames (in `pool` if there is one) into `writer`'s tars; return its manifest entry."""
    # shuffle the sample order: DALI reads each rank's slice in order through a small shuffle buffer
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(frames))
    jobs = [(frames[i], root, split, image_format, jpeg_quality, label_factors) for i in order]
    pixels = np.zeros(256, np.int64)
    results = pool.map(encode_frame, jobs) if pool else map(encode_frame, jobs)
    for key, members, counts in tqdm(results, total=len(jobs), desc=f"pack {split}", unit="frame"):
        writer.write(key, members)
        pixels += counts
    shards = writer.close()
    components = [image_format, "label.png"] + [f"label.x{f}.png" for f in label_factors_for(hw, label_factors)]
    components += [] if frames[0].instance is None else ["instance.png"]
    return {
        "num_samples": len(jobs),
        "height": hw[0],
        "width": hw[1],
        "components": components + ["json"],
        "cities": sorted({fr.city for fr in frames}),
        "class_pixels": [int(c) for c in pixels[:NUM_CLASSES]],
        "ignore_pixels": int(pixels[IGNORE_INDEX]),
        "bytes": sum(sh["bytes"] for sh in shards),
        "shards": shards,
    }


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an older shard folder there (checked by _check_out) is swapped out
    first, then dropped, so `out` is never a half-written folder."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m frrn_dist.shards",
        description="Pack a Cityscapes-layout folder (leftImg8bit/, gtFine/ with *_labelIds.png and, for "
        "evaluation splits, *_instanceIds.png) into shuffled WebDataset tar shards with DALI indexes and a "
        "manifest.json, for frrn_dist's loaders. Re-running on the same input with the same settings does nothing.",
    )
    ap.add_argument("--root", required=True, help="Cityscapes root (real download or `python -m frrn_dist.synthetic`)")
    ap.add_argument("--out", required=True, help="output shard folder (replaced when whole; must hold only shards)")
    ap.add_argument("--splits", default="train,val", help="comma-separated splits to pack (default: train,val)")
    ap.add_argument("--image-format", choices=("jpg", "png"), default="jpg",
                    help="jpg (default): GPU-decodable by nvJPEG; png: lossless, decoded on the CPU")  # fmt: skip
    ap.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality, 1..100 (default: 95)")
    ap.add_argument(
        "--shard-size-mb", type=float, default=400, help="roll over to a new tar at this size (default: 400)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle (default: 0)")
    ap.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    ap.add_argument("--force", action="store_true", help="repack even when the output is up to date")
    ap.add_argument("--label-factors", default=",".join(map(str, LABEL_FACTORS)),
                    help="also store labels majority-voted down by these factors, read by whole-frame recipes at "
                         "that factor instead of voting every step (default: 2,4; '' for none)")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        label_factors = [int(f) for f in args.label_factors.split(",") if f.strip()]
    except ValueError:
        raise SystemExit(f"error: --label-factors {args.label_factors!r}: expected integers like 2,4") from None
    splits = [s for s in args.splits.split(",") if s]
    t0 = time.perf_counter()
    try:
        manifest = pack(args.root, args.out, splits=splits, image_format=args.image_format,
                        jpeg_quality=args.jpeg_quality, shard_size_mb=args.shard_size_mb, seed=args.seed,
                        workers=args.workers, force=args.force, label_factors=label_factors)  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_samples']} samples {info['height']}x{info['width']} in {len(info['shards'])} "
              f"shards, {info['bytes'] / 1e6:.1f} MB")  # fmt: skip
    print(f"{args.out}: done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
