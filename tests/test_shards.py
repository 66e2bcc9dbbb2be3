"""`make shards`: round trip against the source PNGs, the manifest, both readers, re-runs and every bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import frrn_dist.shards as shards_mod
from frrn_dist.data.labels import ID_TO_TRAIN, NUM_CLASSES
from frrn_dist.data.manifest import ShardError, read_manifest, split_files
from frrn_dist.data.shardwriter import TAR_MTIME
from frrn_dist.shards import InputError, pack

SPLITS = ("train", "val")


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} in tar order, checking members of a sample are consecutive."""
    samples: dict[str, dict[str, bytes]] = {}
    last = None
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            assert key == last or key not in samples, f"{m.name}: members of a sample must be consecutive"
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
            last = key
    return samples


def read_split(shard_dir: Path, split: str) -> dict[str, dict[str, bytes]]:
    out = {}
    for tar in split_files(shard_dir, split)[0]:
        out.update(read_tar(Path(tar)))
    return out


def decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def source_keys(root: Path, split: str) -> set[str]:
    return {p.name[: -len("_leftImg8bit.png")] for p in (root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")}


@pytest.mark.parametrize("fixture", ["shard_dir", "shard_dir_png"])
def test_round_trip(fixture: str, request, synthetic_root: Path):
    shard_dir = request.getfixturevalue(fixture)
    image_ext = "jpg" if fixture == "shard_dir" else "png"
    for split in SPLITS:
        samples = read_split(shard_dir, split)
        assert set(samples) == source_keys(synthetic_root, split)  # every frame exactly once
        for key, s in samples.items():
            meta = json.loads(s["json"])
            expected_members = {image_ext, "label.png", "label.x2.png", "label.x4.png", "json"}
            expected_members |= {"instance.png"} if split == "val" else set()
            assert set(s) == expected_members
            assert meta["key"] == key and meta["split"] == split and key.startswith(meta["city"] + "_")
            src_img = np.asarray(Image.open(synthetic_root / meta["image"]))
            assert (meta["height"], meta["width"]) == src_img.shape[:2]
            src_ids = np.asarray(Image.open(synthetic_root / meta["label"]))
            label = Image.open(io.BytesIO(s["label.png"]))
            assert label.mode == "L"  # 8-bit single channel: DALI ANY_DATA decodes it exactly
            assert np.array_equal(np.asarray(label), ID_TO_TRAIN[src_ids])
            img = decode(s[image_ext])
            if image_ext == "png":
                assert np.array_equal(img, src_img)
            else:
                err = np.abs(img.astype(np.int16) - src_img.astype(np.int16))
                psnr = 10 * np.log10(255**2 / np.mean(err.astype(np.float64) ** 2))
                # q95 with 4:2:0 chroma on per-pixel sensor grain at 128x256: ~30 dB; a wrong frame is ~10 dB
                assert psnr > 27 and err.mean() < 5, (key, psnr, err.mean())
            if split == "val":
                src_inst = synthetic_root / meta["instance"]
                assert s["instance.png"] == src_inst.read_bytes()
                inst = Image.open(io.BytesIO(s["instance.png"]))
                assert inst.mode == "I;16" and np.asarray(inst).max() >= 24000


@pytest.mark.parametrize("fixture", ["shard_dir", "shard_dir_png"])
def test_manifest_matches_the_files(fixture: str, request, synthetic_root: Path):
    shard_dir = request.getfixturevalue(fixture)
    m = read_manifest(shard_dir)  # the loaders' own reader accepts it
    assert m["source_root"] == str(synthetic_root.resolve())
    assert m["settings"]["image_format"] == ("jpg" if fixture == "shard_dir" else "png")
    names = {p.name for p in shard_dir.iterdir()}
    listed = {"manifest.json"}
    for split in SPLITS:
        info = m["splits"][split]
        samples = read_split(shard_dir, split)
        assert info["num_samples"] == len(samples) == len(source_keys(synthetic_root, split))
        assert (info["height"], info["width"]) == (128, 256)
        votes = ["label.x2.png", "label.x4.png"]  # the default LABEL_FACTORS, both dividing 128x256
        assert info["components"][1:] == ["label.png", *votes] + (["instance.png"] if split == "val" else []) + ["json"]
        assert len(info["shards"]) >= 2  # 0.1 MB shards: rolled over
        pixels = np.zeros(256, np.int64)
        for s in samples.values():
            pixels += np.bincount(decode(s["label.png"]).ravel(), minlength=256)
        assert info["class_pixels"] == pixels[:NUM_CLASSES].tolist()
        assert info["ignore_pixels"] == int(pixels[255])
        assert sum(info["class_pixels"]) + info["ignore_pixels"] == len(samples) * 128 * 256
        for sh in info["shards"]:
            tar = shard_dir / sh["tar"]
            data = tar.read_bytes()
            assert sh["bytes"] == len(data) and sh["sha256"] == hashlib.sha256(data).hexdigest()
            assert sh["num_samples"] == len(read_tar(tar))
            listed |= {sh["tar"], sh["idx"]}
        assert sum(sh["num_samples"] for sh in info["shards"]) == info["num_samples"]
    assert names == listed  # nothing else in the folder: no temp files


def test_samples_are_shuffled_and_bytes_do_not_depend_on_workers(shard_dir: Path, synthetic_root: Path, tmp_path):
    keys = list(read_split(shard_dir, "train"))
    assert keys != sorted(keys)  # Cityscapes order is by city: DALI's local shuffle buffer needs this
    m1 = pack(synthetic_root, tmp_path / "w1", image_format="jpg", shard_size_mb=0.1, seed=0, workers=1)
    m2 = read_manifest(shard_dir)
    for split in SPLITS:
        assert [s["sha256"] for s in m1["splits"][split]["shards"]] == [
            s["sha256"] for s in m2["splits"][split]["shards"]
        ]
    m3 = pack(synthetic_root, tmp_path / "seed1", splits=("train",), shard_size_mb=0.1, seed=1, workers=1)
    assert list(read_split(tmp_path / "seed1", "train")) != keys
    assert m3["settings"]["splits"] == ["train"] and list(m3["splits"]) == ["train"]


def test_index_equals_dalis_wds2idx(shard_dir: Path, tmp_path: Path):
    wds2idx = Path(sys.executable).parent / "wds2idx"
    for split in SPLITS:
        for tar, idx in zip(*split_files(shard_dir, split)):
            ref = tmp_path / (Path(idx).name + ".ref")
            subprocess.run([str(wds2idx), tar, str(ref)], check=True, capture_output=True)
            assert Path(idx).read_text() == ref.read_text()


def test_webdataset_reads_the_shards(shard_dir: Path):
    import webdataset as wds

    tars, _ = split_files(shard_dir, "val")
    seen = {}
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        seen[sample["__key__"]] = sample
    expected = read_split(shard_dir, "val")
    assert set(seen) == set(expected)
    for key, sample in seen.items():
        assert sample["label.png"] == expected[key]["label.png"] and sample["jpg"] == expected[key]["jpg"]
        assert json.loads(sample["json"])["key"] == key


def test_tars_are_webdataset_tarwriter_output(shard_dir: Path):
    """Byte for byte what webdataset's own writer makes of the same samples (the packer goes through it)."""
    import webdataset as wds

    for tar in split_files(shard_dir, "val")[0]:
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=TAR_MTIME, user="", group="", format="GNU_FORMAT") as w:
            for key, members in read_tar(Path(tar)).items():
                w.write({"__key__": key, **members})
        assert buf.getvalue() == Path(tar).read_bytes()


def test_dali_reads_the_shards_with_the_index(shard_dir: Path):
    from nvidia.dali import fn, pipeline_def, types

    tars, idxs = split_files(shard_dir, "val")
    expected = read_split(shard_dir, "val")

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl, inst, meta = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "label.png", "instance.png", "json"],
            missing_component_behavior="error", name="Reader")  # fmt: skip
        img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        lbl = fn.decoders.image(lbl, device="cpu", output_type=types.ANY_DATA)
        inst = fn.decoders.image(inst, device="cpu", output_type=types.ANY_DATA, dtype=types.UINT16)
        return img, lbl, inst, meta

    p = pipe()
    p.build()
    assert p.epoch_size("Reader") == len(expected)
    seen = set()
    for _ in range(len(expected)):
        img, lbl, inst, meta = (np.asarray(o[0]) for o in p.run())
        key = json.loads(meta.tobytes())["key"]
        seen.add(key)
        assert img.shape == (128, 256, 3)
        assert np.array_equal(lbl[..., 0], decode(expected[key]["label.png"]))
        assert inst.dtype == np.uint16 and np.array_equal(inst[..., 0], decode(expected[key]["instance.png"]))
    assert seen == set(expected)


