"""Both loaders end to end on CPU: real DALI pipelines and real DataLoader workers over real tar shards.

Two kinds of data:
- `shard_dir` / `shard_dir_png` (conftest.py): the packer's output for tiny synthetic Cityscapes frames (128x256),
  checked against labels decoded here with PIL and tarfile, independently of the loaders' own index reader.
- `drawn`: frames written here whose label is drawn into the image: channel 0 = 10 + 12 * train id on 32x32
  blocks, channel 1 a ramp along x, channel 2 a ramp along y. Wherever the image is clean (a pixel whose 7x7
  neighbourhood holds one label, beyond the reach of the Lanczos filter), channel 0 must spell out the label:
  any crop, shift, flip or downscale applied to one and not the other shows up.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from frrn_dist.data.loaders import LoaderError, build_loader
from frrn_dist.data.manifest import ShardError, split_info
from frrn_dist.data.recipes import RecipeError, gamma_exponent

from .test_data_recipes import reference_vote

WDS2IDX = Path(sys.executable).parent / "wds2idx"
BACKENDS = ["dali", "torch"]
# DALI threads, or fallback workers: most tests run the fallback in-process (0), the resume and coverage tests
# with a worker process, which is the path a real run takes.
THREADS = {"dali": 1, "torch": 0}
SOURCE_HW, BLOCK = (128, 256), 32
NUM_DRAWN = 10  # not a multiple of 2 or 3 ranks, nor of the batch size: the uneven cases are the interesting ones


# ---------------------------------------------------------------------------------------------------------------
# test data


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out: Path, split: str, samples: list[dict], *, per_tar: int, components: list[str]) -> Path:
    """Tars, DALI indexes and a manifest in the packer's format (frrn_dist/shards.py) from ready-made samples."""
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=per_tar, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    shards = []
    for tar in sorted(out.glob(f"{split}-*.tar")):
        idx = tar.with_suffix(".idx")
        subprocess.run([str(WDS2IDX), str(tar), str(idx)], check=True, capture_output=True)
        count = int(idx.read_text().split()[1])
        shards.append({"tar": tar.name, "idx": idx.name, "num_samples": count})
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"format": "frrn-dist-shards/1"}
    manifest.setdefault("splits", {})[split] = {
        "num_samples": len(samples),
        "height": SOURCE_HW[0],
        "width": SOURCE_HW[1],
        "components": components,
        "shards": shards,
    }
    manifest_path.write_text(json.dumps(manifest))
    return out


