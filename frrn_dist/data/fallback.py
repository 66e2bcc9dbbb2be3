"""The plain-PyTorch loader for machines without DALI: same shards, same recipes, same Batch, same sharding.

Imports: numpy, torch, PIL, frrn_dist.data.{manifest, recipes, shardindex, spec, state}; never loaders.py, which
imports this (the checkpoint format both share lives in state.py).

It reads the WebDataset tars through their `.idx` files (byte offsets), not through webdataset's sequential
reader: that one splits work by *tar file* and stalls when there are fewer tars than ranks x workers
(webdataset#188), while here any rank takes exactly DALI's contiguous sample range, shuffles it fully, and
resumes by skipping batches without reading them.

Each epoch is planned up front from (seed + rank, epoch): the order of the rank's slice and one random row per
sample (recipes.draw_params, plus the seed recipe's crop corner). A checkpoint is just (epoch, batches done),
replayed deterministically. DataLoader workers decode with PIL, downscale with PIL's Lanczos and run
recipes.finish_batch on the CPU, one whole micro-batch per task.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from frrn_dist.data.manifest import ShardError
from frrn_dist.data.recipes import Batch, Recipe, draw_crops, draw_params, finish_batch
from frrn_dist.data.shardindex import Sample, shard_range
from frrn_dist.data.spec import FULL_LABEL, LoaderBase, LoaderSpec
from frrn_dist.data.state import pack_state


def lanczos_downscale(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PIL's anti-aliased Lanczos, edges replicated like DALI's resize: (H, W, 3) uint8 -> (h, w, 3) uint8.

    PIL renormalises the filter where it runs off the image and DALI clamps to the edge pixel; padding by the
    filter's reach (3 taps x the factor) makes PIL do the same, so the two loaders differ by a grey level or
    two instead of up to ~10 along the border.
    """
    (H, W), (h, w) = image.shape[:2], hw
    pad = 3 * -(-max(H // h, W // w, 1) // 1)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return np.asarray(Image.fromarray(padded).resize((w, h), Image.LANCZOS, box=(pad, pad, pad + W, pad + H)))


class _BatchDataset(Dataset):
    """Item = one micro-batch: a list of (sample index, random row, crop corner). Returns finished tensors."""

    def __init__(
        self, samples: list[Sample], recipe: Recipe, image_ext: str, full_res: bool, instances: bool, label_ext: str
    ):
        self.samples, self.recipe, self.image_ext = samples, recipe, image_ext
        self.full_res, self.instances = full_res, instances
        # the full map (voted by finish_batch) or a vote packed at the recipe's factor (spec.label_member)
        self.label_ext, self.label_factor = label_ext, recipe.factor if label_ext == FULL_LABEL else 1
        self._fds: dict[str, int] = {}  # per worker process: tar path -> open file descriptor

    def __len__(self) -> int:  # items are batch specs from the sampler, not positions
        return len(self.samples)

    def __getstate__(self):  # to a worker process: open descriptors do not travel
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _read(self, sample: Sample, ext: str) -> bytes:
        fd = self._fds.get(sample.tar)
        if fd is None:
            fd = self._fds[sample.tar] = os.open(sample.tar, os.O_RDONLY)
        offset, size = sample.members[ext]
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ShardError(f"{sample.tar}: truncated inside {sample.key}.{ext}")
        return data

    def _decode(self, sample: Sample, ext: str, mode: str, hw: tuple[int, int] | None = None) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(self._read(sample, ext))) as im:
                if ext == self.image_ext:
                    im = im.convert("RGB")
                elif im.mode != mode:
                    raise ShardError(f"{sample.tar}: {sample.key}.{ext} is a {im.mode!r} PNG, expected {mode!r}")
                array = np.asarray(im)
        except (OSError, SyntaxError) as e:
            raise ShardError(f"{sample.tar}: cannot decode {sample.key}.{ext} ({e})") from e
        want = tuple(hw or self.recipe.source_hw)
        if array.shape[:2] != want:
            raise ShardError(
                f"{sample.tar}: {sample.key}.{ext} is {array.shape[0]}x{array.shape[1]}, the manifest says "
                f"{want[0]}x{want[1]}"
            )
        return array

    def __getitem__(self, spec):
        # A bad sample comes back as a message: DataLoader would wrap a worker's exception in a traceback.
        try:
            return self._batch(spec)
        except ShardError as e:
            return {"error": str(e)}

    def _batch(self, spec):
        (h, w), (rh, rw) = self.recipe.input_hw, self.recipe.region_hw
        packed = self.label_ext != FULL_LABEL
        lh, lw = (h, w) if packed else (rh, rw)
        f, (H, W) = self.recipe.factor, self.recipe.source_hw
        images, labels, full_labels, keys, instances, params = [], [], [], [], [], []
        for index, row, (y, x) in spec:
            sample = self.samples[index]
            image = self._decode(sample, self.image_ext, "RGB")[y : y + rh, x : x + rw]
            if packed:  # the vote of the whole frame at 1/f; the seed crop's corner lies on the f grid
                vote = self._decode(sample, self.label_ext, "L", (H // f, W // f))
                labels.append(vote[y // f : y // f + h, x // f : x // f + w])
            else:
                labels.append(self._decode(sample, FULL_LABEL, "L")[y : y + rh, x : x + rw])
            if self.full_res:
                full_labels.append(self._decode(sample, FULL_LABEL, "L") if packed else labels[-1])
            images.append(lanczos_downscale(image, (h, w)))
            keys.append(json.loads(self._read(sample, "json"))["key"])
            params.append(row)
            if self.instances:
                instances.append(self._decode(sample, "instance.png", "I;16").astype(np.int32))
        random = self.recipe.random and len(spec) > 0
        x, y = finish_batch(
            _stack(images, (h, w, 3), torch.uint8), _stack(labels, (lh, lw), torch.uint8),
            np.stack(params) if random else None, factor=self.label_factor,
        )  # fmt: skip
        out = dict(images=x, labels=y, keys=keys)
        if self.full_res:
            out["full_labels"] = _stack(full_labels, (H, W), torch.uint8)  # uint8, widened only where scored
            if self.instances:
                out["full_instances"] = _stack(instances, (H, W), torch.int32)
        return out


def _stack(arrays: list[np.ndarray], hw: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """(N, *hw) from N arrays; an empty batch (evaluation's short last one) as a (0, *hw) tensor."""
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros((0, *hw), dtype=dtype)


class _Specs:
    """The DataLoader's sampler: the batch specs still to come in the current epoch, set before each `for`."""

    def __init__(self):
        self.specs: list = []

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def worker_context(preload: str):
    """The DataLoader workers' multiprocessing context (the stream backend's too): a forkserver, not a fork."""
    ctx = mp.get_context("forkserver")
    # Workers fork from a server that has imported torch, PIL and `preload` once (if nobody started it yet), not
    # from this process: forking a process that runs DALI's, gloo's (or any) thread pools can leave the child
    # waiting forever on a lock some thread held at the fork (seen here with DALI alive).
    ctx.set_forkserver_preload([preload])
    return ctx


def batch_on(device: torch.device, out: dict) -> Batch:
    """A worker's finished tensors (a dict) as a Batch on `device`."""
    to = lambda t: None if t is None else t.to(device, non_blocking=True)
    return Batch(
        images=to(out["images"]),
        labels=to(out["labels"]),
        keys=list(out["keys"]),
        full_labels=to(out.get("full_labels")),
        full_instances=to(out.get("full_instances")),
    )


class TorchLoader(LoaderBase):
    """The fallback backend. Same public surface as the DALI loader: len, iteration by epochs, state()."""

    def __init__(self, spec: LoaderSpec, *, samples: list[Sample]):
        super().__init__(spec)
        self._dataset = _BatchDataset(
            samples, spec.recipe, spec.image_ext, spec.full_res_targets, spec.instances, spec.label_ext
        )
        self._num_samples = len(samples)
        self._device = spec.torch_device
        self._sampler, self._loader = _Specs(), None

    def epoch_plan(self, epoch: int) -> list[list[tuple[int, np.ndarray, tuple[int, int]]]]:
        """This rank's batches of `epoch`: lists of (sample index, random row, crop corner)."""
        spec = self.spec
        # Like DALI, every rank moves on to the next slice each epoch (so a dropped tail differs per epoch).
        lo, hi = shard_range(self._num_samples, (spec.rank + epoch) % spec.world_size, spec.world_size)
        order = np.arange(lo, hi)
        if spec.drop_last:
            rng = np.random.default_rng([spec.seed + spec.rank, epoch])
            order = rng.permutation(order) if spec.shuffle else order
            params, crops = draw_params(rng, len(order), self.recipe), draw_crops(rng, len(order), self.recipe)
        else:
            params = np.zeros((len(order), 4), np.float32)
            crops = np.zeros((len(order), 2), np.int64)
        rows = [(int(i), params[k], (int(crops[k, 0]), int(crops[k, 1]))) for k, i in enumerate(order)]
        b = spec.micro_batch_size
        # Evaluation: short (or empty) last batches on the ranks with the smaller slices, never a repeat.
        return [rows[k * b : (k + 1) * b] for k in range(spec.num_batches)]

    def __iter__(self):
        if self._done >= self.spec.num_batches:
            self._epoch, self._done = self._epoch + 1, 0
        epoch = self._epoch
        self._sampler.specs = self.epoch_plan(epoch)[self._done :]
        if self._loader is None:
            workers = self.spec.num_threads
            self._loader = DataLoader(
                self._dataset,
                batch_size=None,  # the dataset returns whole batches
                sampler=self._sampler,
                num_workers=workers,
                pin_memory=self._device.type == "cuda",
                prefetch_factor=2 if workers else None,
                # Workers live as long as the loader (no start-up per epoch) and come from a forkserver.
                persistent_workers=workers > 0,
                multiprocessing_context=worker_context("frrn_dist.data.fallback") if workers else None,
            )
        for out in self._loader:
            if "error" in out:
                raise ShardError(out["error"])
            self._done += 1
            yield batch_on(self._device, out)

    def state(self) -> bytes:
        """Bytes that resume this loader where it is (epoch and batches done; the rest is replayed)."""
        return pack_state(self.spec.setup, dict(epoch=self._epoch, batches_done=self._done))
