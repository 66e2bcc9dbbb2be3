"""Scaling on paper, from measurements: how many GPUs FRRN training can use before the all-reduce dominates.

    python benchmarks/bench_scaling.py [--repeats 3] [--threads 1] [--gpu-img-s 50] [--micro-batch 3]

Measured here, on this CPU, in this run:
  - compute per image: FRRN-A and FRRN-B forward+backward (+ the loss) at 64x128 and 128x256, batch 1, fp32, the
    fastest of --repeats after one warm-up, on --threads threads (1 by default: per-core figures stay steady when
    other work shares the machine; the projection uses only the B/A ratio, not the CPU's speed). The per-pixel
    cost at 128x256 is EXTRAPOLATED by pixel count to the training sizes (A at 256x512, B at 512x1024); the
    64x128 vs 128x256 per-pixel figures show how linear that is.
  - FLOPs per image (torch's FlopCounterMode during the warm-up), the forward/backward split, and the parameters.
  - bytes all-reduced per optimizer step = parameters x bytes per gradient value (fp32 4, bf16 2); a ring all-reduce
    sends and receives 2(N-1)/N of that per GPU.
Assumed (not measured, change them with the flags):
  - a GPU's compute: --gpu-img-s images/s for FRRN-A at 256x512 (default 50: an A100 with bf16 autocast reaching
    ~12% of its 312 TFLOP/s on FRRN's narrow full-resolution convolutions, which are memory-bound). FRRN-B's GPU
    time is that times the ratio measured here on the CPU.
  - the network: every GPU has its own link of the given bandwidth (one NIC per GPU, DGX style) and a ring
    all-reduce reaches 80% of it, plus 10 us per ring hop; the link is the bottleneck, also inside a node (so the
    table is pessimistic below --gpus-per-node, where NVLink makes communication nearly free).
  - overlap off: gradients are all-reduced after the backward pass (DeepSpeed ZeRO 0 and 1 do this);
    overlap on: all of it hides under the backward pass (ZeRO 2 with overlap_comm, or DDP buckets), an upper bound.
  - data loading keeps up (DALI decodes on the GPU) and the micro-batch is --micro-batch images per GPU.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from common import cpu_model
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from frrn_dist.model import FRRN, count_parameters

MEASURE_HW = ((64, 128), (128, 256))
TRAIN_HW = {"A": (256, 512), "B": (512, 1024)}
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
LINKS_GBIT = (25, 100, 400)
LINK_EFFICIENCY = 0.8
HOP_LATENCY_S = 10e-6
GRAD_BYTES = {"fp32": 4, "bf16": 2}


def train_step(model: FRRN, images: torch.Tensor, labels: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels, ignore_index=255).backward()


def measure(arch: str, repeats: int, bar: tqdm) -> dict:
    """Seconds per image (fastest of `repeats`) at each MEASURE_HW; FLOPs per pixel (forward, forward+backward)."""
    torch.manual_seed(0)
    model = FRRN(arch=arch).train()
    out = {"params": count_parameters(model), "s_per_img": {}}
    for hw in MEASURE_HW:
        images = torch.rand(1, 3, *hw)
        labels = torch.randint(0, 19, (1, *hw))
        if "flops" not in out:
            with FlopCounterMode(display=False) as fwd:
                model(images)
            with FlopCounterMode(display=False) as both:  # doubles as the warm-up
                train_step(model, images, labels)
            pixels = hw[0] * hw[1]
            out["flops"] = (fwd.get_total_flops() / pixels, both.get_total_flops() / pixels)  # per pixel
        else:
            train_step(model, images, labels)  # warm-up: allocator, kernels
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            train_step(model, images, labels)
            times.append(time.perf_counter() - t0)
        out["s_per_img"][hw] = min(times)
        bar.update(1)
    return out


def ring_seconds(grad_bytes: float, gpus: int, link_gbit: float) -> float:
    """One ring all-reduce of grad_bytes over `gpus` GPUs: 2(N-1)/N of the bytes over each link, 2(N-1) hops."""
    if gpus == 1:
        return 0.0
    link_bytes_per_s = link_gbit * 1e9 / 8 * LINK_EFFICIENCY
    return 2 * (gpus - 1) / gpus * grad_bytes / link_bytes_per_s + 2 * (gpus - 1) * HOP_LATENCY_S


def projection(step_compute_s: float, backward_fraction: float, grad_bytes: float, micro_batch: int) -> list[str]:
    """Rows: GPUs, then per (link, overlap) 'images/s (efficiency)'."""
    fwd, bwd = step_compute_s * (1 - backward_fraction), step_compute_s * backward_fraction
    single = micro_batch / step_compute_s
    rows = []
    for n in GPU_COUNTS:
        cells = []
        for link in LINKS_GBIT:
            comm = ring_seconds(grad_bytes, n, link)
            for overlap in (False, True):
                step = fwd + (max(bwd, comm) if overlap else bwd + comm)
                img_s = n * micro_batch / step
                cells.append(f"{img_s:8.0f} ({img_s / (n * single):4.0%})")
        rows.append(f"{n:5d} " + " ".join(cells))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes per size (fastest)")
    parser.add_argument(
        "--gpu-img-s", type=float, default=50.0, help="ASSUMED training images/s of one GPU for FRRN-A at 256x512"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the timings")
    parser.add_argument("--micro-batch", type=int, default=3, help="images per GPU per step (configs: 3)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="only for the note on NVLink inside a node")
    args = parser.parse_args()
    if min(args.repeats, args.threads, args.micro_batch) < 1 or args.gpu_img_s <= 0:
        raise SystemExit("--repeats, --threads and --micro-batch must be >= 1, --gpu-img-s > 0")
    torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPU(s), torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, load average {load:.1f} at start (other work on the machine slows the CPU figures)"
    )
    t_start = time.perf_counter()
    with tqdm(total=2 * len(MEASURE_HW), desc="forward+backward timings", unit="size") as bar:
        results = {arch: measure(arch, args.repeats, bar) for arch in ("A", "B")}

    print(f"\nmeasured on this CPU: forward+backward+loss, batch 1, fp32 (fastest of {args.repeats} after a warm-up)")
    print(f"{'model':8} {'size':>9} {'s/image':>9} {'us/pixel':>9} {'GFLOP/image':>12}")
    for arch, r in results.items():
        for hw, s in r["s_per_img"].items():
            pixels = hw[0] * hw[1]
            gflop = r["flops"][1] * pixels / 1e9
            print(f"FRRN-{arch:3} {hw[0]:4d}x{hw[1]:<4d} {s:9.2f} {s / pixels * 1e6:9.1f} {gflop:12.1f}")
    big = MEASURE_HW[-1]
    small = MEASURE_HW[0]
    cpu_train_s = {}
    for arch, r in results.items():
        hw = TRAIN_HW[arch]
        per_px = r["s_per_img"][big] / (big[0] * big[1])
        cpu_train_s[arch] = per_px * hw[0] * hw[1]
        linear = (r["s_per_img"][small] / (small[0] * small[1])) / per_px
        print(
            f"FRRN-{arch} at {hw[0]}x{hw[1]}: {cpu_train_s[arch]:.1f} s/image EXTRAPOLATED by pixels from "
            f"{big[0]}x{big[1]} (per-pixel cost at {small[0]}x{small[1]} was {linear:.2f}x that at {big[0]}x{big[1]}); "
            f"{r['flops'][1] * hw[0] * hw[1] / 1e9:.0f} GFLOP/image, backward {1 - r['flops'][0] / r['flops'][1]:.0%}"
        )
    ratio_b = cpu_train_s["B"] / cpu_train_s["A"]
    flop_ratio = (results["B"]["flops"][1] * 4) / results["A"]["flops"][1]
    print(f"B at 512x1024 / A at 256x512 compute: {ratio_b:.2f}x measured (extrapolated), {flop_ratio:.2f}x by FLOPs")
    if not 0.75 < ratio_b / flop_ratio < 1.33:
        print(f"WARNING: measured and FLOP ratios disagree: a busy CPU (load {load:.1f})? Re-run on an idle machine.")

    print(
        "\nbytes all-reduced per optimizer step (= gradient bytes; ZeRO 2's reduce-scatter + all-gather moves the same)"
    )
    print(
        f"{'model':8} {'params':>12} {'fp32 MB':>9} {'bf16 MB':>9}   per GPU per step on a ring of N: 2(N-1)/N x that"
    )
    for arch, r in results.items():
        p = r["params"]
        print(f"FRRN-{arch:3} {p:12,d} {p * 4 / 1e6:9.1f} {p * 2 / 1e6:9.1f}")

    gpu_s = {"A": 1 / args.gpu_img_s, "B": ratio_b / args.gpu_img_s}
    print(
        f"\nASSUMPTION (not measured): one GPU trains FRRN-A at 256x512 at {args.gpu_img_s:.0f} images/s "
        f"(= {results['A']['flops'][1] * 256 * 512 * args.gpu_img_s / 1e12:.0f} TFLOP/s achieved); FRRN-B at "
        f"512x1024 then at {1 / gpu_s['B']:.1f} images/s (the CPU ratio above). Micro-batch {args.micro_batch} per "
        f"GPU, ring all-reduce at {LINK_EFFICIENCY:.0%} of the link + {HOP_LATENCY_S * 1e6:.0f} us/hop, one link per "
        "GPU."
    )
    header = f"{'GPUs':>5} " + " ".join(
        f"{f'{b} Gb/s ' + ('overlap' if o else 'serial'):>16}" for b in LINKS_GBIT for o in (0, 1)
    )
    for arch in ("A", "B"):
        hw = TRAIN_HW[arch]
        backward_fraction = 1 - results[arch]["flops"][0] / results[arch]["flops"][1]
        for dtype, nbytes in GRAD_BYTES.items():
            grad_bytes = results[arch]["params"] * nbytes
            step_s = gpu_s[arch] * args.micro_batch
            print(
                f"\nFRRN-{arch} at {hw[0]}x{hw[1]}, {dtype} gradients ({grad_bytes / 1e6:.0f} MB/step), compute "
                f"{step_s * 1e3:.0f} ms/step: projected images/s (scaling efficiency)"
            )
            print(header)
            print("\n".join(projection(step_s, backward_fraction, grad_bytes, args.micro_batch)))
    print(
        f"\nnotes: frrn-dist reduces fp32 gradients under every ZeRO stage by default, bf16 autocast included "
        f"(DeepSpeed's own default would reduce conv gradients in bf16 under ZeRO 1/2); train.bf16_grad_reduce=true "
        f"halves the bytes (the bf16 column). Inside one node of {args.gpus_per_node} GPUs "
        f"NVLink (~2400 Gb/s per GPU on A100) makes the rows up to {args.gpus_per_node} GPUs close to 100%.\n"
        f"benchmark took {time.perf_counter() - t_start:.0f} s"
    )


if __name__ == "__main__":
    main()
