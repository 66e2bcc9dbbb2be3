"""What every benchmark prints about the machine it ran on: CPU model, the flags that matter, load, CPU time.

Imported by the scripts beside it (`python benchmarks/bench_x.py` puts this folder on sys.path).
"""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

# the instruction sets that decide how fast FRRN's convolutions run on a CPU (fp32: avx512f; bf16: the rest)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """'AMD EPYC', 'Intel(R) Xeon(R) Platinum 8480+', ... (/proc/cpuinfo, else platform's guess)."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists for the first CPU (empty where there is no /proc)."""
    return set((_cpuinfo_field("flags") or "").split())


def speed_flags() -> str:
    """'avx2 yes, avx512f yes, avx512_bf16 yes, amx_tile no, amx_bf16 no'."""
    flags = cpu_flags()
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in SPEED_FLAGS)


def load_average() -> str:
    """'0.3, 0.5, 0.4' (1, 5, 15 minutes); above the core count means other processes shared the cores."""
    return ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU seconds of this process (all its threads), plus its finished children if asked."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    if children:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += kids.ru_utime + kids.ru_stime
    return total


def machine_line() -> str:
    """One line: CPU model, cores, the flags that matter, Python, load average now."""
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} cores, {speed_flags()}; Python {platform.python_version()}; "
        f"load average {load_average()}"
    )
