"""Helpers for the evaluation/prediction/export tests: a run folder holding a freshly initialised FRRN-A."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from frrn_dist.export import save_model
from frrn_dist.model import FRRN

REPO = Path(__file__).resolve().parents[1]
INPUT_HW = (32, 64)  # FRRN-A's smallest sensible input; synthetic frames are 128x256 (factor 4)


def make_run(root: Path, *, shard_dir: Path | None = None, seed: int = 0, step: int = 7) -> Path:
    """runs/<name>/ as training leaves it: config.yaml, checkpoints/latest, checkpoints/<tag>/model.*.

    The numbers are compared between paths, never judged, so an untrained model is enough; BN running statistics
    are randomised so that eval mode (running statistics) differs visibly from batch statistics.
    """
    torch.manual_seed(seed)
    model = FRRN("A")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    run = root / "run"
    tag = f"step{step:08d}"
    meta = {"arch": "A", "num_classes": 19, "upsample": "theano", "input_hw": list(INPUT_HW), "step": step}
    save_model(model, run / "checkpoints" / tag, meta)
    (run / "checkpoints" / "latest").write_text(tag)
    lines = ["model:", "  arch: A", "data:", "  val_split: val", "  backend: torch", "  input_hw: [32, 64]"]
    if shard_dir is not None:
        lines.insert(3, f"  shard_dir: {shard_dir}")
    (run / "config.yaml").write_text("\n".join(lines) + "\n")
    return run


def run_cli(script: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run launch/<script> as a user would, from the repo root."""
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout,
    )  # fmt: skip
