"""The samples of a split, read from the DALI `.idx` files beside its tars, checked before any loader starts.

Imports: the standard library, frrn_dist.data.manifest.

Both loaders use this. DALI reads the same index; the fallback seeks straight to the bytes it names, so it can
take any contiguous range of samples (DALI's sharding rule) and resume without re-reading a tar.

The checks cost one 512-byte read per component (the tar header before it): about 9k small reads for Cityscapes
train, tens of ms on a local disk. They turn what would be a DALI stack trace deep in the first epoch into one
line naming the file: a missing shard or index (manifest.split_files), an index that does not parse, a tar that
is shorter than its index says or whose headers are not where the index points (corrupt, or re-packed without a
new index), and a sample missing a component (e.g. its label).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from frrn_dist.data.manifest import ShardError, split_files, split_info

TAR_BLOCK = 512


@dataclass(frozen=True)
class Sample:
    """One sample: its key, its tar and, per component extension, (byte offset, size) of the member's data."""

    key: str
    tar: str
    members: dict[str, tuple[int, int]]


def read_index(idx_path: str | Path, tar_path: str | Path) -> list[Sample]:
    """Parse a DALI webdataset index (`v1.2 <n>`, then per sample `ext offset size name ...`)."""
    lines = Path(idx_path).read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise ShardError(f"{idx_path}: not a DALI webdataset index (first line {lines[:1]}, expected 'v1.2 <n>')")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) % 4:
            raise ShardError(f"{idx_path}:{lineno}: expected groups of 'ext offset size name', got {line!r}")
        members, key = {}, None
        for ext, offset, size, name in zip(*[iter(fields)] * 4):
            if not (offset.isdigit() and size.isdigit()):
                raise ShardError(f"{idx_path}:{lineno}: bad offset/size in {line!r}")
            members[ext] = (int(offset), int(size))
            key = name[: len(name) - len(ext) - 1]
        samples.append(Sample(key=key, tar=str(tar_path), members=members))
    if len(samples) != int(head[1]):
        raise ShardError(f"{idx_path}: header says {head[1]} samples, found {len(samples)}")
    return samples


def _check_header(fd: int, tar: str, offset: int, name: str) -> None:
    """The 512-byte block before a member's data must be that member's tar header (valid checksum, its name)."""
    block = os.pread(fd, TAR_BLOCK, offset - TAR_BLOCK)
    if len(block) < TAR_BLOCK:
        raise ShardError(f"{tar}: truncated (index points at byte {offset}, the file has fewer bytes)")
    stored = block[148:156].split(b"\0", 1)[0].strip()
    # The checksum sums the header with its own 8-byte field read as spaces.
    actual = sum(block[:148]) + 8 * 32 + sum(block[156:])
    header_name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    ok = stored.isdigit() and int(stored, 8) == actual
    # Long names live in a PAX record and only a prefix of them in the ustar field; keys are short.
    if not ok or (len(name) < 100 and header_name != name):
        raise ShardError(
            f"{tar}: corrupt or re-packed: no tar header for {name!r} at byte {offset - TAR_BLOCK} "
            f"where its index says (re-run `make shards`)"
        )


def index_split(shard_dir: str | Path, split: str, components: list[str]) -> list[Sample]:
    """Every sample of `split` in DALI's order (tars in manifest order), each checked to have `components`."""
    info = split_info(shard_dir, split)
    tars, idxs = split_files(shard_dir, split)
    samples: list[Sample] = []
    for tar, idx, entry in zip(tars, idxs, info["shards"]):
        part = read_index(idx, tar)
        if "num_samples" in entry and len(part) != entry["num_samples"]:
            raise ShardError(f"{idx}: {len(part)} samples, the manifest says {entry['num_samples']}")
        tar_bytes = os.path.getsize(tar)
        fd = os.open(tar, os.O_RDONLY)
        try:
            for s in part:
                for ext in components:
                    if ext not in s.members:
                        raise ShardError(f"{tar}: sample {s.key!r} has no {ext!r} component (has {sorted(s.members)})")
                    offset, size = s.members[ext]
                    if offset + size > tar_bytes:
                        raise ShardError(
                            f"{tar}: truncated ({tar_bytes} bytes, but {s.key}.{ext} ends at byte {offset + size})"
                        )
                    _check_header(fd, tar, offset, f"{s.key}.{ext}")
        finally:
            os.close(fd)
        samples.extend(part)
    if len(samples) != info["num_samples"]:
        raise ShardError(
            f"{shard_dir}: split {split!r} has {len(samples)} samples, the manifest says {info['num_samples']}"
        )
    if not samples:
        raise ShardError(f"{shard_dir}: split {split!r} has no samples")
    return samples


def shard_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """DALI's rule: shard r of S holds samples [floor(r N / S), floor((r + 1) N / S)) of all tars concatenated."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size
