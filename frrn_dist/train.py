"""Training FRRN with DeepSpeed: main(cfg) builds everything, resumes, runs the loop, evaluates and checkpoints.

The loop is the torchvision segmentation reference's shape with HelloDeepSpeed's three lines at its heart
(loss = ...; engine.backward(loss); engine.step()). Everything that depends on the config is translated into
plain arguments here; the model, the loss and the loaders never see the config object.

Written for the GPU: an ordinary micro-step never waits for the device. Loss sums and non-finite counts stay on
the device, and the host reads them once every `train.log_every_steps` optimizer steps, in one all-reduce that is
also where every rank agrees to stop (a non-finite loss or a SIGTERM anywhere). Every evaluation and save is
preceded by that agreement, so no checkpoint is ever written after a non-finite step.
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

import deepspeed
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from frrn_dist import distributed as dist
from frrn_dist.checkpoints import latest_tag, load_checkpoint, save_checkpoint
from frrn_dist.config import deepspeed_config, images_per_step, save_config, to_dict
from frrn_dist.data.loaders import build_loader
from frrn_dist.loss import BootstrappedCrossEntropy
from frrn_dist.metrics import CityscapesMetrics
from frrn_dist.model import FRRN, convert_sync_batchnorm
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


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_model(model_cfg: DictConfig) -> FRRN:
    """The one place where the model's config becomes constructor arguments."""
    model = FRRN(
        arch=model_cfg.arch,
        num_classes=model_cfg.num_classes,
        upsample=model_cfg.upsample,
        checkpointing=model_cfg.checkpointing,
        channels_last=model_cfg.channels_last,  # the model converts its input; weights stay contiguous for DeepSpeed
    )
    if model_cfg.sync_bn:
        model = convert_sync_batchnorm(model)
    return model


