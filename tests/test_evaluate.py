"""The evaluate command: official-format PNGs the official evaluator scores to our numbers, shards vs Cityscapes
folder, resize modes, defaults from the run, clear refusals (2 ranks = 1 rank: tests/test_tta.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from frrn_dist.data.labels import TRAIN_TO_ID
from frrn_dist.evaluate import main, run_evaluation
from frrn_dist.metrics import official_main
from frrn_dist.tta import to_full_resolution
from tests.eval_helpers import make_run, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory, shard_dir_png):
    return make_run(tmp_path_factory.mktemp("evaluate"), shard_dir=shard_dir_png)


@pytest.fixture(scope="module")
def folder_eval(run, synthetic_root, tmp_path_factory):
    """The Cityscapes-folder path, with official-format predictions."""
    out = tmp_path_factory.mktemp("folder_eval")
    r = run_evaluation(run, cityscapes=synthetic_root, write_predictions=out / "preds", out=out / "report",
                       micro_batch_size=3, num_workers=0)  # fmt: skip
    return r, out


@pytest.fixture(scope="module")
def shards_eval(run, tmp_path_factory):
    """`make eval RUN=...`: shards and loader from the run's config.yaml (torch backend), report in RUN/eval-val/."""
    out = tmp_path_factory.mktemp("shards_eval")
    return main(str(run), micro_batch_size=2, num_workers=0, write_predictions=str(out / "preds")), out


def strict_json(path):
    """metrics.json must parse without Python's NaN extension (strict JSON parsers reject bare NaN)."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: bare {c} in JSON"))


def gt_files(root, split="val"):
    return sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))


def same(a, b):
    return (a is None and (b is None or math.isnan(b))) or (a is not None and a == pytest.approx(b, rel=1e-9))


def test_written_predictions_score_the_same_with_the_official_evaluator(folder_eval, synthetic_root):
    r, out = folder_eval
    preds = out / "preds"
    gts = gt_files(synthetic_root)
    assert r["images"] == len(gts) == 4
    for gt in gts:
        key = gt.name[: -len("_gtFine_labelIds.png")]
        p = preds / f"{key}_pred.png"  # <city>_<seq>_<frame>_pred.png
        im, gt_im = Image.open(p), Image.open(gt)
        assert im.mode == "L" and im.size == gt_im.size  # 8-bit, ground-truth resolution
        assert set(np.unique(np.array(im))) <= set(TRAIN_TO_ID.tolist())  # label ids, not train ids

    # cityscapesScripts' evaluator with its own file matching (<city>_<seq>_<frame>*.png anywhere below the folder)
    official = official_main(["--predictions", str(preds), "--cityscapes", str(synthetic_root)])
    report = strict_json(out / "report" / "metrics.json")
    assert report["resize"] == "nearest" and report["input_hw"] == [32, 64]
    assert same(report["miou"], official["averageScoreClasses"])
    assert same(report["iiou"], official["averageScoreInstClasses"])
    assert same(report["category_miou"], official["averageScoreCategories"])
    assert same(report["category_iiou_mean"], official["averageScoreInstCategories"])
    for name, v in report["class_iou"].items():
        assert same(v, official["classScores"][name]), name
    for name, v in report["class_iiou"].items():
        assert same(v, official["classInstScores"][name]), name
    assert sum(v is not None for v in report["class_iou"].values()) >= 10  # a real comparison, not all-NaN
    for png in ("confusion.png", "class_iou.png"):
        assert Image.open(out / "report" / png).size[0] > 300


def test_defaults_come_from_the_run_and_shards_equal_the_folder(run, shards_eval, folder_eval, shard_dir_png):
    from_shards, from_folder = shards_eval[0], folder_eval[0]
    report = strict_json(run / "eval-val" / "metrics.json")  # the default report folder
    assert report["source"] == str(shard_dir_png) and report["split"] == "val" and report["step"] == 7
    # lossless PNG shards decode to the source pixels and both paths shrink with the loaders' Lanczos
    assert from_shards["confusion"] == from_folder["confusion"] == report["confusion"]
    assert from_shards["iiou"] == pytest.approx(from_folder["iiou"], rel=1e-12)


def test_dali_and_torch_loaders_read_the_same_ground_truth(run, shard_dir_png, shards_eval, tmp_path):
    fallback, out = shards_eval
    dali = run_evaluation(run, shards=shard_dir_png, backend="dali", num_workers=1, out=tmp_path / "d",
                          write_predictions=tmp_path / "pd", micro_batch_size=3)  # fmt: skip
    # ground truth (label.png, instance.png) decodes exactly in both: per-class pixel counts are equal
    assert [sum(row) for row in dali["confusion"]] == [sum(row) for row in fallback["confusion"]]
    assert dali["images"] == fallback["images"] == 4 and dali["pixels"] == fallback["pixels"]
    # predictions differ only where DALI's and PIL's Lanczos round differently at the input scale
    same = [np.mean(np.array(Image.open(p)) == np.array(Image.open(out / "preds" / p.name)))
            for p in sorted((tmp_path / "pd").iterdir())]  # fmt: skip
    assert len(same) == 4 and min(same) > 0.98


def test_resize_modes_by_hand():
    # logits favouring class 0 left, class 1 right, at 1x2; ground truth 2x4
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    nearest = to_full_resolution(logits, (2, 4), "nearest")
    assert nearest.tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1]]]  # output o takes input cell o // 2
    # bilinear on logits, align_corners=False: column 1 sits at input x = 0.25 -> class 0 logit 1.5 vs 0.25;
    # column 2 at x = 0.75 -> 0.5 vs 0.75, class 1
    assert to_full_resolution(logits, (2, 4), "bilinear").tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1]]]
    strong_left = torch.tensor([[[[4.0, 0.0]], [[0.0, 1.0]]]])
    # x = 0.75: class 0 = 1.0, class 1 = 0.75 -> bilinear moves the border, nearest cannot
    assert to_full_resolution(strong_left, (1, 4), "bilinear").tolist() == [[[0, 0, 0, 1]]]
    assert to_full_resolution(strong_left, (1, 4), "nearest").tolist() == [[[0, 0, 1, 1]]]
    with pytest.raises(ValueError, match="resize"):
        to_full_resolution(logits, (2, 4), "bicubic")


def test_missing_or_mismatched_checkpoint_and_bad_folder_are_refused(run, synthetic_root, tmp_path):
    r = run_cli("evaluate.py", "--checkpoint", tmp_path / "nope", "--cityscapes", synthetic_root)
    assert r.returncode != 0 and str(tmp_path / "nope") in r.stderr
    assert r.stderr.strip().count("\n") == 0  # one line, no traceback
    bad = tmp_path / "b"
    shutil.copytree(run / "checkpoints" / "step00000007", bad)
    meta = json.loads((bad / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**meta, "arch": "B"}))
    with pytest.raises(ValueError, match="does not match FRRN-B"):
        run_evaluation(bad, cityscapes=synthetic_root)
    with pytest.raises(ValueError, match="leftImg8bit"):
        run_evaluation(run, cityscapes=tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"):
        main(str(run), split="test")  # shards from the run config, which has no test split
    assert not (run / "eval-test").exists()


# 2 ranks = 1 rank: tests/test_tta.py::test_two_ranks_give_the_same_numbers_as_one (with views; the one
# multi-process evaluation test, covering the same sharding, all-reduce and per-rank prediction files)
