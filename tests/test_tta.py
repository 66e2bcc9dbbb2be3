"""Test-time augmentation: one view is the single-scale bilinear path bit for bit, flip and scale views equal
hand computations from plain forward passes, the official evaluator scores the averaged PNGs, 1 rank = 2 ranks,
and unusable scales are refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from frrn_dist.data.cityscapes_folder import cityscapes_files, downscale_image, read_array
from frrn_dist.data.labels import ID_TO_TRAIN
from frrn_dist.evaluate import run_evaluation
from frrn_dist.export import load_model
from frrn_dist.metrics import official_main
from frrn_dist.predict import segment
from frrn_dist.tta import choose_resize, make_views, mean_probabilities, predict, view_hw, view_logits
from tests.eval_helpers import INPUT_HW, REPO, make_run, run_cli

TTA_SCALES = "0.5,1.5"  # 16x32 (shrunk, antialiased) and 48x96 (enlarged) from the 32x64 input


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("tta"))


@pytest.fixture(scope="module")
def model(run):
    return load_model(run)[0].eval()


@pytest.fixture(scope="module")
def frames(synthetic_root):
    """The 4 val frames as the network gets them: (key, (1, 3, 32, 64) input, (H, W) train ids)."""
    out = []
    for key, image, gt, _ in cityscapes_files(synthetic_root, "val"):
        x = downscale_image(read_array(image, mode="RGB"), INPUT_HW)
        out.append((key, torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255, ID_TO_TRAIN[read_array(gt)]))
    return out


def softmax_up(logits, full_hw):
    return F.interpolate(logits, size=full_hw, mode="bilinear", align_corners=False).softmax(1)


def by_hand(model, x, full_hw, hws, flip):
    """Mean class probabilities from plain forward passes, written out without frrn_dist.tta."""
    probs = []
    with torch.no_grad():
        for h, w in hws:
            v = x
            if (h, w) != tuple(x.shape[-2:]):
                v = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=h < x.shape[-2])
            probs.append(softmax_up(model(v), full_hw))
            if flip:  # mirror the input, mirror the full-size probabilities back
                probs.append(softmax_up(model(v.flip(-1)), full_hw).flip(-1))
    return sum(probs) / len(probs)


def labels_agree(pred, probs):
    """pred == argmax(probs) wherever the two best classes are more than float noise apart (flip after vs before
    upsampling differs by rounding only); returns how many pixels were decided."""
    pred, top2 = pred.long(), probs.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert torch.equal(pred[clear], probs.argmax(1)[clear])
    assert clear.float().mean() > 0.99
    return int(clear.sum())


def test_sizes_round_to_the_architecture_multiple():
    assert view_hw(0.75, (256, 512), 16) == (192, 384) and view_hw(1.25, (256, 512), 16) == (320, 640)
    assert view_hw(0.75, (512, 1024), 32) == (384, 768)  # FRRN-B
    assert view_hw(1.1, (256, 512), 16) == (288, 560)  # 281.6 -> 18 x 16; 563.2 -> 35 x 16
    assert view_hw(1.0, INPUT_HW, 16) == INPUT_HW
    views = make_views("0.75,1.0,1.25", True, (256, 512), 16)
    assert views.as_dict() == {"scales": [0.75, 1.0, 1.25], "input_hws": [[192, 384], [256, 512], [320, 640]],
                               "flip": True, "num_views": 6}  # fmt: skip
    assert "192x384, 256x512, 320x640" in views.describe()


def test_one_view_is_the_bilinear_path_exactly(model, frames, run, synthetic_root, tmp_path):
    one = make_views(None, False, INPUT_HW, model.size_multiple)
    x = torch.cat([f[1] for f in frames[:2]])  # a batch of 2: the per-image loop must not mix images
    with torch.no_grad():
        logits = model(x)
        today = F.interpolate(logits, size=(128, 256), mode="bilinear", align_corners=False).argmax(1)
        assert torch.equal(predict(model, x, one, (128, 256)), today)
        # and the softmax-averaging path with that one view picks the same labels (argmax softmax = argmax logits)
        labels_agree(today, mean_probabilities(view_logits(model, x, one), (128, 256)))
    # the command: --scales 1.0 without --flip writes the same files and scores as --resize bilinear
    kw = dict(cityscapes=synthetic_root, micro_batch_size=2, num_workers=0)
    a = run_evaluation(run, resize="bilinear", out=tmp_path / "a", write_predictions=tmp_path / "pa", **kw)
    b = run_evaluation(run, scales="1.0", out=tmp_path / "b", write_predictions=tmp_path / "pb", **kw)
    assert a["confusion"] == b["confusion"] and a["miou"] == b["miou"] and b["resize"] == "bilinear"
    for p in sorted((tmp_path / "pa").iterdir()):
        assert p.read_bytes() == (tmp_path / "pb" / p.name).read_bytes()


def test_flip_view_is_the_mirrored_model(model, frames):
    x = torch.cat([f[1] for f in frames[:2]])
    views = make_views("1.0", True, INPUT_HW, model.size_multiple)
    with torch.no_grad():
        plain, mirrored = view_logits(model, x, views)
        direct = model(x.flip(-1)).flip(-1)
        assert torch.equal(mirrored, direct) and torch.equal(plain, model(x))
        assert (plain.argmax(1) != mirrored.argmax(1)).float().mean() > 0.05  # the flip view does add something
        labels_agree(predict(model, x, views, (128, 256)), by_hand(model, x, (128, 256), [INPUT_HW], flip=True))


def test_two_scales_average_as_computed_by_hand(model, frames):
    x = torch.cat([f[1] for f in frames[:2]])
    views = make_views(TTA_SCALES, False, INPUT_HW, model.size_multiple)
    assert views.input_hws == ((16, 32), (48, 96))
    hand = by_hand(model, x, (128, 256), [(16, 32), (48, 96)], flip=False)
    with torch.no_grad():
        assert torch.allclose(mean_probabilities(view_logits(model, x, views), (128, 256)), hand, atol=1e-6)
        pred = predict(model, x, views, (128, 256))
    assert torch.equal(pred, hand.argmax(1))  # same operations in the same order: no rounding to excuse
    single = by_hand(model, x, (128, 256), [INPUT_HW], flip=False).argmax(1)
    assert (pred != single).float().mean() > 0.05  # a real average, not the 1.0 view again


def test_predict_averages_views_at_the_image_size(model):
    rgb = np.random.default_rng(0).integers(0, 255, (45, 67, 3), np.uint8)  # neither side a multiple of 16
    views = make_views("0.5,1.0", True, INPUT_HW, model.size_multiple)
    got = segment(model, rgb, input_hw=INPUT_HW, views=views)
    x = torch.from_numpy(downscale_image(rgb, INPUT_HW)).permute(2, 0, 1)[None].float() / 255
    hand = by_hand(model, x, (45, 67), [(16, 32), INPUT_HW], flip=True)
    assert got.shape == (45, 67) and got.dtype == np.uint8
    labels_agree(torch.from_numpy(got.astype(np.int64))[None], hand)


@pytest.fixture(scope="module")
def tta_eval(run, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("tta_eval")
    r = run_evaluation(run, cityscapes=synthetic_root, scales=TTA_SCALES, flip=True, out=out / "report",
                       write_predictions=out / "preds", micro_batch_size=1, num_workers=0)  # fmt: skip
    return r, out


def test_report_records_views_time_memory_and_the_official_evaluator_agrees(tta_eval, model, frames, synthetic_root):
    r, out = tta_eval
    report = json.loads((out / "report" / "metrics.json").read_text())
    assert report["views"] == {"scales": [0.5, 1.5], "input_hws": [[16, 32], [48, 96]], "flip": True, "num_views": 4}
    assert report["resize"] == "bilinear" and "mean over views" in report["resize_note"]
    assert 0 < report["model_seconds_per_image"] <= report["seconds_per_image"] < report["seconds"]
    assert report["peak_memory_bytes"] > 50 * 2**20 and report["peak_memory"].startswith("cpu: peak RSS")
    # the written PNGs are the averaged result, at ground-truth size, and score the same officially
    for key, x, _ in frames:
        png = np.array(Image.open(out / "preds" / f"{key}_pred.png"))
        labels_agree(
            torch.from_numpy(ID_TO_TRAIN[png])[None], by_hand(model, x, (128, 256), [(16, 32), (48, 96)], True)
        )
    official = official_main(["--predictions", str(out / "preds"), "--cityscapes", str(synthetic_root)])
    assert report["miou"] == pytest.approx(official["averageScoreClasses"], rel=1e-9)
    assert report["iiou"] == pytest.approx(official["averageScoreInstClasses"], rel=1e-9)


def test_unusable_scales_and_modes_are_refused(run, synthetic_root, model, tmp_path):
    r = run_cli("evaluate.py", "--checkpoint", run, "--cityscapes", synthetic_root, "--scales", "1.0,0.2")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr  # one line, no traceback
    assert "scale 0.2" in r.stderr and "rounds to 0x16" in r.stderr  # 32x64 x 0.2 = 6.4x12.8 -> 0x16
    for bad in ("abc", "-1", "0", "nan", "1.0,,2"):
        with pytest.raises(ValueError, match="scale '.*' .*expected a positive number"):
            make_views(bad, False, INPUT_HW, 16)
    with pytest.raises(ValueError, match="nearest with 2 views"):
        choose_resize("nearest", make_views("1.0", True, INPUT_HW, 16), "bilinear")
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(img)
    r = run_cli("predict.py", "--checkpoint", run, "--input", img, "--out", tmp_path / "o", "--fit", "pad", "--flip")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "--fit resize" in r.stderr, r.stderr


@pytest.mark.slow
def test_two_ranks_give_the_same_numbers_as_one(run, shard_dir_png, tta_eval, tmp_path):
    """The one multi-process evaluation test (it also covers the plain path: same sharding, all-reduce, files)."""
    args = ["--checkpoint", run, "--shards", shard_dir_png, "--backend", "torch", "--workers", "0",
            "--micro-batch-size", "1", "--scales", TTA_SCALES, "--flip"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "launch" / "evaluate.py"), *map(str, args), "--out", str(tmp_path / "two"),
         "--write-predictions", str(tmp_path / "p2")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "4 view(s): scales 0.5, 1.5 -> inputs 16x32, 48x96 and each mirrored" in two.stdout
    one, out = tta_eval  # 1 rank, from the Cityscapes folder: lossless PNG shards give the same pixels
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["ranks"], b["ranks"]) == (1, 2) and one["views"] == b["views"]
    assert one["confusion"] == b["confusion"] and one["images"] == b["images"] == 4
    for key in ("miou", "iiou", "category_miou", "category_iiou_mean"):
        assert one[key] == pytest.approx(b[key], rel=1e-12), key
    # each rank wrote its own samples' predictions: together every frame, identical to the 1-rank files
    names = sorted(p.name for p in (out / "preds").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "p2").iterdir()) and len(names) == 4
    for n in names:
        assert (out / "preds" / n).read_bytes() == (tmp_path / "p2" / n).read_bytes()
