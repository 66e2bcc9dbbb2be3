"""`build_loader`: batches of (images, labels) from the shards, by DALI or by the plain-PyTorch fallback.

Imports: torch, frrn_dist.data.{manifest, recipes, shardindex, spec, state}; inside functions (only the backend in use
loads) nvidia.dali, PIL, frrn_dist.data.{dali, fallback}. Re-exports LoaderError, ShardError, RecipeError, Batch.

    loader = build_loader(shard_dir, "train", backend="dali", recipe="paper", input_hw=(256, 512),
                          micro_batch_size=3, rank=rank, world_size=world_size, seed=0)
    for batch in loader:      # one epoch per `for`; breaking off and starting a new `for` continues that epoch
        batch.images          # float32 (N, 3, h, w) RGB in [0, 1] on the device; batch.labels int64 (N, h, w)
    blob = loader.state()     # bytes; build_loader(..., checkpoint=blob) continues exactly there

Sharding by GLOBAL rank (DALI's rule, both backends): rank r reads samples [r N / S, (r + 1) N / S) of all tars
concatenated, moving to the next slice each epoch. len(loader) is the same on every rank, which DeepSpeed's
collectives need:
- training: floor(floor(N / S) / micro_batch_size) full batches (DROP); a rank's surplus is read and dropped.
- evaluation (recipe "eval"): ceil(ceil(N / S) / micro_batch_size) batches (PARTIAL + padded slices), so every
  sample is seen exactly once per epoch across ranks; a rank's last batch can be short, even empty.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from frrn_dist.data.manifest import BACKOFF_S, RETRIES, ShardError, is_url, location, split_files, split_info
from frrn_dist.data.recipes import Batch, Recipe, RecipeError, finish_batch, make_recipe
from frrn_dist.data.shardindex import index_split
from frrn_dist.data.spec import FULL_LABEL, LoaderBase, LoaderSpec, label_member, sample_components
from frrn_dist.data.state import LoaderError, pack_state, unpack_state

if TYPE_CHECKING:
    from frrn_dist.data.fallback import TorchLoader
    from frrn_dist.data.stream import StreamLoader

__all__ = ["Batch", "LoaderError", "ShardError", "RecipeError", "build_loader", "epoch_batches"]

BACKENDS = ("dali", "torch", "stream")


def epoch_batches(num_samples: int, world_size: int, micro_batch_size: int, *, drop_last: bool) -> int:
    """Batches per epoch on every rank (see the module docstring)."""
    if drop_last:
        return (num_samples // world_size) // micro_batch_size
    return math.ceil(math.ceil(num_samples / world_size) / micro_batch_size)


def build_loader(
    shard_dir: str | Path,
    split: str,
    *,
    backend: str = "dali",
    recipe: str = "paper",
    input_hw: tuple[int, int] = (256, 512),
    micro_batch_size: int = 3,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    translate_px: int = 30,
    gamma_z: float = 0.05,
    flip: bool | None = None,
    device: str = "cpu",
    device_id: int | None = None,
    num_threads: int = 2,
    shuffle_buffer: int = 256,
    shuffle: bool = True,
    checkpoint: bytes | None = None,
    full_res_targets: bool = False,
    retries: int = RETRIES,
    retry_backoff_s: float = BACKOFF_S,
    on_error: str = "stop",
) -> DaliLoader | TorchLoader | StreamLoader:
    """A loader over `split` of a shard folder; see the module docstring for the contract.

    recipe: "paper" (whole frames downscaled by an integer factor, translation, gamma), "seed" (random (2h, 2w)
    crop halved, flip, gamma) or "eval" (whole frames, no randomness, every sample once per epoch).
    seed: base seed; rank r draws its augmentation from seed + r. device: "cpu" or "cuda" (DALI then decodes
    JPEG on GPU device_id, default the current CUDA device). num_threads: DALI threads, or fallback DataLoader
    workers (0 = in this process). full_res_targets: also return the source-resolution labels (and the
    instanceIds if the split has them); whole-frame recipes only. shuffle=False reads every rank's slice in
    order in training too (exact comparisons between runs; evaluation never shuffles).
    backend="stream" (frrn_dist.data.stream) also reads a URL (http(s)://, s3://, gs://, pipe:...{}) with
    num_threads DataLoader workers, retrying transient failures `retries` times (waits from retry_backoff_s,
    doubling); on_error="skip" leaves out (and counts) samples it cannot read instead of stopping.
    """
    _check_arguments(
        shard_dir, backend=backend, device=device, rank=rank, world_size=world_size,
        micro_batch_size=micro_batch_size, shuffle_buffer=shuffle_buffer, num_threads=num_threads, on_error=on_error,
    )  # fmt: skip
    info = split_info(shard_dir, split)
    image_ext = _image_ext(shard_dir, split, info)
    plan = _recipe(
        recipe, info, input_hw=input_hw, translate_px=translate_px, gamma_z=gamma_z, flip=flip,
        full_res_targets=full_res_targets,
    )  # fmt: skip
    instances = full_res_targets and "instance.png" in info.get("components", [])
    label_ext = label_member(plan, info.get("components", []))
    needed = sample_components(image_ext, instances, label_ext, full_res_targets)
    samples = index_split(shard_dir, split, needed) if backend != "stream" else None  # stream: no .idx up front
    num_samples = len(samples) if samples is not None else info["num_samples"]
    drop_last = recipe != "eval"
    num_batches = _batches_per_epoch(shard_dir, split, num_samples, world_size, micro_batch_size, drop_last)
    device_id = _device_id(device, device_id)
    setup = _checkpoint_setup(
        backend, split, plan, num_samples=num_samples, micro_batch_size=micro_batch_size, rank=rank,
        world_size=world_size, seed=seed, full_res_targets=full_res_targets, shuffle=shuffle and drop_last,
        shuffle_buffer=shuffle_buffer, workers=max(1, min(num_threads, num_batches)),
    )  # fmt: skip
    position, payload = unpack_state(checkpoint, setup) if checkpoint is not None else ({}, None)
    spec = LoaderSpec(
        recipe=plan, image_ext=image_ext, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
        seed=seed, num_batches=num_batches, drop_last=drop_last, shuffle=setup["shuffle"],
        full_res_targets=full_res_targets, instances=instances, device=device, device_id=device_id,
        num_threads=num_threads, setup=setup, position=position, label_ext=label_ext,
    )  # fmt: skip
    return _backend_loader(
        backend, spec, shard_dir=shard_dir, split=split, info=info, samples=samples, dali_checkpoint=payload,
        shuffle_buffer=shuffle_buffer, retries=retries, retry_backoff_s=retry_backoff_s, on_error=on_error,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# build_loader's steps, in the order it runs them (the order decides which error a doubly bad call reports)


def _check_arguments(
    shard_dir, *, backend, device, rank, world_size, micro_batch_size, shuffle_buffer, num_threads, on_error
) -> None:
    """LoaderError for arguments that are wrong whatever the shards hold."""
    if backend not in BACKENDS:
        raise LoaderError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if device not in ("cpu", "cuda"):
        raise LoaderError(f"device={device!r}: expected 'cpu' or 'cuda'")
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if micro_batch_size < 1:
        raise LoaderError(f"micro_batch_size={micro_batch_size}: must be >= 1")
    if shuffle_buffer < 1:
        raise LoaderError(f"shuffle_buffer={shuffle_buffer}: must be >= 1 (samples held for DALI's shuffle)")
    if num_threads < (1 if backend == "dali" else 0):
        raise LoaderError(f"num_threads={num_threads}: DALI needs at least 1")
    if backend != "stream" and is_url(shard_dir):
        raise LoaderError(
            f"{shard_dir}: backend={backend!r} needs files (local or on a shared filesystem); to train from a URL "
            "use data.backend=stream"
        )
    if backend != "stream" and on_error != "stop":
        raise LoaderError(f"on_error={on_error!r}: only backend='stream' can skip unreadable samples")


def _image_ext(shard_dir, split: str, info: dict) -> str:
    """The split's image member: "jpg" or "png" (ShardError if the manifest lists neither)."""
    components = info.get("components", [])
    image_ext = next((e for e in ("jpg", "png") if e in components), None)
    if image_ext is None:
        raise ShardError(f"{location(shard_dir, 'manifest.json')}: split {split!r} lists no jpg or png image component")
    return image_ext


def _recipe(recipe: str, info: dict, *, full_res_targets: bool, **recipe_args) -> Recipe:
    """The recipe for the split's frames (RecipeError if it does not fit them); recipe_args: make_recipe's."""
    plan = make_recipe(recipe, source_hw=(info["height"], info["width"]), **recipe_args)
    if full_res_targets and plan.region_hw != plan.source_hw:
        raise LoaderError(f"full_res_targets=True needs a whole-frame recipe ('paper' or 'eval'), not {recipe!r}")
    return plan


def _batches_per_epoch(shard_dir, split: str, num_samples: int, world_size: int, micro_batch_size: int, drop_last):
    num_batches = epoch_batches(num_samples, world_size, micro_batch_size, drop_last=drop_last)
    if num_batches == 0 or num_samples < world_size:
        raise LoaderError(
            f"{shard_dir}: split {split!r} has {num_samples} samples, too few for {world_size} rank(s) x "
            f"micro_batch_size {micro_batch_size} (each rank needs a sample, in training a full batch)"
        )
    return num_batches


def _device_id(device: str, device_id: int | None) -> int | None:
    """The CUDA device to use (default: the current one); LoaderError if there is none."""
    if device != "cuda":
        return device_id
    if not torch.cuda.is_available():
        raise LoaderError("device='cuda' but torch sees no CUDA device (use device='cpu')")
    return torch.cuda.current_device() if device_id is None else device_id


def _checkpoint_setup(
    backend: str,
    split: str,
    plan: Recipe,
    *,
    num_samples: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    full_res_targets: bool,
    shuffle: bool,
    shuffle_buffer: int,
    workers: int,
) -> dict:
    """Everything that must match for a checkpoint to resume this loader (state.unpack_state compares it)."""
    setup = dict(
        backend=backend,
        split=split,
        recipe=plan.name,
        input_hw=list(plan.input_hw),
        num_samples=num_samples,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        translate_px=plan.translate_px,
        gamma_z=plan.gamma_z,
        flip=plan.flip,
        full_res_targets=full_res_targets,
        shuffle=shuffle,
    )
    if backend == "dali":
        import nvidia.dali

        # A DALI checkpoint restores only into the same graph (the shuffle buffer is part of it) and version.
        setup.update(shuffle_buffer=shuffle_buffer, dali=nvidia.dali.__version__)
    if backend == "stream":  # the plan depends on these too (frrn_dist.data.stream: workers = W)
        setup.update(shuffle_buffer=shuffle_buffer, workers=workers, stream=1)
    return setup


def _backend_loader(
    backend: str,
    spec: LoaderSpec,
    *,
    shard_dir,
    split: str,
    info: dict,
    samples: list | None,
    dali_checkpoint: bytes | None,
    shuffle_buffer: int,
    retries: int,
    retry_backoff_s: float,
    on_error: str,
) -> DaliLoader | TorchLoader | StreamLoader:
    """The backend's loader: the spec plus what only that backend needs."""
    if backend == "torch":
        from frrn_dist.data.fallback import TorchLoader

        return TorchLoader(spec, samples=samples)
    if backend == "stream":
        from frrn_dist.data.stream import StreamLoader

        return StreamLoader(
            spec, shard_dir=shard_dir, shards=info["shards"], shuffle_buffer=shuffle_buffer, retries=retries,
            retry_backoff_s=retry_backoff_s, on_error=on_error,
        )  # fmt: skip
    tars, idxs = split_files(shard_dir, split)
    return DaliLoader(
        spec, tars=tars, idxs=idxs, shuffle_buffer=shuffle_buffer, dali_checkpoint=dali_checkpoint,
        what=f"{Path(shard_dir)}/{split}",
    )  # fmt: skip


class DaliLoader(LoaderBase):
    """The DALI backend: frrn_pipeline behind a DALIGenericIterator, finished by recipes.finish_batch."""

    def __init__(
        self,
        spec: LoaderSpec,
        *,
        tars: list[str],
        idxs: list[str],
        shuffle_buffer: int,
        dali_checkpoint: bytes | None,
        what: str,
    ):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from frrn_dist.data.dali import frrn_pipeline, output_names

        super().__init__(spec)
        self._tars, self._idxs, self._what = tars, idxs, what
        pipe = frrn_pipeline(
            tars=tars,
            idxs=idxs,
            image_ext=spec.image_ext,
            recipe=spec.recipe,
            shard_id=spec.rank,
            num_shards=spec.world_size,
            shuffle=spec.shuffle,
            shuffle_buffer=shuffle_buffer,
            decode_device="mixed" if spec.device == "cuda" else "cpu",
            instances=spec.instances,
            label_ext=spec.label_ext,
            full_labels=spec.full_res_targets and spec.label_ext != FULL_LABEL,
            batch_size=spec.micro_batch_size,
            num_threads=spec.num_threads,
            device_id=spec.device_id if spec.device == "cuda" else None,
            seed=spec.seed + spec.rank,
            checkpoint=dali_checkpoint,
        )
        # PARTIAL for both: with padded slices it is the only policy whose every epoch covers each sample once.
        # DROP is emulated above it (len = the smallest rank's full batches, the rest drained in _end_epoch)
        # because DALI's own DROP leaves the padded tail batch in the pipeline, where the next epoch then
        # starts: repeated samples on every rank whose slice is not a multiple of the batch size (seen here).
        # (The iterator runs the pipeline for its first batch right away, so read errors can surface here.)
        self._it = self._call(
            DALIGenericIterator,
            [pipe],
            output_names(spec.recipe, spec.instances, spec.full_res_targets and spec.label_ext != FULL_LABEL),
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=True,
        )

    def __iter__(self):
        if self._done >= self.spec.num_batches:
            self._end_epoch()
        epoch = self._epoch
        while self._epoch == epoch and self._done < self.spec.num_batches:
            out = self._next()
            self._done += 1
            yield self._to_batch(out)
        if self._epoch == epoch:  # not already ended by state()
            self._end_epoch()

    def state(self) -> bytes:
        """Bytes that resume this loader where it is: same next batch, same random numbers, same epochs after."""
        if self._done >= self.spec.num_batches:
            self._end_epoch()  # saved at an epoch's end: resume at the next epoch's start
        checkpoint = self._it.checkpoints()[0]
        if isinstance(checkpoint, str):
            checkpoint = checkpoint.encode()
        return pack_state(self.spec.setup, dict(epoch=self._epoch, batches_done=self._done), checkpoint)

    def _end_epoch(self) -> None:
        # Read and drop whatever the epoch has left (training's surplus), up to DALI's end of epoch.
        while True:
            try:
                self._next()
            except StopIteration:
                break
        self._epoch, self._done = self._epoch + 1, 0

    def _next(self):
        return self._call(next, self._it)[0]

    def _call(self, f, *args, **kwargs):
        try:
            return f(*args, **kwargs)
        except StopIteration:
            raise
        except RuntimeError as e:
            where = _find_undecodable(self._tars, self._idxs) or self._what
            raise LoaderError(f"{where}: DALI failed while reading: {_dali_reason(str(e))}") from e

    def _to_batch(self, out: dict) -> Batch:
        labels = out["label"][..., 0]  # (N, Hr, Wr) uint8, or (N, h, w) when packed voted
        images, small = finish_batch(out["image"], labels, out.get("params"), factor=self.spec.label_factor)
        keys = [json.loads(bytes(m.numpy()).rstrip(b"\0"))["key"] for m in out["meta"]]
        batch = Batch(images=images, labels=small, keys=keys)
        if self.spec.full_res_targets:
            # uint8: a 1024x2048 frame is 2 MB, not 16 MB as int64
            batch.full_labels = out["full_label"][..., 0] if "full_label" in out else labels
            if "instance" in out:
                batch.full_instances = out["instance"][..., 0].int()
        return batch


def _find_undecodable(tars: list[str], idxs: list[str]) -> str | None:
    """After a DALI failure: '<tar>: sample <key> (<member>)' of the first member PIL cannot decode, or None.

    DALI's decoder errors name neither the tar nor the sample. Only run on the error path: it reads every image.
    """
    import io

    from PIL import Image

    from frrn_dist.data.shardindex import read_index

    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            for sample in read_index(idx, tar):
                for ext, (offset, size) in sample.members.items():
                    if not ext.endswith(("jpg", "png")):
                        continue
                    f.seek(offset)
                    try:
                        Image.open(io.BytesIO(f.read(size))).load()
                    except Exception:  # noqa: BLE001 - any decoder failure is the one to report
                        return f"{tar}: sample {sample.key} ({sample.key}.{ext}) does not decode"
    return None


def _dali_reason(message: str) -> str:
    """One line out of DALI's multi-line error: the failing operator and what it said."""
    op = re.search(r"Error in \w+ operator `([^`]+)`", message)
    tail = message.split("encountered:", 1)[-1]
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip() and not ln.startswith("Critical error")]
    reason = lines[0] if lines else message.strip().splitlines()[0]
    return f"{op.group(1)}: {reason}" if op else reason
