"""Faults a cluster job meets, with real training processes and real checkpoints on disk.

- resuming on a different number of ranks: ZeRO 0 carries Adam's moments over (ZeRO 1/2: test_elastic.py);
- a full disk while saving (RLIMIT_FSIZE makes writes fail with EFBIG): the previous checkpoint stays usable;
- SIGKILL in the middle of a checkpoint save, at a seeded random save: resume is exact and loses nothing;
- a corrupt or truncated shard met while training: the error must name the shard.

test_train.py already covers a SIGKILL between saves, SIGTERM, NaN and same-world-size resume; this file does not
repeat them. Runs are FRRN-A at 32x64 on the tiny shards of conftest.py.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from frrn_dist.data.loaders import build_loader
from frrn_dist.data.manifest import ShardError, split_files
from frrn_dist.data.shardindex import read_index

from .procs import ROOT, _env, run_train, saving_every_two, start_train, tiny, train_cmd, train_losses

STEPS = 6  # checkpoints at 2, 4 and 6 (the end)
KILL_SEED = 2024


def faulty(shard_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    return saving_every_two(shard_dir, out_dir, name, STEPS, *extra)


def latest(run: Path) -> str | None:
    path = run / "checkpoints/latest"
    return path.read_text().strip() if path.is_file() else None


def resumed_from(output: str) -> str:
    lines = [line for line in output.splitlines() if "resumed from" in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def optimizer_restart_warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if "ZeRO" in line and "restart" in line]


def adam_steps(tag_dir: Path) -> set[float]:
    """Adam's step counter(s) in a checkpoint: equal to the optimizer steps since its moments last started at zero."""
    zero_files = sorted(tag_dir.glob("zero_pp_rank_*_optim_states.pt"))
    if zero_files:
        states = [
            torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
            for f in zero_files
        ]
    else:
        states = [torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["state"]]
    return {float(s["step"]) for state in states for s in state.values()}


def copy_run(run: Path, dst: Path) -> Path:
    """A run folder with only the checkpoint `latest` names: what a restart on other hardware would be given."""
    keep = latest(run)
    shutil.copytree(
        run,
        dst,
        ignore=lambda d, names: [
            n for n in names if Path(d).name == "checkpoints" and n.startswith("step") and n != keep
        ],
    )
    return dst


@pytest.fixture(scope="module")
def two_ranks(shard_dir, tmp_path_factory) -> Path:
    """Reference run: 2 ranks, ZeRO 0, STEPS steps, uninterrupted."""
    out = tmp_path_factory.mktemp("faults")
    run_train(faulty(shard_dir, out, "two_ranks"), ranks=2)
    assert latest(out / "two_ranks") == f"step{STEPS:08d}"
    return out / "two_ranks"


# ---------------------------------------------------------------------------------------------------------------
# resume on a different number of ranks


@pytest.mark.slow
def test_zero0_checkpoint_of_two_ranks_resumes_on_one_with_adam_state(two_ranks, shard_dir, tmp_path):
    run = copy_run(two_ranks, tmp_path / "zero0")
    proc = run_train(faulty(shard_dir, tmp_path, "zero0", f"train.max_steps={STEPS + 2}"), ranks=1)
    out = proc.stdout + proc.stderr
    line = resumed_from(out)
    assert f"step{STEPS:08d}" in line and "2 -> 1 rank(s)" in line and "optimizer state as saved" in line, line
    assert "the epoch restarts with the new sharding (ranks changed)" in line
    assert optimizer_restart_warnings(out) == []
    tag = run / f"checkpoints/step{STEPS + 2:08d}"
    assert latest(run) == tag.name
    # stage 0 keeps the whole optimizer state in one file: Adam's moments went on counting across 2 -> 1 ranks
    assert adam_steps(tag) == {STEPS + 2.0}
    losses = train_losses(run)
    assert all(torch.isfinite(torch.tensor(losses[s])) for s in (STEPS + 1, STEPS + 2))


# ---------------------------------------------------------------------------------------------------------------
# a full disk while saving


