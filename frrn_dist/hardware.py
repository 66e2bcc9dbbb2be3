"""What the machine at hand runs fast, decided at start-up: precision, activation layout, peak FLOP/s, FLOPs/image.

Plain functions of a torch.device (no config object). Each choice comes back with a reason string that says what
was found and measured; the caller logs it and records it (nothing here prints). Probes run once per process
and take well under a second on a 2-core CPU.

Precision, `choose_precision`: bf16 autocast where the device has fast bf16 arithmetic, fp32 elsewhere.
- CUDA: compute capability >= 8.0 (Ampere and later have bf16 tensor cores). Older GPUs (V100: fp16 only) fp32.
- CPU with AMX tiles (Xeon Sapphire Rapids and later): bf16, no probe needed.
- CPU with AVX512-BF16 (Cooper Lake, Zen 4, ...), or where oneDNN claims bf16 support without either (AVX512BW
  emulation, ARM): the query is not conclusive, so a probe times a 3x3 conv forward+backward in fp32 and in bf16
  autocast on one thread (~0.1 s) and bf16 is taken when it is >= `BF16_MIN_SPEEDUP` faster. Measured: on a
  2-core AMD EPYC (Zen 4, avx512_bf16) the probe shows 1.5-1.7x and FRRN-A forward+backward 1.5-2.3x; another
  machine of this project without bf16 instructions ran bf16 autocast ~10x slower than fp32.
- anything else (no oneDNN bf16, MPS, ...): fp32.

Layout, `choose_channels_last`: CUDA: NHWC exactly with bf16 on compute capability >= 8.0 (cuDNN's tensor-core
convolutions are NHWC-native). CPU with oneDNN: NHWC in both precisions. Measured on FRRN-A, forward+backward, 1
thread of the EPYC above (benchmarks/bench_model.py, BENCHMARKS.md): NHWC / NCHW = 1.51x (64x128 x4) and 1.18x
(256x512) in bf16, 1.17x and 1.05x in fp32 (1.03x at 2 threads); the machine without bf16 instructions gained
nothing from NHWC in fp32 and lost nothing. Without oneDNN: NCHW.

Peaks, `dense_peak_tflops`: a table of dense (no sparsity) tensor-core peaks of common GPUs, matched on the device
name; fp32 means TF32 where cuDNN is allowed to use it (the default for convolutions). On a CPU: a 1024x1024
matmul measured once per process and thread count (what MFU is measured against). 1024 reaches the same GFLOP/s
as 2048 on the EPYC above (74 fp32 / 170 bf16 on 1 thread, both sizes) in a fifth of the time (0.2 s, not 1.1 s
of every run's start-up).

FLOPs, `flops_per_image`: torch's FlopCounterMode over one forward+backward at batch 1 on a meta-device copy
(shapes only: no compute, the model's BN statistics untouched). Checkpointing is switched off in the copy, so the
count is the nominal forward+backward; with checkpointing a step really computes the recomputed forwards on top
(unit: about +1/3), which MFU by convention does not credit.

torch.compile, `maybe_compile` (checked on torch 2.13 CPU inductor; tests/test_compile.py):
- The earlier "some stem gradients differ from eager" was an inductor bug, not tolerance and not ours. Compiled
  FRRN-A gave eager's logits but gradients 20-80% off for every parameter before the 1/16 encoder stage, in fp64
  as in fp32 (fp64 compiled vs fp64 eager: decoder and head equal to 1e-13, those 0.2-0.7 off). Dynamo's capture,
  AOT autograd, the decompositions and the partitioner are exact (backend "aot_eager" and
  "aot_eager_decomp_partition" equal eager bit for bit in fp64); only inductor's generated code is wrong. Turning
  off buffer reuse / in-place buffers or layout optimisation does not help. Replacing the max_unpool2d scatter
  in our argmax-keeping max pool's backward by a pointwise select fixes it, whether done at the 1/16 scale alone
  or at every other scale alone: the fault is in inductor's fused scatter kernels around the 1/16 stage (its
  z pool's 16x16 window exceeds inductor's 127-element limit and falls back to aten, and its unpool fuses with
  the stage-entry y unpool). Not reduced to a minimal inductor reproducer.
- Fixes in model.py, both active only while compiling: the pool's backward selects (`_unpool_by_select`; eager
  keeps the faster scatter), and checkpoint() gets no context_fn (compile refuses one that is not a pair of
  TorchDispatchModes; its own recompute updates BN statistics once, tested).
- After the fix, compiled fp32 is within 2-4x eager fp32's own error from an fp64 run (eager CPU BatchNorm
  accumulates in double, inductor in fp32); bf16 matches eager bf16's error statistics.
- bf16 + channels_last (what this CPU runs by default) does not compile: inductor's generated backward raises
  "UnboundLocalError: cannot access local variable 'buf232'" (64x128 x4; another inductor codegen bug).
- Speed on the 2-core EPYC, 1 thread, 64x128 x4 (bench_model.py): compiled / eager = 1.05x in fp32 NCHW, 1.01x in
  bf16 NCHW. Compiling costs 4-5 min cold on 2 shared cores (~1-1.5 min from inductor's on-disk cache) per input
  size, precision, layout and checkpointing mode; dynamic=True took 8.6 min. So on a CPU: leave it off.
  GPUs: not measured.

Imports: torch.
"""

