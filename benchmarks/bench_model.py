"""FRRN-A speed and activation memory on this CPU, and the memory planner's micro-batches.

    python benchmarks/bench_model.py [--threads N] [--reps R] [--skip-large]

Measures one training step (forward, bootstrapped loss, backward) of FRRN-A:
- at 64x128: images/s and bytes saved for backward per image, for checkpointing off / unit / stage, NCHW
  (contiguous) and NHWC (channels_last) activations, fp32 (2 images) and bf16 autocast (1 image: on a CPU without
  bf16 instructions bf16 convs run ~10x slower than fp32 in NHWC and ~30x in NCHW, so NCHW bf16 gets one step);
- at 256x512 (1 image, the paper's FRRN-A input): the same for fp32 in the faster layout. bf16 is not timed there;
  its bytes come from the planner, which runs the step at 256x512 on fake tensors (shapes only).
Modes are timed interleaved (off, unit, stage, off, ...) and the median is reported, so load from other processes
hits them alike. Then the planner (frrn_dist.plan) for FRRN-A at 256x512 in 8 GiB and FRRN-B at 512x1024 in 80 GiB,
and the targets: checkpointing cuts bytes saved for backward per image >= 3x for <= 40% more step time, and with it
>= 12 FRRN-A images at 256x512 fit in 8 GiB. On a busy machine pass --threads 1: two OpenMP threads fighting other
processes for 2 cores ran 10x slower here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from frrn_dist.loss import bootstrapped_cross_entropy
from frrn_dist.model import CHECKPOINTING_MODES, FRRN
from frrn_dist.plan import format_table, plan_micro_batch

MiB = 2**20
GiB = 2**30


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def step(model: FRRN, x: torch.Tensor, labels: torch.Tensor, bf16: bool) -> int:
    """One forward + loss + backward; returns bytes saved for backward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = bootstrapped_cross_entropy(logits, labels)
    loss.backward()
    model.zero_grad(set_to_none=False)
    return sum(saved.values())


