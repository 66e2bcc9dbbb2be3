"""Loader checkpoints: the bytes `loader.state()` returns and `build_loader(..., checkpoint=...)` resumes from,
shared by both backends, and `LoaderError`.

Imports: the standard library only (both loaders.py and fallback.py import this, so it imports neither).

A state is JSON: the setup it belongs to (everything that must match to resume), the place in the epoch, and the
backend's own bytes (DALI's checkpoint; none for the fallback, which replays its plan).
"""

from __future__ import annotations

import base64
import json

STATE_FORMAT = "frrn-dist-loader/1"


class LoaderError(ValueError):
    """Bad loader arguments, a checkpoint from another setup, or a shard that fails while reading."""


def pack_state(setup: dict, position: dict, payload: bytes | None = None) -> bytes:
    """A loader checkpoint: the setup it belongs to, its place in the epoch, and the backend's own bytes."""
    doc = dict(format=STATE_FORMAT, setup=setup, position=position)
    if payload is not None:
        doc["payload"] = base64.b64encode(payload).decode("ascii")
    return json.dumps(doc).encode()


def unpack_state(blob: bytes, setup: dict) -> tuple[dict, bytes | None]:
    """(position, payload) of a checkpoint from pack_state; LoaderError if it is not one or `setup` differs."""
    try:
        doc = json.loads(bytes(blob))
        ok = doc.get("format") == STATE_FORMAT and isinstance(doc.get("setup"), dict)
    except (TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise LoaderError(f"checkpoint: not a loader state ({STATE_FORMAT}); pass the bytes from loader.state()")
    for key, value in setup.items():
        if doc["setup"].get(key) != value:
            raise LoaderError(
                f"checkpoint: saved with {key}={doc['setup'].get(key)!r}, this loader has {key}={value!r} "
                "(a loader resumes only with the same data, recipe, batch size, rank and world size)"
            )
    payload = base64.b64decode(doc["payload"]) if "payload" in doc else None
    return doc.get("position", {}), payload