def test_rerun_is_a_noop_and_changed_settings_repack(shard_dir: Path, synthetic_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    m = pack(synthetic_root, out, image_format="jpg", shard_size_mb=0.1, seed=0)
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert m == read_manifest(out)
    # the CLI says the same and exits 0
    r = subprocess.run([sys.executable, "-m", "frrn_dist.shards", "--root", str(synthetic_root), "--out", str(out),
                        "--shard-size-mb", "0.1"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "up to date" in r.stdout, r.stderr
    # other settings: repacked in place, the old shards replaced
    m = pack(synthetic_root, out, image_format="png", shard_size_mb=1, seed=0, workers=1)
    assert m["settings"]["image_format"] == "png" and len(m["splits"]["train"]["shards"]) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "train-000000.tar", "train-000000.idx", "val-000000.tar", "val-000000.idx"]
    )
    assert not list(tmp_path.glob("copy.*"))  # no .tmp-/.old- folders left


# ---- bad input: one clear error naming the file, nothing left that looks finished ------------------------------


@pytest.fixture
def val_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of the val split to break."""
    root = tmp_path / "src"
    for sub in ("leftImg8bit", "gtFine"):
        shutil.copytree(synthetic_root / sub / "val", root / sub / "val")
    return root


def first(root: Path, kind: str) -> Path:
    pattern = {"image": "leftImg8bit/val/*/*.png", "label": "gtFine/val/*/*_labelIds.png",
               "instance": "gtFine/val/*/*_instanceIds.png"}[kind]  # fmt: skip
    return sorted(root.glob(pattern))[0]


def assert_fails(root: Path, out: Path, match: str, splits=("val",), **kw) -> str:
    with pytest.raises(InputError, match=match) as e:
        pack(root, out, splits=splits, workers=2, **kw)
    assert not out.exists()
    assert not list(out.parent.glob(out.name + ".tmp-*"))
    with pytest.raises(ShardError):
        read_manifest(out)
    return str(e.value)


def test_missing_root(tmp_path: Path):
    assert_fails(tmp_path / "nope", tmp_path / "out", "nope: no such folder")


def test_split_without_images(val_copy: Path, tmp_path: Path):
    assert_fails(val_copy, tmp_path / "out", r"leftImg8bit/train: missing", splits=("train",))
    (val_copy / "leftImg8bit" / "test").mkdir()
    assert_fails(val_copy, tmp_path / "out", r"leftImg8bit/test: no \*_leftImg8bit.png images", splits=("test",))


def test_image_without_label_and_label_without_image(val_copy: Path, tmp_path: Path):
    label = first(val_copy, "label")
    label.rename(tmp_path / "aside.png")
    assert_fails(val_copy, tmp_path / "out", f"{label}: missing, the label of")
    (tmp_path / "aside.png").rename(label)
    image = first(val_copy, "image")
    image.unlink()
    assert_fails(val_copy, tmp_path / "out", f"{image}: missing, the image of")


def test_missing_instance_ids_on_an_evaluation_split(val_copy: Path, tmp_path: Path):
    inst = first(val_copy, "instance")
    inst.unlink()
    assert_fails(val_copy, tmp_path / "out", f"{inst}: missing, the instance ids")


def test_label_id_outside_the_table(val_copy: Path, tmp_path: Path):
    label = sorted(val_copy.glob("gtFine/val/*/*_labelIds.png"))[-1]  # the last one: found by a worker mid-run
    ids = np.asarray(Image.open(label)).copy()
    ids[5, 7] = 200
    Image.fromarray(ids).save(label)
    assert_fails(val_copy, tmp_path / "out", f"{label}: label id 200 is not in the Cityscapes table")


def test_truncated_png(val_copy: Path, tmp_path: Path):
    image = sorted(val_copy.glob("leftImg8bit/val/*/*.png"))[-1]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    assert_fails(val_copy, tmp_path / "out", f"{image}: unreadable PNG")
    image.write_bytes(b"not a png at all")
    assert_fails(val_copy, tmp_path / "out", f"{image}: unreadable PNG")


def test_sizes_that_disagree(val_copy: Path, tmp_path: Path):
    image = sorted(val_copy.glob("leftImg8bit/val/*/*.png"))[-1]
    Image.open(image).resize((128, 64)).save(image)
    assert_fails(val_copy, tmp_path / "out", f"{image}: 64x128 but .* is 128x256")


def test_out_folder_holding_other_files_is_refused(val_copy: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds files that are not shards"):
        pack(val_copy, out, splits=("val",))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_interrupted_run_leaves_nothing_finished(val_copy: Path, tmp_path: Path, monkeypatch):
    calls = []

    def dying(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job)
        return real(job)

    real = shards_mod.encode_frame
    monkeypatch.setattr(shards_mod, "encode_frame", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack(val_copy, out, splits=("val",), workers=1)
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    # a run killed hard leaves its temp folder: never accepted, and swept away by the next run
    stale = tmp_path / "out.tmp-999999999"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    monkeypatch.setattr(shards_mod, "encode_frame", real)
    pack(val_copy, out, splits=("val",), workers=1)
    assert not stale.exists() and read_manifest(out)["splits"]["val"]["num_samples"] == 4


def test_cli_errors_and_help(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "frrn_dist.shards", "--root", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path / 'nope'}: no such folder (the Cityscapes root with leftImg8bit/ and gtFine/)"
    )
    r = subprocess.run([sys.executable, "-m", "frrn_dist.shards", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--image-format" in r.stdout and "--shard-size-mb" in r.stdout
    assert os.path.basename(sys.executable)  # the interpreter the tests run under runs the CLI


def test_packed_votes_equal_the_reference_vote(shard_dir: Path):
    """label.x2/x4.png hold the cell-by-cell majority vote (a plain count, not the packer's Boyer-Moore) of label.png,
    on frames with class boundaries, void and ties; and a hand-made noisy map at other factors."""
    from .test_data_recipes import reference_vote

    for split in SPLITS:
        for key, s in read_split(shard_dir, split).items():
            full = decode(s["label.png"])
            for f in (2, 4):
                np.testing.assert_array_equal(decode(s[f"label.x{f}.png"]), reference_vote(full, f), err_msg=key)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 19, (6, 9)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    noisy = np.where(rng.random(blocks.shape) < 0.4, rng.choice([0, 1, 255], blocks.shape), blocks).astype(np.uint8)
    for f in (2, 3, 4, 8):
        np.testing.assert_array_equal(shards_mod.vote_down(noisy, f), reference_vote(noisy, f), err_msg=f"f={f}")


def test_label_factors_are_packed_only_where_they_divide(synthetic_root: Path, tmp_path: Path):
    out = tmp_path / "votes"
    pack(synthetic_root, out, splits=("val",), shard_size_mb=0.1, label_factors=(3, 4, 1))  # 128x256: 3 does not divide
    info = read_manifest(out)["splits"]["val"]
    assert [c for c in info["components"] if c.startswith("label")] == ["label.png", "label.x4.png"]
    assert all("label.x4.png" in s and "label.x3.png" not in s for s in read_split(out, "val").values())
    with pytest.raises(InputError, match=r"label_factors=\[0\]"):
        pack(synthetic_root, tmp_path / "bad", splits=("val",), label_factors=(0,))
