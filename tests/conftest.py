"""Shared fixtures: a tiny synthetic Cityscapes dataset on disk and its shards (session-scoped, built once); the
order files run in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from frrn_dist.shards import pack
from frrn_dist.synthetic import make_dataset

# Files that take a minute or more (each runs several multi-process trainings, or compiles FRRN-A) run first, the
# rest after them in their usual order: `make test` runs pytest-xdist with whole files per worker, handed out in
# this order (--dist loadfile --no-loadscope-reorder). Started last, test_compile kept one worker compiling alone
# for ~4 minutes (a fresh-clone suite of 802 s against ~520-550 s).
LONG_FILES = ("test_compile", "test_loop", "test_train", "test_faults", "test_elastic", "test_cluster", "test_stream",
              "test_gpu_check")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    # One intra-op thread per core a worker owns: `make test` runs one xdist worker per core, and two workers each
    # running 2 OpenMP threads on 2 cores spin at every op's barrier while the other worker holds the core.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(LONG_FILES)))  # stable: same order within a file


# 6 train frames (2 cities) + 4 val frames (1 city) at 128x256: every frame holds all 19 classes, ~2 s to make.
SYNTHETIC_HW = (128, 256)
SYNTHETIC_TRAIN, SYNTHETIC_VAL = 6, 4


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Cityscapes-layout folder: leftImg8bit/{train,val}/<city>/..., gtFine/{train,val}/<city>/... (read only)."""
    return make_dataset(
        tmp_path_factory.mktemp("synthetic") / "cityscapes",
        hw=SYNTHETIC_HW,
        num_train=SYNTHETIC_TRAIN,
        num_val=SYNTHETIC_VAL,
        num_train_cities=2,
        num_val_cities=1,
        seed=0,
        workers=2,
    )


@pytest.fixture(scope="session")
def shard_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`synthetic_root` packed as the loaders expect: train/val tars (JPEG q95), .idx files, manifest.json."""
    out = tmp_path_factory.mktemp("shards") / "jpg"
    pack(synthetic_root, out, image_format="jpg", shard_size_mb=0.1, seed=0, workers=2)
    return out


@pytest.fixture(scope="session")
def shard_dir_png(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`synthetic_root` packed with lossless PNG images (decode equals the source exactly)."""
    out = tmp_path_factory.mktemp("shards") / "png"
    pack(synthetic_root, out, image_format="png", shard_size_mb=0.1, seed=0, workers=2)
    return out
