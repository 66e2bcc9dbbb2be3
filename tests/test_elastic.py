"""Resume on any number of ranks with nothing lost, and resume only what can be resumed (real DeepSpeed on CPU).

- ZeRO 1 and 2, saved on 2 ranks, resumed on 1 and on 3 through the universal checkpoint: Adam's step, moments
  and fp32 weights as DeepSpeed gathers them equal the saved ones, BN statistics too, and the first update equals
  the one computed here, on one process, from the saved state on the same batches (tests/elastic_worker.py);
- a conversion killed half-way leaves the run resumable, and `train.py` then converts again and trains on 1 rank,
  listing and recording the changed optim.lr, saying how images per step changed, and reading the data exactly as
  a fresh 1-rank run would (the epoch restarts with the new sharding);
- a resume with model.arch changed stops with one line; `inspect` and `--help` of the checkpoints CLI.

ZeRO 0 on another rank count is in test_faults.py. Costs on 2 shared cores: one 2-rank save of both stages, one
1-rank and one 3-rank resume of both stages, one killed conversion, one short training resume, one refused start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from frrn_dist import checkpoints, resume_config
from frrn_dist.config import load_config
from frrn_dist.model import FRRN
from frrn_dist.tracking import read_metrics

from .elastic_worker import batch, criterion
from .procs import ROOT, _env, run_train, tiny, train_cmd

WORKER = ROOT / "tests/elastic_worker.py"
TAG = "step00000002"  # the worker trains 2 steps before saving
RESUME_HYPER = ("optim.eps=1e-6", "optim.grad_clip=1.0")  # changed on resume: they must be in effect after it


def worker(mode: str, shard_dir: Path, out: Path, ranks: int, *extra: str) -> str:
    cmd = train_cmd([mode, str(shard_dir), str(out), *extra], ranks, script=WORKER)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def saved(shard_dir, tmp_path_factory) -> Path:
    """OUT/zero1 and OUT/zero2: 2 ranks, 2 steps, a checkpoint at step 2 and the gathered state (saved_state.pt)."""
    out = tmp_path_factory.mktemp("elastic")
    worker("save", shard_dir, out, 2, "--stages", "1", "2")
    return out


@pytest.fixture(scope="module")
def resumed(saved, shard_dir):
    """ranks -> the worker's log of resuming both stages on that many ranks (memoised: each runs once)."""
    logs: dict[int, str] = {}

    def on(ranks: int) -> str:
        if ranks not in logs:
            logs[ranks] = worker("resume", shard_dir, saved, ranks, "--stages", "1", "2", "--set", *RESUME_HYPER)
        return logs[ranks]

    return on


def resumed_lines(output: str, run: Path) -> list[str]:
    return [line for line in output.splitlines() if "resumed from" in line and str(run) in line]


def reference_update(run: Path, ranks: int) -> dict[str, torch.Tensor]:
    """One data-parallel Adam step of `ranks` ranks computed in this process from the saved (gathered) state:
    the mean of every rank's gradient (each rank's BN normalising its own micro-batch), clipped, then AdamW."""
    saved = torch.load(run / "saved_state.pt", weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1): Adam magnifies a reduction-order difference
    try:
        return _reference_update(run, ranks, saved)
    finally:
        torch.set_num_threads(threads)


