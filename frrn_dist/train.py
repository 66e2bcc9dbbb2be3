"""Training FRRN with DeepSpeed: main(cfg) builds everything, resumes, runs the loop, evaluates and checkpoints.

The loop is the torchvision segmentation reference's shape with HelloDeepSpeed's three lines at its heart
(loss = ...; engine.backward(loss); engine.step()), in frrn_dist/loop.py. Everything that depends on the config
is translated into plain arguments here; the model, the loss, the loaders and the loop never see the config.

Imports: deepspeed, omegaconf, frrn_dist.{loop, checkpoints, config, data.loaders, hardware, loss, model,
distributed, tracking}.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import deepspeed
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from frrn_dist import distributed as dist
from frrn_dist import hardware
from frrn_dist.checkpoints import latest_tag, load_checkpoint, resume_deepspeed_keys, save_checkpoint
from frrn_dist.config import deepspeed_config, images_per_step, save_config, to_dict
from frrn_dist.data.loaders import build_loader
from frrn_dist.loop import (  # noqa: F401 (lr_at, forward_loss, evaluate: the loop's API, used from here by tests)
    Loop,
    PreemptionFlag,
    RunState,
    autocast_context,
    evaluate,
    forward_loss,
    lr_at,
    train_one_epoch,
    write_sync_report,
)
from frrn_dist.loss import BootstrappedCrossEntropy
from frrn_dist.model import FRRN, convert_sync_batchnorm
from frrn_dist.resume_config import check_resume_config, compare_config
from frrn_dist.syncs import HostSyncCounter
from frrn_dist.tracking import Tracker

log = logging.getLogger("frrn_dist")


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
        # the model converts its input; weights stay contiguous for DeepSpeed. "auto" is resolved by setup_run
        # before a run builds its model; unresolved (a bare config) means contiguous.
        channels_last=model_cfg.channels_last is True,
    )
    if model_cfg.sync_bn:
        model = convert_sync_batchnorm(model)
    return model


def build_engine(cfg: DictConfig, device: torch.device) -> deepspeed.DeepSpeedEngine:
    """FRRN wrapped in a DeepSpeed engine (optimizer, ZeRO stage, clipping, autocast from the config)."""
    torch.manual_seed(cfg.train.seed)  # same initial weights everywhere (DeepSpeed also broadcasts rank 0's)
    model = hardware.maybe_compile(build_model(cfg.model).to(device), cfg.train.compile)  # in place: same names
    ds_config = deepspeed_config(cfg, dist.get_world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def resume(engine, ckpt_dir: Path, cfg: DictConfig) -> RunState:
    """Collective: the run state from `latest` (weights and optimizer go into the engine), or a fresh one.

    On another number of ranks a ZeRO 1/2 engine loads the universal checkpoint (resume_deepspeed_keys), so
    Adam's step and moments come back whole. The loaders' saved positions apply only to the same ranks, micro-batch,
    seed and data settings; otherwise the epoch restarts with the new sharding: the loaders start as a fresh run's
    (same seed, so the same first batches) and the epoch count goes on from the checkpoint's.
    """
    state = RunState()
    if latest_tag(ckpt_dir) is None:
        return state
    world_size = dist.get_world_size()
    check = compare_config(to_dict(cfg), ckpt_dir.parent, world_size)  # the tag's own config.yaml: still there
    path, client = load_checkpoint(engine, ckpt_dir, world_size)
    # DeepSpeed restores the optimizer's hyperparameters (and ZeRO's clip_grad) from the checkpoint, over the
    # config's; the loop sets lr every step, the rest must be put back or a changed beta/eps/decay/clip is ignored.
    hyper = deepspeed_config(cfg, world_size)["optimizer"]["params"]
    for group in engine.optimizer.param_groups:
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items() if k in group})
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = cfg.optim.grad_clip
    state = RunState(**{k: client[k] for k in ("epoch", "best_miou", "wandb_id", "data") if k in client})
    saved_world = check.world_size[0] if check and check.world_size[0] else len(state.data or [])
    restart = check.data_changed() if check else []
    if saved_world != world_size and "ranks" not in restart:
        restart.append("ranks")
    if restart:
        state.data = None
    optimizer = "Adam's state re-partitioned through the universal checkpoint" if engine.load_universal_checkpoint() \
        else "optimizer state as saved"  # fmt: skip
    data = f"the epoch restarts with the new sharding ({', '.join(restart)} changed)" if restart else "exact position"
    log.info(f"resumed from {path} at step {engine.global_steps}, epoch {state.epoch}: {saved_world} -> {world_size} "
             f"rank(s), {optimizer}; data: {data}")  # fmt: skip
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
    if cfg.data.backend == "stream":  # reading over a network: how hard to try, and what to do with a bad sample
        common.update(retries=cfg.data.retries, on_error=cfg.data.on_error)
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


def resolve_auto(cfg: DictConfig, device: torch.device, run_dir: Path) -> None:
    """Collective: replace `auto` precision and layout by what this device runs fast (frrn_dist.hardware).

    Rank 0 decides (a start-up measurement may be part of it) and every rank takes its answer, so all ranks train
    the same way; the choice and the reason go to the log and to `cfg.chosen`, which config.yaml keeps. A resumed
    run keeps the choice its first start made: a measurement taken on a busy machine must not switch a run's
    precision halfway (set the key explicitly to change it).
    """
    chosen = {}
    if dist.is_main_process():
        saved = run_dir / "config.yaml"
        earlier = OmegaConf.load(saved).get("chosen", {}) if cfg.run.resume and saved.is_file() else {}
        for key, choose in (("train.precision", _choose_precision), ("model.channels_last", _choose_layout)):
            if OmegaConf.select(cfg, key) != "auto":
                continue
            if key in earlier:
                chosen[key] = {
                    "value": earlier[key]["value"],
                    "why": f"kept from the run's start: {earlier[key]['why']}",
                }
            else:
                value, why = choose(cfg, device, chosen)
                chosen[key] = {"value": value, "why": why}
    chosen = dist.broadcast_object(chosen)
    for key, choice in chosen.items():
        OmegaConf.update(cfg, key, choice["value"])
        cfg.chosen[key] = choice
        log.info(f"{key}=auto -> {choice['value']}: {choice['why']}")


def _choose_precision(cfg: DictConfig, device: torch.device, chosen: dict) -> tuple[str, str]:
    return hardware.choose_precision(device)


def _choose_layout(cfg: DictConfig, device: torch.device, chosen: dict) -> tuple[bool, str]:
    precision = chosen.get("train.precision", {}).get("value", cfg.train.precision)
    return hardware.choose_channels_last(device, precision)


def setup_run(cfg: DictConfig) -> tuple[torch.device, Path]:
    """Join the process group, create the run folder (rank 0) and save the effective config in it."""
    device = dist.init_distributed(resolve_device(cfg.run.device))
    dist.setup_logging()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks compute on the same cores: torch's default (every core per process) oversubscribes them
        # (measured here: 2 ranks x 2 threads on 2 cores ran ~10x slower than 2 x 1)
        threads, source = dist.cpus_per_rank()
        torch.set_num_threads(threads)
        log.info(f"torch threads per rank: {threads} ({source}; OMP_NUM_THREADS overrides)")
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    resolve_auto(cfg, device, run_dir)
    if cfg.run.resume:  # before config.yaml is replaced: it is what older checkpoints are compared with
        check_resume_config(to_dict(cfg), run_dir, dist.get_world_size())
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


def perf_model(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """What perf/tflops and perf/mfu are computed from: FLOPs per image (counted once, on a meta-device model at
    the training size: no memory, no compute) and this rank's peak at the training precision (logged)."""
    # Rank 0 counts (~1.5 s of Python on the meta device) and measures (a CPU's peak is a matmul timed here) while
    # the others wait, so no rank's measurement is slowed by another's, and every rank reports the same numbers.
    measured = None
    if dist.is_main_process():
        with torch.device("meta"):
            flops = hardware.flops_per_image(build_model(cfg.model), tuple(cfg.data.input_hw))
        measured = flops, hardware.dense_peak_tflops(device, cfg.train.precision)
    flops, (peak, source) = dist.broadcast_object(measured)
    peak_text = f"{peak:.3g} TFLOP/s per rank ({source})" if peak else f"unknown ({source}): no perf/mfu"
    log.info(f"FRRN-{cfg.model.arch} forward+backward: {flops / 1e9:.2f} GFLOP per image; peak {peak_text}")
    return {"flops_per_image": flops, "peak_tflops": peak}


