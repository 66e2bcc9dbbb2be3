"""What the sections of benchmarks/gpu_check.py share: the statuses, the Rows a section fills, and the switch
that blocks packages (FRRN_GPU_CHECK_SKIP). Standard library only, so the parent never imports torch.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

OK, FAILED, MISSING, NA = "ok", "FAILED", "not installed", "n/a"
SKIP_VAR = "FRRN_GPU_CHECK_SKIP"
SKIP_ALIASES = {"dali": "nvidia.dali"}
GiB = 2**30


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()[:300]


def missing_package(e: BaseException) -> str | None:
    """The package an ImportError says is missing, unless it is frrn_dist itself (then it is a bug, not a gap)."""
    name = getattr(e, "name", None)
    if isinstance(e, ImportError) and name and name.split(".")[0] != "frrn_dist":
        top = name.split(".")[0]
        return "nvidia.dali (DALI)" if top == "nvidia" else top  # `import nvidia.dali` fails at the namespace
    return None


class Rows:
    """One section's rows, rewritten to `path` after every change, so a crash or a timeout keeps what was done."""

    def __init__(self, path: Path, section: str):
        self.path, self.section = path, section
        self.expected: list[str] = []
        self.rows: list[dict] = []
        self._write()

    def expect(self, *checks: str) -> None:
        """The checks this section means to report: those missing when it ends become FAILED rows."""
        self.expected += checks
        self._write()

    def add(self, check: str, value: str, status: str = OK, **data) -> None:
        self.rows.append(dict(section=self.section, check=check, value=value, status=status, **data))
        self._write()

    def guard(self, check: str, fn) -> None:
        """Run fn() -> (value, status[, data]) as the row `check`; an exception becomes its one-line row."""
        try:
            value, status, *data = fn()
            self.add(check, value, status, **(data[0] if data else {}))
        except Exception as e:  # noqa: BLE001 - any failure is one row, the section goes on
            self.fail(check, e)

    def fail(self, check: str, e: BaseException) -> None:
        name = missing_package(e)
        if name:
            self.add(check, f"{name} not installed{skipped_note(name)}", MISSING)
        else:
            self.add(check, one_line(e), FAILED)

    def rest(self, e: BaseException) -> None:
        """Every expected check not reported yet gets the row of `e`."""
        for check in [c for c in self.expected if c not in {r["check"] for r in self.rows}]:
            self.fail(check, e)

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"expected": self.expected, "rows": self.rows}))
        tmp.replace(self.path)


def skipped_note(name: str | None) -> str:
    skipped = {SKIP_ALIASES.get(s, s) for s in os.environ.get(SKIP_VAR, "").split(",") if s}
    return f" (blocked by {SKIP_VAR})" if name and any(name.startswith(s.split(".")[0]) for s in skipped) else ""


def block_skipped_packages() -> None:
    for name in filter(None, os.environ.get(SKIP_VAR, "").split(",")):
        sys.modules[SKIP_ALIASES.get(name, name)] = None  # `import` of it now raises ModuleNotFoundError


def version_of(module: str, dist: str | None = None) -> str:
    import importlib
    import importlib.metadata

    mod = importlib.import_module(module)
    version = getattr(mod, "__version__", None)
    return str(version or importlib.metadata.version(dist or module))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device=cuda but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(out: Path, *, frame_hw, num_train: int, num_val: int, workers: int) -> Path:
    """Synthetic Cityscapes frames packed as the loaders read them (JPEG q95 + .idx + manifest)."""
    from frrn_dist.shards import pack
    from frrn_dist.synthetic import make_dataset

    root = make_dataset(out / "cityscapes", hw=frame_hw, num_train=num_train, num_val=max(1, num_val),
                        num_train_cities=2, num_val_cities=1, seed=0, workers=workers)  # fmt: skip
    splits = ("train", "val") if num_val else ("train",)
    pack(root, out / "shards", splits=splits, image_format="jpg", shard_size_mb=8, seed=0, workers=workers)
    return out / "shards"


def time_loader(loader, epochs: int, device) -> tuple[float, float, object]:
    """(images/s, CPU-seconds per image, a batch) over `epochs` epochs after one warm-up epoch.

    CPU time is this process's, every thread included (DALI's workers are threads), so it is what one GPU's
    loader costs the node's cores."""
    batch = None
    for batch in loader:  # noqa: B007 - warm-up (pipeline build, nvJPEG and allocator set-up); keeps a batch
        pass
    sync(device)
    images, wall, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for batch in loader:
            images += len(batch)
    sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return images / wall, cpu / images, batch