def drawn_frame(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of SOURCE_HW with the label drawn into image channel 0 (no void, so 255 only means padding)."""
    H, W = SOURCE_HW
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 19, (H // BLOCK, W // BLOCK)).repeat(BLOCK, 0).repeat(BLOCK, 1).astype(np.uint8)
    y, x = np.mgrid[0:H, 0:W]
    image = np.stack([10 + 12 * label, 20 + 200 * x // W, 20 + 200 * y // H], -1).astype(np.uint8)
    return image, label


def drawn_samples(n: int, same_frame: bool = False) -> list[dict]:
    samples = []
    for i in range(n):
        image, label = drawn_frame(0 if same_frame else i)
        key = f"drawn_{i:06d}_000019"
        samples.append({"__key__": key, "png": _png(image), "label.png": _png(label), "json": {"key": key}})
    return samples


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drawn")
    return write_shards(out, "train", drawn_samples(NUM_DRAWN), per_tar=4, components=["png", "label.png", "json"])


def decoded(shard_dir: Path, split: str) -> dict[str, dict[str, np.ndarray]]:
    """Every sample's label (and instance ids) decoded with tarfile + PIL, by key."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for shard in split_info(shard_dir, split)["shards"]:
        with tarfile.open(shard_dir / shard["tar"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext in ("label.png", "instance.png"):
                    out.setdefault(key, {})[ext] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
    return out


# ---------------------------------------------------------------------------------------------------------------
# checks on drawn frames


def clean_pixels(labels: torch.Tensor) -> torch.Tensor:
    """Pixels whose 7x7 neighbourhood holds one (non-void) label: beyond the reach of Lanczos3 from any edge.
    Outside the frame counts as unknown (255): a shifted frame's border pixel saw content that is now cut off."""
    x = F.pad(labels[:, None].float(), (3, 3, 3, 3), value=255)
    hi = F.max_pool2d(x, 7, stride=1)
    lo = -F.max_pool2d(-x, 7, stride=1)
    return ((hi == lo) & (hi != 255))[:, 0]


def assert_aligned(images: torch.Tensor, labels: torch.Tensor) -> None:
    clean = clean_pixels(labels)
    assert clean.float().mean() > 0.05, "too few clean pixels to judge alignment"
    spelled = torch.round((images[:, 0] * 255 - 10) / 12).long()
    assert torch.equal(spelled[clean], labels[clean]), "image channel 0 and the label disagree: misaligned"


def void_band(label: torch.Tensor) -> tuple[int, int]:
    """(dy, dx) read off the 255 band that a translation leaves (drawn frames have no void of their own)."""
    void = label == 255
    rows, cols = void.all(1), void.all(0)
    top = int(rows.int().cumprod(0).sum())
    bottom = int(rows.flip(0).int().cumprod(0).sum())
    left = int(cols.int().cumprod(0).sum())
    right = int(cols.flip(0).int().cumprod(0).sum())
    assert not (top and bottom) and not (left and right)
    # Everything outside the bands is content.
    h, w = label.shape
    assert not void[top : h - bottom, left : w - right].any()
    return top - bottom, left - right


def collect(loader, epochs: int) -> list[list]:
    return [[b for b in loader] for _ in range(epochs)]


def as_records(epoch_batches):
    return [(b.keys, b.images.clone(), b.labels.clone()) for b in epoch_batches]


# ---------------------------------------------------------------------------------------------------------------
# alignment, exact labels, padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_recipe_translation_aligned_exact_and_reflected(drawn, backend):
    t = 8
    loader = build_loader(
        drawn, "train", backend=backend, recipe="paper", input_hw=(32, 64), micro_batch_size=3, translate_px=t,
        gamma_z=0.0, seed=3, num_threads=THREADS[backend],
    )  # fmt: skip
    frames = {f"drawn_{i:06d}_000019": drawn_frame(i)[1] for i in range(NUM_DRAWN)}
    offsets = []
    for batch in [b for epoch in collect(loader, 2) for b in epoch]:
        assert batch.images.dtype == torch.float32 and batch.labels.dtype == torch.int64
        assert batch.images.shape == (3, 3, 32, 64) and batch.labels.shape == (3, 32, 64)
        assert batch.images.min() >= 0 and batch.images.max() <= 1
        assert_aligned(batch.images, batch.labels)
        for image, label, key in zip(batch.images, batch.labels, batch.keys):
            dy, dx = void_band(label)
            offsets.append((dy, dx))
            assert abs(dy) <= t and abs(dx) <= t
            # Exact label values: the majority vote of the source label, shifted by (dy, dx).
            want = torch.full((32, 64), 255, dtype=torch.int64)
            small = torch.from_numpy(reference_vote(frames[key], 4)).long()
            want[max(dy, 0) : 32 + min(dy, 0), max(dx, 0) : 64 + min(dx, 0)] = small[
                max(-dy, 0) : 32 - max(dy, 0), max(-dx, 0) : 64 - max(dx, 0)
            ]
            assert torch.equal(label, want)
            # The image's shifted-in band is a mirror image of the content next to it (reflection padding).
            for r in range(dy):
                assert torch.equal(image[:, r], image[:, 2 * dy - r])
            for c in range(-dx):
                assert torch.equal(image[:, :, 63 - c], image[:, :, 63 + 2 * dx + c])
            # Ramps keep running left to right and top to bottom: no flip in the paper recipe.
            assert image[1, :, 40:].mean() > image[1, :, :24].mean() and image[2, 20:].mean() > image[2, :12].mean()
    assert len({o for o in offsets}) > 4 and any(dy < 0 for dy, _ in offsets) and any(dx > 0 for _, dx in offsets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_recipe_crop_flip_aligned_and_exact(drawn, backend):
    loader = build_loader(
        drawn, "train", backend=backend, recipe="seed", input_hw=(32, 64), micro_batch_size=2, gamma_z=0.0, seed=5,
        num_threads=THREADS[backend],
    )  # fmt: skip
    H, W = SOURCE_HW
    flips, corners = [], []
    for batch in [b for epoch in collect(loader, 2) for b in epoch]:
        assert batch.images.shape == (2, 3, 32, 64)
        assert_aligned(batch.images, batch.labels)
        for image, label, key in zip(batch.images, batch.labels, batch.keys):
            source = drawn_frame(int(key.split("_")[1]))[1]
            flipped = bool(image[1, :, :32].mean() > image[1, :, 32:].mean())
            flips.append(flipped)
            # The crop corner, roughly, from the ramps (channel 2 = 20 + 200 y / H at the crop's top rows) ...
            y0 = float((image[2, :2].mean() * 255 - 20) * H / 200 - 1)
            x_left = float((image[1, :, :2].mean() if not flipped else image[1, :, -2:].mean()) * 255 - 20) * W / 200
            # ... and exactly: the label must be the f=2 vote of a 64x128 crop at a nearby corner.
            found = []
            for y in range(max(0, round(y0) - 4), min(H - 64, round(y0) + 4) + 1):
                for x in range(max(0, round(x_left - 1) - 4), min(W - 128, round(x_left - 1) + 4) + 1):
                    want = torch.from_numpy(reference_vote(source[y : y + 64, x : x + 128], 2)).long()
                    if torch.equal(label, want.flip(-1) if flipped else want):
                        found.append((y, x))
            assert found, f"{key}: label is not the majority vote of any 64x128 crop near ({y0:.0f}, {x_left:.0f})"
            corners.append(found[0])
    assert any(flips) and not all(flips)
    assert len(set(corners)) > 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_gamma_is_applied_per_sample(drawn, backend):
    """Same frames without geometry: each image is the eval image raised to its own Eq. 14 exponent."""
    z = 0.3
    common = dict(backend=backend, input_hw=(32, 64), micro_batch_size=5, num_threads=THREADS[backend])
    gamma = build_loader(drawn, "train", recipe="paper", translate_px=0, gamma_z=z, seed=1, **common)
    plain = build_loader(drawn, "train", recipe="eval", **common)
    reference = {k: (x, y) for b in plain for k, x, y in zip(b.keys, b.images, b.labels)}
    exponents = []
    for batch in gamma:
        for key, x, y in zip(batch.keys, batch.images, batch.labels):
            base, label = reference[key]
            assert torch.equal(y, label)
            mid = (base > 0.1) & (base < 0.9)
            g = (torch.log(x[mid]) / torch.log(base[mid])).median()
            exponents.append(float(g))
            assert torch.allclose(x, base**g, atol=1e-5)
    lo, hi = float(gamma_exponent(z)), float(gamma_exponent(-z))
    assert all(lo - 1e-3 <= g <= hi + 1e-3 for g in exponents)
    assert len(exponents) == 10 and np.std(exponents) > 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_labels_are_exact_votes_of_the_shards(shard_dir, backend):
    truth = decoded(shard_dir, "val")
    for input_hw, f in [((32, 64), 4), ((64, 128), 2)]:
        loader = build_loader(
            shard_dir, "val", backend=backend, recipe="eval", input_hw=input_hw, micro_batch_size=3,
            full_res_targets=True, num_threads=THREADS[backend],
        )  # fmt: skip
        seen = []
        for batch in loader:
            assert batch.full_labels.dtype == torch.uint8 and batch.full_instances.dtype == torch.int32
            for key, label, full, inst in zip(batch.keys, batch.labels, batch.full_labels, batch.full_instances):
                assert np.array_equal(label.numpy(), reference_vote(truth[key]["label.png"], f))
                assert np.array_equal(full.numpy(), truth[key]["label.png"])
                assert np.array_equal(inst.numpy(), truth[key]["instance.png"])
                seen.append(key)
        assert sorted(seen) == sorted(truth)
        # Synthetic frames have real void and thin objects: the vote is not a trivial one here.
        assert any((reference_vote(t["label.png"], f) == 255).any() for t in truth.values())


# ---------------------------------------------------------------------------------------------------------------
# sharding, coverage, equal lengths


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_coverage_per_rank_over_epochs(drawn, backend, world_size):
    epochs, batch_size = 3, 2
    common = dict(backend=backend, input_hw=(32, 64), micro_batch_size=batch_size, world_size=world_size)
    common["num_threads"] = 1  # the fallback with one worker process per rank
    keys = {f"drawn_{i:06d}_000019" for i in range(NUM_DRAWN)}

    # Eval with batches of 3 leaves some ranks a short and then an empty last batch (3 ranks: slices 3, 3, 4).
    for eval_batch in (batch_size, 3):
        evals = [
            build_loader(drawn, "train", recipe="eval", rank=r, **{**common, "micro_batch_size": eval_batch})
            for r in range(world_size)
        ]
        assert len({len(loader) for loader in evals}) == 1
        per_rank = [collect(loader, epochs) for loader in evals]
        for epoch in range(epochs):
            seen = [k for rank in per_rank for b in rank[epoch] for k in b.keys]
            assert sorted(seen) == sorted(keys), f"eval epoch {epoch}: each sample exactly once across ranks"
            assert all(len(rank[epoch]) == len(evals[0]) for rank in per_rank)
            for b in (b for rank in per_rank for b in rank[epoch]):
                assert b.images.shape == (len(b.keys), 3, 32, 64) and b.labels.shape == (len(b.keys), 32, 64)
        if world_size == 3 and eval_batch == 3:
            assert any(len(b) == 0 for rank in per_rank for b in rank[0])

    trains = [build_loader(drawn, "train", recipe="paper", translate_px=2, rank=r, **common) for r in range(world_size)]
    expected = (NUM_DRAWN // world_size) // batch_size
    assert [len(loader) for loader in trains] == [expected] * world_size
    per_rank = [collect(loader, epochs) for loader in trains]
    orders = []
    for epoch in range(epochs):
        assert all(len(rank[epoch]) == expected for rank in per_rank), "every rank runs the same number of steps"
        assert all(len(b) == batch_size for rank in per_rank for b in rank[epoch])
        seen = [k for rank in per_rank for b in rank[epoch] for k in b.keys]
        assert len(seen) == len(set(seen)) == expected * batch_size * world_size and set(seen) <= keys
        orders.append(seen)
    assert len({tuple(o) for o in orders}) > 1, "training order changes between epochs"


def test_ranks_draw_different_augmentations(tmp_path):
    """Identical frames on both ranks: only the per-rank seed (seed + rank) can make their shifts differ."""
    samples = drawn_samples(8, same_frame=True)
    shards = write_shards(tmp_path, "train", samples, per_tar=8, components=["png", "label.png", "json"])
    common = dict(recipe="paper", input_hw=(32, 64), micro_batch_size=2, world_size=2, translate_px=8, num_threads=1)
    offsets = {}
    for rank in (0, 1):
        for attempt in (0, 1):  # the same rank and seed twice: identical
            loader = build_loader(shards, "train", rank=rank, seed=7, **common)
            offsets[rank, attempt] = [void_band(y) for b in loader for y in b.labels]
    assert offsets[0, 0] == offsets[0, 1] and offsets[1, 0] == offsets[1, 1]
    assert offsets[0, 0] != offsets[1, 0]


# ---------------------------------------------------------------------------------------------------------------
# resuming


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", ["paper", "seed"])
def test_state_resumes_exactly_across_epoch_boundaries(drawn, backend, recipe):
    # Rank 1 of 2: 5 samples, batches of 2 -> 2 batches per epoch and one sample read and dropped each epoch.
    common = dict(
        backend=backend, recipe=recipe, input_hw=(32, 64), micro_batch_size=2, rank=1, world_size=2, seed=11,
        translate_px=6, num_threads=1,  # the fallback with a worker process
    )  # fmt: skip
    reference = [as_records(e) for e in collect(build_loader(drawn, "train", **common), 3)]
    flat = [r for e in reference for r in e]
    assert len(reference[0]) == 2 and flat[0][0] != flat[2][0]

    def same(a, b):
        return a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])

    # Save after 1 batch (mid-epoch), after 2 (the epoch's last batch, before its `for` ends), after 3 (in epoch 1).
    for consumed in (1, 2, 3):
        loader = build_loader(drawn, "train", **common)
        got, it = [], iter(loader)
        for _ in range(consumed):
            if len(got) == 2:  # the first epoch's `for` ends, the next one starts
                assert next(it, None) is None
                it = iter(loader)
            got.append(next(it))
        blob = loader.state()
        assert isinstance(blob, bytes)
        resumed = build_loader(drawn, "train", checkpoint=blob, **common)
        rest = [as_records(e) for e in collect(resumed, 3)]
        # The resumed loader first finishes the interrupted epoch (nothing, if it was saved at its end).
        replay = [r for e in rest for r in e][: len(flat) - consumed]
        assert len(replay) == len(flat) - consumed
        assert all(same(a, b) for a, b in zip(replay, flat[consumed:])), f"resume after {consumed} batches differs"

    with pytest.raises(LoaderError, match="rank"):
        build_loader(drawn, "train", checkpoint=blob, **{**common, "rank": 0})
    with pytest.raises(LoaderError, match="loader state"):
        build_loader(drawn, "train", checkpoint=b"not a state", **common)


# ---------------------------------------------------------------------------------------------------------------
# the two loaders agree


@pytest.mark.parametrize("fixture", ["shard_dir", "shard_dir_png"])
def test_loaders_agree_in_eval(request, fixture):
    shards = request.getfixturevalue(fixture)
    common = dict(recipe="eval", input_hw=(64, 128), micro_batch_size=3, world_size=2, full_res_targets=True)
    for rank in (0, 1):
        dali = collect(build_loader(shards, "val", backend="dali", rank=rank, num_threads=1, **common), 2)
        fallback = collect(build_loader(shards, "val", backend="torch", rank=rank, num_threads=0, **common), 2)
        assert [len(e) for e in dali] == [len(e) for e in fallback]
        for a, b in zip([x for e in dali for x in e], [x for e in fallback for x in e]):
            assert a.keys == b.keys
            assert torch.equal(a.labels, b.labels) and torch.equal(a.full_labels, b.full_labels)
            assert torch.equal(a.full_instances, b.full_instances)
            # Both decode with libjpeg-turbo / zlib (identical pixels); the two Lanczos implementations differ by
            # a grey level or two, more at a few high-contrast edges of the synthetic frames.
            diff = (a.images - b.images).abs() * 255
            assert diff.mean() < 0.5 and torch.quantile(diff.flatten(), 0.99) <= 3 and diff.max() <= 24


# ---------------------------------------------------------------------------------------------------------------
# errors: one line naming the file


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_errors_for_broken_shards(drawn, tmp_path, backend):
    def build(path):
        return build_loader(path, "train", backend=backend, recipe="paper", input_hw=(32, 64), micro_batch_size=2)

    broken = _copy(drawn, tmp_path / "missing_tar")
    (broken / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar: shard listed in the manifest is missing"):
        build(broken)

    broken = _copy(drawn, tmp_path / "missing_idx")
    (broken / "train-000002.idx").unlink()
    with pytest.raises(ShardError, match=r"train-000002\.idx: DALI index .* missing"):
        build(broken)

    broken = _copy(drawn, tmp_path / "truncated")
    tar = broken / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"train-000001\.tar: truncated"):
        build(broken)

    broken = _copy(drawn, tmp_path / "overwritten")
    tar = broken / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[4096:12288] = np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes()
    tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000000\.tar: corrupt"):
        build(broken)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_error_for_a_sample_without_its_label(tmp_path, backend):
    samples = drawn_samples(4)
    del samples[2]["label.png"]
    shards = write_shards(tmp_path, "train", samples, per_tar=4, components=["png", "label.png", "json"])
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample 'drawn_000002_000019' has no 'label\.png'"):
        build_loader(shards, "train", backend=backend, input_hw=(32, 64), micro_batch_size=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_error_for_a_corrupt_image_inside_an_intact_tar(drawn, tmp_path, backend):
    """Headers intact, image bytes garbage: found only when decoding, still reported in one line."""
    broken = _copy(drawn, tmp_path / "garbage")
    tar = broken / "train-000000.tar"
    first = next(line for line in (broken / "train-000000.idx").read_text().splitlines()[1:])
    fields = first.split()
    png = fields.index("png")
    offset, size = int(fields[png + 1]), int(fields[png + 2])
    data = bytearray(tar.read_bytes())
    data[offset : offset + size] = b"\x89PNG" + bytes(size - 4)
    tar.write_bytes(bytes(data))
    with pytest.raises((LoaderError, ShardError)) as e:
        loader = build_loader(broken, "train", backend=backend, recipe="eval", input_hw=(32, 64), micro_batch_size=2)
        for _ in loader:
            pass
    message = str(e.value)
    assert "\n" not in message and str(broken) in message
    if backend == "torch":
        assert "drawn_000000_000019.png" in message


def test_clear_errors_for_bad_arguments(shard_dir):
    with pytest.raises(RecipeError, match="128x256.*30x60"):
        build_loader(shard_dir, "train", input_hw=(30, 60))
    with pytest.raises(RecipeError, match="256x512.*128x256"):
        build_loader(shard_dir, "train", recipe="seed", input_hw=(128, 256))
    with pytest.raises(LoaderError, match="too few"):
        build_loader(shard_dir, "train", input_hw=(32, 64), micro_batch_size=4, world_size=2)
    with pytest.raises(LoaderError, match="too few"):  # DALI refuses more shards than samples
        build_loader(shard_dir, "val", recipe="eval", input_hw=(32, 64), micro_batch_size=1, world_size=5)
    with pytest.raises(LoaderError, match="whole-frame"):
        build_loader(shard_dir, "train", recipe="seed", input_hw=(32, 64), full_res_targets=True)
    with pytest.raises(LoaderError, match="backend"):
        build_loader(shard_dir, "train", backend="tf")
    with pytest.raises(ShardError, match="no split 'test'"):
        build_loader(shard_dir, "test")


# ---------------------------------------------------------------------------------------------------------------
# the GPU graph, checked without a GPU


@pytest.mark.parametrize("recipe", ["paper", "seed", "eval"])
def test_mixed_decoder_graph_traces_and_serializes_on_cpu(shard_dir, recipe):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401 (the loader's import, checked here)

    from frrn_dist.data.dali import frrn_pipeline
    from frrn_dist.data.manifest import split_files
    from frrn_dist.data.recipes import make_recipe

    tars, idxs = split_files(shard_dir, "val")
    plan = make_recipe(recipe, source_hw=SOURCE_HW, input_hw=(32, 64), translate_px=4)
    pipe = frrn_pipeline(
        tars=tars, idxs=idxs, image_ext="jpg", recipe=plan, shard_id=0, num_shards=2, shuffle=recipe != "eval",
        shuffle_buffer=16, decode_device="mixed", instances=recipe == "eval",
        batch_size=2, num_threads=1, device_id=None, seed=0,
    )  # fmt: skip
    graph = pipe.serialize()
    assert len(graph) > 500 and b"mixed" in graph and b"gpu" in graph


# ---------------------------------------------------------------------------------------------------------------
# the cheaper decodes: region-of-interest decoding (seed recipe) and votes packed into the shards (whole frames)


def test_region_decode_equals_decoding_the_frame_then_cutting(shard_dir):
    """dali.decode_region (the seed recipe's ROI decode) against fn.decoders.image + fn.slice, JPEG and PNG."""
    from nvidia.dali import fn, pipeline_def, types

    from frrn_dist.data.dali import decode_region
    from frrn_dist.data.manifest import split_files

    tars, idxs = split_files(shard_dir, "train")
    H, W = SOURCE_HW
    rh, rw = 64, 96  # not a multiple of JPEG's 16-pixel blocks, corners anywhere: odd offsets included

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=2)
    def both():
        jpg, png = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "label.png"])
        y = fn.random.uniform(values=list(range(H - rh + 1)), dtype=types.INT32)
        x = fn.random.uniform(values=list(range(W - rw + 1)), dtype=types.INT32)
        corner = fn.stack(y, x)
        outs = [corner]
        for enc, kind in ((jpg, types.RGB), (png, types.ANY_DATA)):
            whole = fn.decoders.image(enc, output_type=kind)
            outs += [
                decode_region(enc, corner, (rh, rw), output_type=kind),
                fn.slice(whole, start=corner, shape=[rh, rw], axes=[0, 1]),
            ]
        return tuple(outs)

    pipe = both()
    pipe.build()
    corners = set()
    for _ in range(4):
        corner, *pairs = pipe.run()
        for i in range(4):
            corners.add(tuple(np.array(corner[i])))
            for region, cut in zip(pairs[::2], pairs[1::2]):
                assert np.array(region[i]).shape[:2] == (rh, rw)
                np.testing.assert_array_equal(np.array(region[i]), np.array(cut[i]))
    assert any(y % 2 for y, _ in corners) and any(x % 16 for _, x in corners)


@pytest.fixture(scope="module")
def shard_dir_unvoted(synthetic_root, tmp_path_factory) -> Path:
    from frrn_dist.shards import pack

    out = tmp_path_factory.mktemp("unvoted") / "shards"
    pack(synthetic_root, out, image_format="jpg", shard_size_mb=0.1, seed=0, label_factors=())
    return out


@pytest.mark.parametrize("backend", [*BACKENDS, "stream"])
@pytest.mark.parametrize("recipe, input_hw, factor", [("paper", (32, 64), 4), ("seed", (32, 64), 2),
                                                      ("eval", (64, 128), 2)])  # fmt: skip
def test_packed_votes_give_the_batches_of_voting_on_the_fly(
    shard_dir, shard_dir_unvoted, backend, recipe, input_hw, factor
):
    """Whole frames read label.x<f>.png, the seed recipe its crop of label.x2.png: the batches of voting the
    full-resolution map on the fly, bit for bit (the seed's corners on the f grid make its crop's cells the
    frame's)."""
    split = "val" if recipe == "eval" else "train"
    kw = dict(backend=backend, recipe=recipe, input_hw=input_hw, micro_batch_size=3, translate_px=4, seed=4,
              num_threads=THREADS.get(backend, 0), full_res_targets=recipe == "eval")  # fmt: skip
    packed, unvoted = build_loader(shard_dir, split, **kw), build_loader(shard_dir_unvoted, split, **kw)
    assert packed.spec.label_ext == f"label.x{factor}.png" and unvoted.spec.label_ext == "label.png"
    for a, b in zip(collect(packed, 2), collect(unvoted, 2), strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.keys == y.keys and torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
            assert (x.labels != 255).any() and (x.labels == 255).any()  # translation / void: not all one value
            if recipe == "eval":
                assert torch.equal(x.full_labels, y.full_labels) and x.full_labels.shape[-2:] == SOURCE_HW
                assert torch.equal(x.full_instances, y.full_instances)