from __future__ import annotations

import copy
import re
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PRECISIONS = ("bf16", "fp32")
BF16_MIN_SPEEDUP = 1.15  # the probe's bf16 / fp32 speed at which bf16 is taken (measured 1.4-1.7x where it pays)
MIN_CUDA_CAPABILITY = (8, 0)

# Dense peaks in TFLOP/s (datasheets, no sparsity): bf16 and tf32 on tensor cores, fp32 on CUDA cores. Matched
# top to bottom on the upper-cased device name, so the specific variants come before the family.
GPU_PEAKS = (
    (r"\bGH200\b", "GH200 (H100 SXM)", 989.0, 494.0, 67.0),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.0, 418.0, 60.0),
    (r"\bH200\b", "H200 SXM", 989.0, 494.0, 67.0),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe", 756.0, 378.0, 51.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.0, 418.0, 60.0),
    (r"\bH100\b", "H100 SXM", 989.0, 494.0, 67.0),
    (r"\bA100\b", "A100", 312.0, 156.0, 19.5),
    (r"\bL40S\b", "L40S", 362.0, 183.0, 91.6),
    (r"\bL40\b", "L40", 181.0, 90.5, 90.5),
    (r"\bL4\b", "L4", 121.0, 60.0, 30.3),
    (r"\bA40\b", "A40", 150.0, 75.0, 37.4),
    (r"\bA10\b", "A10", 125.0, 62.5, 31.2),
    (r"\bRTX A6000\b", "RTX A6000", 155.0, 77.4, 38.7),
    (r"\bRTX 4090\b", "RTX 4090", 165.0, 82.6, 82.6),
    (r"\bRTX 3090\b", "RTX 3090", 71.0, 35.6, 35.6),
    (r"\bV100\b", "V100 (no bf16; fp16 tensor cores 125)", None, None, 15.7),
)

_CACHE: dict = {}  # per-process results of the probes, keyed by what they depend on


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''}"


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


# ---------------------------------------------------------------------------------------------------------------
# CPU capability: torch's own queries (the same ones oneDNN dispatches on)


def cpu_bf16_capability() -> dict[str, bool | str]:
    """What torch says this CPU has: {'avx512_bf16', 'amx', 'onednn_bf16': bool, 'isa': 'AVX512' | 'AVX2' | ...}."""
    query = lambda name: bool(getattr(torch.cpu, name, lambda: False)())
    return {
        "avx512_bf16": query("_is_avx512_bf16_supported"),
        "amx": query("_is_amx_tile_supported"),
        "onednn_bf16": torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }


def _conv_step(x: torch.Tensor, w: torch.Tensor, bf16: bool) -> float:
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = F.conv2d(x, w, padding=1)
    y.float().sum().backward()
    return time.perf_counter() - t


