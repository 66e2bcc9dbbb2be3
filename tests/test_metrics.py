"""CityscapesMetrics against hand counts and against cityscapesScripts' own evaluator on label-id PNGs."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling import args as official_args
from PIL import Image

from frrn_dist.data.labels import CATEGORY_NAMES, CLASS_NAMES, ID_TO_TRAIN, TRAIN_TO_ID
from frrn_dist.metrics import CityscapesMetrics, format_table, official_evaluate

ROAD, SIDEWALK, WALL, PERSON, CAR, TRUCK = (
    CLASS_NAMES.index(n) for n in ("road", "sidewalk", "wall", "person", "car", "truck")
)
AVG_CAR = official_args.avgClassSize["car"]


def scores(pred, target, instances=None) -> dict:
    m = CityscapesMetrics()
    t = lambda a: None if a is None else torch.tensor(a)[None]  # one image: (1, H, W)
    m.update(t(pred), t(target), t(instances))
    return m.compute()


def test_class_absent_everywhere_is_nan_and_left_out_of_the_mean():
    r = scores([[ROAD, ROAD, SIDEWALK, SIDEWALK]], [[ROAD, ROAD, SIDEWALK, SIDEWALK]])
    assert math.isnan(r["class_iou"]["wall"])
    assert r["class_iou"]["road"] == 1.0 and r["class_iou"]["sidewalk"] == 1.0
    assert r["miou"] == 1.0  # mean over the 2 present classes, not 2/19
    assert r["pixels"] == 4 and r["images"] == 1
    assert "iiou" not in r  # no instance maps given (the training-scale use)


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    r = scores([[ROAD, ROAD, ROAD, SIDEWALK]], [[ROAD, ROAD, ROAD, ROAD]])
    assert r["class_iou"]["road"] == pytest.approx(3 / 4)
    assert r["class_iou"]["sidewalk"] == 0.0
    assert r["miou"] == pytest.approx((3 / 4 + 0) / 2)


def test_predictions_on_ignored_pixels_do_not_count():
    r = scores([[ROAD, ROAD, CAR, WALL]], [[ROAD, ROAD, 255, 255]])
    assert r["class_iou"]["road"] == 1.0
    assert math.isnan(r["class_iou"]["car"]) and math.isnan(r["class_iou"]["wall"])
    assert r["miou"] == 1.0 and r["pixels"] == 2
    assert sum(map(sum, r["confusion"])) == 2


def test_void_prediction_is_a_miss_but_nobodys_false_positive():
    # 255 predicted on an evaluated pixel (like an ignored label id officially): FN of road, FP of no class
    r = scores([[ROAD, ROAD, ROAD, 255]], [[ROAD, ROAD, ROAD, ROAD]])
    assert r["class_iou"]["road"] == pytest.approx(3 / 4)
    assert r["miou"] == pytest.approx(3 / 4)


def test_instance_weighting_with_two_instances_of_different_size():
    # instance a: 2 px, 1 found; instance b: 6 px, all found; one road pixel predicted as car (unweighted FP)
    inst = [[26000, 26000, 26001, 26001, 26001, 26001, 26001, 26001, 7]]
    target = [[CAR] * 8 + [ROAD]]
    pred = [[CAR, ROAD, CAR, CAR, CAR, CAR, CAR, CAR, CAR]]
    r = scores(pred, target, inst)
    w_a, w_b = AVG_CAR / 2, AVG_CAR / 6
    tp_w, fn_w, fp = 1 * w_a + 6 * w_b, 1 * w_a, 1
    assert r["class_iiou"]["car"] == pytest.approx(tp_w / (tp_w + fp + fn_w), rel=1e-12)
    assert r["class_iou"]["car"] == pytest.approx(7 / (7 + 1 + 1))  # the pixel IoU weights b's 6 px by size
    assert math.isnan(r["class_iiou"]["person"])
    assert r["iiou"] == pytest.approx(r["class_iiou"]["car"])
    assert set(r["class_iiou"]) == {"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"}


def test_same_instance_id_in_two_images_is_two_instances():
    m = CityscapesMetrics()
    target = torch.tensor([[[CAR, CAR, CAR, CAR]], [[CAR, ROAD, ROAD, ROAD]]])
    inst = torch.tensor([[[26000, 26000, 26000, 26000]], [[26000, 7, 7, 7]]])
    pred = torch.tensor([[[CAR, CAR, ROAD, ROAD]], [[CAR, ROAD, ROAD, ROAD]]])
    m.update(pred, target, inst)
    r = m.compute()
    tp_w, fn_w = 2 * AVG_CAR / 4 + AVG_CAR / 1, 2 * AVG_CAR / 4
    assert r["class_iiou"]["car"] == pytest.approx(tp_w / (tp_w + fn_w), rel=1e-12)


def test_car_predicted_as_truck_counts_for_vehicle():
    inst = [[26000, 26000, 26000, 26000, 24000, 24000]]
    target = [[CAR, CAR, CAR, CAR, PERSON, PERSON]]
    pred = [[TRUCK, TRUCK, TRUCK, TRUCK, PERSON, PERSON]]
    r = scores(pred, target, inst)
    assert r["class_iou"]["car"] == 0.0 and r["class_iou"]["truck"] == 0.0
    assert r["category_iou"]["vehicle"] == 1.0 and r["category_iou"]["human"] == 1.0
    assert r["category_iiou"] == {"human": 1.0, "vehicle": 1.0}
    assert r["class_iiou"]["car"] == 0.0
    assert math.isnan(r["category_iou"]["flat"])
    assert r["category_miou"] == 1.0


def test_mixing_batches_with_and_without_instances_is_refused():
    m = CityscapesMetrics()
    x = torch.zeros(1, 2, 2, dtype=torch.int64)
    m.update(x, x, torch.full_like(x, 7))
    m.update(x, x)
    with pytest.raises(ValueError, match="instance maps"):
        m.compute()
    with pytest.raises(ValueError, match="pred"):
        m.update(x, x[0])


def random_frames(seed: int, n: int, hw=(48, 96)):
    """Blocky label-id maps over all 34 ids, instance ids of varied size (groups included), noisy predictions."""
    rng = np.random.default_rng(seed)
    h, w = hw
    out = []
    for _ in range(n):
        ids = rng.integers(0, 34, (h // 8, w // 8))
        ids = np.where(rng.random(ids.shape) < 0.25, 26, ids)  # plenty of cars, so instances of many sizes
        k = rng.integers(0, 3, ids.shape)  # blocks sharing k form one instance of 1..n blocks
        inst = np.where(np.isin(ids, [24, 25, 26, 27, 28, 29, 30, 31, 32, 33]) & (k < 2), ids * 1000 + k, ids)
        label_ids = ids.repeat(8, 0).repeat(8, 1).astype(np.uint8)
        inst = inst.repeat(8, 0).repeat(8, 1).astype(np.uint16)
        train = ID_TO_TRAIN[label_ids].astype(np.int64)
        pred = np.where(rng.random((h, w)) < 0.6, train, rng.integers(0, 19, (h, w)))
        pred = np.where(pred == 255, rng.integers(0, 19, (h, w)), pred)
        pred[rng.random((h, w)) < 0.02] = 255  # a few void predictions: label id 0 in the official format
        out.append((label_ids, inst, pred))
    return out


def write_official(tmp_path, frames):
    """Write frames as the official evaluator reads them; return (pred_files, gt_files)."""
    to_label_id = np.zeros(256, np.uint8)
    to_label_id[:19] = TRAIN_TO_ID
    preds, gts = [], []
    for i, (label_ids, inst, pred) in enumerate(frames):
        stem = tmp_path / f"lindau_000000_{i:06d}"
        Image.fromarray(label_ids, "L").save(f"{stem}_gtFine_labelIds.png")
        Image.fromarray(inst).save(f"{stem}_gtFine_instanceIds.png")  # uint16 -> 16-bit PNG ('I;16')
        Image.fromarray(to_label_id[pred], "L").save(f"{stem}_pred.png")
        preds.append(f"{stem}_pred.png")
        gts.append(f"{stem}_gtFine_labelIds.png")
    return preds, gts


def assert_same_as_official(ours: dict, official: dict) -> None:
    close = lambda a, b: (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)
    for name in CLASS_NAMES:
        assert close(ours["class_iou"][name], official["classScores"][name]), name
    for name, value in ours["class_iiou"].items():
        assert close(value, official["classInstScores"][name]), name
    for name in CATEGORY_NAMES:
        assert close(ours["category_iou"][name], official["categoryScores"][name]), name
    for name, value in ours["category_iiou"].items():
        assert close(value, official["categoryInstScores"][name]), name
    assert math.isnan(official["categoryScores"]["void"])
    assert close(ours["miou"], official["averageScoreClasses"])
    assert close(ours["iiou"], official["averageScoreInstClasses"])
    assert close(ours["category_miou"], official["averageScoreCategories"])
    assert close(ours["category_iiou_mean"], official["averageScoreInstCategories"])
    cm = np.array(official["confMatrix"])
    assert np.array_equal(np.array(ours["confusion"]), cm[np.ix_(TRAIN_TO_ID, TRAIN_TO_ID)])


def test_matches_the_official_evaluator_on_label_id_pngs(tmp_path):
    frames = random_frames(0, 5)
    preds, gts = write_official(tmp_path, frames)
    official = official_evaluate(preds, gts)

    m = CityscapesMetrics()
    for batch in (frames[:2], frames[2:]):  # two updates: the sums run over the whole set
        target = torch.from_numpy(np.stack([ID_TO_TRAIN[f[0]] for f in batch]))
        inst = torch.from_numpy(np.stack([f[1].astype(np.int32) for f in batch]))
        pred = torch.from_numpy(np.stack([f[2] for f in batch]))
        m.update(pred, target, inst)
    ours = m.compute()
    assert ours["miou"] > 0.2 and not math.isnan(ours["iiou"])  # a meaningful case, not all-NaN
    assert sum(not math.isnan(v) for v in ours["class_iiou"].values()) == 8
    assert_same_as_official(ours, official)
    assert "road" in format_table(ours) and f"{ours['miou']:5.3f}" in format_table(ours)


def _rank_main(rank: int, port: int, frames, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    m = CityscapesMetrics()
    for label_ids, inst, pred in frames[rank::2][: 1 + rank]:  # rank 1 sees more images than rank 0
        m.update(torch.from_numpy(pred)[None], torch.from_numpy(ID_TO_TRAIN[label_ids])[None],
                 torch.from_numpy(inst.astype(np.int32))[None])  # fmt: skip
    m.all_reduce()
    queue.put((rank, m.compute()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_ranks_equals_one_pass():
    frames = random_frames(1, 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank_main, args=(port, frames, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))

    seen = frames[0::2][:1] + frames[1::2][:2]
    m = CityscapesMetrics()
    for label_ids, inst, pred in seen:
        m.update(torch.from_numpy(pred)[None], torch.from_numpy(ID_TO_TRAIN[label_ids])[None],
                 torch.from_numpy(inst.astype(np.int32))[None])  # fmt: skip
    single = m.compute()
    for r in results.values():
        assert r["confusion"] == single["confusion"] and r["images"] == 3
        assert r["miou"] == pytest.approx(single["miou"], rel=1e-12)
        assert r["iiou"] == pytest.approx(single["iiou"], rel=1e-12)
