"""Compare training runs from their folders alone (no wandb server needed).

For each run folder (runs/<name>/ with config.yaml, metrics.jsonl and, after `launch/evaluate.py`, eval-<split>/
metrics.json) this draws the loss and mIoU curves of all runs on one figure and tabulates their final scores and
the config keys in which they differ, as markdown and as PNG. Online, runs that share a wandb project and group
are compared on the wandb dashboard instead; this is the offline twin.

Imports: omegaconf, frrn_dist.visualize.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from frrn_dist.visualize import plot_runs, plot_table


class RunError(ValueError):
    """A run folder that cannot be compared; the message names it."""


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a half-written last line (training still appending) is skipped, not fatal."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise RunError(f"{path}:{i + 1}: not JSON ({e})") from e
    return records


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        return flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    except Exception as e:  # noqa: BLE001 - any YAML/omegaconf failure is a bad run folder
        raise RunError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def read_evals(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{split: metrics.json} of every eval-<split>/ the evaluate command wrote into the run."""
    out = {}
    for path in sorted(run_dir.glob("eval-*/metrics.json")):
        try:
            out[path.parent.name[len("eval-") :]] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{path}: not JSON ({e})") from e
    return out


def _last(records: list[dict[str, Any]], kind: str, key: str) -> tuple[int | None, float | None]:
    for r in reversed(records):
        v = r.get(key)
        if r.get("kind") == kind and isinstance(v, (int, float)) and not math.isnan(v):
            return r.get("step"), float(v)
    return None, None


def summarize(name: str, records: list[dict[str, Any]], evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Final scores of one run: last train loss, last and best val mIoU (training scale), official eval scores."""
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    val = [(r["step"], r["miou"]) for r in records if r.get("kind") == "val" and isinstance(r.get("miou"), float)]
    val = [(s, v) for s, v in val if not math.isnan(v)]
    best = max(val, key=lambda sv: sv[1]) if val else (None, None)
    row = {
        "run": name,
        "steps": max(steps) if steps else None,
        "train loss": _last(records, "train", "loss")[1],
        "val mIoU": _last(records, "val", "miou")[1],
        "best val mIoU": best[1],
        "best at step": best[0],
    }
    for split, m in evals.items():
        row[f"{split} mIoU (official)"] = m.get("miou")
        row[f"{split} iIoU (official)"] = m.get("iiou")
        row[f"{split} cat. mIoU (official)"] = m.get("category_miou")
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> dict[str, Path]:
    """Write curves.png, scores.png, config_diff.png and compare.md into `out`; return their paths."""
    if not run_dirs:
        raise RunError("compare: give at least one run folder")
    runs = {}
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise RunError(f"{d}: no such run folder")
        records, config, evals = read_records(d), read_config(d), read_evals(d)
        if not records and not config and not evals:
            raise RunError(f"{d}: no metrics.jsonl, config.yaml or eval-*/metrics.json: not a run folder")
        name = d.resolve().name
        if name in runs:  # two folders of the same name (e.g. two out_dirs): tell them apart by path
            name = str(d)
        runs[name] = (records, config, evals)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"curves": plot_runs({n: r[0] for n, r in runs.items()}, out / "curves.png", title="runs compared")}

    rows = [summarize(n, r[0], r[2]) for n, r in runs.items()]
    header = list(dict.fromkeys(k for row in rows for k in row))
    score_rows = [[_fmt(row.get(k)) for k in header] for row in rows]
    paths["scores"] = plot_table(header, score_rows, out / "scores.png", title="final scores")

    # config keys in which the runs differ (the run name always does: it is the row label already)
    configs = {n: r[1] for n, r in runs.items()}
    keys = sorted({k for c in configs.values() for k in c} - {"run.name"})
    missing = object()
    differ = [k for k in keys if len({json.dumps(c.get(k, missing), default=str) for c in configs.values()}) > 1]
    diff_header = ["config key", *configs]
    diff_rows = [[k, *(_fmt(c[k]) if k in c else "(absent)" for c in configs.values())] for k in differ]
    paths["config_diff"] = plot_table(
        diff_header, diff_rows or [["(none: same config)", *("" for _ in configs)]], out / "config_diff.png",
        title="config keys that differ",
    )  # fmt: skip

    md = [
        "# Runs compared",
        "",
        "![curves](curves.png)",
        "",
        "## Final scores",
        "",
        "val mIoU is measured during training at the training scale; `(official)` columns come from "
        "`launch/evaluate.py` (full resolution, cityscapesScripts rules).",
        "",
        _markdown(header, score_rows),
        "",
        "## Config keys that differ",
        "",
        _markdown(diff_header, diff_rows) if diff_rows else "The runs share one config (apart from run.name).",
        "",
    ]
    md_path = out / "compare.md"
    tmp = md_path.with_name(f".{md_path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(md))
    os.replace(tmp, md_path)
    paths["markdown"] = md_path
    return paths