class RunActions:
    """The two side effects the loop triggers at its boundaries, with what they need: save a resumable checkpoint,
    evaluate on the val split and log it. `results` holds the last evaluation's scores."""

    def __init__(self, cfg: DictConfig, engine, ckpt_dir: Path, state: RunState, tracker: Tracker, loaders, criterion):
        self.engine, self.ckpt_dir, self.state, self.tracker, self.criterion = (
            engine,
            ckpt_dir,
            state,
            tracker,
            criterion,
        )
        self.train_loader, self.val_loader = loaders
        self.keep, self.precision, self.num_samples = (
            cfg.train.keep_checkpoints,
            cfg.train.precision,
            cfg.wandb.num_samples,
        )
        self.meta = {k: cfg.model[k] for k in ("arch", "num_classes", "upsample")}
        self.meta.update(input_hw=list(cfg.data.input_hw), run=cfg.run.name)
        self.results: dict[str, Any] = {}

    def checkpoint(self) -> str:
        """Collective: every rank's data position into the client state, then the save (frrn_dist.checkpoints)."""
        engine, state = self.engine, self.state
        state.data = dist.all_gather_object(self.train_loader.state())  # per-rank data position, in rank order
        tag = save_checkpoint(engine, self.ckpt_dir, client_state=vars(state),
                              meta={**self.meta, "step": engine.global_steps}, keep=self.keep)  # fmt: skip
        log.info(f"checkpoint {self.ckpt_dir / tag}")
        return tag

    def evaluate(self) -> dict[str, Any]:
        """Collective: val mIoU at the training scale on every rank, logged with sample predictions by rank 0."""
        engine, state = self.engine, self.state
        self.results, samples = evaluate(engine.module, self.val_loader, self.criterion, precision=self.precision,
                                         num_samples=self.num_samples)  # fmt: skip
        state.best_miou = max(self.results["miou"], state.best_miou or -1.0)
        log.info(f"step {engine.global_steps} epoch {state.epoch}: val mIoU {self.results['miou']:.4f}, "
                 f"loss {self.results['loss']:.4f}")  # fmt: skip
        self.tracker.log_val(engine.global_steps, state.epoch, self.results, samples)
        return self.results


