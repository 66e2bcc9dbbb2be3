"""Training FRRN with DeepSpeed: main(cfg) builds everything, runs the loop, evaluates and checkpoints.

The loop is the torchvision segmentation reference's shape with HelloDeepSpeed's three lines at its heart
(loss = ...; engine.backward(loss); engine.step()). Everything that depends on the config is translated into
plain arguments here; the model, the loss and the loaders never see the config object.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import deepspeed
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from frrn_dist import distributed as dist
from frrn_dist.config import deepspeed_config, images_per_step, save_config, to_dict
from frrn_dist.data.loaders import build_loader
from frrn_dist.export import save_model
from frrn_dist.loss import BootstrappedCrossEntropy
from frrn_dist.metrics import CityscapesMetrics
from frrn_dist.model import FRRN, convert_sync_batchnorm
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
    """FRRN wrapped in a DeepSpeed engine (Adam, ZeRO stage, clipping, autocast from the config)."""
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
    engine, loader, criterion, *, precision: str, num_samples: int = 0
) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]]:
    """Collective: score the val split at the training scale over all ranks; returns (results, samples).

    Every rank runs this (the confusion matrix is all-reduced, so mIoU is computed once over the whole set,
    the Cityscapes way, never averaged over ranks). BN running statistics are averaged first so every rank
    evaluates the same model. `samples` (image, prediction, label, key) are this rank's first few images.
    """
    dist.average_buffers(engine.module)
    engine.eval()
    metrics = CityscapesMetrics()
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of per-batch losses x images, images)
    samples = []
    for batch in loader:
        with autocast_context(precision, batch.images.device):
            logits = engine(batch.images)
        logits = logits.float()
        n = batch.images.shape[0]
        loss_sum += torch.tensor([criterion(logits, batch.labels).item() * n, n], dtype=torch.float64)
        pred = logits.argmax(1)
        metrics.update(pred, batch.labels)
        for i in range(min(n, num_samples - len(samples))):
            key = batch.keys[i] if batch.keys else f"sample{len(samples)}"
            samples.append((batch.images[i].cpu(), pred[i].cpu(), batch.labels[i].cpu(), key))
    metrics.all_reduce()
    dist.all_reduce_sum(loss_sum)
    engine.train()
    results = metrics.compute()
    results["loss"] = (loss_sum[0] / loss_sum[1].clamp(min=1)).item()
    return results, samples


class PreemptionFlag:
    """Set by SIGTERM (cluster preemption, `scancel`): the loop saves a checkpoint and exits 0 at the next step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def save_checkpoint(engine, ckpt_dir: Path, *, client_state: dict[str, Any], meta: dict[str, Any], keep: int) -> str:
    """Collective: a resumable DeepSpeed checkpoint plus an exported model, on every rank with the same tag.

    DeepSpeed's save has barriers inside: it hangs if called on rank 0 only. BN buffers are averaged first, since
    the checkpoint holds rank 0's copy and every rank gets that copy back on resume. `latest` is written by us,
    atomically and only after every file is complete, so a crash or a full disk mid-save leaves the previous
    checkpoint as the one a restart resumes from.
    """
    dist.average_buffers(engine.module)
    tag = f"step{engine.global_steps:08d}"
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if dist.is_main_process():
            save_model(engine.module, ckpt_dir / tag, meta)
    except (OSError, RuntimeError) as e:
        # A full disk or quota is an OSError from Python's writes but a RuntimeError from torch.save's zip writer
        # ("unexpected pos ..."), the one DeepSpeed uses (seen in tests/test_faults.py). The launcher stops the
        # other ranks when this one exits non-zero.
        if dist.is_main_process():
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        previous = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else "none"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0]
        raise SystemExit(
            f"{ckpt_dir / tag}: checkpoint could not be written ({reason or type(e).__name__}); the previous "
            f"checkpoint ({previous}) is intact and a restart resumes from it"
        ) from None
    dist.barrier()  # every rank's files are complete
    if dist.is_main_process():
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
        # only complete checkpoints (model.json is written last) at or below this one count towards `keep`; a
        # partial tag left by a crash is removed, so it never outlives a good checkpoint
        for p in ckpt_dir.glob("step*"):
            if p.is_dir() and not (p / "model.json").is_file():
                shutil.rmtree(p, ignore_errors=True)
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name < tag)
        for old in tags[: max(0, len(tags) - max(0, keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: Path, world_size: int) -> tuple[str, dict[str, Any]]:
    """Collective: resume weights, optimizer, step and client state from `ckpt_dir/latest`.

    ZeRO 1/2 shard the optimizer state by rank, so a checkpoint written by N ranks cannot restore Adam's moments
    on M != N ranks; then the weights, the step and the schedule are resumed and the optimizer state restarts
    (said in the log). Stage 0 keeps the whole optimizer state in one file and resumes on any number of ranks.
    """
    tag = (ckpt_dir / "latest").read_text().strip()
    shards = len(list((ckpt_dir / tag).glob("zero_pp_rank_*_optim_states.pt")))
    same_world = shards in (0, world_size)
    if not same_world:
        log.warning(
            f"{ckpt_dir / tag}: written by {shards} ranks with a sharded (ZeRO) optimizer state, resumed on "
            f"{world_size}: weights, step and lr schedule are restored, Adam's moments restart from zero"
        )
    path, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=same_world, load_lr_scheduler_states=same_world
    )
    if path is None:
        raise SystemExit(f"{ckpt_dir / tag}: checkpoint named by {ckpt_dir / 'latest'} cannot be loaded")
    return path, client


def main(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) the run `cfg.run.name`; returns the last validation results (on every rank)."""
    device = dist.init_distributed(resolve_device(cfg.run.device))
    dist.setup_logging()
    rank, world_size = dist.get_global_rank(), dist.get_world_size()
    is_main = dist.is_main_process()

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt_dir = run_dir / "checkpoints"
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # one path for all ranks, decided by rank 0
    dist.barrier()

    per_step = images_per_step(cfg, world_size)
    log.info(
        f"run {run_dir}: FRRN-{cfg.model.arch} at {cfg.data.input_hw[0]}x{cfg.data.input_hw[1]}, {world_size} "
        f"rank(s) on {device.type}; images per optimizer step = {cfg.train.micro_batch_size} micro x "
        f"{cfg.train.grad_accum_steps} accum x {world_size} ranks = {per_step}"
    )
    engine = build_engine(cfg, device)

    # Resume: every rank loads the same tag; per-rank data state was gathered into rank 0's client_state.
    state: dict[str, Any] = {"epoch": 0, "best_miou": None, "wandb_id": None, "data": None}
    if cfg.run.resume and (ckpt_dir / "latest").is_file():
        path, client = load_checkpoint(engine, ckpt_dir, world_size)
        state.update({k: client[k] for k in state if k in client})
        data_states = state["data"] or []
        if len(data_states) != world_size:
            log.warning(
                f"checkpoint was written by {len(data_states)} rank(s), now {world_size}: data order restarts "
                "from the checkpoint's epoch"
            )
            state["data"] = None
        log.info(f"resumed from {path} at step {engine.global_steps}, epoch {state['epoch']}")
    data_state = state["data"][rank] if state["data"] else None

    loader_args = dict(
        backend=cfg.data.backend,
        input_hw=tuple(cfg.data.input_hw),
        micro_batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world_size,
        device=device.type,
        device_id=dist.get_local_rank() if device.type == "cuda" else None,
        num_threads=cfg.data.num_threads,
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
        checkpoint=data_state,
        **loader_args,
    )
    val_loader = build_loader(cfg.data.shard_dir, cfg.data.val_split, recipe="eval", **loader_args)
    criterion = BootstrappedCrossEntropy(k=cfg.loss.bootstrap_k, k_fraction=cfg.loss.bootstrap_fraction)
    lr_args = dict(
        lr=cfg.optim.lr,
        schedule=cfg.optim.schedule,
        drop_step=cfg.optim.lr_drop_step,
        drop_factor=cfg.optim.lr_drop_factor,
        warmup_steps=cfg.optim.warmup_steps,
        max_steps=cfg.train.max_steps,
    )
    meta = {
        "arch": cfg.model.arch,
        "num_classes": cfg.model.num_classes,
        "upsample": cfg.model.upsample,
        "input_hw": list(cfg.data.input_hw),
        "run": cfg.run.name,
    }

    tracker = Tracker(
        run_dir,
        active=is_main,
        use_wandb=cfg.wandb.enabled,
        mode=cfg.wandb.mode,
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group,
        tags=list(cfg.wandb.tags),
        name=cfg.run.name,
        config=to_dict(cfg),
        run_id=state["wandb_id"],
    )
    state["wandb_id"] = dist.broadcast_object(tracker.run_id)
    preempt = PreemptionFlag()

    def checkpoint_now() -> str:
        client_state = {
            "epoch": state["epoch"],
            "best_miou": state["best_miou"],
            "wandb_id": state["wandb_id"],
            "data": dist.all_gather_object(train_loader.state()),  # per-rank DALI position, in rank order
        }
        meta["step"] = engine.global_steps
        tag = save_checkpoint(engine, ckpt_dir, client_state=client_state, meta=meta, keep=cfg.train.keep_checkpoints)
        log.info(f"checkpoint {ckpt_dir / tag}")
        return tag

    def run_eval() -> dict[str, Any]:
        results, samples = evaluate(
            engine, val_loader, criterion, precision=cfg.train.precision, num_samples=cfg.wandb.num_samples
        )
        miou = results["miou"]
        if state["best_miou"] is None or miou > state["best_miou"]:
            state["best_miou"] = miou
        log.info(f"step {engine.global_steps} epoch {state['epoch']}: val mIoU {miou:.4f}, loss {results['loss']:.4f}")
        tracker.log_val(engine.global_steps, state["epoch"], results, samples)
        return results

    step = engine.global_steps
    results: dict[str, Any] = {}
    loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of micro-batch losses, count) since the last log line
    images_seen, t_last = 0, time.perf_counter()
    bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, desc="train", unit="step")
    engine.train()
    stopped_by = None
    while step < cfg.train.max_steps and stopped_by is None:
        for batch in train_loader:
            loss = forward_loss(engine, batch.images, batch.labels, criterion, cfg.train.precision)
            # Collective on every micro-step (two floats): all ranks agree to stop on a non-finite loss or a
            # SIGTERM anywhere, so no rank is left waiting in the next all-reduce.
            flags = dist.all_reduce_sum(torch.tensor([float(not torch.isfinite(loss)), float(preempt.requested)]))
            if flags[0] > 0:
                bar.close()
                tracker.close()
                raise SystemExit(
                    f"step {step}: the loss became {loss.item()} (non-finite on some rank); stopping. The last good "
                    f"checkpoint is kept in {ckpt_dir} (lower optim.lr or set optim.grad_clip)"
                )
            if flags[1] > 0:
                stopped_by = "SIGTERM"
                break
            for group in engine.optimizer.param_groups:
                group["lr"] = lr_at(step, **lr_args)
            engine.backward(loss)
            engine.step()
            loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            images_seen += batch.images.shape[0] * world_size
            if engine.global_steps == step:
                continue  # mid-accumulation: no optimizer step yet
            step = engine.global_steps
            bar.update(1)

            if step % cfg.train.log_every_steps == 0 or step == cfg.train.max_steps:
                dist.all_reduce_sum(loss_sum)  # collective: the same step on every rank
                now = time.perf_counter()
                values = {
                    "loss": (loss_sum[0] / loss_sum[1]).item(),
                    "lr": engine.optimizer.param_groups[0]["lr"],
                    "images_per_s": images_seen / (now - t_last),
                    "epoch": state["epoch"],
                }
                tracker.log_train(step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.2f}")
                loss_sum.zero_()
                images_seen, t_last = 0, now
            if cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0 and step < cfg.train.max_steps:
                results = run_eval()
            if step % cfg.train.save_every_steps == 0 and step < cfg.train.max_steps:
                checkpoint_now()
            if step >= cfg.train.max_steps:
                break
        else:
            state["epoch"] += 1  # the loader ran out: one full pass over this rank's shard
    bar.close()

    if stopped_by:
        log.info(f"{stopped_by} received: saving a checkpoint at step {step} and exiting")
        checkpoint_now()
        tracker.close()
        return results
    results = run_eval()
    checkpoint_now()
    tracker.close()
    if is_main:
        log.info(f"done: val mIoU {results['miou']:.4f} (best {state['best_miou']:.4f}); run folder {run_dir}")
    return results
