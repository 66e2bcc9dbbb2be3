"""The five sections of benchmarks/gpu_check.py (`make gpu-check`), and the child process that runs one.

Each section gets `ctx` (device "cuda" | "cpu", work folder, SIZES[device], CPUs) and a Rows that it fills;
every check is guarded, so one failure or missing package is one row and the section goes on. Module level
imports only the standard library: torch, DeepSpeed, DALI and frrn_dist load inside the sections, after
FRRN_GPU_CHECK_SKIP has blocked the packages it names.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from gpu_check_rows import (
    FAILED,
    MISSING,
    NA,
    OK,
    GiB,
    Rows,
    block_skipped_packages,
    free_port,
    make_shards,
    missing_package,
    one_line,
    skipped_note,
    sync,
    time_loader,
    torch_device,
    version_of,
)

# Sizes per device: the GPU's real ones, the CPU's small enough for a test on 2 shared cores.
SIZES = {
    "cuda": dict(
        dali_frame_hw=(1024, 2048), dali_frames=32, dali_input_hw=(256, 512), dali_batch=8, dali_epochs=4,
        model_hw=(256, 512), model_batch=8, model_warmup=3, model_steps=10,
        loop_frame_hw=(256, 512), loop_input_hw=(128, 256), loop_frames=(64, 8), loop_batch=4,
        loop_steps=(30, 10, 20, 35), loop_precision="bf16",
    ),
    "cpu": dict(
        dali_frame_hw=(256, 512), dali_frames=8, dali_input_hw=(64, 128), dali_batch=2, dali_epochs=2,
        model_hw=(64, 128), model_batch=1, model_warmup=1, model_steps=1,
        loop_frame_hw=(128, 256), loop_input_hw=(32, 64), loop_frames=(8, 4), loop_batch=2,
        loop_steps=(12, 4, 8, 14), loop_precision="fp32",
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------------------------------
def driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 - fall back to the command line tool
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
        return out.stdout.strip().splitlines()[0]


def gpu_rows(rows: Rows) -> None:
    import torch

    dev = torch_device("cuda")
    props = torch.cuda.get_device_properties(dev)
    rows.add("device", f"{props.name}, compute capability {props.major}.{props.minor}, "
             f"{props.multi_processor_count} SMs, {torch.cuda.device_count()} visible")  # fmt: skip
    rows.add("memory", f"{props.total_memory / GiB:.1f} GiB")
    rows.guard("driver", lambda: (driver_version(), OK))
    rows.add("CUDA / cuDNN", f"{torch.version.cuda} / {torch.backends.cudnn.version()}")
    nccl = lambda: torch.cuda.nccl.version()  # a tuple (2, 27, 7); an int 22707 in older torch
    rows.guard("NCCL", lambda: (".".join(map(str, v)) if isinstance(v := nccl(), tuple) else str(v), OK))
    bf16 = torch.cuda.is_bf16_supported()
    rows.add("bf16", "supported" if bf16 else "NOT supported", OK if bf16 else FAILED)


def section_env(ctx, rows: Rows) -> None:
    import platform

    import torch

    rows.expect("python", "torch", "device", "CPUs")
    rows.add("python", f"{platform.python_version()} at {sys.executable}")
    rows.add("torch", f"{torch.__version__} (CUDA build {torch.version.cuda})")
    if ctx.device == "cuda":
        gpu_checks = ("device", "memory", "driver", "CUDA / cuDNN", "NCCL", "bf16")
        rows.expect(*gpu_checks[1:])
        try:
            gpu_rows(rows)
        except Exception as e:  # noqa: BLE001 - no GPU: those rows say why; versions and CPUs still report
            for check in gpu_checks:
                if check not in {r["check"] for r in rows.rows}:
                    rows.fail(check, e)
    else:
        rows.add("device", f"cpu ({platform.processor() or platform.machine()}), capability "
                 f"{torch.backends.cpu.get_cpu_capability()}, mkldnn bf16 "
                 f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")  # fmt: skip
    for check, module, dist in (
        ("DeepSpeed", "deepspeed", None),
        ("DALI", "nvidia.dali", "nvidia-dali-cuda130"),
        ("omegaconf", "omegaconf", None),
        ("webdataset", "webdataset", None),
        ("cityscapesScripts", "cityscapesscripts", "cityscapesScripts"),
        ("wandb (optional, off here)", "wandb", None),
    ):
        rows.expect(check)
        rows.guard(check, lambda m=module, d=dist: (version_of(m, d), OK))
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows.add("CPUs", f"{os.cpu_count()} ({affinity} in this process's affinity)")


# ---------------------------------------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------------------------------------
def init_group(device: str) -> str:
    """A world-size-1 process group the way training makes it; returns how it was made."""
    import torch
    import torch.distributed as tdist

    from frrn_dist import distributed as dist

    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the collectives can still be checked; the env section says why
        name = missing_package(e)
        missing = f"{name} not installed{skipped_note(name)}" if name else f"deepspeed: {one_line(e)}"
    else:
        dist.init_distributed(device)
        return "deepspeed.init_distributed"
    # What dist.init_distributed does, minus DeepSpeed: the same environment, device and backend.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if device == "cuda":
        torch_device("cuda")
        torch.cuda.set_device(0)
        tdist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        tdist.init_process_group("gloo", rank=0, world_size=1)
    dist._DEVICE = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    return f"torch.distributed.init_process_group ({missing})"


def section_collectives(ctx, rows: Rows) -> None:
    import torch
    import torch.distributed as tdist

    from frrn_dist import distributed as dist

    checks = ["process group", "all_reduce_sum float64", "all_reduce_sum int64", "average_buffers (BatchNorm)",
              "all_gather_object", "broadcast_object", "barrier", "refuses a tensor off the device",
              "all_reduce latency"]  # fmt: skip
    if ctx.device == "cuda":
        checks.insert(8, "NCCL refuses a CPU tensor")
    rows.expect(*checks)
    how = init_group(ctx.device)
    want = "nccl" if ctx.device == "cuda" else "gloo"
    backend, world, dev = tdist.get_backend(), dist.get_world_size(), dist.compute_device()
    rows.add("process group", f"{backend} on {dev}, world size {world}, via {how}", OK if backend == want else FAILED)

    def reduce(dtype, values):
        t = torch.tensor(values, dtype=dtype, device=dev)
        out = dist.all_reduce_sum(t)
        want = torch.tensor(values, dtype=dtype, device=dev) * world  # every rank contributes the same values
        good = out is t and out.device == dev and torch.equal(out, want)
        return f"{out.tolist()} on {out.device}", OK if good else FAILED

    rows.guard("all_reduce_sum float64", lambda: reduce(torch.float64, [1.5, -2.25, 3e300]))
    rows.guard("all_reduce_sum int64", lambda: reduce(torch.int64, [2**40 + 1, -7]))

    def buffers():
        bn = torch.nn.BatchNorm2d(4).to(dev)
        bn.running_mean.copy_(torch.arange(4.0))
        bn.running_var.fill_(2.5)
        before = [b.clone() for b in bn.buffers()]
        dist.average_buffers(bn)  # the mean over ranks of identical buffers is the buffers
        good = all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))
        floats = sum(b.is_floating_point() for b in bn.buffers())
        return f"{floats} float buffers averaged on {dev}", OK if good else FAILED

    rows.guard("average_buffers (BatchNorm)", buffers)

    def gather():
        obj = {"rank": dist.get_global_rank(), "host": socket.gethostname()}
        got = dist.all_gather_object(obj)
        return f"{got}", OK if len(got) == world and got[obj["rank"]] == obj else FAILED

    def broadcast():
        got = dist.broadcast_object(str(ctx.work / "runs"))  # what setup_run broadcasts: the run folder
        return got, OK if got == str(ctx.work / "runs") else FAILED

    rows.guard("all_gather_object", gather)
    rows.guard("broadcast_object", broadcast)

    def barrier():
        dist.barrier()
        return "returned", OK

    rows.guard("barrier", barrier)

    def refuses():
        off = torch.ones(2) if dev.type == "cuda" else torch.ones(2, device="meta")
        try:
            dist.all_reduce_sum(off)
        except RuntimeError as e:
            return f"{off.device} tensor refused: {one_line(e)}", OK
        return f"a {off.device} tensor was reduced", FAILED

    rows.guard("refuses a tensor off the device", refuses)
    if ctx.device == "cuda":

        def nccl_refuses():  # the rule a 64-GPU run meets: NCCL has no CPU device
            try:
                tdist.all_reduce(torch.ones(2))
            except (RuntimeError, ValueError) as e:
                return f"raw torch.distributed.all_reduce of a CPU tensor: {one_line(e)}", OK
            return "a CPU tensor went through the NCCL group (a gloo side group?)", FAILED

        rows.guard("NCCL refuses a CPU tensor", nccl_refuses)

    def latency():
        t = torch.zeros(2, dtype=torch.float64, device=dev)
        for _ in range(10):
            dist.all_reduce_sum(t)
        sync(dev)
        start = time.perf_counter()
        for _ in range(200):
            dist.all_reduce_sum(t)
        sync(dev)
        return f"{(time.perf_counter() - start) / 200 * 1e6:.0f} us per all_reduce_sum of 2 float64", OK

    rows.guard("all_reduce latency", latency)
    tdist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# dali
# ---------------------------------------------------------------------------------------------------------------
def section_dali(ctx, rows: Rows) -> None:
    from frrn_dist.data.loaders import build_loader

    s = ctx.sizes
    (fh, fw), (ih, iw), b = s["dali_frame_hw"], s["dali_input_hw"], s["dali_batch"]
    decode = "mixed" if ctx.device == "cuda" else "cpu"
    dali_check = f"DALI device={decode!r} decode {fh}x{fw} -> {ih}x{iw}"
    torch_check = f"PIL fallback, 1 core, {fh}x{fw} -> {ih}x{iw}"
    rows.expect("synthetic JPEG shards", dali_check, torch_check)
    device = torch_device(ctx.device)
    workers = min(16, ctx.cpus)
    start = time.perf_counter()
    shards = make_shards(ctx.work / "dali", frame_hw=(fh, fw), num_train=s["dali_frames"], num_val=0, workers=workers)
    size_mb = sum(p.stat().st_size for p in shards.glob("train*")) / 1e6
    rows.add("synthetic JPEG shards", f"{s['dali_frames']} frames {fh}x{fw}, JPEG q95, {size_mb:.0f} MB, made in "
             f"{time.perf_counter() - start:.0f} s with {workers} workers")  # fmt: skip
    common = dict(recipe="paper", input_hw=(ih, iw), micro_batch_size=b, device=ctx.device, shuffle_buffer=16)

    def measure(backend: str, threads: int):
        loader = build_loader(shards, "train", backend=backend, num_threads=threads, **common)
        ips, cpu_s, batch = time_loader(loader, s["dali_epochs"] if backend == "dali" else 1, device)
        where = batch.images.device
        good = where.type == device.type and tuple(batch.images.shape[-2:]) == (ih, iw)
        value = f"{ips:.1f} images/s, {cpu_s * 1e3:.1f} CPU-ms per image (batch {b}, {threads} thread(s), on {where})"
        return value, OK if good else FAILED, {"images_per_s": ips, "cpu_s_per_image": cpu_s}

    try:
        import nvidia.dali  # noqa: F401 - the row says "not installed" without it
    except ImportError as e:
        rows.add(dali_check, f"DALI not installed{skipped_note('nvidia.dali')} ({one_line(e)}); its wheel is "
                 "~200 MB, see README", MISSING)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - installed but broken (a CUDA mismatch, say): its own FAILED row
        rows.fail(dali_check, e)
    else:
        rows.guard(dali_check, lambda: measure("dali", min(8, max(1, ctx.cpus - 1))))
    rows.guard(torch_check, lambda: measure("torch", 0))  # in-process: its CPU time is all in this process


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------
def time_steps(model, x, labels, *, warmup: int, steps: int, bf16: bool) -> float:
    """Images/s of forward + bootstrapped loss (fp32, as the loop) + backward; CUDA peak memory reset after warm-up
    (cuDNN tries its algorithms there: the steady state is what the planner predicts)."""
    import torch

    from frrn_dist.loss import bootstrapped_cross_entropy

    for i in range(warmup + steps):
        if i == warmup:
            sync(x.device)
            if x.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(x.device)
            start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        bootstrapped_cross_entropy(logits.float(), labels).backward()
    sync(x.device)
    return len(x) * steps / (time.perf_counter() - start)


def memory_vs_plan(device, plan: dict, n: int, weights_grads: int) -> tuple[str, bool, dict]:
    """Peak allocated bytes against the planner's need for n images (fixed + n x per image: what it promises
    fits), and the activation part alone against the planner's fake-tensor peak (no margin)."""
    import torch

    planned = plan["fixed_bytes"] + n * plan["bytes_per_image"]
    if device.type != "cuda":
        return f"planner {planned / GiB:.2f} GiB (no allocator peak on CPU)", True, {"planned_bytes": planned}
    used = torch.cuda.max_memory_allocated(device)
    ratio = (used - weights_grads) / (plan["step_fixed_bytes"] + n * plan["peak_bytes_per_image"])
    text = f"peak {used / GiB:.2f} GiB vs planned {planned / GiB:.2f} GiB (activations {ratio:.2f}x the plan's)"
    return text, used <= planned, {"peak_bytes": used, "planned_bytes": planned, "activation_ratio": ratio}


