"""FRRN-A speed on this machine against a plain transcription, and its activation memory and micro-batches.

    python benchmarks/bench_model.py [--threads N] [--quick] [--skip-large] [--compile SPEC] [--compile-plain]
        [--reps R]

1. The machine: CPU model and the flags that matter (benchmarks/common.py), threads, load; what
   frrn_dist.hardware chooses here for precision and layout, and why; the 2048^2 matmul peak in fp32 and bf16.
2. The yardstick: benchmarks/plain_frrn.py (stock max_pool2d / interpolate / BatchNorm2d) loads our state_dict;
   its logits must equal ours (train mode) to 1e-4 relative, or the run stops.
3. Speed: one training step (forward, bootstrapped loss, backward; checkpointing off) at 64x128 (4 images) and
   256x512 (1 image, the paper's FRRN-A input), fp32 and bf16 autocast, NCHW and NHWC activations. Ours and the
   plain network step alternately (ours, plain, ours, ...) after a warm-up step each, so other load hits both
   alike; medians of --reps (3 at 64x128, 2 at 256x512). GFLOP/s from FlopCounterMode's nominal forward+backward
   count, beside the matmul peak of the same precision; bytes kept for backward per image (saved-tensor hooks).
   torch.compile (inductor, frrn_dist.hardware.maybe_compile), at 64x128: `--compile chosen` (default) times
   our network compiled in the precision and layout hardware.py picks here, beside eager ours and plain in the
   same alternation; `--compile all` or a list (fp32-nchw,bf16-nhwc) picks others, `--compile-plain` adds the
   plain network compiled. A compile that fails is reported in its row. A cold compile takes minutes on 2 cores
   (printed); inductor's on-disk cache makes a rerun's much shorter.
4. Memory (the figures BENCHMARKS.md quotes): per checkpointing mode, bytes kept for backward per image and step
   time at 256x512 fp32 NCHW, 1 image; then the planner (frrn_dist.plan) for FRRN-A at 256x512 in 8 GiB and
   FRRN-B at 512x1024 in 80 GiB (fake tensors: shapes only).
5. Goals: our default configuration (what hardware.py picks) >= 1.6x the plain transcription in fp32; our fp32
   >= 1.0x plain fp32 (else what the memory saving costs, in time and bytes); checkpointing cuts bytes kept for
   backward >= 3x for <= 40% more step time, and >= 12 FRRN-A images at 256x512 fit in 8 GiB with it.
`--quick`: 64x128 only, one timed step each, no compile, no planner (a smoke run, ~1 minute). A default run takes
about 6 minutes on 2 idle cores with a warm compile cache. On a busy machine pass --threads 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import cpu_model, load_average, speed_flags
from plain_frrn import PlainFRRN, max_logit_difference

from frrn_dist import hardware
from frrn_dist.loss import bootstrapped_cross_entropy
from frrn_dist.model import CHECKPOINTING_MODES, FRRN
from frrn_dist.plan import format_table, plan_micro_batch

MiB = 2**20
GiB = 2**30
SIZES = {(64, 128): 4, (256, 512): 1}  # input -> images per step
SAME_LOGITS_TOL = 1e-4


def step(model, x: torch.Tensor, labels: torch.Tensor, bf16: bool) -> int:
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
        loss = bootstrapped_cross_entropy(logits.float(), labels)
    loss.backward()
    model.zero_grad(set_to_none=False)
    return sum(saved.values())


def batch(hw: tuple[int, int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, *hw, generator=g), torch.randint(0, 19, (n, *hw), generator=g)


def time_alternating(models: dict, hw, n: int, *, bf16: bool, reps: int) -> dict:
    """{name: (step seconds median, saved bytes per image) or the error it raised}: one warm-up step each, then
    `reps` rounds in which every model steps once, in turn. A model that raises (a compile failure) drops out."""
    x, labels = batch(hw, n)
    seconds = {name: [] for name in models}
    saved, failed = {}, {}
    for r in range(reps + 1):
        for name, model in models.items():
            if name in failed:
                continue
            t = time.perf_counter()
            try:
                saved[name] = step(model, x, labels, bf16) / n
            except Exception as e:  # noqa: BLE001 - inductor raises anything; the table says what
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                continue
            if r:
                seconds[name].append(time.perf_counter() - t)
    return {name: failed.get(name) or (statistics.median(seconds[name]), saved[name]) for name in models}


def build(kind: str, weights: FRRN, channels_last: bool):
    if kind == "plain":
        return PlainFRRN.from_ours(weights, channels_last=channels_last)
    model = FRRN("A", channels_last=channels_last).train()
    model.load_state_dict(weights.state_dict())
    return model


def check_same_network(weights: FRRN) -> float:
    plain = PlainFRRN.from_ours(weights)
    ours = build("ours", weights, channels_last=False)
    diff = max_logit_difference(ours, plain, batch((64, 128), 2)[0])
    if diff > SAME_LOGITS_TOL:
        raise SystemExit(f"benchmarks/plain_frrn.py: logits differ from ours by {diff:.1e} (> {SAME_LOGITS_TOL})")
    return diff


def parse_compile(spec: str, chosen: tuple[str, bool]) -> set[tuple[str, bool]]:
    """--compile: 'none', 'chosen' (what hardware.py picks here), 'all', or e.g. 'fp32-nchw,bf16-nhwc'."""
    every = {(p, cl) for p in ("fp32", "bf16") for cl in (False, True)}
    if spec in ("none", "chosen", "all"):
        return {"none": set(), "chosen": {chosen}, "all": every}[spec]
    configs = set()
    for item in spec.split(","):
        precision, _, layout = item.partition("-")
        if precision not in ("fp32", "bf16") or layout not in ("nchw", "nhwc"):
            raise SystemExit(f"--compile: {item!r} is not none, chosen, all or a list like fp32-nchw,bf16-nhwc")
        configs.add((precision, layout == "nhwc"))
    return configs


def speed_table(weights: FRRN, sizes, reps: dict, peaks, flops, compiled: set, compile_plain: bool):
    """Prints the rows as they come; returns {(hw, precision, channels_last): {name: (s, bytes) or error}}."""
    results = {}
    for hw, n in sizes.items():
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                models = {k: build(k, weights, channels_last) for k in ("ours", "plain")}
                t0 = time.perf_counter()
                if (precision, channels_last) in compiled and hw == (64, 128):
                    models["ours+compile"] = hardware.maybe_compile(build("ours", weights, channels_last), True)
                    if compile_plain:
                        models["plain+compile"] = hardware.maybe_compile(build("plain", weights, channels_last), True)
                res = time_alternating(models, hw, n, bf16=precision == "bf16", reps=reps[hw])
                results[(hw, precision, channels_last)] = res
                layout = "NHWC" if channels_last else "NCHW"
                for name, got in res.items():
                    head = f"| {hw[0]}x{hw[1]} x{n} | {precision} | {layout} | {name} |"
                    if isinstance(got, str):
                        print(f"{head} failed: {got} | | | |", flush=True)
                        continue
                    sec, saved = got
                    gflops = flops[hw] * n / sec / 1e9
                    note = f" (compile + warm-up: {time.perf_counter() - t0:.0f} s)" if "compile" in name else ""
                    print(
                        f"{head} {n / sec:.3f} | {res['plain'][0] / sec:.2f}x "
                        f"| {gflops:.1f} ({100 * gflops / peaks[precision]:.0f}%) | {saved / MiB:,.0f} MiB |{note}",
                        flush=True,
                    )
    return results


def memory_rows(weights: FRRN, large: bool, reps: int) -> tuple[list[str], dict]:
    """Checkpointing modes at 256x512 fp32 NCHW, 1 image (64x128 x4 with --skip-large); interleaved, medians."""
    hw, n = ((256, 512), 1) if large else ((64, 128), 4)
    model = build("ours", weights, channels_last=False)
    x, labels = batch(hw, n)
    seconds, saved = {m: [] for m in CHECKPOINTING_MODES}, {}
    for r in range(reps + (not large)):  # a warm-up round at 64x128; 256x512 steps are long enough without
        for mode in CHECKPOINTING_MODES:
            model.checkpointing = mode
            t = time.perf_counter()
            saved[mode] = step(model, x, labels, False) / n
            if large or r:
                seconds[mode].append(time.perf_counter() - t)
    res = {m: (statistics.median(seconds[m]), saved[m]) for m in CHECKPOINTING_MODES}
    rows = [
        f"| {hw[0]}x{hw[1]} x{n} | fp32 | NCHW | {m} | {n / sec:.3f} | {sec / res['off'][0] - 1:+.0%} "
        f"| {kept / MiB:,.1f} MiB |"
        for m, (sec, kept) in res.items()
    ]
    return rows, res


def print_goals(results, sizes, chosen, memory, plans_a) -> None:
    print("\n## Goals\n")
    for hw, n in sizes.items():
        cfg = results[(hw, *chosen)]
        base = results[(hw, "fp32", False)]
        plain_fp32 = base["plain"][0]
        default = plain_fp32 / cfg["ours"][0]
        fp32 = plain_fp32 / base["ours"][0]
        label = f"{chosen[0]} {'NHWC' if chosen[1] else 'NCHW'}"
        print(
            f"- {hw[0]}x{hw[1]} x{n}: our default ({label}) {default:.2f}x plain fp32 NCHW (target >= 1.6x: "
            f"{'met' if default >= 1.6 else 'NOT met'}); our fp32 NCHW {fp32:.2f}x plain fp32 NCHW (target >= 1.0x: "
            f"{'met' if fp32 >= 1.0 else 'NOT met'}; bytes kept for backward per image {base['ours'][1] / MiB:,.0f} "
            f"vs {base['plain'][1] / MiB:,.0f} MiB, {base['plain'][1] / base['ours'][1]:.1f}x less)"
        )
    if memory:
        fits = {(p["checkpointing"], p["precision"]): p["max_micro_batch_size"] for p in plans_a}
        for mode in ("unit", "stage"):
            cut = memory["off"][1] / memory[mode][1]
            slower = memory[mode][0] / memory["off"][0] - 1
            print(
                f"- checkpointing {mode}: bytes kept for backward cut {cut:.1f}x (target >= 3x: "
                f"{'met' if cut >= 3 else 'NOT met'}), step time {slower:+.0%} (target <= +40%: "
                f"{'met' if slower <= 0.40 else 'NOT met'}); FRRN-A 256x512 in 8 GiB: {fits[(mode, 'fp32')]} fp32 / "
                f"{fits[(mode, 'bf16')]} bf16 images (target >= 12: "
                f"{'met' if max(fits[(mode, 'fp32')], fits[(mode, 'bf16')]) >= 12 else 'NOT met'}); without "
                f"checkpointing {fits[('off', 'fp32')]} fp32 / {fits[('off', 'bf16')]} bf16"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per model at 64x128 (default 3; 2 at 256x512)")
    ap.add_argument("--skip-large", action="store_true", help="no 256x512 timings (about 3 of the 6 minutes)")
    ap.add_argument(
        "--compile", default="chosen", help="ours compiled at 64x128 in: none, chosen (default: the precision and "
        "layout hardware.py picks here), all, or a list like fp32-nchw,bf16-nhwc",
    )  # fmt: skip
    ap.add_argument("--compile-plain", action="store_true", help="also time the plain network compiled")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64x128, 1 step each, no compile, no planner")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps < 1:
        raise SystemExit("--reps must be >= 1")
    t_start = time.perf_counter()
    large = not (args.skip_large or args.quick)
    sizes = SIZES if large else {(64, 128): SIZES[(64, 128)]}
    reps_small, reps_large = (1, 1) if args.quick else (args.reps, max(1, args.reps - 1))
    compile_spec = "none" if args.quick else args.compile

    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores; {speed_flags()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load_average()} at start")
    precision, why_precision = hardware.choose_precision("cpu")
    channels_last, why_layout = hardware.choose_channels_last("cpu", precision)
    print(f"# hardware.choose_precision: {precision} ({why_precision})")
    print(f"# hardware.choose_channels_last: {channels_last} ({why_layout})")
    peaks = {}
    for p in ("fp32", "bf16"):
        tflops, source = hardware.dense_peak_tflops("cpu", p)
        peaks[p] = tflops * 1e3
        print(f"# matmul peak {p}: {peaks[p]:.0f} GFLOP/s ({source})")

    torch.manual_seed(0)
    weights = FRRN("A").train()
    flops = {hw: hardware.flops_per_image(weights, hw) for hw in sizes}
    plain_flops = hardware.flops_per_image(PlainFRRN.from_ours(weights), (64, 128))
    print(
        f"# same network: plain transcription logits within {check_same_network(weights):.1e} of ours (relative, "
        f"train mode); FLOPs per image forward+backward: "
        + ", ".join(f"{hw[0]}x{hw[1]} {f / 1e9:.1f} G" for hw, f in flops.items())
        + f" (plain at 64x128: {plain_flops / 1e9:.1f} G)"
    )

    print("\n## Training step, FRRN-A, checkpointing off: ours vs the plain transcription\n")
    print("| input x images | precision | activations | network | images/s | vs plain | GFLOP/s (% of matmul peak) "
          "| kept for backward / image |")  # fmt: skip
    print("|---|---|---|---|---:|---:|---:|---:|")
    results = speed_table(
        weights, sizes, {(64, 128): reps_small, (256, 512): reps_large}, peaks, flops,
        parse_compile(compile_spec, (precision, channels_last)), args.compile_plain,
    )  # fmt: skip

    print("\n## Checkpointing: step time and bytes kept for backward, ours\n")
    print("| input x images | precision | activations | checkpointing | images/s | time vs off | kept / image |")
    print("|---|---|---|---|---:|---:|---:|")
    mem_rows, memory = memory_rows(weights, large, reps_large if large else reps_small)
    print("\n".join(mem_rows))

    plans_a = []
    if not args.quick:
        plans_a = [
            plan_micro_batch("A", hw=(256, 512), memory_bytes=8 * GiB, checkpointing=mode, precision=p)
            for p in ("fp32", "bf16")
            for mode in CHECKPOINTING_MODES
        ]
        plans_b = [
            plan_micro_batch("B", hw=(512, 1024), memory_bytes=80 * GiB, checkpointing=mode, precision=p)
            for p in ("fp32", "bf16")
            for mode in CHECKPOINTING_MODES
        ]
        p0 = plans_a[0]
        print(
            f"\n## Planner: largest micro-batch (peak bytes of one step at the target size with 1 and 2 images; "
            f"fixed = 16 B/parameter + measured per-step bytes + {p0['reserve_bytes'] / GiB:.2f} GiB reserve; "
            f"+{p0['margin']:.0%} on activations)\n"
        )
        print(format_table(plans_a + plans_b))
    print_goals(results, sizes, (precision, channels_last), memory if large else None, plans_a)
    print(f"\n# took {time.perf_counter() - t_start:.0f} s; load average at end: {load_average()}")


if __name__ == "__main__":
    main()
