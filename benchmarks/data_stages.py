"""The DALI CPU loader's cost per image, stage by stage, the way it ran before and the way it runs now.

Used by bench_data.py. Each stage is timed as its own small DALI pipeline (one thread, micro-batch 1, the same
shards and operators as frrn_dist/data/dali.py) and reported as CPU milliseconds per image over the reader's own
cost; `finish_batch` is timed in torch on real decoded labels. The two columns:

  before  the whole frame decoded then sliced (seed: a corner anywhere), the 2-megapixel label.png decoded and
          voted every step
  now     the label vote packed into the shards (label.x<f>.png, frrn_dist.shards) decoded instead, nothing left
          to vote; seed: only the crop's region decoded (dali.decode_region), the corner on the f grid so the
          crop's label is its region of label.x2.png

Imports: numpy, torch, nvidia.dali, frrn_dist.data.{dali, manifest, recipes}.
"""

from __future__ import annotations

import numpy as np
import torch
from common import cpu_seconds
from nvidia.dali import fn, pipeline_def, types

from frrn_dist.data.dali import decode_region
from frrn_dist.data.manifest import split_files
from frrn_dist.data.recipes import Recipe, draw_params, finish_batch

LANCZOS = dict(interp_type=types.INTERP_LANCZOS3, antialias=True, dtype=types.UINT8)


def _cpu_ms(tars, idxs, exts, build, frames: int, epochs: int, outputs: bool = False):
    """CPU ms per image of a pipeline reading `exts` and running `build(*members)`; its outputs if asked."""

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=0, prefetch_queue_depth=1)
    def pipe():
        read = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=exts, missing_component_behavior="error")
        return build(*(read if len(exts) > 1 else [read]))

    p = pipe()
    p.build()
    for _ in range(frames):  # warm-up: allocations, page cache
        p.run()
    start, kept = cpu_seconds(), []
    for _ in range(frames * epochs):
        out = p.run()
        if outputs and len(kept) < frames:
            kept.append([np.array(o[0]) for o in out])
    ms = 1e3 * (cpu_seconds() - start) / (frames * epochs)
    return (ms, kept) if outputs else ms


def _corner(recipe: Recipe, step: int = 1):
    """A random crop corner in units of `step` pixels: any pixel (1) or a cell of the f grid (f, as dali.py)."""
    (H, W), (rh, rw) = recipe.source_hw, recipe.region_hw
    y = fn.random.uniform(values=list(range((H - rh) // step + 1)), dtype=types.INT32)
    x = fn.random.uniform(values=list(range((W - rw) // step + 1)), dtype=types.INT32)
    return fn.stack(y, x)


def _decode_paths(recipe: Recipe, output_type, packed: bool = False):
    """(before, now) decode graphs: the whole frame decoded then cut vs only the region decoded (seed recipe:
    of the frame, or of the packed vote when `packed`); whole frames are decoded whole either way."""
    (rh, rw), (h, w), f = recipe.region_hw, recipe.input_hw, recipe.factor
    whole = lambda e: fn.decoders.image(e, output_type=output_type)
    if recipe.region_hw == recipe.source_hw:
        return whole, whole
    cut = lambda e: fn.slice(whole(e), start=_corner(recipe), shape=[rh, rw], axes=[0, 1])
    if packed:
        return cut, lambda e: decode_region(e, _corner(recipe, f), (h, w), output_type=output_type)
    return cut, lambda e: decode_region(e, _corner(recipe, f) * f, (rh, rw), output_type=output_type)


def _image_stages(tars, idxs, image_ext: str, recipe: Recipe, frames: int, epochs: int) -> dict:
    """{stage: (before ms, now ms)} for reading, decoding and shrinking the image."""
    hw, crop = list(recipe.input_hw), recipe.region_hw != recipe.source_hw
    run = lambda build: _cpu_ms(tars, idxs, [image_ext], build, frames, epochs)
    read = run(lambda e: fn.cast(e, dtype=types.UINT8))
    cut, roi = _decode_paths(recipe, types.RGB)
    decode_before, decode_now = run(cut), run(roi)
    resize_before = run(lambda e: fn.resize(cut(e), size=hw, **LANCZOS))
    resize_now = run(lambda e: fn.resize(roi(e), size=hw, **LANCZOS))
    return {
        "read the tar": (read, read),
        "image decode" + (" (+ crop)" if crop else ""): (decode_before - read, decode_now - read),
        "Lanczos downscale": (resize_before - decode_before, resize_now - decode_now),
    }


def _label_stages(tars, idxs, recipe: Recipe, packed: str | None, frames: int, epochs: int) -> dict:
    """{stage: (before ms, now ms)} for the label decode and finish_batch (vote, translate, flip, gamma)."""
    crop = recipe.region_hw != recipe.source_hw
    cast = lambda b: fn.cast(b, dtype=types.UINT8)
    now_exts = [packed] if packed else ["label.png"]
    read_before = _cpu_ms(tars, idxs, ["label.png"], cast, frames, epochs)
    read_now = _cpu_ms(tars, idxs, now_exts, cast, frames, epochs) if packed else read_before
    before, now = _decode_paths(recipe, types.ANY_DATA, packed=bool(packed))
    before_ms, labels = _cpu_ms(tars, idxs, ["label.png"], before, frames, epochs, outputs=True)
    now_ms, small = _cpu_ms(tars, idxs, now_exts, now, frames, epochs, outputs=True)
    finish_before = _finish_ms(recipe, [x[0][..., 0] for x in labels], recipe.factor, epochs)
    finish_now = _finish_ms(recipe, [x[0][..., 0] for x in small], 1 if packed else recipe.factor, epochs)
    name = "label decode" + (" (+ crop)" if crop else "") + (f" ({packed} now)" if packed else "")
    return {
        name: (before_ms - read_before, now_ms - read_now),
        "finish_batch (vote, shift, flip, gamma)": (finish_before, finish_now),
    }


def _finish_ms(recipe: Recipe, labels: list[np.ndarray], factor: int, epochs: int) -> float:
    h, w = recipe.input_hw
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8))
    batches = [torch.from_numpy(np.ascontiguousarray(lab))[None] for lab in labels]
    finish_batch(images, batches[0], draw_params(rng, 1, recipe), factor=factor)
    start = cpu_seconds()
    for _ in range(epochs):
        for lab in batches:
            finish_batch(images, lab, draw_params(rng, 1, recipe), factor=factor)
    return 1e3 * (cpu_seconds() - start) / (epochs * len(batches))


def print_stages(shard_dir, image_ext: str, recipe: Recipe, packed: str | None, frames: int, epochs: int) -> float:
    """Print the per-stage table for `recipe` over `shard_dir`'s train split; return the `now` total (ms)."""
    tars, idxs = split_files(shard_dir, "train")
    stages = _image_stages(tars, idxs, image_ext, recipe, frames, epochs)
    stages |= _label_stages(tars, idxs, recipe, packed, frames, epochs)
    print(f"\nDALI CPU per stage, recipe {recipe.name} at {recipe.input_hw[0]}x{recipe.input_hw[1]}, ms CPU per image:")
    print(f"  {'stage':<56}{'before':>8}{'now':>8}")
    for name, (before, now) in stages.items():
        print(f"  {name:<56}{before:>8.1f}{now:>8.1f}")
    before, now = (sum(v[i] for v in stages.values()) for i in (0, 1))
    print(f"  {'sum':<56}{before:>8.1f}{now:>8.1f}")
    return now
