"""The one typed config schema, and the one place where YAML becomes plain arguments.

Effective config = schema defaults <- `--config file.yaml` <- `key=value` overrides (later wins). Unknown keys
and wrong types fail at start-up with the key's name. The model, the loss and the data pipeline never see this
object: frrn_dist.train translates it into keyword arguments.

Imports: omegaconf.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ModelConfig:
    arch: str = "A"
    """FRRN variant: "A" (inputs divisible by 16, native 256x512) or "B" (divisible by 32, native 512x1024)."""
    num_classes: int = 19
    """Output classes: the 19 Cityscapes train ids."""
    upsample: str = "theano"
    """Pooling-stream x2 upsampling grid: "theano" (the authors'), "align_corners" or "half_pixel" (PyTorch)."""
    checkpointing: str = "off"
    """Activation checkpointing: "off", "unit" (each RU/FRRU) or "stage". "unit" keeps 4.2x fewer bytes for backward
    per image for ~25% more step time (BENCHMARKS.md), so 13 instead of 4 FRRN-A images at 256x512 fit in 8 GiB:
    the GPU configs (frrn_a.yaml, frrn_b.yaml) turn it on; the CPU has memory to spare."""
    sync_bn: bool = False
    """SyncBatchNorm across ranks (GPU only). Off: BN statistics are averaged over ranks before eval and saving."""
    channels_last: bool | str = "auto"
    """Convolutions in NHWC memory layout: true, false, or "auto": NHWC where it was measured faster (CUDA cc >= 8.0
    with bf16; a CPU with oneDNN, 1.05-1.5x here in both precisions: `make bench-model`). Logged and saved."""


@dataclass
class DataConfig:
    shard_dir: str = MISSING
    """Folder written by `make shards` (train/val tars, .idx files, manifest.json)."""
    train_split: str = "train"
    """Split trained on."""
    val_split: str = "val"
    """Split evaluated during training (at the training scale)."""
    backend: str = "dali"
    """Loader: "dali" (DALI pipelines; GPU decode on cuda), "torch" (PIL + DataLoader fallback, via the .idx) or
    "stream" (webdataset streams + DataLoader workers; the one that reads a URL shard_dir: http(s)://, s3://,
    gs://, pipe:CMD {})."""
    recipe: str = "paper"
    """Training augmentation: "paper" (whole frames, translate, gamma) or "seed" (the TF port: crop, halve, flip)."""
    input_hw: list[int] = field(default_factory=lambda: [256, 512])
    """Network input [height, width] in pixels; frames are downscaled to it by an integer factor."""
    translate_px: int = 30
    """Paper recipe: max translation per axis at input scale (A 30, B 40); reflect-padded image, ignored label."""
    gamma_z: float = 0.05
    """Gamma augmentation strength z ~ U(-z, z) (frrn-spec Eq. 14); 0 turns it off."""
    flip: bool | None = None
    """Horizontal flip; None takes the recipe's default (seed: on, paper: off)."""
    num_threads: int | None = None
    """DALI CPU threads (or fallback workers) per rank; None: the CPUs this rank may use (SLURM_CPUS_PER_TASK,
    else its CPU affinity shared by the node's ranks), less one for the training process, at most 8 (logged)."""
    shuffle_buffer: int = 256
    """DALI shuffle buffer in samples; it holds encoded frames in host RAM on every rank."""
    shuffle: bool = True
    """Shuffle within each rank's slice while training; False reads in order (for exact comparisons of runs)."""
    retries: int = 4
    """stream backend: attempts after a transient read failure (HTTP 5xx, a dropped connection), backoff doubling."""
    on_error: str = "stop"
    """stream backend: "stop" at a sample that cannot be read or decoded (one line naming the URL), or "skip" it
    and count it."""


@dataclass
class LossConfig:
    bootstrap_k: int | None = None
    """Pixels kept per image by the bootstrapped cross-entropy; None derives it from bootstrap_fraction."""
    bootstrap_fraction: float = 0.0625
    """K as a fraction of the pixels of an image (1/16: 8,192 for FRRN-A at 256x512, as the paper-era code)."""


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    """"adam" (the authors'; AdamW when weight_decay > 0) or "sgd" (momentum SGD, torch.optim.SGD)."""
    lr: float = 1e-3
    """Learning rate at the start."""
    schedule: str = "step"
    """"step" (lr x lr_drop_factor after lr_drop_step), "constant", or "cosine" (to lr x lr_drop_factor)."""
    lr_drop_step: int = 45000
    """Optimizer step of the step schedule's drop (the authors: 45,000 at 3 images per step)."""
    lr_drop_factor: float = 0.1
    """Step schedule: lr multiplier after the drop; cosine: final lr as a fraction of lr."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps (useful with many images per step)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (the authors used none)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.9
    """SGD momentum (sgd only)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 3
    """Images per rank per forward/backward (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step. Images per step = micro x accum x world size."""
    max_steps: int = 100000
    """Optimizer steps to train for."""
    eval_every_steps: int = 2000
    """Evaluate on the val split every this many optimizer steps (and at the end); 0 = only at the end."""
    save_every_steps: int = 1000
    """Write a resumable checkpoint every this many optimizer steps (and at the end)."""
    log_every_steps: int = 10
    """Log train loss, lr and throughput every this many optimizer steps. Also the loop's only host
    synchronisation: all ranks then agree on stopping (a non-finite loss anywhere, SIGTERM anywhere), as they do
    before every evaluation and save. So SIGTERM is answered within this many steps plus one save."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first); the newest is always kept."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (shard optimizer state) or 2 (also gradients)."""
    precision: str = "auto"
    """"fp32", "bf16" (autocast: convs in bf16, parameters, BN statistics and the loss in fp32), or "auto": bf16
    where the device runs it fast (CUDA compute capability >= 8.0; a CPU with AMX, or AVX512-BF16 confirmed by a
    short measurement at start-up), fp32 elsewhere. What was chosen and why goes to the log and `chosen`."""
    compile: bool = False
    """torch.compile the model (inductor), in place. Off by default: on CPU 1.01-1.05x eager after minutes of
    compiling, and inductor (torch 2.13 CPU) fails in the backward of bf16 + NHWC; fp32 and bf16 NCHW compiled
    equal eager within tolerance (tests/test_compile.py). Not measured on a GPU yet."""
    bf16_grad_reduce: bool = False
    """bf16 + ZeRO 1/2: all-reduce conv gradients in bf16 (half the bytes; DeepSpeed's torch_autocast default).
    Off: every ZeRO stage reduces fp32 gradients, so stage 0, 1 and 2 train the same model."""
    cudnn_benchmark: bool = True
    """CUDA: let cuDNN time its convolution algorithms once (input shapes never change while training)."""
    count_host_syncs: bool = False
    """Count host synchronisations on ordinary micro-steps (CUDA: torch.cuda.set_sync_debug_mode; CPU: the
    loop's own tensor reads) and write them to <run>/host_syncs.json; a check, it slows the loop down."""
    seed: int = 0
    """Seed for weights and data order; rank r augments with seed + r."""


@dataclass
class WandbConfig:
    enabled: bool = True
    """Log to Weights & Biases from rank 0 (run files are also written to the run folder either way)."""
    mode: str = "auto"
    """"online", "offline" (sync later with `wandb sync`), or "auto": online when logged in, else offline."""
    project: str = "frrn-dist"
    """wandb project: runs meant to be compared share it."""
    entity: str | None = None
    """wandb team or user; None uses your default."""
    group: str | None = None
    """wandb group, e.g. one per sweep or experiment."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    num_samples: int = 4
    """Validation images logged as segmentation masks at each evaluation."""


@dataclass
class RunConfig:
    name: str = "frrn${model.arch}-${data.recipe}-${data.input_hw.0}x${data.input_hw.1}"
    """Run name: the folder under out_dir and the wandb run name. Re-using it resumes that run."""
    out_dir: str = "runs"
    """Parent folder of run folders."""
    device: str = "auto"
    """"cuda", "cpu", or "auto" (cuda when available)."""
    resume: bool = True
    """Continue from the run folder's latest checkpoint when there is one."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys merged over the derived ones (expert use, e.g. zero_optimization.overlap_comm)."""
    chosen: dict[str, Any] = field(default_factory=dict)
    """Written by the run, not read: what each "auto" key resolved to on this machine, and why."""


_CHOICES = {
    "model.arch": ("A", "B"),
    "model.upsample": ("theano", "align_corners", "half_pixel"),
    "model.checkpointing": ("off", "unit", "stage"),
    "data.backend": ("dali", "torch", "stream"),
    "data.recipe": ("paper", "seed"),
    "data.on_error": ("stop", "skip"),
    "optim.schedule": ("step", "constant", "cosine"),
    "optim.optimizer": ("adam", "sgd"),
    "train.zero_stage": (0, 1, 2),
    "train.precision": ("auto", "fp32", "bf16"),
    "model.channels_last": ("auto", True, False),
    "wandb.mode": ("auto", "online", "offline"),
    "run.device": ("auto", "cuda", "cpu"),
}


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the key."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- `key=value` overrides, validated; raises ConfigError naming the key."""
    try:
        cfg = OmegaConf.structured(Config)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{path}: config file not found")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"config key {missing[0]} must be set (e.g. {missing[0]}=...)")
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        # omegaconf's messages name the key ("Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?"); keep line 1.
        key = getattr(e, "full_key", None)
        where = f"{path or 'config'}: " + (f"{key}: " if key and key not in str(e).splitlines()[0] else "")
        raise ConfigError(where + str(e).splitlines()[0]) from None
    _validate(cfg)
    return cfg


def _validate(cfg: DictConfig) -> None:
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            hint = (
                " (YAML reads a bare off/on as a boolean: quote it, e.g. 'key=\"off\"')"
                if value in ("False", "True")
                else ""
            )
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}{hint}")
    if len(cfg.data.input_hw) != 2 or min(cfg.data.input_hw) <= 0:
        raise ConfigError(f"data.input_hw={list(cfg.data.input_hw)}: must be [height, width] in pixels")
    multiple = 16 if cfg.model.arch == "A" else 32
    if any(s % multiple for s in cfg.data.input_hw):
        raise ConfigError(
            f"data.input_hw={list(cfg.data.input_hw)}: FRRN-{cfg.model.arch} needs height and width divisible by "
            f"{multiple} (its deepest pooling factor)"
        )
    for key in ("train.micro_batch_size", "train.grad_accum_steps", "train.max_steps", "train.log_every_steps"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be at least 1")


def parse_args(argv: list[str] | None = None, description: str = "") -> tuple[argparse.Namespace, DictConfig]:
    """`--config FILE [key=value ...]` (plus the `--local_rank` DeepSpeed's launcher appends) -> (args, config)."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted keys of the schema in frrn_dist/config.py, e.g. train.micro_batch_size=8 "
        "optim.lr=5e-4 run.name=exp1. Unknown keys are errors.",
    )
    parser.add_argument("--config", help="YAML experiment file (a small diff over the schema defaults)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    return args, cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the effective config (every key, interpolations resolved) atomically."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    OmegaConf.save(cfg, tmp, resolve=True)
    tmp.replace(path)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain nested dict (for wandb and DeepSpeed)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def images_per_step(cfg: DictConfig, world_size: int) -> int:
    """Images per optimizer step = micro batch x accumulation x ranks (DeepSpeed's train_batch_size)."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, derived from ours in this one place (batch sizes stated once)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": images_per_step(cfg, world_size),
        "optimizer": _optimizer_config(cfg.optim),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.optimizer != "adam":
        ds["zero_allow_untested_optimizer"] = True  # torch.optim.SGD under ZeRO 1/2: plain per-parameter state
    if cfg.train.precision == "bf16":
        # Autocast, not DeepSpeed's "bf16" block: that one casts parameters but not BN buffers (stack-notes 2.3).
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if not cfg.train.bf16_grad_reduce:
            # DeepSpeed tags Conv2d parameters comm_dtype=bf16, which ZeRO 1/2 (not 0) then reduce in bf16; an
            # empty list tags nothing, so every stage all-reduces the same fp32 gradients (stack-notes 2.9).
            ds["torch_autocast"]["lower_precision_safe_modules"] = []
    return OmegaConf.to_container(OmegaConf.merge(ds, cfg.deepspeed), resolve=True)  # type: ignore[return-value]


def _optimizer_config(optim: Any) -> dict[str, Any]:
    """DeepSpeed's optimizer block. torch_adam: no FusedAdam JIT build (80 s on CPU); names DeepSpeed does not
    know ("SGD") are looked up in torch.optim."""
    if optim.optimizer == "sgd":
        params = {"lr": optim.lr, "momentum": optim.momentum, "weight_decay": optim.weight_decay}
        return {"type": "SGD", "params": params}
    params = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
        "torch_adam": True,
        "adam_w_mode": True,  # only matters with weight decay
    }
    return {"type": "Adam", "params": params}