def probe_cpu_bf16_speedup(pairs: int = 6) -> tuple[float, float]:
    """(fp32 time / bf16 autocast time, seconds the probe took) for a 3x3 conv 96->96 at 32x64, NHWC, forward and
    backward: an FRRU-sized conv. On one thread: the ratio is the instruction set's, and one thread is not slowed
    by other processes on the cores the way a team of OpenMP threads is (2 threads on 2 busy cores measured 0.63x
    where 1 thread measures 1.55x). fp32 and bf16 steps alternate and the fastest of each counts. Cached per
    process."""
    if "bf16_probe" not in _CACHE:
        t0, threads = time.perf_counter(), torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 96, 32, 64, generator=g).contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            w = (torch.randn(96, 96, 3, 3, generator=g) * 0.05).requires_grad_()
            _conv_step(x, w, False), _conv_step(x, w, True)  # warm-up: oneDNN picks and caches its kernels
            fp32, bf16 = [], []
            for _ in range(pairs):
                fp32.append(_conv_step(x, w, False))
                bf16.append(_conv_step(x, w, True))
                # emulated bf16: no need to wait for more evidence (never on one pair: a busy core can fake it)
                if len(bf16) >= 2 and min(bf16) > 3 * min(fp32):
                    break
        finally:
            torch.set_num_threads(threads)
        _CACHE["bf16_probe"] = (min(fp32) / min(bf16), time.perf_counter() - t0)
    return _CACHE["bf16_probe"]


# ---------------------------------------------------------------------------------------------------------------
# The choices


def choose_precision(device: torch.device | str) -> tuple[str, str]:
    """("bf16" | "fp32", reason): bf16 autocast where this device runs it fast (module docstring)."""
    device = _as_device(device)
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if cc >= MIN_CUDA_CAPABILITY:
            return "bf16", f"CUDA {name}, compute capability {cc[0]}.{cc[1]} >= 8.0: bf16 tensor cores"
        return "fp32", f"CUDA {name}, compute capability {cc[0]}.{cc[1]} < 8.0: no bf16 tensor cores"
    if device.type != "cpu":
        return "fp32", f"{device.type} device: no bf16 rule known here, fp32"
    cap = cpu_bf16_capability()
    found = (
        f"torch reports ISA {cap['isa']}, avx512_bf16 {'yes' if cap['avx512_bf16'] else 'no'}, "
        f"AMX {'yes' if cap['amx'] else 'no'}, oneDNN bf16 {'yes' if cap['onednn_bf16'] else 'no'}"
    )
    if not cap["onednn_bf16"]:
        return "fp32", f"CPU: {found}: bf16 convolutions would run a slow generic kernel"
    if cap["amx"]:
        return "bf16", f"CPU: {found}: AMX tiles run bf16 matmuls and convolutions natively"
    speedup, seconds = probe_cpu_bf16_speedup()
    verdict = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return verdict, (
        f"CPU: {found}; bf16 autocast conv {speedup:.2f}x fp32 in a {seconds:.2f} s probe "
        f"(1 thread; bf16 needs >= {BF16_MIN_SPEEDUP}x)"
    )


def choose_channels_last(device: torch.device | str, precision: str) -> tuple[bool, str]:
    """(NHWC or not, reason): NHWC where it measured faster: CUDA cc >= 8.0 with bf16, CPUs with oneDNN."""
    device, _ = _as_device(device), _check_precision(precision)
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        if cc >= MIN_CUDA_CAPABILITY and precision == "bf16":
            return True, f"CUDA compute capability {cc[0]}.{cc[1]} with bf16: cuDNN's tensor-core convs are NHWC"
        return False, f"CUDA compute capability {cc[0]}.{cc[1]} with {precision}: NCHW"
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        return True, (
            f"CPU with oneDNN, {precision}: NHWC (FRRN-A measured 1.2-1.5x NCHW in bf16, 1.05-1.17x in fp32; "
            "frrn_dist/hardware.py)"
        )
    return False, f"{device.type} device without oneDNN: NCHW"


# ---------------------------------------------------------------------------------------------------------------
# Peaks


