"""The training loop: micro-steps, the optimizer-step boundary where ranks agree, and evaluation at the training
scale. Plain values in, no config object (frrn_dist.train builds everything and calls `train_one_epoch`).

Written for the GPU: an ordinary micro-step never waits for the device. Loss sums and non-finite counts stay on
the device (`Interval`), and the host reads them once every `log_every_steps` optimizer steps, in one all-reduce
that is also where every rank agrees to stop (a non-finite loss or a SIGTERM anywhere). Every evaluation and save
is preceded by that agreement, so no checkpoint is ever written after a non-finite step.

Imports: torch, frrn_dist.distributed, frrn_dist.metrics, frrn_dist.syncs, frrn_dist.tracking.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frrn_dist import distributed as dist
from frrn_dist.metrics import CityscapesMetrics
from frrn_dist.syncs import HostSyncCounter
from frrn_dist.tracking import Tracker

log = logging.getLogger("frrn_dist")


def lr_at(
    step: int, *, lr: float, schedule: str, drop_step: int, drop_factor: float, warmup_steps: int, max_steps: int
) -> float:
    """Learning rate for optimizer step `step` (0-based). A pure function of the step, so resume needs no state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "step":
        return lr * (drop_factor if step >= drop_step else 1.0)
    if schedule == "cosine":
        t = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return lr * (drop_factor + (1 - drop_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
    return lr


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast for convs; parameters, BN statistics and the loss stay fp32 (stack-notes 2.3)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def forward_loss(engine, images: torch.Tensor, labels: torch.Tensor, criterion, precision: str) -> torch.Tensor:
    """One micro-batch forward and loss (backward and step are the caller's, so they stay visible in the loop)."""
    with autocast_context(precision, images.device):
        logits = engine(images)
    return criterion(logits.float(), labels)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader, criterion, *, precision: str, num_samples: int = 0
) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]]:
    """Collective: score the val split at the training scale over all ranks; returns (results, samples).

    `model` is the engine's module: evaluation needs no DeepSpeed (autocast is ours, no gradients flow).

    Every rank runs this (the confusion matrix is all-reduced, so mIoU is computed once over the whole set,
    the Cityscapes way, never averaged over ranks). BN running statistics are averaged first so every rank
    evaluates the same model. `samples` (image, prediction, label, key) are this rank's first few images.
    """
    dist.average_buffers(model)
    model.eval()
    metrics = CityscapesMetrics()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=dist.compute_device())  # (sum of loss x images, images)
    samples = []
    for batch in loader:
        n = len(batch)
        if n == 0:  # a rank's last batch can be empty (500 images, 32 ranks): the mean of no pixels is NaN
            continue
        with autocast_context(precision, batch.images.device):
            logits = model(batch.images)
        logits = logits.float()
        loss_sum[0] += criterion(logits, batch.labels).double() * n
        loss_sum[1] += n
        pred = logits.argmax(1)
        metrics.update(pred, batch.labels)
        for i in range(min(n, num_samples - len(samples))):
            key = batch.keys[i] if batch.keys else f"sample{len(samples)}"
            samples.append((batch.images[i].cpu(), pred[i].cpu(), batch.labels[i].cpu(), key))
    metrics.all_reduce()
    dist.all_reduce_sum(loss_sum)
    model.train()
    results = metrics.compute()
    total, images = loss_sum.tolist()
    results["loss"] = total / max(images, 1)
    return results, samples