def time_modes(
    hw: tuple[int, int],
    n: int,
    *,
    bf16: bool,
    channels_last: bool,
    reps: int,
    modes=CHECKPOINTING_MODES,
    warmup: bool = True,
):
    """{mode: (images/s, saved bytes per image, step seconds)} with the modes' steps interleaved."""
    torch.manual_seed(0)
    model = FRRN("A", channels_last=channels_last).train()
    g = torch.Generator().manual_seed(0)
    x, labels = torch.rand(n, 3, *hw, generator=g), torch.randint(0, 19, (n, *hw), generator=g)
    seconds = {m: [] for m in modes}
    saved = {}
    for r in range(reps + warmup):  # a warm-up round primes the allocator and oneDNN's kernel cache
        for mode in modes:
            model.checkpointing = mode
            t = time.perf_counter()
            saved[mode] = step(model, x, labels, bf16) / n
            if r or not warmup:
                seconds[mode].append(time.perf_counter() - t)
    return {m: (n / statistics.median(seconds[m]), saved[m], statistics.median(seconds[m])) for m in modes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per mode at 64x128 (default 3; 2 at 256x512)")
    ap.add_argument("--skip-large", action="store_true", help="skip the 256x512 timings (about 3 minutes)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    flags = cpu_flags()
    bf16_hw = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16"))
    print(
        f"# machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, bf16 instructions: {', '.join(bf16_hw) or 'none'}; load average at start: "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )

    # -- 64x128: every combination ------------------------------------------------------------------------------------
    rows = []
    small = {}
    for bf16 in (False, True):
        for channels_last in (False, True):
            n = 1 if bf16 else 2
            if bf16 and not channels_last and not bf16_hw:
                # NCHW bf16 convs take a slow generic kernel on this CPU: one step, no warm-up
                res = time_modes((64, 128), n, bf16=True, channels_last=False, reps=1, modes=("off",), warmup=False)
            else:
                res = time_modes((64, 128), n, bf16=bf16, channels_last=channels_last, reps=1 if bf16 else args.reps)
            small[(bf16, channels_last)] = res
            for mode, (ips, saved, _) in res.items():
                off_ips = res.get("off", (ips,))[0]
                rows.append(
                    f"| 64x128 x{n} | {'bf16' if bf16 else 'fp32'} | {'NHWC' if channels_last else 'NCHW'} | {mode} "
                    f"| {ips:.2f} | {off_ips / ips - 1:+.0%} | {saved / MiB:,.1f} MiB |"
                )

    # -- 256x512, 1 image: fp32 in the faster layout ---------------------------------------------------------------
    large = {}
    if not args.skip_large:
        fp32_cl_faster = small[(False, True)]["off"][0] > small[(False, False)]["off"][0]
        large = time_modes((256, 512), 1, bf16=False, channels_last=fp32_cl_faster, reps=2, warmup=False)
        for mode, (ips, saved, _) in large.items():
            rows.append(
                f"| 256x512 x1 | fp32 | {'NHWC' if fp32_cl_faster else 'NCHW'} | {mode} | {ips:.3f} "
                f"| {large['off'][0] / ips - 1:+.0%} | {saved / MiB:,.1f} MiB |"
            )
    # -- the planner -----------------------------------------------------------------------------------------------
    plans_a = [
        plan_micro_batch("A", hw=(256, 512), memory_bytes=8 * GiB, checkpointing=mode, precision=precision)
        for precision in ("fp32", "bf16")
        for mode in CHECKPOINTING_MODES
    ]
    plans_b = [
        plan_micro_batch("B", hw=(512, 1024), memory_bytes=80 * GiB, checkpointing=mode, precision=precision)
        for precision in ("fp32", "bf16")
        for mode in CHECKPOINTING_MODES
    ]
    for p in plans_a[3:]:  # bf16 at 256x512: the planner's bytes (fake tensors at the real size)
        rows.append(
            f"| 256x512 x1 | bf16 | any | {p['checkpointing']} | not timed | "
            f"| {p['saved_bytes_per_image'] / MiB:,.1f} MiB (planner) |"
        )
    print("\n## Training step, FRRN-A (forward + bootstrapped loss + backward)\n")
    print(
        "| input x images | precision | activations | checkpointing | images/s | time vs off "
        "| saved for backward / image |"
    )
    print("|---|---|---|---|---:|---:|---:|")
    print("\n".join(rows))
    p0 = plans_a[0]
    print(
        f"\n## Planner: largest micro-batch (peak bytes of one step at the target size with 1 and 2 images; fixed ="
        f" 16 B/parameter + measured per-step bytes + {p0['reserve_bytes'] / GiB:.2f} GiB reserve; "
        f"+{p0['margin']:.0%} on activations)\n"
    )
    print(format_table(plans_a + plans_b))

    # -- targets ---------------------------------------------------------------------------------------------------
    print("\n## Targets\n")
    basis = large or small[(False, False)]
    where = "256x512 fp32" if large else "64x128 fp32 NCHW (256x512 skipped)"
    fits = {(p["checkpointing"], p["precision"]): p["max_micro_batch_size"] for p in plans_a}
    for mode in ("unit", "stage"):
        cut = basis["off"][1] / basis[mode][1]
        slower = basis[mode][2] / basis["off"][2] - 1
        print(
            f"- {mode}: saved bytes cut {cut:.1f}x (target >= 3x: {'met' if cut >= 3 else 'NOT met'}), step time "
            f"{slower:+.0%} (target <= +40%: {'met' if slower <= 0.40 else 'NOT met'}) at {where}; FRRN-A 256x512 in "
            f"8 GiB: {fits[(mode, 'fp32')]} fp32 / {fits[(mode, 'bf16')]} bf16 images (target >= 12: "
            f"{'met' if max(fits[(mode, 'fp32')], fits[(mode, 'bf16')]) >= 12 else 'NOT met'}; fp32 "
            f"{'met' if fits[(mode, 'fp32')] >= 12 else 'NOT met'}); without checkpointing "
            f"{fits[('off', 'fp32')]} fp32 / {fits[('off', 'bf16')]} bf16"
        )
    print(
        f"\n# took {time.perf_counter() - t_start:.0f} s; load average at end: "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