def gpu_peak_tflops(name: str, precision: str, *, tf32: bool = True) -> tuple[float | None, str]:
    """Dense peak TFLOP/s of the GPU called `name` (torch.cuda.get_device_name) at `precision`, from GPU_PEAKS.
    fp32 with tf32=True means the TF32 tensor-core peak (what cuDNN convolutions run on by default)."""
    _check_precision(precision)
    key = re.sub(r"[-_]", " ", name.upper())
    for pattern, label, bf16, tf32_peak, fp32 in GPU_PEAKS:
        if re.search(pattern, key):
            if precision == "bf16":
                peak, what = bf16, "bf16 tensor cores"
            elif tf32 and tf32_peak is not None:
                peak, what = tf32_peak, "TF32 tensor cores (cuDNN's default for fp32 convolutions)"
            else:
                peak, what = fp32, "fp32 CUDA cores"
            if peak is None:
                return None, f"{name}: table entry {label} has no {precision} peak"
            return peak, f"{name}: datasheet dense peak of {label}, {what}"
    return None, f"{name}: not in the GPU peak table (frrn_dist/hardware.py GPU_PEAKS), no MFU"


def cpu_matmul_tflops(precision: str, n: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """(TFLOP/s of an n x n matmul in `precision`, best of `repeats` after a warm-up; seconds the measurement took).
    Stops early past ~1 s (a CPU that emulates bf16). Cached per process, precision and thread count."""
    _check_precision(precision)
    key = ("matmul", precision, n, torch.get_num_threads())
    if key not in _CACHE:
        t0 = time.perf_counter()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        seconds = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            torch.mm(a, b)
            seconds.append(time.perf_counter() - t)
            if time.perf_counter() - t0 > 1.0:
                break
        best = min(seconds[1:] or seconds)  # the first one is the warm-up (unless it was the only one)
        _CACHE[key] = (2 * n**3 / best / 1e12, time.perf_counter() - t0)
    return _CACHE[key]


def dense_peak_tflops(device: torch.device | str, precision: str = "bf16") -> tuple[float | None, str]:
    """(peak TFLOP/s at `precision` or None, where it came from): GPU table by name, or a CPU matmul measured once."""
    device, _ = _as_device(device), _check_precision(precision)
    if device.type == "cuda":
        return gpu_peak_tflops(torch.cuda.get_device_name(device), precision, tf32=torch.backends.cudnn.allow_tf32)
    if device.type == "cpu":
        tflops, seconds = cpu_matmul_tflops(precision)
        return (
            tflops,
            f"CPU: 1024x1024 {precision} matmul measured here, best of 5, {_threads()} ({seconds:.1f} s)",
        )
    return None, f"{device.type} device: no peak known"


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def flops_per_image(model: nn.Module, input_hw: tuple[int, int], *, in_channels: int = 3, backward: bool = True) -> int:
    """Forward (+ backward) FLOPs of one image at input_hw, counted by torch's FlopCounterMode (convolutions and
    matmuls; BN, ReLU, pools and upsampling are memory traffic and not counted, the MFU convention).

    Runs on a meta-device copy in train mode at batch 1: nothing is computed, `model` is left untouched. Pass the
    plain nn.Module (not a torch.compile wrapper or a DeepSpeed engine: use `engine.module`). A `checkpointing`
    attribute is set to "off" in the copy, so recomputed forwards are not counted (the nominal forward+backward).
    The input image needs no gradient, so the first conv has no input-gradient conv: backward < 2x forward there.
    """
    ghost = copy.deepcopy(model).to("meta").train()
    if hasattr(ghost, "checkpointing"):
        ghost.checkpointing = "off"
    x = torch.empty(1, in_channels, *input_hw, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = ghost(x)
        if backward:
            out.sum().backward()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


def maybe_compile(model: nn.Module, enabled: bool, **compile_kwargs) -> nn.Module:
    """`model` compiled in place by torch.compile (inductor) when enabled, else untouched; returns `model`.

    In place (`nn.Module.compile`), so parameter names, state_dict keys and checkpoints stay those of the eager
    model. Call it before deepspeed.initialize. compile_kwargs go to torch.compile (e.g. dynamic=True). The module
    docstring says what was checked and measured: on CPUs it is barely faster and fails with bf16 + NHWC.
    """
    if enabled:
        model.compile(**compile_kwargs)
    return model


__all__ = [
    "GPU_PEAKS",
    "choose_channels_last",
    "choose_precision",
    "cpu_bf16_capability",
    "cpu_matmul_tflops",
    "dense_peak_tflops",
    "flops_per_image",
    "gpu_peak_tflops",
    "maybe_compile",
    "probe_cpu_bf16_speedup",
]
