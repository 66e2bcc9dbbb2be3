"""Cluster launch rehearsed on one machine: real DeepSpeed launchers, real training processes, real checkpoints.

- Two "nodes" of one rank each on loopback (`deepspeed -H hostfile --no_ssh --node_rank k`, started twice) train the
  same parameters, bit for bit, as one node with two ranks (`deepspeed --num_accelerators 2`).
- `.deepspeed_env` (launch/deepspeed_env.sh) reaches the remote shell of DeepSpeed's pdsh launch command.
- SLURM: launch/scheduler_env.py maps the scheduler's variables; launch/slurm.sbatch runs under stand-ins for
  `srun` and `scontrol` (there is no SLURM here), training for real through them, and requeues only when it should.

Every run is FRRN-A at 32x64 on the tiny shards of conftest.py, as in test_train.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .procs import BIN, ROOT, _env, _port, run_train, saving_every_two, tiny

STEPS = 4  # a checkpoint at 2 (kept) and at 4 (the end)


def overrides(shard_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    return saving_every_two(shard_dir, out_dir, name, STEPS, *extra)


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step{step:08d}/model.safetensors")


def loader_setups(run: Path, step: int) -> list[dict]:
    """The per-rank loader states gathered into the checkpoint (in rank order): what each rank read as."""
    state = torch.load(run / f"checkpoints/step{step:08d}/mp_rank_00_model_states.pt", weights_only=False)
    return [json.loads(bytes(blob))["setup"] for blob in state["data"]]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def one_node(shard_dir, tmp_path_factory) -> Path:
    """The reference: one node, two ranks, DeepSpeed's local launcher."""
    out = tmp_path_factory.mktemp("one_node")
    run_train(overrides(shard_dir, out, "one_node"), ranks=2, cli=True)  # `deepspeed launch/train.py`, as users do
    return out / "one_node"


