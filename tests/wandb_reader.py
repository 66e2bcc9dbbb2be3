"""Read an offline wandb run back from its `run-<id>.wandb` file (wandb 0.31 ships no reader).

The file is LevelDB-log framed: a 7-byte header (":W&B", uint16 0xBEE1, uint8 version), then 32 KiB blocks of
records `crc32 (uint32) | length (uint16) | type (uint8) | payload`, type 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST; a
block's tail shorter than a record header is zero padding. Payloads are `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left_in_block  # zero-filled tail
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"bad crc at {pos}"
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_run(path: str | Path) -> dict[str, Any]:
    """{"history": [row dicts], "config": dict, "summary": dict} from a run-<id>.wandb file."""
    history, config, summary = [], {}, {}
    for payload in _payloads(Path(path).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or ".".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
        elif kind == "run":
            for item in rec.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "config": config, "summary": summary}