def section_model(ctx, rows: Rows) -> None:
    import torch

    from frrn_dist.hardware import choose_precision, dense_peak_tflops, flops_per_image
    from frrn_dist.model import FRRN, count_parameters
    from frrn_dist.plan import plan_micro_batch

    s = ctx.sizes
    (h, w), n = s["model_hw"], s["model_batch"]
    combos = [(mode, cl) for cl in (False, True) for mode in ("off", "unit")]
    name = lambda mode, cl: f"FRRN-A {h}x{w} x{n} ckpt={mode} {'NHWC' if cl else 'NCHW'}"
    rows.expect("precision", "FLOPs per image", "dense peak", "planner", *(name(m, cl) for m, cl in combos))
    device = torch_device(ctx.device)
    precision, why = choose_precision(device)  # bf16 on every GPU with bf16 tensor cores
    rows.add("precision", f"{precision} autocast: {why}", OK if precision == "bf16" or device.type == "cpu" else FAILED)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does: shapes never change
    torch.manual_seed(0)
    models = {cl: FRRN("A", channels_last=cl).to(device).train() for cl in (False, True)}
    flops = flops_per_image(models[False], (h, w))
    rows.add("FLOPs per image", f"{flops / 1e9:.1f} GFLOP forward+backward at {h}x{w} (frrn_dist.hardware, "
             "FlopCounterMode; a checkpoint's recompute not counted)")  # fmt: skip
    peak, why = dense_peak_tflops(device, precision)
    rows.add("dense peak", f"{peak:.3g} TFLOP/s {precision}: {why}" if peak else why, OK if peak else NA)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 * GiB
    plans = {m: plan_micro_batch("A", hw=(h, w), memory_bytes=memory, checkpointing=m, precision=precision)
             for m in ("off", "unit")}  # fmt: skip
    rows.add("planner", f"largest micro-batch in {memory / GiB:.1f} GiB: " +
             ", ".join(f"ckpt={m} {p['max_micro_batch_size']}" for m, p in plans.items()))  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(n, 3, h, w, device=device, generator=g)
    labels = torch.randint(0, 19, (n, h, w), device=device, generator=g)
    weights_grads = 8 * count_parameters(models[False])  # fp32 weights + grads: held besides the activations

    def one(mode: str, cl: bool):
        model = models[cl]
        model.checkpointing = mode
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ips = time_steps(model, x, labels, warmup=s["model_warmup"], steps=s["model_steps"], bf16=precision == "bf16")
        tflops = flops * ips / 1e12
        memory, fits, data = memory_vs_plan(device, plans[mode], n, weights_grads)
        data.update(images_per_s=ips, tflops=tflops, utilisation=tflops / peak if peak else None)
        util = f" = {tflops / peak:.1%} of peak" if peak else ""
        return f"{ips:.1f} img/s, {tflops:.3g} TFLOP/s{util}; {memory}", OK if fits else FAILED, data

    for mode, cl in combos:
        rows.guard(name(mode, cl), lambda m=mode, c=cl: one(m, c))


