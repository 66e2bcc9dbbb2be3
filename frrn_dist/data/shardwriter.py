"""One split's tars written as the loaders read them: `{split}-{i:06d}.tar` + DALI `.idx`, sha256 on the way.

Used by frrn_dist.shards (`make shards`); one process writes, so the index offsets are known as the bytes go out.

Imports: webdataset (its TarWriter), the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TAR_MTIME = 1_483_228_800  # 2017-01-01: fixed, so the same input gives byte-identical tars and sha256


class _HashingFile:
    """A write-only file that hashes what passes through (a tar stream only needs write)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.sha = hashlib.sha256()
        self.pos = 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.pos += len(b)
        return self.f.write(b)

    def close(self) -> None:
        self.f.close()


def _tar_bytes(members: Iterable[tuple[str, bytes]]) -> int:
    return sum(512 + -(-len(b) // 512) * 512 for _, b in members)


class ShardWriter:
    """Writes `{split}-{i:06d}.tar` + `.idx` into a folder, rolling to a new shard at `max_bytes`.

    The tars come from webdataset's own TarWriter (raw bytes, encoder=False; GNU format, fixed mtime and owner so
    the bytes depend on the input only). It writes a sample's members sorted by extension; the index lists them
    in that order, as DALI's wds2idx does. Cost, measured against tarfile directly: 0.38-0.41 s vs 0.29 s of CPU
    for 300 samples of 0.6 MB (its stream mode copies through a buffer), i.e. +0.3 ms a frame where encoding one
    takes tens of ms: no reason to bypass it.
    """

    def __init__(self, folder: Path, split: str, max_bytes: int):
        self.folder, self.split, self.max_bytes = folder, split, max_bytes
        self.shards: list[dict[str, Any]] = []
        self.tar = None

    def _open(self) -> None:
        import webdataset as wds

        name = f"{self.split}-{len(self.shards):06d}"
        self.file = _HashingFile(self.folder / f"{name}.tar")
        self.tar = wds.TarWriter(
            self.file, encoder=False, mtime=TAR_MTIME, mode=0o444, user="", group="", format="GNU_FORMAT"
        )
        self.index: list[str] = []
        self.count, self.name = 0, name

    def _close(self) -> None:
        self.tar.close()  # ends the tar stream; the file object is ours
        self.file.close()
        idx = self.folder / f"{self.name}.idx"
        idx.write_text(f"v1.2 {self.count}\n" + "".join(line + "\n" for line in self.index))
        self.shards.append({
            "tar": f"{self.name}.tar",
            "idx": idx.name,
            "num_samples": self.count,
            "bytes": self.file.pos,
            "sha256": self.file.sha.hexdigest(),
        })  # fmt: skip
        self.tar = None

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self.tar is not None and self.count and self.tar.tarstream.offset + _tar_bytes(members) > self.max_bytes:
            self._close()
        if self.tar is None:
            self._open()
        stream = self.tar.tarstream  # tarfile.TarFile; .offset = bytes of tar written so far
        sample = {"__key__": key, **dict(members)}
        offset, parts = stream.offset, []
        for ext in sorted(e for e in sample if e != "__key__"):  # TarWriter's order
            info = tarfile.TarInfo(f"{key}.{ext}")
            offset += len(info.tobuf(stream.format, stream.encoding, stream.errors))  # its header block(s)
            parts.append(f"{ext} {offset} {len(sample[ext])} {info.name}")
            offset += -(-len(sample[ext]) // 512) * 512
        self.tar.write(sample)
        if stream.offset != offset:  # the index would point DALI at the wrong bytes
            raise RuntimeError(f"{self.name}.tar: index offsets disagree with the tar ({offset} vs {stream.offset})")
        self.index.append(" ".join(parts))  # one line per sample: ext offset size name, per component
        self.count += 1

    def close(self) -> list[dict[str, Any]]:
        if self.tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Close the open tar (its folder is being thrown away) so nothing writes to it at garbage collection."""
        if self.tar is not None:
            with contextlib.suppress(Exception):
                self.tar.close()
            self.file.close()
            self.tar = None