def build_engine(cfg: DictConfig, device: torch.device) -> deepspeed.DeepSpeedEngine:
    """FRRN wrapped in a DeepSpeed engine (optimizer, ZeRO stage, clipping, autocast from the config)."""
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (DeepSpeed also broadcasts rank 0's)
    model = build_model(cfg.model).to(device)
    ds_config = deepspeed_config(cfg, dist.get_world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


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
            "images_per_s": interval.images / seconds,
            "data_wait": interval.data_wait_s / seconds,  # fraction of the time spent waiting for the loader
            "epoch": state.epoch,
        }
        loop.tracker.log_train(step, values)
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{values['images_per_s']:.2f}")
        loop.interval = Interval(interval.device)
    if preempted:
        return "SIGTERM"
    if loop.eval_every_steps and step % loop.eval_every_steps == 0 and step < loop.max_steps:
        loop.run_eval()
    if step % loop.save_every_steps == 0 and step < loop.max_steps:
        loop.checkpoint_now()
    return "done" if step >= loop.max_steps else None


def resume(engine, ckpt_dir: Path, world_size: int) -> RunState:
    """Collective: the run state from `latest` (weights and optimizer go into the engine), or a fresh one."""
    state = RunState()
    if latest_tag(ckpt_dir) is None:
        return state
    path, client = load_checkpoint(engine, ckpt_dir, world_size)
    state = RunState(**{k: client[k] for k in ("epoch", "best_miou", "wandb_id", "data") if k in client})
    if len(state.data or []) != world_size:
        log.warning(
            f"checkpoint was written by {len(state.data or [])} rank(s), now {world_size}: data order restarts "
            "from the checkpoint's epoch"
        )
        state.data = None
    log.info(f"resumed from {path} at step {engine.global_steps}, epoch {state.epoch}")
    return state


def loader_threads(num_threads: int | None) -> int:
    """data.num_threads, or the CPUs this rank may use less one for the training process (1..8); logged."""
    if num_threads is not None:
        return num_threads
    cpus, source = dist.cpus_per_rank()
    threads = max(1, min(8, cpus - 1))
    log.info(f"data.num_threads={threads} per rank ({cpus} CPUs per rank from {source})")
    return threads


def build_loaders(cfg: DictConfig, device: torch.device, data_state: bytes | None):
    """The train and val loaders of this rank (the one place the data config becomes loader arguments)."""
    common = dict(
        backend=cfg.data.backend,
        input_hw=tuple(cfg.data.input_hw),
        micro_batch_size=cfg.train.micro_batch_size,
        rank=dist.get_global_rank(),
        world_size=dist.get_world_size(),
        device=device.type,
        device_id=dist.get_local_rank() if device.type == "cuda" else None,
        num_threads=loader_threads(cfg.data.num_threads),
    )
    train_loader = build_loader(
        cfg.data.shard_dir,
        cfg.data.train_split,
        recipe=cfg.data.recipe,
        seed=cfg.train.seed,
        translate_px=cfg.data.translate_px,
        gamma_z=cfg.data.gamma_z,
        flip=cfg.data.flip,
        shuffle_buffer=cfg.data.shuffle_buffer,
        shuffle=cfg.data.shuffle,
        checkpoint=data_state,
        **common,
    )
    val_loader = build_loader(cfg.data.shard_dir, cfg.data.val_split, recipe="eval", **common)
    return train_loader, val_loader


def build_tracker(cfg: DictConfig, run_dir: Path, wandb_id: str | None) -> Tracker:
    return Tracker(
        run_dir,
        active=dist.is_main_process(),
        use_wandb=cfg.wandb.enabled,
        mode=cfg.wandb.mode,
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group,
        tags=list(cfg.wandb.tags),
        name=cfg.run.name,
        config=to_dict(cfg),
        run_id=wandb_id,
    )


def setup_run(cfg: DictConfig) -> tuple[torch.device, Path]:
    """Join the process group, create the run folder (rank 0) and save the effective config in it."""
    device = dist.init_distributed(resolve_device(cfg.run.device))
    dist.setup_logging()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if dist.is_main_process():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # one path for all ranks, decided by rank 0
    dist.barrier()
    world_size = dist.get_world_size()
    log.info(
        f"run {run_dir}: FRRN-{cfg.model.arch} at {cfg.data.input_hw[0]}x{cfg.data.input_hw[1]}, {world_size} "
        f"rank(s) on {device.type}; images per optimizer step = {cfg.train.micro_batch_size} micro x "
        f"{cfg.train.grad_accum_steps} accum x {world_size} ranks = {images_per_step(cfg, world_size)}"
    )
    return device, run_dir


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


def main(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) the run `cfg.run.name`; returns the last validation results (on every rank)."""
    device, run_dir = setup_run(cfg)
    ckpt_dir = run_dir / "checkpoints"
    engine = build_engine(cfg, device)
    state = resume(engine, ckpt_dir, dist.get_world_size()) if cfg.run.resume else RunState()
    rank = dist.get_global_rank()
    train_loader, val_loader = build_loaders(cfg, device, state.data[rank] if state.data else None)
    criterion = BootstrappedCrossEntropy(k=cfg.loss.bootstrap_k, k_fraction=cfg.loss.bootstrap_fraction)
    tracker = build_tracker(cfg, run_dir, state.wandb_id)
    state.wandb_id = dist.broadcast_object(tracker.run_id)
    meta = {k: cfg.model[k] for k in ("arch", "num_classes", "upsample")}
    meta.update(input_hw=list(cfg.data.input_hw), run=cfg.run.name)

    def checkpoint_now() -> str:
        state.data = dist.all_gather_object(train_loader.state())  # per-rank data position, in rank order
        tag = save_checkpoint(
            engine, ckpt_dir, client_state=vars(state), meta={**meta, "step": engine.global_steps},
            keep=cfg.train.keep_checkpoints,
        )  # fmt: skip
        log.info(f"checkpoint {ckpt_dir / tag}")
        return tag

    results: dict[str, Any] = {}

    def run_eval() -> dict[str, Any]:
        nonlocal results
        results, samples = evaluate(
            engine.module, val_loader, criterion, precision=cfg.train.precision, num_samples=cfg.wandb.num_samples
        )
        state.best_miou = max(results["miou"], state.best_miou or -1.0)
        log.info(f"step {engine.global_steps} epoch {state.epoch}: val mIoU {results['miou']:.4f}, "
                 f"loss {results['loss']:.4f}")  # fmt: skip
        tracker.log_val(engine.global_steps, state.epoch, results, samples)
        return results

    loop = Loop(
        max_steps=cfg.train.max_steps,
        log_every_steps=cfg.train.log_every_steps,
        eval_every_steps=cfg.train.eval_every_steps,
        save_every_steps=cfg.train.save_every_steps,
        precision=cfg.train.precision,
        lr_args=dict(
            lr=cfg.optim.lr,
            schedule=cfg.optim.schedule,
            drop_step=cfg.optim.lr_drop_step,
            drop_factor=cfg.optim.lr_drop_factor,
            warmup_steps=cfg.optim.warmup_steps,
            max_steps=cfg.train.max_steps,
        ),  # fmt: skip
        tracker=tracker,
        preempt=PreemptionFlag(),
        run_eval=run_eval,
        checkpoint_now=checkpoint_now,
        syncs=HostSyncCounter(device) if cfg.train.count_host_syncs else None,
        checked_step=engine.global_steps,
    )
    bar = tqdm(total=cfg.train.max_steps, initial=engine.global_steps, disable=not dist.is_main_process(),
               desc="train", unit="step")  # fmt: skip
    engine.train()
    stop = "done" if engine.global_steps >= cfg.train.max_steps else "epoch"
    while stop == "epoch":
        stop = train_one_epoch(engine, train_loader, criterion, loop, state, bar)
    bar.close()
    if loop.syncs is not None:
        write_sync_report(loop, run_dir)
    if stop == "SIGTERM":
        log.info(f"SIGTERM received: saving a checkpoint at step {engine.global_steps} and exiting")
    else:
        run_eval()
    checkpoint_now()
    tracker.close()
    if dist.is_main_process() and stop != "SIGTERM":
        log.info(f"done: val mIoU {results['miou']:.4f} (best {state.best_miou:.4f}); run folder {run_dir}")
    return results
