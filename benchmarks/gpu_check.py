"""`make gpu-check`: validate the GPU side of frrn-dist on one GPU in at most 6 minutes; one table, one JSON file.

    make gpu-check [DEVICE=cuda|cpu] [OUT=gpu-check.json]
    python benchmarks/gpu_check.py [--device cuda|cpu] [--out FILE] [--sections env,collectives,dali,model,loop]

Five sections, each in a subprocess of its own under a timeout (a crash, a hang or a CUDA error in one cannot take
the table down, and train.main creates its own process group), every check guarded: a missing package gives a
"not installed" row, a failure one "FAILED" row with one line, and the rest still runs.

  env          GPU, memory, driver; torch / CUDA / cuDNN / NCCL / DeepSpeed / DALI / omegaconf versions; CPUs
  collectives  a process group at world size 1 (NCCL on cuda, gloo on cpu; through deepspeed.init_distributed when
               DeepSpeed imports) running every collective the loop uses, through frrn_dist.distributed
  dali         synthetic 1024x2048 JPEG shards decoded by the real loader, DALI device="mixed" (nvJPEG), paper
               recipe to 256x512: images/s and CPU-seconds per image; the PIL fallback beside it on one core
  model        FRRN-A at 256x512, bf16 autocast, checkpointing off/unit x channels_last off/on: forward+backward
               images/s, achieved TFLOP/s, utilisation of the dense bf16 peak, peak memory against the planner
  loop         frrn_dist.train.main itself, 30 micro-steps counting host syncs (torch.cuda.set_sync_debug_mode),
               a save, a resume to step 35 and an evaluation

DEVICE=cpu runs the same code at tiny sizes (64x128 model, 32x64 loop, DALI CPU decode): tests/test_gpu_check.py
runs it, so it cannot rot. It needs no virtualenv: a CUDA build of torch plus the wheels `make gpu-wheels` puts in
.gpu-wheels/ (DeepSpeed, omegaconf, webdataset, cityscapesScripts; DALI and wandb are optional, wandb is off).
FRRN_GPU_CHECK_SKIP=dali[,deepspeed,...] makes those packages unimportable in the sections (sys.modules[name] =
None, Python's own way to block an import), to see what a machine without them prints.
Writes OUT (JSON: every row, per-section times) and OUT with .log (everything the sections printed). Exit status 1
if a row FAILED ("not installed" is not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a plain checkout: frrn_dist from here, no install needed

from gpu_check_rows import FAILED, MISSING  # noqa: E402 - benchmarks/ is this script's sys.path[0]
from gpu_check_sections import run_child  # noqa: E402

SECTIONS = ("env", "collectives", "dali", "model", "loop")
TIMEOUT_S = {"env": 90, "collectives": 120, "dali": 180, "model": 240, "loop": 300}  # each capped by the budget
BUDGET_S = {"cuda": 360, "cpu": 600}  # the GPU run's promise: 6 minutes, every section included


def last_line(log: Path, since: int) -> str:
    with open(log, "rb") as f:
        f.seek(since)
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def run_section(name: str, args, work: Path, log: Path, timeout_s: float) -> tuple[list[dict], float]:
    rows_file = work / f"{name}.rows.json"
    rows_file.unlink(missing_ok=True)  # a child that dies before its first row must not leave an old file in charge
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--child", name,
           "--work", str(work), "--rows", str(rows_file)]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", WANDB_SILENT="true",
               DS_ACCELERATOR="cuda" if args.device == "cuda" else "cpu")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log, "ab") as f:
        f.write(f"\n===== section {name} (timeout {timeout_s:.0f} s) =====\n".encode())
        since = f.tell()
        start = time.perf_counter()
        # a session of its own: a timeout ends the section and everything it started (DALI, loader workers)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            problem = None if rc == 0 else f"section process exited with code {rc}"
        except subprocess.TimeoutExpired:
            problem = f"timed out after {timeout_s:.0f} s"
        except BaseException:  # Ctrl-C reaches only this process, not the section's own session: end it too
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        if problem:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever it left running (DALI threads, loader workers)
            proc.wait()
    seconds = time.perf_counter() - start
    state = json.loads(rows_file.read_text()) if rows_file.is_file() else {"expected": [], "rows": []}
    rows = state["rows"]
    if problem:
        why = f"{problem}: {last_line(log, since)}"
        done = {r["check"] for r in rows}
        owed = [c for c in state["expected"] if c not in done] or (["(section)"] if not rows else [])
        rows += [dict(section=name, check=c, value=why, status=FAILED) for c in owed]
    return rows, seconds


def print_table(rows: list[dict]) -> None:
    widths = [max(len(str(r[k])) for r in rows + [dict(section="section", check="check", status="status")])
              for k in ("section", "check", "status")]  # fmt: skip
    print(f"\n{'section':<{widths[0]}}  {'check':<{widths[1]}}  {'status':<{widths[2]}}  value")
    print(f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * widths[2]}  -----")
    for r in rows:
        print(f"{r['section']:<{widths[0]}}  {r['check']:<{widths[1]}}  {r['status']:<{widths[2]}}  {r['value']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (the check) or cpu (tiny sizes)")
    ap.add_argument("--out", default="gpu-check.json", help="JSON written here; a folder (or a path without a "
                    "suffix) gets FOLDER/gpu-check.json. The sections' output goes beside it with .log")  # fmt: skip
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list out of {','.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="all sections together (default cuda 360, cpu 600)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args)
    sections = [s for s in args.sections.split(",") if s]
    if not sections or any(s not in SECTIONS for s in sections):
        raise SystemExit(f"gpu-check: --sections {args.sections!r}: expected a comma list out of {','.join(SECTIONS)}")
    out = Path(args.out)
    out = out / "gpu-check.json" if out.is_dir() or not out.suffix else out  # a folder, existing or not
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text(f"gpu-check --device {args.device} on {socket.gethostname()}, {time.strftime('%F %T %z')}\n")
    budget = args.budget_s or BUDGET_S[args.device]
    tmp = tempfile.TemporaryDirectory(prefix="gpu-check-") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    start, rows, times = time.perf_counter(), [], {}
    print(f"gpu-check: device {args.device}, sections {','.join(sections)}, budget {budget:.0f} s; log {log}")
    for name in sections:
        left = budget - (time.perf_counter() - start)
        if left < 5:
            rows.append(dict(section=name, check="(section)", value=f"not run: the {budget:.0f} s budget was spent",
                             status=FAILED))  # fmt: skip
            continue
        print(f"gpu-check: {name} ...", flush=True)
        got, times[name] = run_section(name, args, work, log, min(TIMEOUT_S[name], left))
        rows += got
        print(f"gpu-check: {name}: {len(got)} rows in {times[name]:.0f} s, "
              f"{sum(r['status'] == FAILED for r in got)} FAILED", flush=True)  # fmt: skip
    total = time.perf_counter() - start
    if tmp is not None:
        tmp.cleanup()
    failed = [r for r in rows if r["status"] == FAILED]
    report = dict(device=args.device, host=socket.gethostname(), date=time.strftime("%F %T %z"), seconds=total,
                  budget_s=budget, section_seconds=times, ok=not failed, rows=rows)  # fmt: skip
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(out)
    print_table(rows)
    for r in rows:
        if r["status"] == FAILED and r.get("first_stack"):
            print(f"\n{r['section']} / {r['check']}: the first one\n{r['first_stack']}")
    missing = sum(r["status"] == MISSING for r in rows)
    print(f"\ngpu-check: {len(rows)} checks in {total:.0f} s: {len(failed)} FAILED, {missing} not installed "
          f"(README: make gpu-wheels; DALI, wandb optional); table in {out}, output in {log}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
