"""Reading a shard folder: the contract between `make shards` (frrn_dist.shards) and the loaders.

A shard folder is finished only when its manifest.json exists: the packer writes it last, after every tar and
index is complete, so a folder without it is an interrupted run and is refused here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT = "frrn-dist-shards/1"


class ShardError(ValueError):
    """A shard folder, split or file that cannot be used; the message names it."""


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load `shard_dir/manifest.json`, or raise ShardError saying why the folder is not usable."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not Path(shard_dir).is_dir():
        raise ShardError(f"{shard_dir}: no such shard folder (make it with `make shards` or `make demo`)")
    if not path.is_file():
        raise ShardError(f"{path}: missing, so {shard_dir} is not a finished shard folder (re-run `make shards`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def split_info(shard_dir: str | Path, split: str) -> dict[str, Any]:
    """The manifest entry of one split: num_samples, height, width, components, class_pixels, shards."""
    splits = read_manifest(shard_dir)["splits"]
    if split not in splits:
        raise ShardError(f"{Path(shard_dir) / MANIFEST_NAME}: no split {split!r} (has {sorted(splits)})")
    return splits[split]


def split_files(shard_dir: str | Path, split: str) -> tuple[list[str], list[str]]:
    """Absolute paths of a split's tars and their DALI indexes, in the same order; each must exist."""
    root = Path(shard_dir).resolve()
    tars, idxs = [], []
    for shard in split_info(shard_dir, split)["shards"]:
        tar, idx = root / shard["tar"], root / shard["idx"]
        if not tar.is_file():
            raise ShardError(f"{tar}: shard listed in the manifest is missing")
        if not idx.is_file():
            raise ShardError(f"{idx}: DALI index of {tar.name} is missing (re-run `make shards`)")
        tars.append(str(tar))
        idxs.append(str(idx))
    return tars, idxs
