"""The DALI graph: read the shards, decode, cut the recipe's region, downscale the image, draw the random numbers.

Why the work is split between DALI and torch (frrn_dist/data/recipes.py):
- DALI does what it is fast at and what dominates the cost: JPEG decode (nvJPEG / the A100-H100 hardware decoder
  with device="mixed"), the label PNG decode, and the anti-aliased Lanczos downscale of the 1024x2048 image, on
  its own threads, ahead of the training step.
- DALI has no majority-vote downscale and no reflection padding (crop/warp pad with a constant only). Those, the
  flip and the gamma run in torch on the device on the already small (h, w) tensors, in `finish_batch`, which
  the fallback loader shares, so both loaders apply the same recipe by construction.
- Every random number is drawn here, by DALI random nodes, and returned as the `params` output: one node feeds
  both image and label (the seed crop) or one row feeds both in torch, so their geometry cannot diverge, and the
  draws live in DALI's checkpointed random stream, so `loader.state()` resumes them exactly.

Graph construction must not need a GPU: with device_id=None a "mixed" pipeline can still be traced and
serialized (stack-notes §1.8), which is how the tests check the GPU path on CPU.

Imports: numpy, nvidia.dali, frrn_dist.data.recipes.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from frrn_dist.data.recipes import Recipe

# fn.decoders.image's defaults in DALI 2.4 (its docstring): nvJPEG's buffer paddings in bytes.
DALI_DEVICE_MEMORY_PADDING = 16 * 2**20
DALI_HOST_MEMORY_PADDING = 8 * 2**20


@pipeline_def(enable_checkpointing=True)
def frrn_pipeline(
    *,
    tars: list[str],
    idxs: list[str],
    image_ext: str,
    recipe: Recipe,
    shard_id: int,
    num_shards: int,
    shuffle: bool,
    shuffle_buffer: int,
    decode_device: str = "cpu",
    instances: bool = False,
    label_ext: str = "label.png",
    full_labels: bool = False,
):
    """Outputs image uint8 (h, w, 3), label uint8 (Hr, Wr, 1) of the same region at source scale (or (h, w, 1)
    when label_ext is a packed vote), meta (json bytes, zero-padded to the batch's longest), then params float32
    (NUM_PARAMS,) if the recipe is random, full_label uint8 (H, W, 1) if asked (beside a packed vote) and
    instance int32 (H, W, 1) if asked. Call with batch_size, num_threads, device_id, seed (and checkpoint)."""
    exts = [image_ext, label_ext, "json"] + (["label.png"] if full_labels else [])
    exts += ["instance.png"] if instances else []
    read = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=exts,
        missing_component_behavior="error",
        # read() instead of mmap: a tar truncated or replaced under a running job then raises an error naming it
        # instead of killing the process with SIGBUS; mmap only pays off on local disks anyway.
        dont_use_mmap=True,
        shard_id=shard_id,
        num_shards=num_shards,
        # A local buffer of `shuffle_buffer` encoded samples (host RAM per rank: ~1 MB per JPEG frame); the shards
        # are shuffled when written, so this only has to break up the order within a rank's slice.
        # (shuffle_after_epoch would shuffle globally but only permutes whole tars for webdataset, cannot be
        # combined with random_shuffle, and may reshuffle differently after a checkpoint restore.)
        random_shuffle=shuffle,
        initial_fill=shuffle_buffer,
        # Every rank's slice is padded to the same size and ends its epoch there, so PARTIAL covers each sample
        # exactly once per epoch across ranks (stack-notes §1.2). Training drops the tail itself (loaders.py).
        pad_last_batch=True,
        name="Reader",
    )
    encoded, label_png, meta = read[:3]
    (H, W), (rh, rw), (h, w) = recipe.source_hw, recipe.region_hw, recipe.input_hw
    hints = {}
    if decode_device == "mixed":
        # nvJPEG with buffers sized for full frames up front (no reallocation in the first iterations), and the
        # CPU decoder's chroma upsampling, so GPU and CPU decodes of one JPEG agree.
        # The paddings never go below DALI's own defaults (16 MiB device, 8 MiB host), which already hold a
        # 1024x2048 RGB frame (6.3 MB); larger frames get room for one whole decoded frame.
        frame_bytes = H * W * 3
        hints = dict(
            preallocate_height_hint=H,
            preallocate_width_hint=W,
            device_memory_padding=max(DALI_DEVICE_MEMORY_PADDING, frame_bytes),
            host_memory_padding=max(DALI_HOST_MEMORY_PADDING, frame_bytes),
            jpeg_fancy_upsampling=True,
        )
    # Labels stay on the CPU decoder (PNG has no GPU decoder; ANY_DATA keeps the 8-bit ids exact, stack-notes §1.4).
    if (rh, rw) != (H, W):
        # Seed recipe: one corner on the factor's grid (recipes.draw_crops), uniform over its positions, cuts image
        # and label alike. The decoders decode only that region (libjpeg-turbo / nvJPEG skip what lies outside
        # it, PNG stops at its last row): half the CPU of decoding a 1024x2048 frame and slicing, and bit-identical
        # to it (tests/test_loaders.py). A packed vote is cut at corner / f: the crop's own vote.
        f = recipe.factor
        y = fn.random.uniform(values=list(range((H - rh) // f + 1)), dtype=types.INT32)
        x = fn.random.uniform(values=list(range((W - rw) // f + 1)), dtype=types.INT32)
        cell = fn.stack(y, x)  # (2,) int32 = (row, column) in f x f cells
        image = decode_region(encoded, cell * f, (rh, rw), device=decode_device, output_type=types.RGB, **hints)
        packed = label_ext != "label.png"
        label = decode_region(label_png, cell if packed else cell * f, (h, w) if packed else (rh, rw),
                              device="cpu", output_type=types.ANY_DATA)  # fmt: skip
    else:
        image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **hints)
        label = fn.decoders.image(label_png, device="cpu", output_type=types.ANY_DATA)

    # Anti-aliased Lanczos (the authors used OpenCV's Lanczos4): the filter widens with the factor, so this is a
    # proper low-pass, not point sampling. uint8 out: DALI rounds and clamps the Lanczos overshoot to [0, 255].
    image = fn.resize(image, size=[h, w], interp_type=types.INTERP_LANCZOS3, antialias=True, dtype=types.UINT8)
    meta = fn.pad(meta, fill_value=0)  # json lengths differ per sample; padded so the batch stacks

    to_device = (lambda node: node.gpu()) if decode_device == "mixed" else (lambda node: node)
    outputs = [image, to_device(label), meta]
    if recipe.random:
        t = float(recipe.translate_px)
        zero = types.Constant(0.0, dtype=types.FLOAT)
        offsets = [float(v) for v in range(-recipe.translate_px, recipe.translate_px + 1)]
        dy = fn.random.uniform(values=offsets) if t else zero
        dx = fn.random.uniform(values=offsets) if t else zero
        flip = fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT) if recipe.flip else zero
        z = fn.random.uniform(range=[-recipe.gamma_z, recipe.gamma_z]) if recipe.gamma_z > 0 else zero
        outputs.append(fn.stack(dy, dx, flip, z))  # column order: recipes.PARAM_DY, _DX, _FLIP, _Z
    if full_labels:
        outputs.append(to_device(fn.decoders.image(read[3], device="cpu", output_type=types.ANY_DATA)))
    if instances:
        # 16-bit instanceIds: exact only when decoded as UINT16 (stack-notes §1.4); int32 for torch, which has
        # no uint16 in DALI's iterator.
        instance = fn.decoders.image(read[-1], device="cpu", output_type=types.ANY_DATA, dtype=types.UINT16)
        outputs.append(to_device(fn.cast(instance, dtype=types.INT32)))
    return tuple(outputs)


def decode_region(encoded, corner, region_hw: tuple[int, int], **decoder_args):
    """Decode only the region of size region_hw whose top-left pixel is corner = (row, column), absolute ints."""
    region = types.Constant(np.array(region_hw, np.int32))
    roi = dict(axis_names="HW", normalized_anchor=False, normalized_shape=False)
    return fn.decoders.image_slice(encoded, corner, region, **roi, **decoder_args)


def output_names(recipe: Recipe, instances: bool, full_labels: bool = False) -> list[str]:
    """Names of frrn_pipeline's outputs, in order, for DALIGenericIterator's output_map."""
    names = ["image", "label", "meta"] + (["params"] if recipe.random else [])
    return names + (["full_label"] if full_labels else []) + (["instance"] if instances else [])
