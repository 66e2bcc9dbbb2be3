"""The config schema: defaults, the shipped YAML files, overrides, clear errors, and derived DeepSpeed values."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from frrn_dist.config import ConfigError, deepspeed_config, images_per_step, load_config, parse_args, save_config
from frrn_dist.train import lr_at

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_say_how_to_launch(path):
    cfg = load_config(path, ["data.shard_dir=/some/shards"])
    assert cfg.model.arch in ("A", "B")
    head = path.read_text().splitlines()[:8]
    assert any("launch" in line for line in head), f"{path.name} should say how to launch it in its first lines"


def test_overrides_win_and_types_are_coerced():
    cfg = load_config(ROOT / "configs/frrn_a.yaml", ["train.micro_batch_size=8", "optim.lr=5e-4", "data.flip=true"])
    assert cfg.train.micro_batch_size == 8 and cfg.optim.lr == pytest.approx(5e-4) and cfg.data.flip is True
    assert cfg.run.name == "frrnA-paper-256x512"  # interpolated from the keys it names


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "lrr"),
        ("optim.lr=abc", "optim.lr"),
        ("train.micro_batch_size=1.5", "train.micro_batch_size"),
        ("model.arch=C", "model.arch"),
        ("data.input_hw=[100,200]", "data.input_hw"),
        ("train.precision=fp16", "train.precision"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/frrn_a.yaml", [override])


def test_missing_shard_dir_is_named():
    with pytest.raises(ConfigError, match="data.shard_dir"):
        load_config(None, [])


def test_launcher_rejects_unknown_key_in_one_line():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/frrn_a.yaml"), "optim.lrr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "lrr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_local_rank_from_the_deepspeed_launcher_is_accepted():
    args, cfg = parse_args(["--local_rank=1", "--config", str(ROOT / "configs/frrn_a.yaml"), "train.seed=3"])
    assert args.local_rank == 1 and cfg.train.seed == 3


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/frrn_b.yaml", ["optim.lr=2e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_deepspeed_batch_sizes_are_stated_once():
    cfg = load_config(ROOT / "configs/frrn_a.yaml", ["train.micro_batch_size=4", "train.grad_accum_steps=3"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == images_per_step(cfg, 8) == 4 * 3 * 8
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "torch_autocast" not in ds
    bf16 = deepspeed_config(load_config(ROOT / "configs/frrn_b.yaml"), world_size=1)
    # fp32 gradient reduction under every ZeRO stage: no module is tagged for bf16 communication
    want = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert bf16["torch_autocast"] == want and "bf16" not in bf16
    halved = deepspeed_config(load_config(ROOT / "configs/frrn_b.yaml", ["train.bf16_grad_reduce=true"]), 1)
    assert halved["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # DeepSpeed's default: Conv2d in bf16


def test_sgd_goes_to_torch_optim_and_is_allowed_under_zero():
    cfg = load_config(ROOT / "configs/frrn_a.yaml", ["optim.optimizer=sgd", "optim.momentum=0.5", "train.zero_stage=2"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["optimizer"] == {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.5, "weight_decay": 0.0}}
    assert ds["zero_allow_untested_optimizer"] is True


def test_extra_deepspeed_keys_merge_over_derived_ones():
    cfg = load_config(ROOT / "configs/frrn_a.yaml", ["deepspeed.zero_optimization.overlap_comm=true"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True}


def test_lr_schedules():
    common = dict(lr=1e-3, drop_factor=0.1, warmup_steps=0, max_steps=100)
    assert lr_at(44, schedule="step", drop_step=45, **common) == 1e-3
    assert lr_at(45, schedule="step", drop_step=45, **common) == pytest.approx(1e-4)
    assert lr_at(99, schedule="constant", drop_step=45, **common) == 1e-3
    cosine = [lr_at(s, schedule="cosine", drop_step=0, **common) for s in range(100)]
    assert cosine[0] == 1e-3 and all(a >= b for a, b in zip(cosine, cosine[1:])) and cosine[-1] > 1e-4
    warm = dict(common, warmup_steps=10)
    assert [lr_at(s, schedule="constant", drop_step=0, **warm) for s in (0, 4, 9, 10)] == pytest.approx(
        [1e-4, 5e-4, 1e-3, 1e-3]
    )
