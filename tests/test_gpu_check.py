"""`make gpu-check DEVICE=cpu`: the GPU check's own CPU twin, run for real so that it cannot rot.

- The whole check through the Makefile target: every section reports, nothing FAILED, the collectives ran, the
  real loop issued no host synchronisation on its ordinary micro-steps, resumed from its checkpoint and evaluated.
- A machine without DALI and DeepSpeed (FRRN_GPU_CHECK_SKIP blocks their imports, the script's documented switch):
  "not installed" rows, and the rest still runs (collectives through torch.distributed directly).
- Bad --sections: one line naming the value, before any section starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/gpu_check.py"
SECTIONS = ("env", "collectives", "dali", "model", "loop")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FRRN_GPU_CHECK_SKIP", None)
    return {**env, **extra}


def _rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["section"], r["check"]): r for r in report["rows"]}


@pytest.mark.slow
def test_make_gpu_check_on_cpu(tmp_path):
    out = tmp_path / "report/gpu-check.json"
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", "DEVICE=cpu", f"OUT={out}"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    report = json.loads(out.read_text())
    failed = [r for r in report["rows"] if r["status"] == "FAILED"]
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-2000:])
    assert report["device"] == "cpu" and report["ok"] is True
    assert {r["section"] for r in report["rows"]} == set(SECTIONS)
    assert out.with_suffix(".log").is_file()
    # the printed table holds every row of the JSON
    for r in report["rows"]:
        assert f"{r['check']}" in proc.stdout and r["value"] in proc.stdout
    rows = _rows(report)
    collectives = [r for r in report["rows"] if r["section"] == "collectives"]
    assert len(collectives) >= 8 and all(r["status"] == "ok" for r in collectives), collectives
    assert "gloo" in rows[("collectives", "process group")]["value"]
    assert "refused" in rows[("collectives", "refuses a tensor off the device")]["value"]
    syncs = rows[("loop", "host syncs on ordinary micro-steps")]
    assert syncs["status"] == "ok" and syncs["value"].startswith("0 in ") and syncs["first_stack"] == "", syncs
    assert int(syncs["value"].split()[2]) > 0  # micro-steps were watched
    save = rows[("loop", "save")]
    saved = int(save["value"].rsplit("latest = step", 1)[1])  # the first run's last checkpoint
    resume = rows[("loop", "resume")]
    assert save["status"] == "ok" and resume["status"] == "ok", (save, resume)
    assert f"/runs/loop/checkpoints/step{saved:08d}" in resume["value"] and f"at step {saved}," in resume["value"]
    assert int(resume["value"].rsplit("continued to step", 1)[1]) > saved
    assert rows[("loop", "evaluation")]["status"] == "ok"
    model = [r for r in report["rows"] if r["section"] == "model" and r["check"].startswith("FRRN-A")]
    assert len(model) == 4 and all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in model), model


@pytest.mark.slow
def test_missing_dali_and_deepspeed_give_rows_not_a_crash(tmp_path):
    out = tmp_path / "skip.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--sections", "collectives,dali", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(FRRN_GPU_CHECK_SKIP="dali,deepspeed"), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    report = json.loads(out.read_text())
    assert proc.returncode == 0, (report["rows"], proc.stdout[-2000:])
    rows = _rows(report)
    dali = rows[("dali", "DALI device='cpu' decode 256x512 -> 64x128")]
    assert dali["status"] == "not installed" and "blocked by FRRN_GPU_CHECK_SKIP" in dali["value"], dali
    assert rows[("dali", "PIL fallback, 1 core, 256x512 -> 64x128")]["status"] == "ok"  # the section went on
    group = rows[("collectives", "process group")]
    assert "torch.distributed.init_process_group (deepspeed not installed" in group["value"], group
    assert all(r["status"] == "ok" for r in report["rows"] if r["section"] == "collectives"), report["rows"]
    assert "not installed" in proc.stdout


def test_unknown_section_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sections", "env,gpu", "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0 and "--sections 'env,gpu'" in proc.stderr and "collectives" in proc.stderr
    assert not (tmp_path / "x.json").exists()