# ---------------------------------------------------------------------------------------------------------------
# loop
# ---------------------------------------------------------------------------------------------------------------
def loop_overrides(ctx, shards: Path, backend: str, max_steps: int, *extra: str) -> list[str]:
    s = ctx.sizes
    _, log_every, save_every, _ = s["loop_steps"]
    h, w = s["loop_input_hw"]
    # DALI threads, or the fallback's DataLoader workers: respawned every epoch, seconds each on 2 busy CPU cores
    threads = max(1, min(4, ctx.cpus - 1)) if ctx.device == "cuda" else int(backend == "dali")
    return [
        f"data.shard_dir={shards}", f"data.input_hw=[{h},{w}]", f"data.backend={backend}",
        f"data.translate_px={h // 8}", f"data.num_threads={threads}", "data.shuffle_buffer=16",
        f"train.micro_batch_size={s['loop_batch']}", f"train.max_steps={max_steps}",
        f"train.log_every_steps={log_every}", f"train.save_every_steps={save_every}", "train.eval_every_steps=0",
        f"train.precision={s['loop_precision']}", "model.checkpointing=unit",
        f"model.channels_last={ctx.device == 'cuda'}", "optim.schedule=constant", "wandb.enabled=false",
        f"run.device={ctx.device}", f"run.out_dir={ctx.work / 'runs'}", "run.name=loop", *extra,
    ]  # fmt: skip


