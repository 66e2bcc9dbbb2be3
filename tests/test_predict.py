"""The predict command: any size in, same size out; label ids, colours, overlays; refusals that name the file."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from frrn_dist.data.cityscapes_folder import InputError, open_image, read_array
from frrn_dist.data.labels import ID_TO_TRAIN, TRAIN_COLORS, TRAIN_TO_ID
from frrn_dist.export import load_model
from frrn_dist.predict import list_images, predict_files
from tests.eval_helpers import INPUT_HW, make_run, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def model(run):
    return load_model(run)[0]


def png_bomb(path, width: int, height: int) -> None:
    """A real, valid 1-bit PNG of width x height black pixels: a few KB on disk, width*height pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def check_outputs(stem, hw):
    label_ids = np.array(Image.open(f"{stem}_labelIds.png"))
    color = Image.open(f"{stem}_color.png")
    overlay = Image.open(f"{stem}_overlay.png")
    assert label_ids.shape == hw and color.size == overlay.size == (hw[1], hw[0])
    assert Image.open(f"{stem}_labelIds.png").mode == "L"
    assert set(np.unique(label_ids)) <= set(TRAIN_TO_ID.tolist())
    # the colour mask is the palette of exactly these labels
    assert np.array_equal(np.array(color.convert("RGB")), TRAIN_COLORS[ID_TO_TRAIN[label_ids]])
    return label_ids


@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_odd_sized_image_comes_back_at_its_size(model, tmp_path, fit):
    rng = np.random.default_rng(0)
    img = tmp_path / "in" / "odd.jpg"
    img.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (45, 67, 3), np.uint8)).save(img)  # neither 16- nor 32-divisible
    gray = tmp_path / "in" / "gray.png"
    Image.fromarray(rng.integers(0, 255, (20, 30), np.uint8), "L").save(gray)  # not RGB: converted
    written, failures = predict_files(model, [img, gray], tmp_path / "out", input_hw=INPUT_HW, fit=fit, progress=False)
    assert failures == [] and len(written) == 2
    check_outputs(tmp_path / "out" / "odd", (45, 67))
    check_outputs(tmp_path / "out" / "gray", (20, 30))


def test_folder_with_a_broken_image_writes_the_rest_and_exits_nonzero(run, tmp_path):
    src = tmp_path / "photos"
    (src / "street").mkdir(parents=True)
    Image.fromarray(np.full((33, 70, 3), 128, np.uint8)).save(src / "street" / "a.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good = src / "truncated.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:200])  # header fine, pixel data cut off
    r = run_cli("predict.py", "--checkpoint", run, "--input", src, "--out", tmp_path / "out")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "broken.png" in last and "cannot be decoded" in last and "1 of 3 images written" in last
    assert "truncated.png" in r.stderr
    check_outputs(tmp_path / "out" / "street" / "a", (33, 70))  # sub-folders mirrored
    assert not list((tmp_path / "out").glob("broken*")) and not list((tmp_path / "out").glob("truncated*"))


def test_empty_or_missing_input_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images in this folder") as e:
        list_images(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(InputError, match="no such file or folder"):
        list_images(tmp_path / "nope")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    huge = tmp_path / "huge.png"  # 2.5x Pillow's limit: Pillow itself refuses
    side = int((2.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    png_bomb(huge, side, side)
    assert huge.stat().st_size < 200_000
    with pytest.raises(InputError, match="too large to decode safely") as e:
        read_array(huge, mode="RGB")
    assert str(huge) in str(e.value)
    big = tmp_path / "big.png"  # 1.2x: Pillow would only warn and decode it; we refuse
    side = int((1.2 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    png_bomb(big, side, side)
    with pytest.raises(InputError, match="over the limit") as e:
        read_array(big, mode="RGB")
    assert str(big) in str(e.value)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(small)
    assert open_image(small, max_pixels=1600).size == (40, 40)
    with pytest.raises(InputError, match="over the limit of 1599"):
        open_image(small, max_pixels=1599)


def test_two_inputs_with_one_output_name_are_refused(model, tmp_path):
    for suffix in (".png", ".jpg"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / f"same{suffix}")
    with pytest.raises(InputError, match="same output name"):
        predict_files(model, list_images(tmp_path), tmp_path / "out", input_hw=INPUT_HW, root=tmp_path)