def _reference_update(run: Path, ranks: int, saved: dict) -> dict[str, torch.Tensor]:
    model = FRRN(arch="A", num_classes=19, upsample="theano")
    model.load_state_dict(load_file(run / f"checkpoints/{TAG}/model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved["params"][name]["fp32"])
    model.train()
    for rank in range(ranks):
        images, labels = batch(2, rank)
        (criterion()(model(images).float(), labels) / ranks).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # optim.grad_clip=1.0 of the resume
    opt = torch.optim.AdamW(params.values(), lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    for name, p in params.items():
        s = saved["params"][name]
        opt.state[p] = {"step": torch.tensor(saved["steps"][0]), "exp_avg": s["exp_avg"].clone(),
                        "exp_avg_sq": s["exp_avg_sq"].clone()}  # fmt: skip
    opt.step()
    return {name: p.detach() for name, p in params.items()}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_adam_state_after_loading_on_another_rank_count_equals_the_saved_one(saved, resumed, stage, ranks):
    run = saved / f"zero{stage}"
    lines = resumed_lines(resumed(ranks), run)
    assert len(lines) == 1 and f"2 -> {ranks} rank(s)" in lines[0] and "universal" in lines[0], lines
    before = torch.load(run / "saved_state.pt", weights_only=False)
    got = torch.load(run / f"resumed_{ranks}.pt", weights_only=False)
    assert before["steps"] == got["loaded"]["steps"] == [2.0]  # Adam's step counter went on, it did not restart
    assert len(before["params"]) == 181
    for name, states in before["params"].items():
        for key, value in states.items():  # fp32 master weight, exp_avg, exp_avg_sq
            assert torch.equal(value, got["loaded"]["params"][name][key]), (name, key)
    weights = load_file(run / f"checkpoints/{TAG}/model.safetensors")
    for name, buf in got["buffers"].items():  # BN statistics, which DeepSpeed's universal load leaves out
        assert torch.equal(buf, weights[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_first_update_after_resume_equals_one_computed_from_the_saved_state(saved, resumed, stage, ranks):
    resumed(ranks)
    run = saved / f"zero{stage}"
    after = torch.load(run / f"resumed_{ranks}.pt", weights_only=False)["after"]
    start = torch.load(run / "saved_state.pt", weights_only=False)["params"]
    want = reference_update(run, ranks)
    moved = 0
    for name, w in want.items():
        update, expected = after[name] - start[name]["fp32"], w - start[name]["fp32"]
        torch.testing.assert_close(update, expected, rtol=1e-3, atol=1e-7, msg=name)
        moved += int(expected.abs().max() > 1e-5)
    assert moved > 100  # the step did move the weights (lr 1e-3)


@pytest.mark.slow
def test_universal_checkpoint_is_made_once_and_shown_by_inspect(saved, resumed):
    lines = (resumed(1) + resumed(3)).splitlines()
    for stage in (1, 2):
        universal = saved / f"zero{stage}/checkpoints/{TAG}/universal"
        said = [line for line in lines if f"{universal}: universal checkpoint" in line]
        assert len(said) == 2 and sum("converted in" in line for line in said) == 1, said  # the other: already there
        assert sum("already there" in line for line in said) == 1, said
        assert not universal.with_name("universal.partial").exists()
    table = checkpoints.inspect(str(saved / "zero2")).splitlines()
    header, row = table[1].split(), table[2].split()
    assert header == ["tag", "step", "epoch", "ranks", "ZeRO", "complete", "universal", "size"]
    assert row[:9] == [TAG, "<-", "latest", "2", "0", "2", "2", "yes", "yes"], table


def test_inspect_says_a_tag_without_every_shard_is_incomplete(tmp_path):
    tag = tmp_path / "checkpoints/step00000007"
    tag.mkdir(parents=True)
    info = {"step": 7, "epoch": 1, "world_size": 2, "zero_stage": 1, "images_per_step": 4}
    (tag / checkpoints.INFO_FILE).write_text(json.dumps(info))
    (tag / "model.json").write_text("{}")
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")  # rank 1's shard is missing
    row = checkpoints.inspect(str(tmp_path)).splitlines()[2]
    assert row.split()[:6] == ["step00000007", "7", "1", "2", "1", "no"], row


def fake_run(tmp_path: Path, *overrides: str) -> Path:
    """A run folder whose latest checkpoint (ZeRO 1, 2 ranks) was written under tiny() + `overrides`: only the
    files a config check reads."""
    from frrn_dist.config import save_config

    run = tmp_path / "run"
    tag = run / "checkpoints/step00000005"
    tag.mkdir(parents=True)
    save_config(load_config(None, tiny(Path("/shards"), tmp_path, "run", *overrides)), tag / "config.yaml")
    info = {"step": 5, "epoch": 1, "world_size": 2, "zero_stage": 1, "images_per_step": 4}
    (tag / checkpoints.INFO_FILE).write_text(json.dumps(info))
    (run / "checkpoints/latest").write_text(tag.name)
    return run


def test_config_check_sorts_changes_into_refused_data_restarting_and_allowed(tmp_path):
    run = fake_run(tmp_path, "train.zero_stage=1")

    def check(*overrides: str, ranks: int = 2) -> resume_config.ResumeCheck:
        config = OmegaConf.to_container(load_config(None, tiny(Path("/shards"), tmp_path, "run", *overrides)))
        config["chosen"] = {"train.precision": {"value": "fp32", "why": "written by the run"}}
        return resume_config.compare_config(config, run, ranks)

    same = check("train.zero_stage=1")
    assert same.changed == {} and same.unusable() == {} and same.data_changed() == []
    assert check("train.zero_stage=2").unusable() == {}  # ZeRO 1 <-> 2 loads
    assert list(check("train.zero_stage=0").unusable()) == ["train.zero_stage"]
    assert list(check("train.zero_stage=1", "model.num_classes=20").unusable()) == ["model.num_classes"]
    c = check("train.zero_stage=1", "train.micro_batch_size=4", "data.num_threads=2", "wandb.project=x", ranks=1)
    assert c.changed["train.micro_batch_size"] == (2, 4) and c.changed["wandb.project"] == ("frrn-dist", "x")
    assert c.data_changed() == ["train.micro_batch_size", "ranks"]  # num_threads matters to "stream" only
    assert c.images_per_step == (4, 4) and c.factors == ("2 x 1 x 2", "4 x 1 x 1")
    with pytest.raises(SystemExit) as e:
        resume_config.check_resume_config(
            OmegaConf.to_container(load_config(None, tiny(Path("/shards"), tmp_path, "run"))), run, 2
        )
    assert "train.zero_stage 1 -> 0" in str(e.value) and "run.name=run-2" in str(e.value)
    assert not (run / checkpoints.CHANGES_FILE).exists()  # a refused resume records nothing


def test_checkpoints_cli_help_names_both_commands(capsys):
    with pytest.raises(SystemExit) as e:
        checkpoints.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "inspect" in text and "convert" in text and "universal" in text


# ---------------------------------------------------------------------------------------------------------------
# a conversion killed half-way, then a real training resume on 1 rank with optim.lr changed


def cli_overrides(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    # the worker's run (tiny() + zero_stage) resumed for one more step, without evaluating
    return tiny(shard_dir, out, "zero1", "train.zero_stage=1", "train.max_steps=3",
                "train.eval_every_steps=0", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def killed_then_resumed(saved, shard_dir, tmp_path_factory):
    """A copy of the ZeRO 1 run whose conversion was SIGKILLed, then `train.py` on 1 rank with optim.lr=5e-4."""
    out = tmp_path_factory.mktemp("killed")
    run = out / "zero1"
    shutil.copytree(saved / "zero1", run, ignore=shutil.ignore_patterns("universal*", "resumed_*"))
    tag = run / f"checkpoints/{TAG}"
    cmd = [sys.executable, "-m", "frrn_dist.checkpoints", "convert", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tag / "universal.partial").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after_kill = dict(partial=(tag / "universal.partial").exists(), universal=(tag / "universal").exists(),
                      inspect=checkpoints.inspect(str(run)))  # fmt: skip
    proc = run_train(cli_overrides(shard_dir, out, "optim.lr=5e-4"), ranks=1)
    return run, after_kill, proc.stdout + proc.stderr


@pytest.mark.slow
def test_killed_conversion_leaves_the_run_resumable(killed_then_resumed):
    run, after_kill, out = killed_then_resumed
    assert after_kill["partial"] and not after_kill["universal"]
    assert "interrupted, redone when needed" in after_kill["inspect"]
    tag = run / f"checkpoints/{TAG}"
    converted = [line for line in out.splitlines() if f"{tag / 'universal'}: universal checkpoint" in line]
    assert len(converted) == 1 and "converted in" in converted[0], out[-3000:]
    assert not (tag / "universal.partial").exists() and (tag / "universal/zero/optimizer_state.pt").is_file()
    lines = resumed_lines(out, run)
    assert len(lines) == 1 and "2 -> 1 rank(s)" in lines[0] and "universal" in lines[0], out[-3000:]
    assert (run / "checkpoints/latest").read_text() == "step00000003"


@pytest.mark.slow
def test_changed_lr_is_listed_recorded_and_used(killed_then_resumed):
    run, _, out = killed_then_resumed
    listed = [line for line in out.splitlines() if "config changed:" in line]
    assert len(listed) == 1 and "optim.lr 0.001 -> 0.0005" in listed[0], out[-3000:]
    records = [json.loads(line) for line in (run / checkpoints.CHANGES_FILE).read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["changed"]["optim.lr"] == [0.001, 0.0005]
    assert records[-1]["world_size"] == [2, 1] and records[-1]["images_per_step"] == [4, 2]
    step3 = [r for r in read_metrics(run) if r["kind"] == "train" and r["step"] == 3]
    assert step3[-1]["lr"] == 0.0005
    said = [line for line in out.splitlines() if "images per optimizer step change 4 -> 2" in line]
    assert len(said) == 1 and "train.max_steps (3)" in said[0], out[-3000:]


@pytest.mark.slow
def test_new_rank_count_reads_the_data_as_a_fresh_run_would(killed_then_resumed, shard_dir):
    """The checkpoint holds both ranks' positions (one batch in); on 1 rank the first batch after the resume is
    the first batch of a fresh 1-rank run's train loader, so its logged loss is that batch's loss under the
    step-2 weights."""
    from frrn_dist.train import build_loaders

    run, _, _ = killed_then_resumed
    cfg = load_config(None, cli_overrides(shard_dir, run.parent, "optim.lr=5e-4"))
    loader, _ = build_loaders(cfg, torch.device("cpu"), None)
    first = next(iter(loader))
    model = FRRN(arch="A", num_classes=19, upsample="theano")
    model.load_state_dict(load_file(run / f"checkpoints/{TAG}/model.safetensors"))
    model.train()
    with torch.no_grad():
        loss = criterion()(model(first.images).float(), first.labels).item()
    logged = [r["loss"] for r in read_metrics(run) if r["kind"] == "train" and r["step"] == 3][-1]
    assert logged == pytest.approx(loss, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# a config the checkpoint cannot serve


@pytest.mark.slow
def test_resume_with_another_architecture_stops_with_one_line(saved, shard_dir):
    run = saved / "zero2"
    config_before = (run / "config.yaml").read_text()
    overrides = tiny(shard_dir, saved, "zero2", "train.zero_stage=2", "model.arch=B")
    proc = subprocess.run(train_cmd(overrides, 1), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.arch 'A' -> 'B'" in errors[0] and "run.name=zero2-2" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run / "config.yaml").read_text() == config_before  # nothing rewritten
