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
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from frrn_dist.data.labels import NUM_CLASSES
from frrn_dist.tracking import read_metrics

from .procs import BIN, ROOT, _env, _port, run_train, start_train, tiny, train_cmd, train_losses  # noqa: F401 (re-exported)
from .wandb_reader import read_run

pytestmark = pytest.mark.slow


def ref_run(shard_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    """The reference recipe: micro-batch 1, so an epoch of the 6 train frames is 3 steps on 2 ranks and a
    checkpoint at step 4 falls in the middle of an epoch. wandb on (offline): a resumed run goes on logging."""
    return tiny(shard_dir, out_dir, name, "train.micro_batch_size=1", "wandb.enabled=true", *extra)


@pytest.fixture(scope="module")
def uninterrupted(shard_dir, tmp_path_factory):
    """The reference: 8 steps on 2 ranks without interruption."""
    out = tmp_path_factory.mktemp("runs")
    common = ("train.max_steps=8", "train.save_every_steps=4", "train.eval_every_steps=4")
    run_train(ref_run(shard_dir, out, "ref", *common))
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


def test_mid_epoch_resume_on_two_ranks_ends_bit_identical(uninterrupted, shard_dir, tmp_path):
    """Stopped at step 4 (the first of epoch 1's three steps), resumed to 8: the same losses, and weights and BN
    running statistics bit-identical to the run that never stopped."""
    common = ["train.save_every_steps=4", "train.eval_every_steps=4"]
    run_train(ref_run(shard_dir, tmp_path, "resumed", "train.max_steps=4", *common))
    epochs = {r["step"]: r["epoch"] for r in read_metrics(tmp_path / "resumed") if r["kind"] == "train"}
    assert epochs[3] == 0 and epochs[4] == 1, epochs  # step 4 opened an epoch that steps 5 and 6 finish
    proc = run_train(ref_run(shard_dir, tmp_path, "resumed", "train.max_steps=8", *common))
    assert "resumed from" in proc.stdout
    ref, got = train_losses(uninterrupted), train_losses(tmp_path / "resumed")
    assert [got[s] for s in range(5, 9)] == pytest.approx([ref[s] for s in range(5, 9)], rel=1e-5, abs=1e-6)
    a = load_file(uninterrupted / "checkpoints/step00000008/model.safetensors")
    b = load_file(tmp_path / "resumed/checkpoints/step00000008/model.safetensors")
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_sigkill_mid_training_loses_nothing_before_the_last_checkpoint(uninterrupted, shard_dir, tmp_path):
    overrides = ref_run(shard_dir, tmp_path, "killed", "train.max_steps=8", "train.save_every_steps=2")
    proc = start_train(overrides)
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
    # throughput and utilisation, the same numbers as metrics.jsonl; MFU against this CPU's measured matmul peak
    perf = [h for h in run["history"] if "perf/mfu" in h]
    records = [r for r in read_metrics(uninterrupted) if r["kind"] == "train"]
    assert len(perf) == len(records) == 8
    for h, r in zip(perf, records):
        assert int(h["train/step"]) == r["step"]
        for key in ("perf/images_per_s", "perf/tflops", "perf/mfu", "perf/data_wait"):
            assert h[key] == pytest.approx(r[key]) and r[key] >= 0, key
        # MFU is not bounded by 1 here: a CPU's peak is a matmul timed at start-up, slowed by whatever else runs
        assert h["perf/mfu"] > 0 and 0 <= h["perf/data_wait"] < 1
    assert run["config"]["model"]["arch"] == "A" and run["config"]["data"]["input_hw"] == [32, 64]
    vals = [h for h in run["history"] if "val/miou" in h]
    assert len(vals) == 2 and vals[-1]["val/samples._type"] == "images/separated"
    masks = vals[-1]["val/samples.all_masks"][0]
    png = Path(files[0]).parent / "files" / masks["predictions"]["path"]
    ids = np.unique(np.array(Image.open(png)))
    assert set(ids.tolist()) <= set(range(NUM_CLASSES))
    assert json.loads(json.dumps(run["summary"]))["val/miou"] == pytest.approx(vals[-1]["val/miou"])
