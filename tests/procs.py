"""Helpers for tests that run real training processes: tiny-run overrides, launch commands, reading losses back.

Every run is FRRN-A at 32x64 on the conftest shards, on CPU over gloo; process start-up (imports, DeepSpeed, DALI)
is most of its time.
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

from frrn_dist.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    """A free port for a run's rank-0 store, below the kernel's ephemeral range. A port the kernel hands out (bind
    to 0) lies in that range, where gloo's and every client socket's ports come from: one of them took it before
    the store listened (EADDRINUSE, seen once in a fresh-clone suite)."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first = int(ephemeral.read_text().split()[0]) if ephemeral.is_file() else 32768
    for _ in range(200):
        port = random.randint(max(1024, first - 12000), first - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below {first}")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)
    return env


def tiny(shard_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    """Overrides of a run small enough for a test (later `extra` keys win). Precision and layout are pinned: runs
    compared with each other must not each decide `auto` by their own start-up measurement. wandb is off (its
    start costs rank 0 ~3 s a run): a test that reads the wandb run passes wandb.enabled=true."""
    return [
        f"data.shard_dir={shard_dir}",
        "train.precision=fp32",
        "model.channels_last=false",
        "data.input_hw=[32,64]",
        "data.translate_px=4",
        "data.num_threads=1",
        "train.micro_batch_size=2",
        "train.log_every_steps=1",
        "optim.schedule=constant",
        "wandb.enabled=false",
        "wandb.mode=offline",
        "wandb.num_samples=2",
        "run.device=cpu",
        f"run.out_dir={out_dir}",
        f"run.name={name}",
        *extra,
    ]


def saving_every_two(shard_dir: Path, out_dir: Path, name: str, steps: int, *extra: str) -> list[str]:
    """A tiny run of `steps` steps that checkpoints every 2 and never evaluates or logs to wandb in between."""
    return tiny(shard_dir, out_dir, name, f"train.max_steps={steps}", "train.save_every_steps=2",
                "train.eval_every_steps=0", *extra)  # fmt: skip


def start_train(overrides: list[str], ranks: int = 2) -> subprocess.Popen:
    """A run in its own process group (so a test can SIGKILL the launcher and its ranks at once), output dropped."""
    return subprocess.Popen(
        train_cmd(overrides, ranks), env=_env(), cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def train_cmd(overrides: list[str], ranks: int, script: Path | None = None, cli: bool = False) -> list[str]:
    """`python launch/train.py ...` for one rank; for more, DeepSpeed's launcher of one node, the command the
    `deepspeed` CLI runs on each node (`python -m deepspeed.launcher.launch --world_info=...`: it starts the ranks
    with RANK, LOCAL_RANK, WORLD_SIZE and MASTER_* set and --local_rank passed, and stops them all when one
    fails). cli=True: `deepspeed --num_accelerators N ...` itself, which adds a process importing DeepSpeed to
    build that command (2.4 s and ~3.4 CPU-s a run on 2 cores); test_cluster.py runs it so."""
    argv = [str(script or ROOT / "launch/train.py"), *overrides]
    if ranks == 1:
        return [sys.executable, *argv]
    if cli:
        return [str(BIN / "deepspeed"), "--num_accelerators", str(ranks), "--master_port", str(_port()), *argv]
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
            "--master_addr=127.0.0.1", f"--master_port={_port()}", *argv]  # fmt: skip


def run_train(overrides: list[str], ranks: int = 2, timeout: int = 400, **kw) -> subprocess.CompletedProcess:
    """Run to completion; fails the test with the output's tail if it does not exit 0."""
    proc = subprocess.run(
        train_cmd(overrides, ranks, **kw), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a resumed run appends, so the last record of a step wins."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}
