"""Synthetic Cityscapes: the official layout, file formats, classes, instance ids, determinism and the CLI."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

from frrn_dist.data.labels import ID_COLORS, ID_TO_TRAIN, INSTANCE_LABEL_IDS, NUM_CLASSES
from frrn_dist.synthetic import draw_scene, main, make_dataset, parse_hw

NAME = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})_leftImg8bit\.png$")
GT_KINDS = ("labelIds", "instanceIds", "color")


def png_header(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk, independent of how PIL maps modes."""
    head = path.read_bytes()[:33]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return head[24], head[25]


def frames(root: Path, split: str) -> list[Path]:
    return sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))


def test_layout_is_cityscapes(synthetic_root: Path):
    assert sorted(p.name for p in synthetic_root.iterdir()) == ["gtFine", "leftImg8bit", "synthetic.json"]
    for split, cities, n in (("train", {"aachen", "bochum"}, 6), ("val", {"frankfurt"}, 4)):
        imgs = frames(synthetic_root, split)
        assert len(imgs) == n
        assert {p.parent.name for p in imgs} == cities
        gt_files = set((synthetic_root / "gtFine" / split).glob("*/*"))
        img_files = set((synthetic_root / "leftImg8bit" / split).glob("*/*"))
        assert img_files == set(imgs)  # nothing else lying around (no temp files)
        expected_gt = set()
        for img in imgs:
            m = NAME.match(img.name)
            assert m and m[1] == img.parent.name, img
            stem = img.name[: -len("_leftImg8bit.png")]
            expected_gt |= {synthetic_root / "gtFine" / split / m[1] / f"{stem}_gtFine_{k}.png" for k in GT_KINDS}
        assert gt_files == expected_gt