def section_loop(ctx, rows: Rows) -> None:
    import logging

    s = ctx.sizes
    steps, _, save_every, resume_steps = s["loop_steps"]
    main_check = f"train.main {steps} steps"
    rows.expect(main_check, "host syncs on ordinary micro-steps", "save", "resume", "evaluation")
    import deepspeed  # noqa: F401 - both needed by train.main: the rows say "not installed" without them
    import omegaconf  # noqa: F401

    from frrn_dist import distributed as dist
    from frrn_dist import train
    from frrn_dist.checkpoints import latest_tag
    from frrn_dist.config import load_config
    from frrn_dist.tracking import read_metrics

    torch_device(ctx.device)
    try:
        import nvidia.dali  # noqa: F401

        backend = "dali"
    except Exception:  # noqa: BLE001 - missing or broken: the dali section's row says which; the loop goes on
        backend = "torch"
    num_train, num_val = s["loop_frames"]
    shards = make_shards(ctx.work / "loop", frame_hw=s["loop_frame_hw"], num_train=num_train, num_val=num_val,
                         workers=min(8, ctx.cpus))  # fmt: skip
    dist.setup_logging()  # train.main's own handler first, then ours beside it to read "resumed from"
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("frrn_dist").addHandler(handler)
    run_dir = ctx.work / "runs/loop"

    start = time.perf_counter()
    first = train.main(load_config(None, loop_overrides(ctx, shards, backend, steps, "train.count_host_syncs=true")))
    # the last logged images/s (its key is "perf/images_per_s" now, "images_per_s" before)
    speed = [
        v for r in read_metrics(run_dir) if r["kind"] == "train" for k, v in r.items() if k.endswith("images_per_s")
    ]
    speed = speed or [math.nan]
    rows.add(
        main_check,
        f"{time.perf_counter() - start:.0f} s, {backend} loader, {s['loop_precision']}, "
        f"{s['loop_input_hw'][0]}x{s['loop_input_hw'][1]} x{s['loop_batch']}, last {speed[-1]:.1f} images/s",
    )
    ranks = json.loads((run_dir / "host_syncs.json").read_text())
    syncs, micro = sum(r["host_syncs"] for r in ranks), sum(r["micro_steps"] for r in ranks)
    first_stack = next((r["first"] for r in ranks if r["first"]), "")
    rows.add("host syncs on ordinary micro-steps",
             f"{syncs} in {micro} micro-steps" + (f"; first: {first_stack.splitlines()[0]}" if syncs else ""),
             OK if syncs == 0 and micro > 0 else FAILED, first_stack=first_stack)  # fmt: skip
    ckpts = run_dir / "checkpoints"
    tags = [f"step{save_every:08d}", f"step{steps:08d}"]
    whole = all((ckpts / t / "model.safetensors").is_file() for t in tags)
    rows.add("save", f"{', '.join(tags)} written, latest = {latest_tag(ckpts)}",
             OK if whole and latest_tag(ckpts) == tags[-1] else FAILED)  # fmt: skip

    said.clear()
    second = train.main(load_config(None, loop_overrides(ctx, shards, backend, resume_steps)))
    resumed = [m for m in said if m.startswith("resumed from")]
    good = bool(resumed) and f"at step {steps}," in resumed[0] and latest_tag(ckpts) == f"step{resume_steps:08d}"
    rows.add("resume", f"{resumed[0] if resumed else 'no resume'}; continued to {latest_tag(ckpts)}",
             OK if good else FAILED)  # fmt: skip
    results = second or first
    miou, loss = results.get("miou", math.nan), results.get("loss", math.nan)
    good = 0 <= miou <= 1 and math.isfinite(loss) and results.get("images") == num_val
    rows.add("evaluation", f"val mIoU {miou:.3f}, loss {loss:.3f} on {results.get('images')} of {num_val} images "
             f"(after {first.get('miou', math.nan):.3f} at step {steps})", OK if good else FAILED)  # fmt: skip


def run_child(args) -> int:
    """Child mode: run one section, its rows written to --rows as they come."""
    block_skipped_packages()
    ctx = SimpleNamespace(
        device=args.device,
        work=Path(args.work),
        sizes=SIZES[args.device],
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    )
    rows = Rows(Path(args.rows), args.child)
    try:
        globals()[f"section_{args.child}"](ctx, rows)
    except BaseException as e:  # noqa: BLE001 - every check this section still owed gets this one line
        rows.rest(e)
        if not rows.expected:
            rows.fail("(section)", e)
        print(f"gpu-check: section {args.child}: {one_line(e)}", file=sys.stderr)
        import traceback

        traceback.print_exc()
    return 0