class PreemptionFlag:
    """Set by SIGTERM (cluster preemption, `scancel`): the loop saves a checkpoint and exits 0 at the next check."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


@dataclass
class RunState:
    """What a checkpoint carries besides the weights and the optimizer (DeepSpeed's client_state)."""

    epoch: int = 0
    best_miou: float | None = None
    wandb_id: str | None = None
    data: list | None = None  # every rank's loader state, in rank order


@dataclass
class Interval:
    """What the loop gathers between two host reads: device-side sums, host-side counts and timers."""

    device: torch.device
    sums: torch.Tensor = field(init=False)  # float64 (loss sum, non-finite losses) on the device: adds never wait
    micro_steps: int = 0
    images: int = 0  # over all ranks
    data_wait_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def add(self, loss: torch.Tensor, images: int) -> None:
        loss = loss.detach().double()
        self.sums += torch.stack((loss, (~torch.isfinite(loss)).double()))
        self.micro_steps += 1
        self.images += images

    def agree(self, sigterm: bool) -> tuple[float, bool, bool]:
        """Collective, and the loop's one host read: (mean loss since the reset, any non-finite, any SIGTERM)."""
        flags = torch.cat((self.sums, torch.full((1,), float(sigterm), dtype=torch.float64, device=self.device)))
        loss_sum, non_finite, preempted = dist.all_reduce_sum(flags).tolist()
        world = dist.get_world_size()
        return loss_sum / max(1, self.micro_steps * world), non_finite > 0, preempted > 0


def timed(loader, interval_of):
    """Iterate `loader`, adding the time spent waiting for each batch to the current interval's data_wait_s."""
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        interval_of().data_wait_s += time.perf_counter() - t
        yield batch


@dataclass
class Loop:
    """Everything the loop needs besides the engine and the data: plain values, and the run's side effects."""

    max_steps: int
    log_every_steps: int
    eval_every_steps: int
    save_every_steps: int
    precision: str
    lr_args: dict[str, Any]
    tracker: Tracker
    preempt: PreemptionFlag
    run_eval: Any  # () -> results
    checkpoint_now: Any  # () -> tag
    syncs: HostSyncCounter | None = None
    synced_micro_steps: int = 0
    flops_per_image: int = 0  # nominal forward+backward at the training size (hardware.flops_per_image)
    peak_tflops: float | None = None  # one rank's device at the training precision, None = unknown
    interval: Interval | None = None  # since the last log line; carried across epochs
    checked_step: int = 0  # the last step at which the ranks agreed

    def is_boundary(self, step: int) -> bool:
        """Steps at which the host reads the device: log lines, evaluations, saves, the end."""
        return (
            step % self.log_every_steps == 0
            or (self.eval_every_steps and step % self.eval_every_steps == 0)
            or step % self.save_every_steps == 0
            or step >= self.max_steps
        )


def train_one_epoch(engine, loader, criterion, loop: Loop, state: RunState, bar) -> str | None:
    """Run micro-steps until the loader's epoch ends ("epoch"), max_steps ("done") or a SIGTERM ("SIGTERM")."""
    world = dist.get_world_size()
    if loop.interval is None:
        loop.interval = Interval(dist.compute_device())
    for batch in timed(loader, lambda: loop.interval):
        step = engine.global_steps
        loss = forward_loss(engine, batch.images, batch.labels, criterion, loop.precision)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(step, **loop.lr_args)
        engine.backward(loss)
        engine.step()
        loop.interval.add(loss, len(batch) * world)
        if loop.syncs is not None and loop.syncs.active:
            loop.synced_micro_steps += 1
        if engine.global_steps == step:
            continue  # mid-accumulation: no optimizer step yet
        step = engine.global_steps
        bar.update(1)
        if not loop.is_boundary(step):
            if loop.syncs is not None:
                loop.syncs.resume()  # from the first step on: the warm-up micro-step is not ordinary
            continue
        if loop.syncs is not None:
            loop.syncs.pause()
        stop = _at_boundary(engine, loop, state, step, bar)
        if stop:
            return stop
        if loop.syncs is not None:
            loop.syncs.resume()
    state.epoch += 1  # the loader ran out: one full pass over this rank's shard
    return "epoch"


def _at_boundary(engine, loop: Loop, state: RunState, step: int, bar) -> str | None:
    """Collective: agree, log, evaluate and save as this step asks; a reason to stop, or None."""
    interval = loop.interval
    loss, non_finite, preempted = interval.agree(loop.preempt.requested)
    since, loop.checked_step = loop.checked_step, step
    if non_finite:
        bar.close()
        loop.tracker.close()
        if not dist.is_main_process():
            raise SystemExit(1)  # rank 0 says why, once
        raise SystemExit(
            f"the loss became non-finite on some rank between steps {since} and {step}; "
            f"stopping without saving. The last good checkpoint is kept (lower optim.lr or set optim.grad_clip)"
        )
    if step % loop.log_every_steps == 0 or step >= loop.max_steps:
        seconds = time.perf_counter() - interval.start
        values = {
            "loss": loss,
            "lr": engine.optimizer.param_groups[0]["lr"],
            "epoch": state.epoch,
            "perf/images_per_s": interval.images / seconds,
            "perf/data_wait": interval.data_wait_s / seconds,  # fraction of the time spent waiting for the loader
            "perf/tflops": interval.images / seconds * loop.flops_per_image / 1e12,  # all ranks together
        }
        if loop.peak_tflops:
            values["perf/mfu"] = values["perf/tflops"] / (loop.peak_tflops * dist.get_world_size())
        loop.tracker.log_train(step, values)
        mfu = {"mfu": f"{values['perf/mfu']:.0%}"} if "perf/mfu" in values else {}
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{values['perf/images_per_s']:.2f}", **mfu,
                        wait=f"{values['perf/data_wait']:.0%}")  # fmt: skip
        loop.interval = Interval(interval.device)
    if preempted:
        return "SIGTERM"
    if loop.eval_every_steps and step % loop.eval_every_steps == 0 and step < loop.max_steps:
        loop.run_eval()
    if step % loop.save_every_steps == 0 and step < loop.max_steps:
        loop.checkpoint_now()
    return "done" if step >= loop.max_steps else None


def write_sync_report(loop: Loop, run_dir: Path) -> None:
    """Collective: every rank's host-sync count on ordinary micro-steps into <run>/host_syncs.json (rank 0)."""
    mine = {
        "rank": dist.get_global_rank(),
        "device": str(loop.syncs.device),
        "micro_steps": loop.synced_micro_steps,
        "host_syncs": loop.syncs.count,
        "first": loop.syncs.first_stack,
    }
    loop.syncs.close()
    ranks = dist.all_gather_object(mine)
    if dist.is_main_process():
        (run_dir / "host_syncs.json").write_text(json.dumps(ranks, indent=1) + "\n")
        total = sum(r["host_syncs"] for r in ranks)
        log.info(f"host syncs on ordinary micro-steps: {total} in {sum(r['micro_steps'] for r in ranks)}")