def test_file_formats(synthetic_root: Path):
    for img in frames(synthetic_root, "train")[:2] + frames(synthetic_root, "val")[:2]:
        gt = Path(str(img).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_"))
        files = {k: Path(f"{gt}{k}.png") for k in GT_KINDS}
        assert png_header(img) == (8, 2)  # 8-bit RGB
        assert png_header(files["labelIds"]) == (8, 0)  # 8-bit grayscale
        assert png_header(files["instanceIds"]) == (16, 0)  # 16-bit grayscale
        assert png_header(files["color"]) == (8, 6)  # 8-bit RGBA, as json2labelImg writes it
        with Image.open(img) as im, Image.open(files["labelIds"]) as lab, Image.open(files["instanceIds"]) as ins:
            assert (im.mode, lab.mode, ins.mode) == ("RGB", "L", "I;16")
            assert im.size == lab.size == ins.size == (256, 128)
            label_ids = np.asarray(lab)
        color = np.asarray(Image.open(files["color"]))
        assert (color[..., :3] == ID_COLORS[label_ids]).all() and (color[..., 3] == 255).all()


def read_split(root: Path, split: str):
    for img in frames(root, split):
        gt = str(img).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_")
        yield np.asarray(Image.open(gt + "labelIds.png")), np.asarray(Image.open(gt + "instanceIds.png"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_all_19_classes_and_void_ids_present(synthetic_root: Path, split: str):
    counts = np.zeros(256, np.int64)
    for label_ids, _ in read_split(synthetic_root, split):
        assert set(np.unique(label_ids).tolist()) <= set(id2label)  # only ids of the table
        counts += np.bincount(label_ids.ravel(), minlength=256)
    train_counts = np.bincount(ID_TO_TRAIN[np.arange(256)], weights=counts, minlength=256)
    missing = [id2label[int(i)].name for i in np.flatnonzero(train_counts[:NUM_CLASSES] == 0)]
    assert not missing, f"classes absent from {split}: {missing}"
    void = {id2label[i].name for i in np.flatnonzero(counts) if ID_TO_TRAIN[i] == 255}
    assert {"ego vehicle", "rail track"} <= void, void


def test_instance_ids_are_well_formed(synthetic_root: Path):
    for label_ids, inst in list(read_split(synthetic_root, "train")) + list(read_split(synthetic_root, "val")):
        assert inst.dtype == np.uint16
        is_inst = inst >= 1000
        # instance pixels: id*1000+k of an instance class, with the label id underneath
        assert (inst[is_inst] // 1000 == label_ids[is_inst]).all()
        assert set(np.unique(inst[is_inst] // 1000).tolist()) <= set(INSTANCE_LABEL_IDS)
        # every pixel of an instance class belongs to an instance (no group regions drawn); others keep the id
        assert (is_inst == np.isin(label_ids, list(INSTANCE_LABEL_IDS))).all()
        assert (inst[~is_inst] == label_ids[~is_inst]).all()
        for cls in np.unique(inst[is_inst] // 1000):
            ks = np.unique(inst[inst // 1000 == cls] % 1000)
            assert ks.tolist() == list(range(len(ks))), f"class {cls}: k must count from 0 without gaps"
        assert len(np.unique(inst[is_inst])) >= 8  # cars, people, riders, trucks...: several objects a frame


def test_draw_scene_is_deterministic_and_seed_dependent():
    a = draw_scene(3, (64, 128))
    b = draw_scene(3, (64, 128))
    c = draw_scene(4, (64, 128))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    rgb, label_ids, inst = a
    assert (rgb.shape, rgb.dtype) == ((64, 128, 3), np.uint8)
    assert (label_ids.shape, label_ids.dtype, inst.dtype) == ((64, 128), np.uint8, np.uint16)


def test_appearance_is_not_a_colour_lookup():
    """Classes are textured and overlap in colour: a colour->class table learnt on some frames fails on others."""

    def pixels(seeds):
        codes, classes = [], []
        for seed in seeds:
            rgb, label_ids, _ = draw_scene(seed, (96, 192))
            train = ID_TO_TRAIN[label_ids].ravel()
            q = rgb.reshape(-1, 3).astype(np.int64) // 16  # 16 levels a channel
            keep = train < NUM_CLASSES
            codes.append((q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2])[keep])
            classes.append(train[keep])
        return np.concatenate(codes), np.concatenate(classes)

    codes, classes = pixels(range(4))
    table = np.zeros((4096, NUM_CLASSES))
    np.add.at(table, (codes, classes), 1)
    for cls in (0, 2, 8, 13):  # road, building, vegetation, car: shaded and textured, not one flat colour
        assert np.count_nonzero(table[:, cls]) > 10, cls
    codes, classes = pixels(range(100, 103))
    pred = table.argmax(1)[codes]
    ious = [((pred == c) & (classes == c)).sum() / max(1, ((pred == c) | (classes == c)).sum()) for c in range(19)]
    assert np.mean(ious) < 0.3  # measured ~0.12: shape, texture and context have to do the rest


# Regression checksums of the original, single-file implementation (frrn_dist/synthetic.py before issue 14 split it
# into a package), computed from that code: the split, and any later refactoring, must not change a byte of a frame.
# (bytes sha256, decoded pixels sha256) per file. The pixels pin the drawing; the bytes also pin the PNG writing
# (modes, compress levels) and depend on Pillow's zlib too: if only the bytes differ, look at the encoder first.
# A deliberate change to the drawing bumps GENERATOR and these values together.
FRAME_SHA256 = {
    "gtFine/train/aachen/aachen_000000_000019_gtFine_color.png": (
        "5732208b580ad5447d357c7ceadc066910b3aa4bb807e671bf6c936adafd1025",
        "a67be93a525d1da8f8e1e219ec227b7ee4d848be2eaeaa02aff77ac10dba55c5",
    ),
    "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png": (
        "3b0e942a9011e6730eed5fe9da01fddd17257c896b4b738ce5b5562cc30323f4",
        "1ec889166c2bf940ce3304b33db8024885ef9dc7cb29eb575204534ebbf90286",
    ),
    "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png": (
        "b712369165c739dba4d52f4bafcd2b8b97effaca3020aa8024b6722537864a19",
        "a1764c09958282bd67a4b94f522816c4a48834df7f171bdc3cb11e9bbff8f688",
    ),
    "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png": (
        "bc397d9eac09a4bbc776ebd38b2c8e0b580cc1593b731e17d088919fabf6d46e",
        "92e093fd2432ae0bdaa7454b8a377291a75fb6b4092c5e7a7a7ab756f403b18d",
    ),
}
MARKER_SHA256 = "8f34f3528125e23d1728b66856e2948e4557d746c1b79c532ae3cc66dfd472d0"


def test_small_frame_is_byte_identical_to_the_original_implementation(tmp_path: Path):
    root = make_dataset(tmp_path / "d", hw=(64, 128), num_train=1, num_val=0, num_train_cities=1, seed=0, workers=1)
    got = {}
    for path in sorted(root.rglob("*.png")):
        pixels = np.asarray(Image.open(path)).tobytes()
        got[str(path.relative_to(root))] = (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            hashlib.sha256(pixels).hexdigest(),
        )
    assert {k: v[1] for k, v in got.items()} == {k: v[1] for k, v in FRAME_SHA256.items()}, "the drawing changed"
    assert got == FRAME_SHA256, "same pixels, other PNG bytes: the writer (or Pillow's zlib) changed"
    assert hashlib.sha256((root / "synthetic.json").read_bytes()).hexdigest() == MARKER_SHA256


def test_frames_depend_on_seed_split_and_index_only(tmp_path: Path, synthetic_root: Path):
    # 1 worker, fewer frames: the frames that exist in both must be byte-identical to the fixture (2 workers)
    small = make_dataset(tmp_path / "a", hw=(128, 256), num_train=2, num_val=1, num_train_cities=2,
                         num_val_cities=1, seed=0, workers=1)  # fmt: skip
    for split in ("train", "val"):
        for img in frames(small, split):
            rel = img.relative_to(small)
            assert img.read_bytes() == (synthetic_root / rel).read_bytes(), rel
            gt = Path(str(rel).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
            assert (small / gt).read_bytes() == (synthetic_root / gt).read_bytes(), gt


def test_rerun_is_a_noop_and_foreign_folders_are_refused(tmp_path: Path, capsys):
    kw = dict(hw=(32, 64), num_train=1, num_val=1, num_train_cities=1, workers=1)
    root = make_dataset(tmp_path / "d", **kw)
    img = frames(root, "train")[0]
    mtime = img.stat().st_mtime_ns
    capsys.readouterr()
    make_dataset(root, **kw)
    assert "nothing to do" in capsys.readouterr().out
    assert img.stat().st_mtime_ns == mtime
    # other parameters: the old frames go, the new ones come
    make_dataset(root, **{**kw, "num_train": 2})
    assert len(frames(root, "train")) == 2
    foreign = tmp_path / "cityscapes"
    (foreign / "leftImg8bit").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        make_dataset(foreign, **kw)
    assert list(foreign.iterdir()) == [foreign / "leftImg8bit"]


def test_interrupted_run_is_redrawn(tmp_path: Path, monkeypatch):
    import frrn_dist.synthetic.dataset as syn

    kw = dict(hw=(32, 64), num_train=3, num_val=1, num_train_cities=1, workers=1)
    real, calls = syn._write_frame, []

    def dying(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job)
        real(job)

    monkeypatch.setattr(syn, "_write_frame", dying)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(tmp_path / "d", **kw)
    assert len(frames(tmp_path / "d", "train")) == 2  # half a dataset, marked incomplete
    monkeypatch.setattr(syn, "_write_frame", real)
    make_dataset(tmp_path / "d", **kw)  # not refused as a foreign folder, not taken as finished
    assert len(frames(tmp_path / "d", "train")) == 3 and len(frames(tmp_path / "d", "val")) == 1


def test_official_evaluator_finds_and_scores_the_ground_truth(synthetic_root: Path, tmp_path: Path, monkeypatch):
    """cityscapesscripts' own file matching and scoring on our gtFine/val: perfect predictions score 1.0."""
    if not hasattr(np, "in1d"):  # removed in numpy 2.4; the evaluator still calls it
        monkeypatch.setattr(np, "in1d", lambda a, b, invert=False, **_: np.isin(np.ravel(a), b, invert=invert),
                            raising=False)  # fmt: skip
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    results = tmp_path / "results" / "nested"
    results.mkdir(parents=True)
    gts = sorted(str(p) for p in (synthetic_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    for gt in gts:
        name = Path(gt).name.replace("_gtFine_labelIds.png", "_pred.png")
        shutil.copy(gt, results / name)
    args = copy.copy(ev.args)
    args.predictionPath, args.predictionWalk = str(tmp_path / "results"), None
    args.quiet, args.JSONOutput, args.evalInstLevelScore = True, False, True
    preds = [ev.getPrediction(args, gt) for gt in gts]  # the evaluator's <city>_<seq>_<frame>*.png matching
    assert [Path(p).name[:20] for p in preds] == [Path(g).name[:20] for g in gts]
    res = ev.evaluateImgLists(preds, gts, args)
    assert res["averageScoreClasses"] == pytest.approx(1.0)
    assert res["averageScoreInstClasses"] == pytest.approx(1.0)  # read our 16-bit instanceIds
    # and it is really reading them: cars predicted as road lose car IoU and car iIoU
    car = 26
    for p in preds:
        a = np.asarray(Image.open(p)).copy()
        a[a == car] = 7
        Image.fromarray(a).save(p)
    res = ev.evaluateImgLists(preds, gts, args)
    assert res["classScores"]["car"] == 0.0 and res["classInstScores"]["car"] == 0.0
    assert res["classScores"]["person"] == pytest.approx(1.0)


def test_parse_hw_and_cli_errors(tmp_path: Path):
    assert parse_hw("1024x2048") == (1024, 2048)
    for bad in ("100", "10x20", "axb", "1024x"):
        with pytest.raises(ValueError, match="is not HxW"):
            parse_hw(bad)
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "x"), "--hw", "100"])
    assert "--hw: '100' is not HxW" in str(e.value.code)
    assert not (tmp_path / "x").exists()


def test_cli_help_and_run(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "frrn_dist.synthetic", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--hw" in r.stdout and "--train-cities" in r.stdout
    out = tmp_path / "cli"
    r = subprocess.run(
        [sys.executable, "-m", "frrn_dist.synthetic", "--out", str(out), "--hw", "32x64", "--train", "2", "--val",
         "1", "--workers", "1"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(frames(out, "train")) == 2 and len(frames(out, "val")) == 1