def build_loop(cfg: DictConfig, device: torch.device, engine, actions: RunActions) -> Loop:
    """The loop's plain arguments: cadences, the lr schedule, the side effects, the perf model."""
    lr_args = dict(lr=cfg.optim.lr, schedule=cfg.optim.schedule, drop_step=cfg.optim.lr_drop_step,
                   drop_factor=cfg.optim.lr_drop_factor, warmup_steps=cfg.optim.warmup_steps,
                   max_steps=cfg.train.max_steps)  # fmt: skip
    return Loop(
        max_steps=cfg.train.max_steps,
        log_every_steps=cfg.train.log_every_steps,
        eval_every_steps=cfg.train.eval_every_steps,
        save_every_steps=cfg.train.save_every_steps,
        precision=cfg.train.precision,
        lr_args=lr_args,
        tracker=actions.tracker,
        preempt=PreemptionFlag(),
        run_eval=actions.evaluate,
        checkpoint_now=actions.checkpoint,
        syncs=HostSyncCounter(device) if cfg.train.count_host_syncs else None,
        checked_step=engine.global_steps,
        **perf_model(cfg, device),
    )


def main(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) the run `cfg.run.name`; returns the last validation results (on every rank)."""
    # build
    device, run_dir = setup_run(cfg)
    ckpt_dir = run_dir / "checkpoints"
    cfg.deepspeed.merge_with(resume_deepspeed_keys(ckpt_dir, dist.get_world_size()) if cfg.run.resume else {})
    engine = build_engine(cfg, device)
    # resume
    state = resume(engine, ckpt_dir, cfg) if cfg.run.resume else RunState()
    rank = dist.get_global_rank()
    loaders = build_loaders(cfg, device, state.data[rank] if state.data else None)
    criterion = BootstrappedCrossEntropy(k=cfg.loss.bootstrap_k, k_fraction=cfg.loss.bootstrap_fraction)
    tracker = build_tracker(cfg, run_dir, state.wandb_id)
    state.wandb_id = dist.broadcast_object(tracker.run_id)
    actions = RunActions(cfg, engine, ckpt_dir, state, tracker, loaders, criterion)
    loop = build_loop(cfg, device, engine, actions)
    # loop
    bar = tqdm(total=cfg.train.max_steps, initial=engine.global_steps, disable=not dist.is_main_process(),
               desc="train", unit="step")  # fmt: skip
    engine.train()
    stop = "done" if engine.global_steps >= cfg.train.max_steps else "epoch"
    while stop == "epoch":
        stop = train_one_epoch(engine, loaders[0], criterion, loop, state, bar)
    bar.close()
    # finish
    if loop.syncs is not None:
        write_sync_report(loop, run_dir)
    if stop == "SIGTERM":
        log.info(f"SIGTERM received: saving a checkpoint at step {engine.global_steps} and exiting")
    else:
        actions.evaluate()
    actions.checkpoint()
    tracker.close()
    if dist.is_main_process() and stop != "SIGTERM":
        log.info(f"done: val mIoU {actions.results['miou']:.4f} (best {state.best_miou:.4f}); run folder {run_dir}")
    return actions.results
