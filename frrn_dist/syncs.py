"""Counting host synchronisations: the GPU waits that `.item()`, `bool(t)`, `.tolist()` or `.cpu()` cost.

On a GPU each of these blocks the CPU until every queued kernel has run, so the CPU can no longer run ahead and
the loader's torch work, the next forward's launches and Python all queue behind the GPU. The training loop's
ordinary micro-steps must issue none (frrn_dist/train.py reads the device only every `log_every_steps`).

    counter = HostSyncCounter(device)
    counter.resume(); ...work...; counter.pause()
    counter.count, counter.first_stack

- CUDA: torch's own detector, `torch.cuda.set_sync_debug_mode("warn")`, switched on while resumed; every warning
  it raises is one synchronising CUDA call, wherever it comes from (our code, DeepSpeed, torch).
- CPU: nothing synchronises, so the twin counts what *would*: calls of the reading methods of `torch.Tensor`
  made from frrn_dist's own modules outside frrn_dist/data/ (the loop, the loss, the model, the metrics,
  the collectives). The data code reads the CPU-side tensors DALI hands out (crop offsets), which are host
  memory on a GPU too, so it is left out here; the CUDA detector still sees it there.
Importing this module changes nothing; the CPU wrappers are installed only while a counter is alive.

Imports: torch.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
# Methods that copy device memory to the host (or branch on it) and so wait for the GPU.
_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _our_caller() -> str | None:
    """'file:line' of the innermost frame in frrn_dist (outside frrn_dist/data/) calling a tensor read, or None."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if PACKAGE_DIR in path.parents:
            return None if "data" in path.relative_to(PACKAGE_DIR).parts[:-1] else f"{path}:{frame.f_lineno}"
        if "torch" not in path.parts:  # the first frame outside torch decides: our code, or someone else's
            return None
        frame = frame.f_back
    return None


class HostSyncCounter:
    """Counts host synchronisations while resumed; `count` and the stack of the first one (`first_stack`)."""

    def __init__(self, device: torch.device):
        self.device, self.count, self.first_stack = device, 0, ""
        self._active = False
        self._originals: dict[str, object] = {}
        self._warnings = None  # the catch_warnings context while resumed on CUDA
        if device.type == "cpu":
            for name in _READS:
                self._originals[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, self._wrap(name, self._originals[name]))

    def _wrap(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if self._active and (where := _our_caller()) is not None:
                self._record(f"Tensor.{name} at {where}")
            return original(tensor, *args, **kwargs)

        return read

    def _record(self, what: str) -> None:
        self.count += 1
        if not self.first_stack:
            self.first_stack = what + "\n" + "".join(traceback.format_stack(limit=12)[:-2])

    @property
    def active(self) -> bool:
        return self._active

    def resume(self) -> None:
        if self._active:
            return
        self._active = True
        if self.device.type == "cuda":
            # torch raises its warning from inside the synchronising call, so the stack taken here is the culprit's
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            shown = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" in str(message):
                    self._record(f"{message} at {filename}:{lineno}")
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")

    def pause(self) -> None:
        if not self._active:
            return
        self._active = False
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(None, None, None)  # restores warnings.showwarning and the filters
            self._warnings = None

    def close(self) -> None:
        """Stop counting and put torch.Tensor back as it was."""
        self.pause()
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals.clear()

    def __enter__(self) -> HostSyncCounter:
        self.resume()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
