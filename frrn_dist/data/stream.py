"""`data.backend=stream`: the shards read as streams, from local files or a URL (HTTP, S3, GCS, a pipe: command).

Imports: numpy, torch, webdataset, frrn_dist.data.{fallback, manifest, recipes, shardindex, spec, state}; never
loaders.py, which imports this.

DALI and the torch fallback need files they can seek in; this loader needs only a stream per tar, so the shards
can stay in object storage or behind an HTTP server instead of being copied onto every node. Each DataLoader
worker runs a webdataset DataPipeline: open the tar (manifest.RemoteFile: retries with backoff, resumes at the
byte it got to), iterate its members (webdataset.tariterators), hold samples in a shuffle buffer, decode and
downscale them with the fallback's PIL code and finish the batch with recipes.finish_batch, as the other loaders.

The rule, per epoch e (every number below comes from the manifest's per-tar sample counts, nothing is listed):
- tar order: training shuffles the tars with seed (the same order on every rank), evaluation keeps the
  manifest's; N samples concatenated in that order.
- rank r takes DALI's slice [s N / S, (s + 1) N / S) with s = (r + e) mod S (a new slice each epoch), so the
  number of tars does not matter: a rank may start and end inside a tar (webdataset#188 does not arise).
- len(loader) = B is the same on every rank (loaders.epoch_batches): training reads B full micro-batches from
  the front of the slice and never reads its surplus (at most micro_batch_size samples); evaluation reads the whole
  slice, with a short (or empty) last batch, so every sample is seen exactly once per epoch across ranks.
- W = min(num_workers, B) workers (at least 1: num_workers=0 runs it in this process); batch j is made by worker
  j mod W, and worker w reads the contiguous run of the slice its batches need, in order. A stream that starts
  inside a tar seeks to the sample through the tar's .idx where the source can seek (HTTP Range, local files);
  a pipe reads and drops the bytes before it.
- the shuffle buffer (training): each worker passes its run through a buffer of shuffle_buffer / W samples,
  simulated on sample positions with a generator seeded by (seed + rank, e, w) before anything is read, so the
  order and every augmentation draw are known in advance. A checkpoint is (epoch, the epoch's tar order,
  batches and samples consumed); resuming recomputes the plan, drops the batches already consumed and starts
  every worker's stream at the first sample it still needs: the same samples, in the same batches, with the
  same augmentations as the uninterrupted run. Workers persist across epochs (and evaluations); a small tensor
  in shared memory tells them the epoch, its tar order and the batches already consumed when a pass starts.

Failures: transient ones are retried inside manifest.RemoteFile; a missing tar, a 404, a truncated tar, a sample
that lacks a component or a member that does not decode stops the epoch with ShardError, one line naming the
URL. With on_error="skip" such samples are left out of their batches instead (a batch gets shorter, the number
of batches does not change) and counted in `loader.skipped`.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from frrn_dist.data.fallback import _BatchDataset, batch_on, worker_context
from frrn_dist.data.manifest import RemoteFile, ShardError, is_url, location
from frrn_dist.data.recipes import Recipe, draw_crops, draw_params
from frrn_dist.data.shardindex import Sample, shard_range
from frrn_dist.data.spec import LoaderBase, LoaderSpec, sample_components
from frrn_dist.data.state import pack_state

ON_ERROR = ("stop", "skip")
TAR_BLOCK = 512


@dataclass
class WorkerPlan:
    """What one worker reads and makes in one epoch.

    order: the epoch's tar order; first: position of its run in the concatenation in that order; batches: (batch
    index j, slots, random rows, crop corners), slots being positions in the run (0 = `first`), in the order they
    go into the batch.
    """

    worker: int
    order: list[int]
    first: int
    batches: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def shuffle_order(num_samples: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of `buffer_size` emits positions 0..n-1 in (webdataset's shuffle, on indices).

    Fill the buffer; then every arriving sample replaces a uniformly drawn one, which leaves; at the end the
    buffer drains in random order. A sample leaves at most buffer_size positions before it was read.
    """
    buffer, out = [], []
    picks = rng.integers(0, 1 << 62, num_samples)
    for i in range(num_samples):
        buffer.append(i)
        if len(buffer) >= buffer_size:
            k = int(picks[i] % len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            out.append(buffer.pop())
    out.extend(buffer[k] for k in rng.permutation(len(buffer)))
    return np.asarray(out, np.int64)


def tar_order(num_tars: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's tar order: the same on every rank (seeded by seed and epoch, not by rank)."""
    if not shuffle:
        return list(range(num_tars))
    return [int(t) for t in np.random.default_rng([seed, epoch, 7]).permutation(num_tars)]


def plan_epoch(
    counts: list[int],
    order: list[int],
    *,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    num_batches: int,
    micro_batch_size: int,
    drop_last: bool,
    shuffle: bool,
    num_workers: int,
    shuffle_buffer: int,
    recipe: Recipe,
) -> list[WorkerPlan]:
    """Every worker's plan for one epoch of this rank (the rule in the module docstring)."""
    lo, hi = shard_range(sum(counts), (rank + epoch) % world_size, world_size)
    b = micro_batch_size
    sizes = [b if drop_last else min(b, max(0, hi - lo - j * b)) for j in range(num_batches)]
    workers = max(1, min(num_workers, num_batches))
    plans, first = [], lo
    for w in range(workers):
        mine = list(range(w, num_batches, workers))
        n = sum(sizes[j] for j in mine)
        if drop_last:
            rng = np.random.default_rng([seed + rank, epoch, w])
            slots = shuffle_order(n, max(1, shuffle_buffer // workers), rng) if shuffle else np.arange(n)
            rows, crops = draw_params(rng, n, recipe), draw_crops(rng, n, recipe)
        else:
            slots, rows, crops = np.arange(n), np.zeros((n, 4), np.float32), np.zeros((n, 2), np.int64)
        plan, k = WorkerPlan(worker=w, order=list(order), first=first), 0
        for j in mine:
            plan.batches.append((j, slots[k : k + sizes[j]], rows[k : k + sizes[j]], crops[k : k + sizes[j]]))
            k += sizes[j]
        plans.append(plan)
        first += n
    return plans


def segments(counts: list[int], order: list[int], begin: int, end: int) -> list[tuple[int, int, int]]:
    """Positions [begin, end) of the concatenation in `order` as (tar, first sample in it, count) runs."""
    out, start = [], 0
    for t in order:
        a, z = max(begin, start), min(end, start + counts[t])
        if a < z:
            out.append((t, a - start, z - a))
        start += counts[t]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Inside a worker: read the run, hold samples until their batch is complete, decode


class _Decoder(_BatchDataset):
    """The fallback's PIL decode + Lanczos + finish_batch, reading member bytes from held samples."""

    def __init__(self, recipe: Recipe, image_ext: str, full_res: bool, instances: bool, label_ext: str):
        super().__init__([], recipe, image_ext, full_res, instances, label_ext)
        self._held: dict[tuple[str, str], dict] = {}

    def _read(self, sample: Sample, ext: str) -> bytes:
        data = self._held[(sample.tar, sample.key)].get(ext)
        if data is None:
            raise ShardError(f"{sample.tar}: sample {sample.key!r} has no {ext!r} component")
        return data

    def batch(self, samples: list[dict], rows: np.ndarray, crops: np.ndarray) -> dict:
        """Finished tensors of `samples` (webdataset dicts), or {"error": one line}."""
        self.samples = [Sample(key=s["__key__"], tar=s["__url__"], members={}) for s in samples]
        self._held = {(s["__url__"], s["__key__"]): s for s in samples}
        spec = [(i, rows[i], (int(crops[i, 0]), int(crops[i, 1]))) for i in range(len(samples))]
        return self[spec]


@dataclass
class _Source:
    """Where a worker reads from: the shard folder, the split's tars (manifest entries), reading options."""

    shard_dir: str
    shards: list[dict]
    components: list[str]
    retries: int
    backoff_s: float


def _open_at(src: _Source, tar: int, first: int) -> tuple[RemoteFile, str | None]:
    """The tar's stream, positioned at sample `first` (-> the key expected there) or at byte 0 (-> None)."""
    entry = src.shards[tar]
    url = location(src.shard_dir, entry["tar"])
    kw = dict(expected_bytes=entry.get("bytes"), retries=src.retries, backoff_s=src.backoff_s)
    seekable = not is_url(src.shard_dir) or src.shard_dir.startswith(("http://", "https://"))
    if first > 0 and seekable and entry.get("idx"):
        with RemoteFile(location(src.shard_dir, entry["idx"]), retries=src.retries, backoff_s=src.backoff_s) as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        fields = lines[first + 1].split() if first + 1 < len(lines) else []
        # ext offset size name: the sample's first member; its header is the 512 bytes before (short names only)
        if len(fields) >= 4 and fields[1].isdigit() and len(fields[3]) < 100 and int(fields[1]) >= TAR_BLOCK:
            return RemoteFile(url, start=int(fields[1]) - TAR_BLOCK, **kw), fields[3][: -len(fields[0]) - 1]
    return RemoteFile(url, **kw), None


def _reraise(e: BaseException):
    raise e  # webdataset's default handler would append " @ <stream>" to the message


def _tar_samples(src: _Source, tar: int, first: int, count: int):
    """Samples first .. first + count - 1 of one tar as webdataset dicts ({__key__, __url__, ext: bytes})."""
    stream, expected_key = _open_at(src, tar, first)
    url, skip = stream.url, 0 if expected_key is not None else first
    wanted = set(src.components)
    seen, key_now, parts, complete = 0, None, {}, False  # samples begun in this stream; the one being read
    try:
        for member in wds.tariterators.tar_file_iterator(stream, handler=_reraise):
            key, ext = wds.tariterators.base_plus_ext(member["fname"])
            if key is None:
                continue
            if key != key_now:
                if key_now is not None and seen > skip and not complete:
                    raise ShardError(f"{url}: sample {key_now!r} has no {sorted(wanted - set(parts))[0]!r} component")
                if seen == 0 and expected_key is not None and key != expected_key:
                    raise ShardError(f"{url}: its .idx puts sample {expected_key!r} where the tar has {key!r}")
                key_now, parts, complete, seen = key, {}, False, seen + 1
            if seen <= skip or complete or ext not in wanted:
                continue
            parts[ext] = member["data"]
            if wanted <= parts.keys():
                complete = True
                yield {"__key__": key, "__url__": url, **parts}
                if seen - skip == count:
                    return
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{url}: not a readable tar ({e})") from None
    finally:
        stream.close()
    if key_now is not None and seen > skip and not complete:
        raise ShardError(f"{url}: sample {key_now!r} has no {sorted(wanted - set(parts))[0]!r} component")
    total = seen + (first if expected_key is not None else 0)
    raise ShardError(f"{url}: ends after {total} samples, the manifest says {src.shards[tar]['num_samples']}")


class _PlansNow:
    """First stage of a worker's pipeline, run at every epoch: the plan of this worker (all of them in-process).

    The epoch, the batches already consumed and the tar order come from `ticket`, a tensor in shared memory the
    training process fills before each `for`: the workers persist across epochs, their copy of the loader does not
    change, so this is how they learn where the new pass starts.
    """

    def __init__(self, ticket: torch.Tensor, counts: list[int], plan_args: dict):
        self.ticket, self.counts, self.plan_args = ticket, counts, plan_args

    def __call__(self):
        epoch, done, *order = (int(v) for v in self.ticket)
        plans = plan_epoch(self.counts, order, epoch=epoch, **self.plan_args)
        info = get_worker_info()
        for plan in plans if info is None else [plans[info.id]]:
            yield WorkerPlan(plan.worker, plan.order, plan.first, [b for b in plan.batches if b[0] >= done])


def _make_batches(plans, *, src: _Source, counts: list[int], decoder: _Decoder, skip: bool):
    """Second stage: for each plan, read its run and yield {"j", tensors..., "skipped"} per batch, in plan order."""
    for plan in plans:
        try:
            yield from _plan_batches(plan, src, counts, decoder, skip)
        except ShardError as e:  # a message, not a raise: DataLoader would wrap a worker's exception in a traceback
            yield {"error": str(e)}
            return


def _plan_batches(plan: WorkerPlan, src: _Source, counts: list[int], decoder: _Decoder, skip: bool):
    if not plan.batches:
        return
    needed = {int(s) for _, slots, _, _ in plan.batches for s in slots}
    begin = min(needed, default=0)
    end = max(needed, default=-1) + 1
    held: dict[int, dict | str] = {}  # slot -> sample, or the reason it is missing (on_error="skip")

    def samples():
        slot = begin
        for tar, first, count in segments(counts, plan.order, plan.first + begin, plan.first + end):
            segment_end = slot + count
            try:
                for sample in _tar_samples(src, tar, first, count):
                    yield slot, sample
                    slot += 1
            except ShardError as e:
                if not skip:
                    raise
                while slot < segment_end:  # the rest of this run of the tar is missing
                    yield slot, str(e)
                    slot += 1

    stream = samples()
    for j, slots, rows, crops in plan.batches:
        for s in slots:
            while int(s) not in held:
                got, sample = next(stream)
                if got in needed:
                    held[got] = sample
        items = [held.pop(int(s)) for s in slots]
        keep = [i for i, x in enumerate(items) if isinstance(x, dict)]
        reasons = [x for x in items if isinstance(x, str)]
        out = decoder.batch([items[i] for i in keep], rows[keep], crops[keep])
        if "error" in out and skip:
            good = []
            for i in keep:  # find the sample(s) that do not decode (error path only: decodes them once more)
                one = decoder.batch([items[i]], rows[[i]], crops[[i]])
                if "error" in one:
                    reasons.append(one["error"])
                else:
                    good.append(i)
            out = decoder.batch([items[i] for i in good], rows[good], crops[good])
        out.update(j=j, skipped=reasons)
        yield out


# --------------------------------------------------------------------------------------------------------------------
# In the training process


class StreamLoader(LoaderBase):
    """The stream backend. Same public surface as the other loaders: len, iteration by epochs, .epoch, state()."""

    def __init__(
        self,
        spec: LoaderSpec,
        *,
        shard_dir: str,
        shards: list[dict],
        shuffle_buffer: int,
        retries: int,
        retry_backoff_s: float,
        on_error: str,
    ):
        if on_error not in ON_ERROR:
            raise ShardError(f"on_error={on_error!r}: expected one of {', '.join(ON_ERROR)}")
        super().__init__(spec)
        components = sample_components(spec.image_ext, spec.instances, spec.label_ext, spec.full_res_targets)
        self._src = _Source(str(shard_dir), shards, components, retries, retry_backoff_s)
        self._counts = [int(sh["num_samples"]) for sh in shards]
        self._decoder = _Decoder(spec.recipe, spec.image_ext, spec.full_res_targets, spec.instances, spec.label_ext)
        self._plan_args = dict(
            rank=spec.rank, world_size=spec.world_size, seed=spec.seed, num_batches=spec.num_batches,
            micro_batch_size=spec.micro_batch_size, drop_last=spec.drop_last, shuffle=spec.shuffle,
            num_workers=spec.num_threads, shuffle_buffer=shuffle_buffer, recipe=spec.recipe,
        )  # fmt: skip
        self._skip = on_error == "skip"
        self._device = spec.torch_device
        self._samples_done = int(spec.position.get("samples_done", 0))
        self._order = spec.position.get("tar_order")  # the current epoch's tar order (None: not decided yet)
        if self._order is not None and sorted(self._order) != list(range(len(shards))):
            raise ShardError(f"checkpoint: tar order {self._order} does not fit the {len(shards)} tars of the split")
        self.skipped: list[str] = []  # on_error="skip": one line per sample left out
        # (epoch, batches done, tar order...) for the workers' next pass (_PlansNow); shared, not copied
        self._ticket = torch.zeros(2 + len(shards), dtype=torch.int64).share_memory_()
        self._pipeline = wds.DataPipeline(
            _PlansNow(self._ticket, self._counts, self._plan_args),
            partial(_make_batches, src=self._src, counts=self._counts, decoder=self._decoder, skip=self._skip),
        )
        self._loader = None

    def tar_order(self, epoch: int) -> list[int]:
        """Indices (into the manifest's list) of the tars in the order `epoch` reads them."""
        return tar_order(len(self._counts), self.spec.seed, epoch, self.spec.shuffle)

    def plan(self, epoch: int, order: list[int] | None = None) -> list[WorkerPlan]:
        """Every worker's plan of `epoch` (see the module docstring)."""
        order = self.tar_order(epoch) if order is None else order
        return plan_epoch(self._counts, order, epoch=epoch, **self._plan_args)

    def __iter__(self):
        if self._done >= self.spec.num_batches:
            self._next_epoch()
        if self._order is None:
            self._order = self.tar_order(self._epoch)
        epoch = self._epoch
        self._ticket.copy_(torch.tensor([epoch, self._done, *self._order]))
        if self._loader is None and self.spec.num_threads > 0:
            workers = max(1, min(self.spec.num_threads, self.spec.num_batches))
            self._loader = DataLoader(
                self._pipeline,
                batch_size=None,  # the pipeline yields whole batches
                num_workers=workers,
                prefetch_factor=2,
                pin_memory=self._device.type == "cuda",
                persistent_workers=True,  # no worker start-up per epoch (or per evaluation)
                multiprocessing_context=worker_context("frrn_dist.data.stream"),
            )
        it = iter(self._loader if self._loader is not None else self._pipeline)
        pending = {}  # batches that arrived before their turn (workers run side by side)
        while self._epoch == epoch and self._done < self.spec.num_batches:
            while self._done not in pending:
                out = next(it, None)
                if out is None:
                    raise ShardError(f"{self._src.shard_dir}: the readers ended before batch {self._done}")
                if "error" in out:
                    raise ShardError(out["error"])
                pending[out["j"]] = out
            out = pending.pop(self._done)
            self.skipped.extend(out["skipped"])
            self._done += 1
            self._samples_done += len(out["keys"])
            yield batch_on(self._device, out)
        if self._epoch == epoch:
            self._next_epoch()

    def state(self) -> bytes:
        """Bytes that resume this loader where it is: epoch, its tar order, batches and samples consumed."""
        position = dict(
            epoch=self._epoch, batches_done=self._done, samples_done=self._samples_done, tar_order=self._order
        )
        return pack_state(self.spec.setup, position)

    def _next_epoch(self) -> None:
        self._epoch, self._done, self._samples_done, self._order = self._epoch + 1, 0, 0, None
