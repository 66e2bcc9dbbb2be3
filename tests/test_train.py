"""Training end to end with real processes: DeepSpeed over gloo on 2 CPU ranks, DALI over real shards, checkpoints
on disk, an offline wandb run read back from its .wandb file.

Every run here is FRRN-A at 32x64 on the tiny synthetic shards of conftest.py; a step takes well under a second,
process start-up (imports, DeepSpeed, DALI) most of the time.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from frrn_dist.data.labels import NUM_CLASSES
from frrn_dist.tracking import read_metrics

from .wandb_reader import read_run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)
    return env


def tiny(shard_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.shard_dir={shard_dir}",
        "data.input_hw=[32,64]",
        "data.translate_px=4",
        "data.num_threads=1",
        "train.micro_batch_size=2",
        "train.log_every_steps=1",
        "optim.schedule=constant",
        "wandb.mode=offline",
        "wandb.num_samples=2",
        "run.device=cpu",
        f"run.out_dir={out_dir}",
        f"run.name={name}",
        *extra,
    ]


def train_cmd(overrides: list[str], ranks: int) -> list[str]:
    script = [str(ROOT / "launch/train.py"), *overrides]
    if ranks == 1:
        return [sys.executable, *script]
    return [str(BIN / "deepspeed"), "--num_accelerators", str(ranks), "--master_port", str(_port()), *script]


def run_train(overrides: list[str], ranks: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_cmd(overrides, ranks), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a resumed run appends, so the last record of a step wins."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(shard_dir, tmp_path_factory):
    """The reference: 8 steps on 2 ranks without interruption."""
    out = tmp_path_factory.mktemp("runs")
    run_train(tiny(shard_dir, out, "ref", "train.max_steps=8", "train.save_every_steps=4", "train.eval_every_steps=4"))
    return out / "ref"


def test_run_folder_has_everything_people_look_at(uninterrupted):
    run = uninterrupted
    assert (run / "config.yaml").is_file() and (run / "curves.png").is_file()
    assert (run / "checkpoints/latest").read_text().strip() == "step00000008"
    assert (run / "checkpoints/step00000008/model.safetensors").is_file()
    assert len(list((run / "samples").glob("*.png"))) >= 2
    vals = [r for r in read_metrics(run) if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [4, 8] and all(0.0 <= v["miou"] <= 1.0 for v in vals)
    assert sorted(train_losses(run)) == list(range(1, 9))


def test_resume_continues_with_the_same_losses(uninterrupted, shard_dir, tmp_path):
    common = ["train.save_every_steps=4", "train.eval_every_steps=4"]
    run_train(tiny(shard_dir, tmp_path, "resumed", "train.max_steps=4", *common))
    proc = run_train(tiny(shard_dir, tmp_path, "resumed", "train.max_steps=8", *common))
    assert "resumed from" in proc.stdout
    ref, got = train_losses(uninterrupted), train_losses(tmp_path / "resumed")
    assert [got[s] for s in range(5, 9)] == pytest.approx([ref[s] for s in range(5, 9)], rel=1e-5, abs=1e-6)


def test_sigkill_mid_training_loses_nothing_before_the_last_checkpoint(uninterrupted, shard_dir, tmp_path):
    overrides = tiny(shard_dir, tmp_path, "killed", "train.max_steps=8", "train.save_every_steps=2")
    proc = subprocess.Popen(
        train_cmd(overrides, 2),
        env=_env(),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = tmp_path / "killed"
    deadline = time.time() + 300
    while max(train_losses(run), default=0) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    last = int((run / "checkpoints/latest").read_text().strip()[4:])
    assert last >= 4
    run_train(overrides)
    ref, got = train_losses(uninterrupted), train_losses(run)
    assert [got[s] for s in range(last + 1, 9)] == pytest.approx(
        [ref[s] for s in range(last + 1, 9)], rel=1e-5, abs=1e-6
    )


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(shard_dir, tmp_path):
    overrides = tiny(shard_dir, tmp_path, "preempted", "train.max_steps=1000", "train.save_every_steps=1000")
    proc = subprocess.Popen(
        train_cmd(overrides, 2), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run = tmp_path / "preempted"
    deadline = time.time() + 300
    while max(train_losses(run), default=0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    for p in ranks:  # as SLURM does on preemption: every task gets SIGTERM
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out
    tag = (run / "checkpoints/latest").read_text().strip()
    assert int(tag[4:]) >= 2 and (run / "checkpoints" / tag / "model.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shard_dir, tmp_path):
    # lr 1e30 blows the weights up at the first update after the checkpoint at step 1
    overrides = tiny(
        shard_dir,
        tmp_path,
        "nan",
        "train.max_steps=20",
        "train.save_every_steps=1",
        "optim.lr=1e30",
        "optim.warmup_steps=2",
    )
    proc = subprocess.run(train_cmd(overrides, 1), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "non-finite" in proc.stderr.strip().splitlines()[-1]
    tag = (tmp_path / "nan/checkpoints/latest").read_text().strip()
    weights = torch.load(tmp_path / "nan/checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in weights["module"].values() if v.is_floating_point())


def test_offline_wandb_run_holds_losses_config_and_masks(uninterrupted):
    files = glob.glob(str(uninterrupted / "wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    run = read_run(files[0])
    logged = {int(h["train/step"]): h["train/loss"] for h in run["history"] if "train/loss" in h}
    assert logged == pytest.approx(train_losses(uninterrupted))
    assert run["config"]["model"]["arch"] == "A" and run["config"]["data"]["input_hw"] == [32, 64]
    vals = [h for h in run["history"] if "val/miou" in h]
    assert len(vals) == 2 and vals[-1]["val/samples._type"] == "images/separated"
    masks = vals[-1]["val/samples.all_masks"][0]
    png = Path(files[0]).parent / "files" / masks["predictions"]["path"]
    ids = np.unique(np.array(Image.open(png)))
    assert set(ids.tolist()) <= set(range(NUM_CLASSES))
    assert json.loads(json.dumps(run["summary"]))["val/miou"] == pytest.approx(vals[-1]["val/miou"])


def test_two_ranks_equal_one_rank_with_gradient_accumulation(tmp_path):
    """2 ranks x micro-batch b == 1 rank x b with 2 accumulation steps fed the same micro-batches (BN normalises
    per micro-batch, so this is the exact equivalence)."""
    script = str(ROOT / "tests/ds_equivalence.py")
    for stage in (0, 2):
        two, one = tmp_path / f"two{stage}.pt", tmp_path / f"one{stage}.pt"
        for cmd in (
            [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(_port()), script, str(two)],
            [sys.executable, script, str(one)],
        ):
            proc = subprocess.run(
                [*cmd, "--zero-stage", str(stage)], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300
            )
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        a, b = torch.load(two), torch.load(one)
        assert a["final"].keys() == b["final"].keys()
        # the steps must have moved the weights, or equality would prove nothing
        assert not any(torch.equal(a["final"][k], a["init"][k]) for k in a["init"])
        a, b = a["final"], b["final"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"stage {stage}: {k}")