def _small_disk() -> None:
    """In the child: files may not grow past 20 MB (a checkpoint is ~280 MB); writes then fail with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # instead of being killed by it; stays ignored across exec
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000))


@pytest.mark.slow
def test_full_disk_while_saving_keeps_the_previous_checkpoint(two_ranks, shard_dir, tmp_path):
    run = copy_run(two_ranks, tmp_path / "disk")
    previous = latest(run)
    overrides = faulty(shard_dir, tmp_path, "disk", f"train.max_steps={STEPS + 2}")
    proc = subprocess.run(
        train_cmd(overrides, 1),
        preexec_fn=_small_disk,
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=400,
    )
    assert proc.returncode != 0
    failed = run / f"checkpoints/step{STEPS + 2:08d}"
    errors = [line for line in proc.stderr.splitlines() if "could not be written" in line]
    assert len(errors) == 1 and str(failed) in errors[0] and previous in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert latest(run) == previous
    assert not failed.exists() and not (run / "checkpoints/latest.tmp").exists()

    proc = run_train(overrides, ranks=1)  # disk space is back: resume from the intact checkpoint
    assert previous in resumed_from(proc.stdout + proc.stderr)
    assert latest(run) == failed.name and (failed / "model.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL while a checkpoint is being written


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_resumes_exactly(two_ranks, shard_dir, tmp_path):
    save_step = random.Random(KILL_SEED).choice((4, STEPS))  # a mid-run save or the final one
    overrides = faulty(shard_dir, tmp_path, "killed")
    run = tmp_path / "killed"
    tag = run / f"checkpoints/step{save_step:08d}"
    proc = start_train(overrides)
    deadline = time.time() + 400
    while not tag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)  # DeepSpeed makes the tag folder first, then writes ~280 MB into it
    assert proc.poll() is None, "the run ended before the save could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the save was cut short: `latest` still names the previous, complete checkpoint
    assert latest(run) == f"step{save_step - 2:08d}", f"seed {KILL_SEED}: the kill came after the save completed"
    assert not (tag / "model.json").exists()  # model.json is the last file of a complete save

    proc = run_train(overrides, ranks=2)
    assert f"step{save_step - 2:08d}" in resumed_from(proc.stdout + proc.stderr)
    assert latest(run) == f"step{STEPS:08d}" and (run / f"checkpoints/step{STEPS:08d}/model.json").is_file()
    ref, got = train_losses(two_ranks), train_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))  # nothing lost before the last checkpoint
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx(
        [ref[s] for s in range(1, STEPS + 1)], rel=1e-5, abs=1e-6
    )


# ---------------------------------------------------------------------------------------------------------------
# a corrupt or truncated shard


def corrupt_copy(shard_dir: Path, dst: Path) -> tuple[Path, str]:
    """A copy of the shards whose last train tar holds one undecodable image (tar headers and index intact, so the
    start-up checks pass and the loader meets it while reading). Returns (tar, sample key)."""
    shutil.copytree(shard_dir, dst)
    tars, idxs = split_files(dst, "train")
    sample = read_index(idxs[-1], tars[-1])[1]
    offset, size = sample.members["jpg"]
    with open(tars[-1], "r+b") as f:
        f.seek(offset)
        f.write(random.Random(0).randbytes(size))
    return Path(tars[-1]), sample.key


@pytest.fixture(scope="module")
def corrupt_run(shard_dir, tmp_path_factory):
    """Training (DALI, 1 rank) over shards with one corrupt image; returns (process, run, shard copy, tar, key)."""
    out = tmp_path_factory.mktemp("corrupt")
    bad = out / "shards"
    tar, key = corrupt_copy(shard_dir, bad)
    overrides = tiny(
        bad,
        out,
        "corrupt",
        "train.max_steps=20",
        "train.save_every_steps=100",
        "train.eval_every_steps=0",
    )
    proc = subprocess.run(train_cmd(overrides, 1), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=400)
    return proc, out / "corrupt", bad, tar, key


@pytest.mark.slow
def test_corrupt_image_met_while_training_stops_the_run(corrupt_run):
    proc, run, bad, _, _ = corrupt_run
    assert proc.returncode != 0
    # With seed 0 the corrupt sample comes in the 3rd batch of the first epoch: training had started.
    assert len(train_losses(run)) >= 1
    assert any(str(bad) in line for line in proc.stderr.splitlines()[-20:]), proc.stderr[-3000:]


@pytest.mark.slow
def test_corrupt_image_error_names_the_tar_and_the_sample(corrupt_run):
    proc, _, _, tar, key = corrupt_run
    assert tar.name in proc.stderr and key in proc.stderr


def test_fallback_loader_names_the_tar_and_the_sample_of_a_corrupt_image(shard_dir, tmp_path):
    tar, key = corrupt_copy(shard_dir, tmp_path / "shards")
    loader = build_loader(
        tmp_path / "shards",
        "train",
        backend="torch",
        input_hw=(32, 64),
        micro_batch_size=2,
        translate_px=4,
        num_threads=0,
    )
    with pytest.raises(ShardError) as e:
        for _ in range(2):  # every sample is read within two epochs
            for _ in loader:
                pass
    assert str(tar) in str(e.value) and key in str(e.value)


TRUNCATE_WHILE_READING = """
import os, sys
from frrn_dist.data.loaders import build_loader
shards, tar = sys.argv[1], sys.argv[2]
loader = build_loader(shards, "train", backend="dali", input_hw=(32, 64), micro_batch_size=2, translate_px=4,
                      num_threads=1)
for epoch in range(4):
    for i, batch in enumerate(loader):
        if epoch == 0 and i == 0:
            os.truncate(tar, os.path.getsize(tar) // 3)  # the shard shrinks under the running job
"""


@pytest.mark.slow
def test_shard_truncated_while_reading_gives_an_error_naming_it(shard_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    tar = split_files(shards, "train")[0][-1]
    proc = subprocess.run(
        [sys.executable, "-c", TRUNCATE_WHILE_READING, str(shards), tar],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode > 0, f"exit {proc.returncode} (negative: killed by signal {-proc.returncode})"
    assert Path(tar).name in proc.stderr.strip().splitlines()[-1]