@pytest.mark.slow
def test_two_nodes_on_loopback_train_the_same_parameters_as_one_node(one_node, shard_dir, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = _port()
    procs, outs = [], []
    for node_rank in (0, 1):
        # What each node of a cluster runs when there is no ssh between them (or under a scheduler's own fan-out).
        cmd = [
            str(BIN / "deepspeed"),
            "-H",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node_rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--enable_each_rank_log",
            str(tmp_path / f"logs{node_rank}"),
            str(ROOT / "launch/train.py"),
            *overrides(shard_dir, tmp_path, "two_nodes"),
        ]
        out = open(tmp_path / f"node{node_rank}.out", "w")  # noqa: SIM115 (closed below)
        procs.append(subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
        outs.append(out)
    for p, out in zip(procs, outs):
        p.wait(timeout=600)
        out.close()
    launcher = [(tmp_path / f"node{k}.out").read_text() for k in (0, 1)]
    rank_logs = [sorted((tmp_path / f"logs{k}").glob("*.log")) for k in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(
        t[-3000:] for t in launcher + [f.read_text()[-3000:] for logs in rank_logs for f in logs]
    )

    run = tmp_path / "two_nodes"
    assert_same_weights(weights(run, STEPS), weights(one_node, STEPS))
    # ...and training moved them, or the equality would prove nothing
    mid, end = weights(run, 2), weights(run, STEPS)
    assert any(not torch.equal(mid[k], end[k]) for k in end if k.endswith(".weight"))

    # Node k ran exactly one process, global rank k, with local rank 0 (its only device).
    for k in (0, 1):
        assert [f.name.rsplit("_", 1)[1] for f in rank_logs[k]] == [f"rank{k}.log"]
        assert f"node_rank={k}" in launcher[k] and "'--local_rank=0'" in launcher[k]
    log0 = rank_logs[0][0].read_text()
    assert " rank0] run " in log0 and "2 rank(s)" in log0
    # Each rank sharded the data by its global rank, not its local rank (both 0 here).
    assert [(s["rank"], s["world_size"]) for s in loader_setups(run, STEPS)] == [(0, 2), (1, 2)]


# ---------------------------------------------------------------------------------------------------------------
# .deepspeed_env through DeepSpeed's pdsh launch path


@pytest.mark.slow
def test_deepspeed_env_reaches_the_remote_shell_of_the_pdsh_launch(tmp_path):
    """The real runner builds the pdsh command; a stand-in `pdsh` records it; the remote part runs in `env -i`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "pdsh_argv.json"
    (bin_dir / "pdsh").write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv, open({str(record)!r}, 'w'))\n"
    )
    (bin_dir / "pdsh").chmod(0o755)
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    env = dict(
        _env(),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        WANDB_PROJECT="frrn city scapes",
        OMP_NUM_THREADS="3",
        WANDB_API_KEY="not-to-be-copied",
        TORCH_EXTENSIONS_DIR=str(tmp_path / "ext cache"),
    )
    env.pop("DS_ENV_FILE", None)

    made = subprocess.run(
        ["bash", str(ROOT / "launch/deepspeed_env.sh")], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    lines = (tmp_path / ".deepspeed_env").read_text().splitlines()
    assert all("=" in line and not line.startswith("#") for line in lines)  # the runner splits every line at "="
    assert oct((tmp_path / ".deepspeed_env").stat().st_mode & 0o777) == "0o600"

    env["WANDB_RUN_GROUP"] = "set-after-the-snapshot"  # not in the file: pdsh must not see it
    ran = subprocess.run(
        [
            str(BIN / "deepspeed"),
            "-H",
            "hostfile",
            "--no_ssh_check",
            "--master_addr",
            "10.0.0.1",
            str(ROOT / "launch/train.py"),
            "--config",
            "x.yaml",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    argv = json.loads(record.read_text())
    assert argv[argv.index("-w") + 1] == "node0,node1"
    exports, remote = argv[argv.index("-w") + 2], " ".join(argv[argv.index("-w") + 3 :])
    assert exports.startswith("export ") and "--node_rank=%n" in remote and "--master_addr=10.0.0.1" in remote
    # What a node's fresh ssh shell ends up with: evaluate the export prefix with an empty environment.
    seen = subprocess.run(["env", "-i", "bash", "-c", exports + " env -0"], capture_output=True, text=True, check=True)
    remote_env = dict(kv.split("=", 1) for kv in seen.stdout.split("\0") if "=" in kv)
    assert remote_env["WANDB_PROJECT"] == "frrn city scapes"
    assert remote_env["OMP_NUM_THREADS"] == "3"
    assert remote_env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "ext cache")
    assert "WANDB_API_KEY" not in remote_env and "WANDB_RUN_GROUP" not in remote_env


def test_deepspeed_env_refuses_values_the_remote_shell_would_expand(tmp_path):
    env = dict(os.environ, WANDB_NOTES="costs $HOME")
    proc = subprocess.run(
        ["bash", str(ROOT / "launch/deepspeed_env.sh")], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "WANDB_NOTES" in proc.stderr
    assert not (tmp_path / ".deepspeed_env").exists()


# ---------------------------------------------------------------------------------------------------------------
# SLURM and MPI: scheduler variables -> RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*


def _scheduler_env_module():
    spec = importlib.util.spec_from_file_location("scheduler_env", ROOT / "launch/scheduler_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scheduler_env_maps_slurm_and_mpi_ranks(tmp_path, monkeypatch):
    se = _scheduler_env_module()
    slurm = {"SLURM_PROCID": "13", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5", "MASTER_ADDR": "gpu01"}
    assert se.scheduler_env(slurm) == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_PORT": "29500"}
    mpi = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "3",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "2222",
        "CUDA_VISIBLE_DEVICES": "3",
    }
    # one GPU bound to the task: it is that task's device 0
    assert se.scheduler_env(mpi) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_PORT": "2222"}
    assert se.scheduler_env({**slurm, "RANK": "0"}) == {}  # a launcher already set the ranks
    assert se.scheduler_env({"HOME": "/root"}) == {}  # a plain single process
    with pytest.raises(SystemExit, match="MASTER_ADDR"):
        se.scheduler_env({k: v for k, v in mpi.items() if k != "MASTER_ADDR"})

    # MASTER_ADDR from the SLURM node list, expanded by scontrol (a stand-in here)
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] && printf 'gpu07\\ngpu08\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    no_master = {k: v for k, v in slurm.items() if k != "MASTER_ADDR"}
    assert se.scheduler_env({**no_master, "SLURM_JOB_NODELIST": "gpu[07-08]"})["MASTER_ADDR"] == "gpu07"


# Stand-ins for SLURM's commands (there is no SLURM on this machine). srun starts SLURM_NTASKS copies of its command
# with the per-task variables srun sets, or, with STUB_LATEST set, only writes that `latest` tag (a job step that
# "trained" to that step), so the script's requeue decisions can be checked in seconds.
SRUN = """#!/usr/bin/env bash
echo "srun $*" >>"$STUB_LOG"
while [[ "$1" == --* ]]; do shift; done
if [[ -n "${STUB_LATEST:-}" ]]; then
    mkdir -p "$(dirname "$STUB_LATEST_FILE")" && printf '%s' "$STUB_LATEST" >"$STUB_LATEST_FILE"
    exit 0
fi
per_node=${SLURM_NTASKS_PER_NODE:-1}
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) SLURM_STEP_NUM_TASKS=$SLURM_NTASKS \\
        "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >>"$STUB_LOG"
[[ "$1 $2" == "show hostnames" ]] && printf 'localhost\\nnode2\\n'
exit 0
"""


@pytest.fixture
def slurm(tmp_path):
    """(env, log) for running launch/slurm.sbatch as SLURM would on 2 nodes x 1 task."""
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    env = dict(
        _env(),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=sys.executable,
        STUB_LOG=str(log),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost,node2",
        SLURM_NTASKS="2",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(ROOT),
        MASTER_PORT=str(_port()),
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    return env, log


def sbatch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "launch/slurm.sbatch"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sbatch_requeues_only_a_run_that_progressed_and_is_unfinished(slurm, tmp_path):
    env, log = slurm
    args = [str(ROOT / "configs/demo.yaml"), *tiny(tmp_path / "shards", tmp_path, "job", "train.max_steps=10")]
    env["STUB_LATEST_FILE"] = str(tmp_path / "job/checkpoints/latest")

    env["STUB_LATEST"] = "step00000003"  # stopped by the time-limit SIGTERM at step 3 of 10
    proc = sbatch(args, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run at step 0 of 10" in proc.stdout and "requeueing" in proc.stdout
    assert "scontrol requeue 4242" in log.read_text()

    log.write_text("")
    proc = sbatch(args, env)  # stopped again without a new checkpoint: requeueing would loop forever
    assert proc.returncode != 0 and "without progress" in proc.stderr
    assert "scontrol requeue" not in log.read_text()

    env["STUB_LATEST"] = "step00000010"
    proc = sbatch(args, env)
    assert proc.returncode == 0 and "run finished at step 10" in proc.stdout
    assert "scontrol requeue" not in log.read_text()

    log.write_text("")
    proc = sbatch([str(ROOT / "configs/demo.yaml"), "train.max_stepz=3"], env)  # a typo fails before srun
    assert proc.returncode != 0 and "max_stepz" in proc.stderr and "srun" not in log.read_text()


@pytest.mark.slow
def test_sbatch_trains_one_task_per_rank_like_one_node(one_node, slurm, shard_dir, tmp_path):
    """srun's tasks become global ranks 0 and 1 through scheduler_env.py and train what one node trains."""
    env, log = slurm
    base = tmp_path / "base.yaml"  # the schema defaults, as the one-node reference uses
    base.write_text("model:\n  arch: A\n")
    proc = sbatch([str(base), *overrides(shard_dir, tmp_path, "job", "train.max_steps=2")], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "run finished at step 2" in proc.stdout and "master localhost:" in proc.stdout
    calls = log.read_text()
    assert "--kill-on-bad-exit=1" in calls and "launch/scheduler_env.py launch/train.py" in calls
    assert "scontrol requeue" not in calls
    run = tmp_path / "job"
    assert [(s["rank"], s["world_size"]) for s in loader_setups(run, 2)] == [(0, 2), (1, 2)]
    assert_same_weights(weights(run, 2), weights(one_node, 2))


def test_launch_files_say_how_to_use_them():
    from deepspeed.launcher.runner import _parse_hostfile

    for name in ("hostfile.example", "slurm.sbatch", "deepspeed_env.sh", "scheduler_env.py"):
        head = (ROOT / "launch" / name).read_text().splitlines()[:12]
        assert any("launch/" in line for line in head), name
    for script in ("slurm.sbatch", "deepspeed_env.sh"):
        proc = subprocess.run(["bash", str(ROOT / "launch" / script), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) > 5, script
    # DeepSpeed's own parser accepts the example (comments included) and reads its hosts in order.
    pool = _parse_hostfile((ROOT / "launch/hostfile.example").read_text().splitlines(keepends=True))
    assert list(pool) == ["node1", "node2"] and all(slots > 0 for slots in pool.values())
