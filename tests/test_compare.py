"""The compare command: curves of several runs, final scores and config differences, from run folders alone."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from frrn_dist.compare import RunError, compare_runs
from tests.eval_helpers import run_cli


def make_run_dir(root, name, *, lr, miou_curve, eval_miou=None, truncated=False):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"model:\n  arch: A\n  upsample: theano\noptim:\n  lr: {lr}\n  schedule: step\nrun:\n  name: {name}\n"
    )
    records = []
    for step in range(0, 50, 10):
        records.append({"kind": "train", "step": step, "epoch": 0, "loss": 3.0 / (step + 1) + lr, "lr": lr})
    for step, miou in miou_curve:
        records.append({"kind": "val", "step": step, "epoch": 0, "miou": miou, "loss": 1.0, "class_iou": {}})
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    if truncated:  # training is still appending: a half-written last line
        text += '{"kind": "train", "step": 60, "lo'
    (run / "metrics.jsonl").write_text(text)
    if eval_miou is not None:
        (run / "eval-val").mkdir()
        (run / "eval-val" / "metrics.json").write_text(
            json.dumps({"miou": eval_miou, "iiou": None, "category_miou": 0.7})
        )
    return run, records


def test_report_has_curves_scores_and_only_the_differing_config_keys(tmp_path):
    a, rec_a = make_run_dir(tmp_path, "lr-high", lr=0.01, miou_curve=[(20, 0.31), (40, 0.29)], eval_miou=0.3333)
    b, rec_b = make_run_dir(tmp_path, "lr-low", lr=0.001, miou_curve=[(20, 0.12), (40, 0.25)], truncated=True)
    paths = compare_runs([a, b], tmp_path / "report")
    for key in ("curves", "scores", "config_diff"):
        assert Image.open(paths[key]).size[0] > 200
    md = paths["markdown"].read_text()
    diff = md[md.index("## Config keys") :]
    assert "optim.lr" in diff and "0.01" in diff and "0.001" in diff
    assert "model.arch" not in diff and "optim.schedule" not in diff and "run.name" not in diff
    scores = md[md.index("## Final scores") : md.index("## Config keys")]
    rows = {line.split("|")[1].strip(): line for line in scores.splitlines() if line.startswith("| lr-")}
    best_a = max(r["miou"] for r in rec_a if r["kind"] == "val")
    last_b = [r["miou"] for r in rec_b if r["kind"] == "val"][-1]
    assert f"{best_a:.4g}" in rows["lr-high"] and "0.3333" in rows["lr-high"]  # best val and official eval
    assert f"{last_b:.4g}" in rows["lr-low"]
    assert f"| {max(r['step'] for r in rec_b)} |" in rows["lr-low"]  # the half-written step 60 is not counted


def test_bad_run_folders_are_named(tmp_path):
    with pytest.raises(RunError, match="no such run folder") as e:
        compare_runs([tmp_path / "missing"], tmp_path / "out")
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="not a run folder"):
        compare_runs([tmp_path / "empty"], tmp_path / "out")
    broken, _ = make_run_dir(tmp_path, "broken", lr=0.1, miou_curve=[])
    (broken / "metrics.jsonl").write_text('{"kind": "train"\n{"kind": "val", "step": 1}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl:1: not JSON"):
        compare_runs([broken], tmp_path / "out")


def test_cli(tmp_path):
    a, _ = make_run_dir(tmp_path, "one", lr=0.01, miou_curve=[(10, 0.2)])
    b, _ = make_run_dir(tmp_path, "two", lr=0.02, miou_curve=[(10, 0.3)])
    r = run_cli("compare.py", a, b, "--out", tmp_path / "cmp")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cmp" / "compare.md").is_file() and (tmp_path / "cmp" / "curves.png").is_file()
    r = run_cli("compare.py", a, tmp_path / "nope", "--out", tmp_path / "cmp2")
    assert r.returncode != 0 and r.stderr.strip() == f"compare: {tmp_path / 'nope'}: no such run folder"
